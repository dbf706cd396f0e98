"""The baseline of the HTTP benchmark: a no-op endpoint served in-process by the same
HTTP server library and settings as API nodes (uvicorn, httptools, uvloop).

    python -m bench.api_inproc PORT [asgi|starlette]
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

BODY = b'{"result":{"prediction":1},"generation":"v1"}'
HEADERS = [(b"content-type", b"application/json")]


async def asgi(scope: Any, receive: Any, send: Any) -> None:
    """The bare ASGI callable: what the API node's own HTTP app is built as."""
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def predict(request: Request) -> Response:
        await request.body()
        return Response(BODY, media_type="application/json")

    return Starlette(routes=[Route("/public/api/v1/{service}/{endpoint}/predict", predict,
                                   methods=["POST"])])


def main() -> None:
    port = int(sys.argv[1])
    app = starlette_app() if sys.argv[2:] == ["starlette"] else asgi
    print("READY", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                lifespan="off", access_log=False, log_level="warning", server_header=False)


if __name__ == "__main__":
    main()
