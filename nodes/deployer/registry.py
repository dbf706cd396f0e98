"""The node registry: liveness from heartbeats, persisted in a KV bucket.

Pure state and rules here; ``nodes.deployer.node`` wires it to NATS.

* A heartbeat makes a node ``online`` (event ``node.online``: first seen, resumed after
  being lost, or restarted with a new pid).
* A node silent for more than ``LOST_AFTER`` of its own intervals becomes ``lost``
  (event ``node.lost``).
* Records are written to KV on every transition and state change, not on every beat;
  a restarted Deployer loads them and gives every node a fresh grace period before
  judging it, so a Deployer restart never declares a healthy fleet lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol.events import NodeEvent, NodeLost, NodeOnline
from protocol.heartbeat import Heartbeat
from protocol.registry import LOST, ONLINE, NodeInfo

LOST_AFTER = 3.0  # missed intervals


@dataclass
class Record:
    info: NodeInfo
    # Wall-clock time liveness is judged from: last beat, or the registry's own start
    # for records loaded from KV (grace period after a Deployer restart).
    judge_from: float
    seq: int = 0
    dirty: bool = True
    instance: str = ""
    # The process that reported its exit: beats still in flight from it are ignored.
    exited: tuple[int, str] | None = None


@dataclass
class Registry:
    nodes: dict[str, Record] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def load(self, infos: list[NodeInfo]) -> None:
        for info in infos:
            self.nodes[info.name] = Record(
                info=info, judge_from=max(info.last_seen, self.started_at), dirty=False)

    def on_heartbeat(self, hb: Heartbeat, now: float | None = None) -> NodeEvent | None:
        """Record a beat; return the ``node.online`` event if this is a transition."""
        now = time.time() if now is None else now
        rec = self.nodes.get(hb.node)
        event: NodeEvent | None = None
        if rec is not None and rec.exited is not None and rec.info.host == hb.host:
            pid, instance = rec.exited
            if hb.pid == pid and (not instance or hb.instance == instance):
                return None
        if rec is None:
            reason = "first_seen"
        elif rec.info.status == LOST:
            reason = "resumed"
        elif (rec.info.pid != hb.pid or rec.info.host != hb.host or hb.seq < rec.seq
              or (rec.instance and hb.instance != rec.instance)):
            reason = "restarted"
        else:
            reason = ""
        if reason:
            event = NodeOnline(node=hb.node, role=hb.role, infra=hb.infra, host=hb.host,
                               pid=hb.pid, reason=reason, ts=now)
        first_seen = now if rec is None or reason == "restarted" else rec.info.first_seen
        changed = (
            rec is None or bool(reason) or rec.info.state != hb.state
            or rec.info.infra != hb.infra or rec.info.role != hb.role
            or rec.info.version != hb.version
        )
        info = NodeInfo(
            name=hb.node, role=hb.role, infra=hb.infra, status=ONLINE, last_seen=now,
            first_seen=first_seen, version=hb.version, host=hb.host, pid=hb.pid,
            uptime_s=hb.uptime_s, interval_s=hb.interval_s, state=hb.state,
        )
        self.nodes[hb.node] = Record(info=info, judge_from=now, seq=hb.seq,
                                     dirty=changed or (rec is not None and rec.dirty),
                                     instance=hb.instance)
        return event

    def sweep(self, now: float | None = None) -> list[NodeEvent]:
        """Mark silent nodes lost; return the ``node.lost`` events."""
        now = time.time() if now is None else now
        events: list[NodeEvent] = []
        for rec in self.nodes.values():
            info = rec.info
            if info.status != ONLINE:
                continue
            silent = now - rec.judge_from
            if silent > LOST_AFTER * info.interval_s:
                rec.info = msgspec.structs.replace(info, status=LOST)
                rec.dirty = True
                events.append(NodeLost(node=info.name, role=info.role, infra=info.infra,
                                       last_seen=info.last_seen,
                                       silent_s=round(now - info.last_seen, 3), ts=now))
        return events

    def on_exit(self, node: str, pid: int, reason: str, instance: str = "",
                now: float | None = None) -> NodeEvent | None:
        """A node's process ended: mark it lost at once (if that process is current)."""
        now = time.time() if now is None else now
        rec = self.nodes.get(node)
        if rec is None or rec.info.status != ONLINE or rec.info.pid != pid:
            return None
        if instance and rec.instance and instance != rec.instance:
            return None
        info = rec.info
        rec.info = msgspec.structs.replace(info, status=LOST)
        rec.dirty = True
        rec.exited = (pid, instance)
        return NodeLost(node=info.name, role=info.role, infra=info.infra,
                        last_seen=info.last_seen, silent_s=round(now - info.last_seen, 3),
                        reason=reason, ts=now)

    def take_dirty(self) -> list[NodeInfo]:
        out = []
        for rec in self.nodes.values():
            if rec.dirty:
                rec.dirty = False
                out.append(rec.info)
        return out

    def mark_dirty(self, name: str) -> None:
        if name in self.nodes:
            self.nodes[name].dirty = True

    def query(self, *, role: str | None = None, infra: str | None = None,
             status: str | None = None, now: float | None = None) -> list[NodeInfo]:
        now = time.time() if now is None else now
        out = []
        for rec in sorted(self.nodes.values(), key=lambda r: (r.info.role, r.info.name)):
            info = rec.info
            if (role and info.role != role) or (infra and info.infra != infra) or (
                    status and info.status != status):
                continue
            out.append(msgspec.structs.replace(
                info, last_seen_s=round(max(0.0, now - info.last_seen), 3)))
        return out

    def get(self, name: str) -> NodeInfo | None:
        rec = self.nodes.get(name)
        return rec.info if rec else None

    def online(self, *, role: str | None = None, infra: str | None = None) -> list[NodeInfo]:
        return self.query(role=role, infra=infra, status=ONLINE)


def state_of(info: NodeInfo, key: str) -> Any:
    return info.state.get(key)
