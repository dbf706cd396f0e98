"""Heartbeats: every node, every ``interval_s`` seconds, on ``sy.hb.<role>.<node>``."""

from __future__ import annotations

from typing import Any

from protocol.base import Codec, Message


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    """A node's liveness and state.

    ``state`` is role specific (for example, the bundles an Automation node runs).
    ``interval_s`` lets the registry judge liveness per node: lost after 3 missed beats.
    ``seq`` counts beats since the process started; a reset means a restart.
    """

    node: str
    role: str
    infra: str
    version: str
    host: str
    pid: int
    uptime_s: float
    interval_s: float
    seq: int = 0
    ts: float = 0.0
    instance: str = ""  # unique per node object: tells a restart even with the same pid
    state: dict[str, Any] = {}


HEARTBEAT = Codec[Heartbeat](Heartbeat)
