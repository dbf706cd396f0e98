"""A test-only role ("probe") with handlers that sleep or raise, to exercise the runtime."""

from __future__ import annotations

from typing import Any, ClassVar

import anyio

from nodes.runtime.node import Node, handles
from protocol.base import Command, Family, Message, Request
from protocol.errors import NotFound


class Done(Message, frozen=True, kw_only=True, tag="done"):
    label: str


class Work(Command[Done], frozen=True, kw_only=True, tag="work"):
    label: str
    seconds: float = 0.0


class Boom(Command[Done], frozen=True, kw_only=True, tag="boom"):
    typed: bool = False


class Unhandled(Command[Done], frozen=True, kw_only=True, tag="unhandled"):
    pass


class Steps(Command[Done], frozen=True, kw_only=True, tag="steps"):
    """Tell the requester ``count`` steps of progress, each body of ``raw`` first."""

    count: int
    raw: list[str] = []


PROBE = Family("probe", Work | Boom | Unhandled | Steps, Done)


class ProbeNode(Node):
    role: ClassVar[str] = "probe"
    family: ClassVar[Family | None] = PROBE

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.started_work: list[str] = []
        self.finished_work: list[str] = []

    @handles(Work)
    async def work(self, cmd: Work, req: Request[Any]) -> Done:
        self.started_work.append(cmd.label)
        await anyio.sleep(cmd.seconds)
        self.finished_work.append(cmd.label)
        return Done(label=cmd.label)

    @handles(Boom)
    async def boom(self, cmd: Boom, req: Request[Any]) -> Done:
        if cmd.typed:
            raise NotFound("no such thing: widget-7")
        raise ZeroDivisionError("division by zero in handler")

    @handles(Steps)
    async def steps(self, cmd: Steps, req: Request[Any]) -> Done:
        notices = self.progress(req)
        for body in cmd.raw:
            await self.nc.publish(notices.subject, body.encode())
        for i in range(1, cmd.count + 1):
            await notices("stepping", i, cmd.count, "files")
        return Done(label=f"{notices.sent} sent")
