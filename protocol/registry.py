"""The Deployer's node registry: commands and replies on ``sy.cmd.deployer.nodes.*``."""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import subjects
from protocol.base import Command, Message

ONLINE = "online"
LOST = "lost"


def registry_key(node: str) -> str:
    """KV key of a node's record (``NodeInfo``) in ``sy_registry``: its name."""
    return subjects.token(node, "node name")


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One node as the registry last saw it.  Also the value in the registry KV bucket."""

    name: str
    role: str
    infra: str
    status: str
    last_seen: float
    first_seen: float
    version: str
    host: str
    pid: int
    uptime_s: float
    interval_s: float
    state: dict[str, Any] = {}
    last_seen_s: float = 0.0


class NodeList(Message, frozen=True, kw_only=True, tag="nodes"):
    nodes: list[NodeInfo] = []


class ListNodes(Command[NodeList], frozen=True, kw_only=True, tag="nodes.list"):
    """All known nodes, optionally filtered by role, infra or status."""

    role: str | None = None
    infra: str | None = None
    status: str | None = None


REGISTRY_VALUE = msgspec.json.Decoder(NodeInfo)
