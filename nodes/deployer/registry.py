"""The node registry: liveness (when a silent node is judged lost) from heartbeats, kept in KV.

Pure state and rules here; ``nodes.deployer.node`` wires it to NATS.

* A heartbeat makes a node ``online`` (event ``node.online``: first seen, resumed after
  being lost, or restarted with a new pid).
* A node silent for more than ``LOST_AFTER`` of its own intervals becomes ``lost``
  (event ``node.lost``).  Silence is measured on a monotonic clock (``clock``), so a
  wall-clock step (NTP, a suspended VM) never marks a fleet lost; wall time (``wall``)
  is kept for display only.  Both clocks are injectable, for tests.
* An exit report marks a node lost at once.  Beats from that same process are then
  ignored, in case they were in flight, but only for ``EXIT_LATE_BEATS`` beats: a process
  that keeps beating is alive whatever a (possibly forged) report said, and comes back.
* A node lost for ``forget_after`` seconds is forgotten (event ``node.forgotten``), and
  ``forget`` removes one on request; removed names are handed to the KV writer.
* Records are written to KV on every transition and state change, not on every beat;
  a restarted Deployer loads them and gives every node a fresh grace period before
  judging it, so a Deployer restart never declares a healthy fleet lost.  A Deployer
  that was itself stopped for a while (its sweep comes late) does the same (``grace``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from protocol.events import NodeEvent, NodeForgotten, NodeLost, NodeOnline
from protocol.heartbeat import MAX_INTERVAL_S, MIN_INTERVAL_S, Heartbeat
from protocol.registry import LOST, ONLINE, NodeInfo

LOST_AFTER = 3.0  # missed intervals
EXIT_LATE_BEATS = 1  # beats after an exit report still taken as in flight
FORGET_AFTER_S = 24 * 3600.0  # default: lost nodes are kept a day
MAX_NODES = 10_000  # beyond this, beats from unknown nodes are refused (memory is bounded)


@dataclass
class Record:
    info: NodeInfo
    # Monotonic time liveness is judged from: the last beat, or the registry's load time
    # for records read from KV (grace period after a Deployer restart).
    judge_from: float
    seq: int = 0
    dirty: bool = True
    instance: str = ""
    # Monotonic time of the last beat this registry saw (None: loaded, not seen since).
    beat_at: float | None = None
    # Monotonic time the node became lost (None while online).
    lost_at: float | None = None
    # The process that reported its exit, and the last seq seen from it then.
    exited: tuple[int, str, int] | None = None


def _clamp(interval: float) -> float:
    return min(max(interval, MIN_INTERVAL_S), MAX_INTERVAL_S)


@dataclass
class Registry:
    nodes: dict[str, Record] = field(default_factory=dict)
    forget_after: float | None = FORGET_AFTER_S  # None: lost nodes are kept
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    removed: set[str] = field(default_factory=set)  # forgotten, not yet deleted from KV
    max_nodes: int = MAX_NODES

    def admits(self, name: str) -> bool:
        """Whether a beat from ``name`` may be recorded: known, or room for one more."""
        return name in self.nodes or len(self.nodes) < self.max_nodes

    def load(self, infos: list[NodeInfo]) -> None:
        """Records read back from KV (validated by the caller)."""
        now, wall = self.clock(), self.wall()
        for info in infos:
            info = msgspec.structs.replace(info, interval_s=_clamp(info.interval_s))
            lost_at = None
            if info.status != ONLINE:
                # Across a restart only wall time links the two processes.
                lost_at = now - min(max(0.0, wall - info.last_seen), self.forget_after or 0)
            self.nodes[info.name] = Record(info=info, judge_from=now, dirty=False,
                                           lost_at=lost_at)

    def on_heartbeat(self, hb: Heartbeat) -> NodeEvent | None:
        """Record a (validated) beat; return the ``node.online`` event of a transition."""
        now, wall = self.clock(), self.wall()
        rec = self.nodes.get(hb.node)
        if rec is not None and self._steady(rec, hb):
            # The common case (the same process beating again, nothing changed): the
            # record is updated in place; half the cost of building a new one.
            rec.info = msgspec.structs.replace(
                rec.info, last_seen=wall, uptime_s=hb.uptime_s,
                interval_s=_clamp(hb.interval_s), dropped=hb.dropped, cpu_s=hb.cpu_s,
                rss_bytes=hb.rss_bytes, cpu_pct=_cpu_pct(rec.info, hb))
            rec.judge_from = rec.beat_at = now
            rec.seq, rec.instance = hb.seq, hb.instance
            return None
        event: NodeEvent | None = None
        if rec is not None and rec.exited is not None and rec.info.host == hb.host:
            pid, instance, seq = rec.exited
            if hb.pid == pid and (not instance or hb.instance == instance) \
                    and hb.seq <= seq + EXIT_LATE_BEATS:
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
                               pid=hb.pid, reason=reason, ts=wall)
        first_seen = wall if rec is None or reason == "restarted" else rec.info.first_seen
        changed = (
            rec is None or bool(reason) or rec.info.state != hb.state
            or rec.info.infra != hb.infra or rec.info.role != hb.role
            or rec.info.version != hb.version
        )
        info = NodeInfo(
            name=hb.node, role=hb.role, infra=hb.infra, status=ONLINE, last_seen=wall,
            first_seen=first_seen, version=hb.version, host=hb.host, pid=hb.pid,
            uptime_s=hb.uptime_s, interval_s=_clamp(hb.interval_s), state=hb.state,
            dropped=hb.dropped, cpu_s=hb.cpu_s, rss_bytes=hb.rss_bytes,
            cpu_pct=_cpu_pct(rec.info, hb) if rec is not None and not reason else None,
        )
        self.nodes[hb.node] = Record(info=info, judge_from=now, seq=hb.seq,
                                     dirty=changed or (rec is not None and rec.dirty),
                                     instance=hb.instance, beat_at=now)
        self.removed.discard(hb.node)
        return event

    @staticmethod
    def _steady(rec: Record, hb: Heartbeat) -> bool:
        """Whether ``hb`` is the next beat of the process ``rec`` holds, online, with
        nothing a record write, an event or an exit check would care about."""
        info = rec.info
        return (rec.exited is None and info.status == ONLINE and info.pid == hb.pid
                and info.host == hb.host and hb.seq >= rec.seq
                and (not rec.instance or hb.instance == rec.instance)
                and info.role == hb.role and info.infra == hb.infra
                and info.version == hb.version and info.state == hb.state)

    def _silent_s(self, rec: Record, now: float, wall: float) -> float:
        if rec.beat_at is not None:
            return round(max(0.0, now - rec.beat_at), 3)
        return round(max(0.0, wall - rec.info.last_seen), 3)

    def grace(self) -> None:
        """Judge every online node from now on, as after a restart: the Deployer itself
        was stopped for a while (a paused process, a stalled VM), so the beats sent
        meanwhile may be waiting, unread, in its connection."""
        now = self.clock()
        for rec in self.nodes.values():
            if rec.info.status == ONLINE:
                rec.judge_from = max(rec.judge_from, now)

    def sweep(self) -> list[NodeEvent]:
        """Mark silent nodes lost and forget long-lost ones; return their events."""
        now, wall = self.clock(), self.wall()
        events: list[NodeEvent] = []
        for rec in list(self.nodes.values()):
            info = rec.info
            if info.status == ONLINE:
                if now - rec.judge_from > LOST_AFTER * info.interval_s:
                    rec.info = msgspec.structs.replace(info, status=LOST)
                    rec.dirty = True
                    rec.lost_at = now
                    events.append(NodeLost(node=info.name, role=info.role, infra=info.infra,
                                           last_seen=info.last_seen,
                                           silent_s=self._silent_s(rec, now, wall), ts=wall))
            elif self.forget_after is not None and rec.lost_at is not None \
                    and now - rec.lost_at >= self.forget_after:
                events.append(self.forget(
                    info.name, reason=f"lost for more than {self.forget_after:g}s"))
        return events

    def on_exit(self, node: str, pid: int, reason: str, instance: str = "") -> NodeEvent | None:
        """A node's process ended: mark it lost at once (if that process is current)."""
        now, wall = self.clock(), self.wall()
        rec = self.nodes.get(node)
        if rec is None or rec.info.status != ONLINE or rec.info.pid != pid:
            return None
        if instance and rec.instance and instance != rec.instance:
            return None
        info = rec.info
        rec.info = msgspec.structs.replace(info, status=LOST)
        rec.dirty = True
        rec.lost_at = now
        rec.exited = (pid, instance, rec.seq)
        return NodeLost(node=info.name, role=info.role, infra=info.infra,
                        last_seen=info.last_seen, silent_s=self._silent_s(rec, now, wall),
                        reason=reason, ts=wall)

    def forget(self, name: str, *, reason: str, by: str = "") -> NodeForgotten:
        """Remove ``name`` (which must be known); its KV record is deleted by the writer.
        Raises ``KeyError`` for an unknown name."""
        rec = self.nodes.pop(name)
        self.removed.add(name)
        info = rec.info
        return NodeForgotten(node=name, role=info.role, infra=info.infra,
                             last_seen=info.last_seen, reason=reason, by=by, ts=self.wall())

    def take_removed(self) -> list[str]:
        out = sorted(self.removed)
        self.removed.clear()
        return out

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
              status: str | None = None) -> list[NodeInfo]:
        now, wall = self.clock(), self.wall()
        out = []
        for rec in sorted(self.nodes.values(), key=lambda r: (r.info.role, r.info.name)):
            info = rec.info
            if (role and info.role != role) or (infra and info.infra != infra) or (
                    status and info.status != status):
                continue
            out.append(msgspec.structs.replace(
                info, last_seen_s=self._silent_s(rec, now, wall)))
        return out

    def get(self, name: str) -> NodeInfo | None:
        rec = self.nodes.get(name)
        return rec.info if rec else None

    def online(self, *, role: str | None = None, infra: str | None = None) -> list[NodeInfo]:
        return self.query(role=role, infra=infra, status=ONLINE)


def _cpu_pct(prev: NodeInfo, hb: Heartbeat) -> float | None:
    """The process's CPU share between two beats of it (% of one core), from the CPU
    seconds and uptime each beat carries; None when they cannot say (a first beat, an
    older node sending no CPU time, a clock that did not move)."""
    elapsed = hb.uptime_s - prev.uptime_s
    used = hb.cpu_s - prev.cpu_s
    if elapsed <= 0 or used < 0 or not hb.cpu_s:
        return prev.cpu_pct if elapsed == 0 else None
    return round(100.0 * used / elapsed, 1)
