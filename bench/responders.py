"""Responder processes for the echo benchmark: raw nats-py, and the node runtime.

    python -m bench.responders raw URL SUBJECT [CREDS]
    python -m bench.responders node URL NAME [CREDS]

With ``CREDS`` (a shipyard credentials file) the responder connects as that identity.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import anyio
import nats

from nodes.runtime import natscompat
from nodes.runtime.node import Node, handles
from nodes.runtime.settings import NatsSettings
from protocol.base import Command, Family, Message, Request


class Echoed(Message, frozen=True, kw_only=True, tag="bench.echoed"):
    payload: str


class BenchEcho(Command[Echoed], frozen=True, kw_only=True, tag="echo"):
    payload: str


BENCH = Family("bench", BenchEcho, Echoed)


class BenchNode(Node):
    """A role whose one handler echoes: the runtime's full request path, nothing else."""

    role: ClassVar[str] = "bench"
    family: ClassVar[Family | None] = BENCH

    @handles(BenchEcho)
    async def echo(self, cmd: BenchEcho, req: Request[Any]) -> Echoed:
        return Echoed(payload=cmd.payload)


async def raw(url: str, subject: str, creds: str | None = None) -> None:
    nc = await nats.connect(url, **NatsSettings(servers=(url,), creds_file=creds)
                            .connect_options())

    async def on_msg(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, queue="bench", cb=on_msg)
    await natscompat.flush(nc)
    print("READY", flush=True)
    await anyio.sleep_forever()


async def node(url: str, name: str, creds: str | None = None) -> None:
    n = BenchNode(name=name, nats=NatsSettings(servers=(url,), creds_file=creds),
                  heartbeat_interval=2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(n.serve)
        print("READY", flush=True)


def main() -> None:
    kind, url, arg = sys.argv[1:4]
    creds = sys.argv[4] if len(sys.argv) > 4 else None
    from nodes.runtime.logs import configure_logging
    configure_logging("warning", json=True)
    fn = raw if kind == "raw" else node
    anyio.run(fn, url, arg, creds, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
