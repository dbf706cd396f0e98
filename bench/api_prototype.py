"""The reference prototype of the HTTP benchmark: uvicorn + Starlette + nats-py, an HTTP
request turned into a NATS request to a bare echo responder, nothing else.

    python -m bench.api_prototype NATS_URL echo
    python -m bench.api_prototype NATS_URL PORT

It is the "bare HTTP -> NATS -> echo" design the API node's targets were set against
(~0.49x the in-process throughput, ~0.26 ms added): measuring it in the same run shows
which in-process baseline that ratio refers to, and what the API node adds on top.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nodes.runtime import natscompat

SUBJECT = "bench.prototype.echo"


async def echo(url: str) -> None:
    nc = await nats.connect(url)

    async def respond(msg: Any) -> None:
        await msg.respond(b'{"result":{"prediction":1},"generation":"v1"}')

    await nc.subscribe(SUBJECT, queue="q", cb=respond)
    await natscompat.flush(nc)
    print("READY", flush=True)
    await asyncio.Event().wait()


def http(url: str, port: int) -> None:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["nc"] = await nats.connect(url)
        print("READY", flush=True)
        yield

    async def predict(request: Request) -> Response:
        body = await request.body()
        msg = await state["nc"].request(SUBJECT, body, timeout=5)
        return Response(msg.data, media_type="application/json")

    app = Starlette(routes=[Route("/public/api/v1/{service}/{endpoint}/predict", predict,
                                  methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                lifespan="on", access_log=False, log_level="warning", server_header=False)


def main() -> None:
    url, what = sys.argv[1], sys.argv[2]
    if what == "echo":
        import uvloop
        uvloop.run(echo(url))
    else:
        http(url, int(what))


if __name__ == "__main__":
    main()
