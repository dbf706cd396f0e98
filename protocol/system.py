"""Commands every node answers on ``sy.node.<node>.<verb>``: liveness and echo."""

from __future__ import annotations

from protocol.base import Command, Family, Message


class Pong(Message, frozen=True, kw_only=True, tag="pong"):
    node: str
    role: str
    version: str
    uptime_s: float


class Echoed(Message, frozen=True, kw_only=True, tag="echoed"):
    payload: str


class Ping(Command[Pong], frozen=True, kw_only=True, tag="ping"):
    pass


class Echo(Command[Echoed], frozen=True, kw_only=True, tag="echo"):
    """Returns ``payload``; the runtime benchmark measures the handler path with it."""

    payload: str = ""


SYSTEM = Family("node", Ping | Echo, Pong | Echoed, direct=True)
