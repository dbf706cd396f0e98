"""The Deployer's node registry: commands and replies on ``sy.cmd.deployer.nodes.*``."""

from __future__ import annotations

import msgspec

from protocol import checks, subjects
from protocol.base import Command, Message
from protocol.errors import InvalidMessage
from protocol.state import NoState, RoleState, StatedCodec

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
    state: RoleState = NoState()  # as its last heartbeat carried it
    last_seen_s: float = 0.0
    dropped: int = 0  # inbound messages the node dropped as malformed (its last beat)
    cpu_s: float = 0.0  # the process's CPU seconds and memory, as its last beat said
    rss_bytes: int = 0
    cpu_pct: float | None = None  # CPU share (% of one core) between its last two beats

    def validate(self, key: str) -> None:
        """Raise ``InvalidMessage`` unless this record's names are valid and its name is
        ``key`` (a record read back from KV must not bring in what a heartbeat could not)."""
        checks.name(self.name, "node name")
        checks.name(self.role, "role")
        checks.name(self.infra, "infra name")
        if key != registry_key(self.name):
            raise InvalidMessage(f"record of node {self.name!r} is stored under key "
                                 f"{key!r}: expected {registry_key(self.name)!r}")
        self.state.belongs_to(self.role)
        self.state.validate()


class NodeList(Message, frozen=True, kw_only=True, tag="nodes"):
    nodes: list[NodeInfo] = []


class ListNodes(Command[NodeList], frozen=True, kw_only=True, tag="nodes.list"):
    """All known nodes, optionally filtered by role, infra or status."""

    role: str | None = None
    infra: str | None = None
    status: str | None = None


class ForgottenNode(Message, frozen=True, kw_only=True, tag="nodes.forget.reply"):
    node: NodeInfo


class ForgetNode(Command[ForgottenNode], frozen=True, kw_only=True, tag="nodes.forget"):
    """Remove ``name`` from the registry and its KV record.  An online node is refused
    (``conflict``) unless ``force``: it would come back with its next heartbeat."""

    name: str
    force: bool = False
    by: str = ""


# Records stored by the previous release carry an untagged state: see protocol.state.
REGISTRY_VALUE = StatedCodec[NodeInfo](NodeInfo)
