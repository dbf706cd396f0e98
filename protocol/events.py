"""Events: what happened, kept in the SY_EVENTS stream under ``sy.evt.>``.

This module has the base class and the node events; each area defines its own events
beside its commands, and ``protocol.stream`` gathers them into the one union readers
decode with.

Every event has an ``id`` (also sent as ``Nats-Msg-Id``, so a retried publish is stored
once) and a wall-clock ``ts``.  ``subject()`` says where it is published and
``summary()`` is the one line ``shipyard events`` prints.
"""

from __future__ import annotations

import time

import msgspec

from protocol import subjects
from protocol.base import Message, new_id


class Event(Message, frozen=True, kw_only=True):
    id: str = msgspec.field(default_factory=new_id)
    ts: float = msgspec.field(default_factory=time.time)

    def subject(self) -> str:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def summary(self) -> str:  # pragma: no cover - every kind overrides it
        raise NotImplementedError


class NodeOnline(Event, frozen=True, kw_only=True, tag="node.online"):
    """A node's heartbeats started (``first_seen``), resumed after it was lost
    (``resumed``), or came from a new process of the same node (``restarted``)."""

    node: str
    role: str
    infra: str
    host: str
    pid: int
    reason: str = "first_seen"

    def subject(self) -> str:
        return subjects.node_event(self.node)

    def summary(self) -> str:
        return (f"node {self.node} ({self.role}, infra {self.infra}) online: {self.reason}"
                f" [{self.host} pid {self.pid}]")


class NodeLost(Event, frozen=True, kw_only=True, tag="node.lost"):
    """No heartbeat from ``node`` for ``silent_s`` seconds (3 of its intervals), or its
    process ended (``reason`` says how)."""

    node: str
    role: str
    infra: str
    last_seen: float
    silent_s: float
    reason: str = ""

    def subject(self) -> str:
        return subjects.node_event(self.node)

    def summary(self) -> str:
        why = self.reason or f"no heartbeat for {self.silent_s:.1f}s"
        return f"node {self.node} ({self.role}, infra {self.infra}) lost: {why}"


class NodeForgotten(Event, frozen=True, kw_only=True, tag="node.forgotten"):
    """``node`` was removed from the registry: lost for longer than the Deployer keeps
    lost nodes, or forgotten on request (``by`` says who)."""

    node: str
    role: str
    infra: str
    last_seen: float
    reason: str
    by: str = ""

    def subject(self) -> str:
        return subjects.node_event(self.node)

    def summary(self) -> str:
        who = f" by {self.by}" if self.by else ""
        return f"node {self.node} ({self.role}, infra {self.infra}) forgotten{who}: {self.reason}"


class ApiScaled(Event, frozen=True, kw_only=True, tag="api.scaled"):
    """API node ``node`` changed its worker processes from ``from_workers`` to
    ``to_workers`` (within ``min_workers``..``max_workers``) because of ``reason`` (the
    load or latency it measured, or a quiet period)."""

    node: str
    infra: str
    from_workers: int
    to_workers: int
    min_workers: int
    max_workers: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.to_workers > self.from_workers else "down"

    def subject(self) -> str:
        return subjects.event("api", self.infra, self.node, "scaled")

    def summary(self) -> str:
        return (f"{self.node} scaled {self.direction} from {self.from_workers} to "
                f"{self.to_workers} workers ({self.min_workers}..{self.max_workers}): "
                f"{self.reason}")


NodeEvent = NodeOnline | NodeLost | NodeForgotten


class HealthChanged(Event, frozen=True, kw_only=True, tag="health.changed"):
    """The health of a deployment (``about`` ``deployment``, ``kind`` bundle or api,
    ``name`` its project or service) or of an infra (``about`` and ``kind`` ``infra``,
    ``name`` the infra) went from ``previous`` to ``health``, for ``reasons``.  Published by the
    Deployer on ``sy.evt.health.<infra>`` (an infra) or
    ``sy.evt.health.<infra>.<kind>.<name>`` (a deployment)."""

    infra: str
    about: str
    kind: str
    name: str
    health: str
    previous: str
    reasons: list[str] = []

    def subject(self) -> str:
        if self.about == "infra":
            return subjects.event("health", self.infra)
        return subjects.event("health", self.infra, self.kind, self.name)

    def summary(self) -> str:
        what = f"infra {self.name}" if self.about == "infra" else \
            f"{self.kind} {self.name} on {self.infra}"
        why = f": {'; '.join(self.reasons)}" if self.reasons else ""
        return f"{what} health {self.previous} -> {self.health}{why}"
