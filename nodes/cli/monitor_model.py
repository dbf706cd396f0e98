"""What ``shipyard monitor`` shows, as a pure state model: no NATS, no terminal.

The live feed (heartbeats, API metrics reports, events) and the Deployer's answers (nodes,
deployments, runs) are handed to ``MonitorModel``; ``snapshot()`` turns them into plain
rows that the terminal view, the plain-text view and ``--json`` all print.  Time comes
from injectable clocks (``clock`` monotonic, for ages and rates; ``wall`` for display
and for the feed lag), so tests drive it without sleeping.

Liveness is judged here as the registry judges it (silent for 3 of its own intervals:
lost), from the beats this viewer saw, so the view stays right while the Deployer is
down; a node this viewer has not heard from yet takes the Deployer's verdict.
Traffic is computed from the API nodes' own metrics reports (cumulative counters), over
a sliding window: the difference between a node's oldest and newest report in the window
gives requests per second, the error rate and latency quantiles from the histogram
buckets, so one lost report never makes a spike.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from nodes.roles import ROLE_NAMES
from protocol import subjects
from protocol.api import ANY_GENERATION, LATENCY_BUCKETS_S, ApiMetricsReport
from protocol.deploy import DeploymentView, InfraCreatedEvent
from protocol.errors import BadName
from protocol.events import Event
from protocol.heartbeat import Heartbeat
from protocol.registry import LOST, ONLINE, NodeInfo
from protocol.scenarios import RunFinished, RunProgress, RunStarted, RunSummary

LOST_AFTER = 3.0  # missed intervals, as the registry counts them
TRAFFIC_WINDOW_S = 10.0
MAX_NODES = 20_000  # rows kept (the registry holds at most 10,000)
EVENTS_KEPT = 200
RUNS_KEPT = 500
LAGS_KEPT = 20_000
UNLISTED_KEPT_S = 600.0  # a silent node the Deployer never listed (it forgot it) goes
SEEN_IDS = 2_000  # event ids remembered, so history and live never show one twice
FILTER_KEYS = ("infra", "project", "role")
ASKING = "asking"  # the Deployer's state before its first answer


def _is_name(value: str) -> bool:
    try:
        subjects.token(value, "role")
    except BadName:
        return False
    return True


class BadFilter(ValueError):
    """A ``--filter`` that is not ``key=value[,key=value]`` with known keys."""


@dataclass(frozen=True)
class Filter:
    """What the view is narrowed to: ``infra`` (nodes, deployments, traffic, runs,
    events), ``project`` (deployments, traffic by service, runs, events), ``role`` (nodes
    and node events)."""

    infra: str | None = None
    project: str | None = None
    role: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Filter:
        """``infra=prod,role=api`` -> Filter.  Raises ``BadFilter`` saying what is wrong."""
        values: dict[str, str] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise BadFilter(f"{part.strip()!r} is not key=value: expected e.g. "
                                "infra=prod,project=shop,role=api")
            if key not in FILTER_KEYS:
                raise BadFilter(f"unknown filter key {key!r}: expected one of "
                                f"{', '.join(FILTER_KEYS)}")
            if key == "role" and value not in ROLE_NAMES and _is_name(value):
                # A malformed one is left to the name check every command makes (exit 1).
                raise BadFilter(f"unknown role {value!r}: expected one of "
                                f"{', '.join(ROLE_NAMES)}")
            values[key] = value
        return cls(**values)

    @property
    def narrows(self) -> bool:
        return any(getattr(self, k) is not None for k in FILTER_KEYS)

    def describe(self) -> str:
        return ",".join(f"{k}={getattr(self, k)}" for k in FILTER_KEYS
                        if getattr(self, k) is not None) or "everything"

    def admits(self, *, infra: str | None = None, project: str | None = None,
               role: str | None = None) -> bool:
        """Whether a row with these scopes passes (a scope the row lacks is not checked).
        Called per row per frame: plain comparisons (5,000 nodes: 120 -> 10 ms)."""
        return ((self.infra is None or infra is None or self.infra == infra)
                and (self.project is None or project is None or self.project == project)
                and (self.role is None or role is None or self.role == role))


# -- rows: what every view prints ---------------------------------------------------------

class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    infra: str
    status: str
    age_s: float | None  # since its last beat (None: unknown)
    cpu_pct: float | None  # of one core, between its last two beats
    rss_bytes: int | None
    version: str
    host: str
    pid: int


class DeploymentRow(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    name: str
    infra: str
    desired: str
    actual: str
    state: str
    health: str
    reasons: list[str]


class TrafficRow(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    generation: str
    infra: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float | None
    requests: int  # in the window
    nodes: int


class RunRow(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    scenario: str
    infra: str
    running: list[str]  # run ids
    last_outcome: str | None
    last_run: str | None
    last_finished_at: float | None
    last_duration_s: float | None
    last_error: str = ""


class EventRow(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    kind: str
    text: str


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    filter: str
    nats: str
    deployer: str  # "ok" or why not
    deployer_age_s: float | None  # since its last answer
    feed_lag_p50_ms: float | None  # heartbeat sent -> received here
    feed_lag_p99_ms: float | None
    nodes: list[NodeRow]
    deployments: list[DeploymentRow]
    traffic: list[TrafficRow]
    runs: list[RunRow]
    events: list[EventRow]


# -- the model -----------------------------------------------------------------------------

@dataclass
class _Node:
    hb: Heartbeat | None = None
    beat_at: float | None = None
    cpu_pct: float | None = None
    info: NodeInfo | None = None  # the Deployer's record
    info_at: float = 0.0
    listed: bool = False  # the Deployer has listed it lost at least once
    exited_at: float | None = None  # its process reported its exit


@dataclass
class MonitorModel:
    filter: Filter = field(default_factory=Filter)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    events_kept: int = EVENTS_KEPT
    traffic_window_s: float = TRAFFIC_WINDOW_S

    def __post_init__(self) -> None:
        self.nodes: OrderedDict[str, _Node] = OrderedDict()
        self.deployments: list[DeploymentView] = []
        self.runs: OrderedDict[str, RunSummary] = OrderedDict()
        self.reports: dict[str, deque[tuple[float, ApiMetricsReport]]] = {}
        self.events: deque[EventRow] = deque(maxlen=self.events_kept)
        self.seen_ids: OrderedDict[str, None] = OrderedDict()
        self.lags: deque[float] = deque(maxlen=LAGS_KEPT)
        self.beats = 0
        self.nats = "connecting"
        self.deployer = ASKING
        self.deployer_at: float | None = None

    # -- live feed ---------------------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat) -> None:
        """A (validated) heartbeat: liveness, CPU share between beats, memory, lag."""
        now = self.clock()
        self.beats += 1
        if hb.ts > 0:
            self.lags.append(max(0.0, self.wall() - hb.ts))
        node = self.nodes.get(hb.node)
        if node is None:
            if len(self.nodes) >= MAX_NODES:
                self.nodes.popitem(last=False)
            node = self.nodes[hb.node] = _Node()
        prev = node.hb
        if prev is not None and prev.pid == hb.pid and hb.uptime_s > prev.uptime_s \
                and hb.cpu_s >= prev.cpu_s and (hb.cpu_s or prev.cpu_s):
            node.cpu_pct = round(100 * (hb.cpu_s - prev.cpu_s) / (hb.uptime_s - prev.uptime_s),
                                 1)
        elif prev is None or prev.pid != hb.pid:
            node.cpu_pct = None
        node.hb, node.beat_at, node.exited_at = hb, now, None

    def on_exit(self, node: str, pid: int) -> None:
        """A node's process reported its exit: lost at once (until it beats again)."""
        known = self.nodes.get(node)
        if known is not None and known.hb is not None and known.hb.pid == pid:
            known.exited_at = self.clock()

    def on_metrics(self, report: ApiMetricsReport) -> None:
        now = self.clock()
        window = self.reports.setdefault(report.node, deque())
        window.append((now, report))
        while len(window) > 2 and now - window[1][0] >= self.traffic_window_s:
            window.popleft()

    def on_event(self, event: Event) -> None:
        """An event (history or live, each shown once): the tail, and run outcomes."""
        if event.id in self.seen_ids:
            return
        self.seen_ids[event.id] = None
        if len(self.seen_ids) > SEEN_IDS:
            self.seen_ids.popitem(last=False)
        if isinstance(event, RunStarted):
            self._run(RunSummary(run_id=event.run_id, project=event.project,
                                 scenario=event.scenario, infra=event.infra, node=event.node,
                                 bundle=event.bundle, trigger=event.trigger,
                                 started_at=event.ts), keep_finished=True)
        elif isinstance(event, RunFinished):
            self._run(event.run)
        if self.admits_event(event):
            self.events.append(EventRow(ts=event.ts, kind=str(event.__struct_config__.tag or "?"),
                                        text=event.summary()))

    def admits_event(self, event: Event) -> bool:
        """Whether ``event`` passes the filter (is shown in the tail)."""
        infra, project, role = _scope(event)
        if infra is None and isinstance(event, RunProgress) and event.run_id in self.runs:
            infra = self.runs[event.run_id].infra
        return self.filter.admits(infra=infra, project=project, role=role)

    def on_unknown_event(self, ts: float, kind: str, text: str) -> None:
        """An event of a kind this release does not know: shown, never dropped."""
        self.events.append(EventRow(ts=ts, kind=kind, text=text))

    # -- the Deployer's answers ----------------------------------------------------------

    def on_nodes(self, infos: Iterable[NodeInfo], *, everyone: bool = False) -> None:
        """The Deployer's lost nodes (online ones come from their beats: asking for
        them all would send the whole fleet every round), or every node (``everyone``:
        the first round, so the view is whole before the first beats arrive); a node it
        no longer lists is forgotten."""
        now = self.clock()
        listed = set()
        for info in infos:
            listed.add(info.name)
            node = self.nodes.get(info.name)
            if node is None:
                if len(self.nodes) >= MAX_NODES:
                    continue
                node = self.nodes[info.name] = _Node()
            node.info, node.info_at = info, now
            node.listed = node.listed or info.status == LOST
        for name, node in list(self.nodes.items()):
            if name in listed:
                continue
            if not everyone and node.beat_at is None and node.info is not None \
                    and node.info.status == ONLINE:
                continue  # online when all were listed, not lost since: its beat is due
            node.info = None
            # Listed before and silent now: forgotten.  Never listed: not judged lost by
            # the Deployer yet (kept, lost here), unless silent for very long.
            if self._silent(node, now) and (node.listed or node.beat_at is None
                                            or now - node.beat_at > UNLISTED_KEPT_S):
                del self.nodes[name]

    def on_deployments(self, views: Iterable[DeploymentView]) -> None:
        self.deployments = list(views)

    def on_runs(self, runs: Iterable[RunSummary]) -> None:
        for r in runs:
            self._run(r, keep_finished=True)

    def deployer_ok(self) -> None:
        self.deployer, self.deployer_at = "ok", self.clock()

    def deployer_failed(self, why: str) -> None:
        self.deployer = why

    def _run(self, r: RunSummary, *, keep_finished: bool = False) -> None:
        known = self.runs.get(r.run_id)
        if keep_finished and known is not None and known.outcome != "RUNNING":
            return  # a finished run never goes back to running
        self.runs[r.run_id] = r
        self.runs.move_to_end(r.run_id)
        while len(self.runs) > RUNS_KEPT:
            self.runs.popitem(last=False)

    # -- the view ------------------------------------------------------------------------

    def _silent(self, node: _Node, now: float) -> bool:
        hb = node.hb
        return hb is None or node.beat_at is None or \
            now - node.beat_at > LOST_AFTER * hb.interval_s

    def node_rows(self) -> list[NodeRow]:
        now = self.clock()
        rows = []
        for name, node in self.nodes.items():
            hb, info = node.hb, node.info
            source: Heartbeat | NodeInfo | None = hb or info
            if source is None or not self.filter.admits(infra=source.infra, role=source.role):
                continue
            age: float | None
            if node.beat_at is None:
                assert info is not None
                status, age = info.status, info.last_seen_s + (now - node.info_at)
            else:
                # Our own beats decide; an exit report, or the Deployer, can only say lost
                # sooner (the node's exit came after the last beat seen here).
                said_lost = (info is not None and info.status == LOST
                             and node.info_at > node.beat_at) \
                    or node.exited_at is not None
                status = LOST if said_lost or self._silent(node, now) else ONLINE
                age = now - node.beat_at
            fresh = status == ONLINE and hb is not None
            rows.append(NodeRow(
                name=name, role=source.role, infra=source.infra, status=status,
                age_s=None if age is None else round(age, 1),
                cpu_pct=node.cpu_pct if fresh else None,
                rss_bytes=hb.rss_bytes or None if fresh and hb is not None else None,
                version=source.version, host=source.host, pid=source.pid))
        return sorted(rows, key=lambda r: (r.role, r.name))

    def deployment_rows(self) -> list[DeploymentRow]:
        rows = []
        for v in self.deployments:
            if not self.filter.admits(infra=v.infra, project=v.project):
                continue
            rows.append(DeploymentRow(kind=v.kind, name=v.project, infra=v.infra,
                                      desired=v.desired, actual=_actual(v), state=v.state,
                                      health=v.health, reasons=list(v.reasons)))
        return sorted(rows, key=lambda r: (r.kind, r.name, r.infra))

    def traffic_rows(self) -> list[TrafficRow]:
        now = self.clock()
        sums: dict[tuple[str, str, str], dict[str, Any]] = {}
        for window in list(self.reports.values()):
            at, newest = window[-1]
            if now - at > max(LOST_AFTER * newest.interval_s, self.traffic_window_s):
                continue  # the node stopped reporting
            if not self.filter.admits(infra=newest.infra):
                continue
            oldest_at, oldest = window[0]
            span = at - oldest_at
            before = {(m.service, m.endpoint, m.generation, m.shadow): m
                      for m in oldest.endpoints} if span > 0 else {}
            for m in newest.endpoints:
                if m.generation == ANY_GENERATION or not self.filter.admits(project=m.service):
                    continue  # ANY_GENERATION: requests queued, not traffic yet
                gen = m.generation + (" (shadow)" if m.shadow else "")
                row = sums.setdefault((m.service, gen, newest.infra), {
                    "requests": 0, "errors": 0, "rps": 0.0, "nodes": set(),
                    "buckets": [0] * (len(LATENCY_BUCKETS_S) + 1)})
                row["nodes"].add(newest.node)
                if span <= 0:
                    continue  # one report: no interval yet
                old = before.get((m.service, m.endpoint, m.generation, m.shadow))
                if old is None or old.requests > m.requests:
                    # A generation's first traffic (a row the earlier report lacks), or the
                    # node restarted: counted from zero.
                    req0, err0, buckets0 = 0, 0, [0] * len(m.buckets)
                else:
                    req0, err0, buckets0 = old.requests, old.errors, old.buckets
                requests = m.requests - req0
                row["requests"] += requests
                row["errors"] += max(0, m.errors - err0)
                row["rps"] += requests / span
                row["buckets"] = [a + max(0, b - c) for a, b, c in
                                  zip(row["buckets"], m.buckets, buckets0, strict=False)]
        rows = []
        for (service, gen, infra), s in sums.items():
            p50, p99 = _quantile(s["buckets"], 0.5), _quantile(s["buckets"], 0.99)
            rows.append(TrafficRow(
                service=service, generation=gen, infra=infra, rps=round(s["rps"], 1),
                p50_ms=p50, p99_ms=p99, requests=s["requests"], nodes=len(s["nodes"]),
                error_rate=round(s["errors"] / s["requests"], 4) if s["requests"] else None))
        return sorted(rows, key=lambda r: (r.service, r.generation))

    def run_rows(self) -> list[RunRow]:
        groups: dict[tuple[str, str, str], list[RunSummary]] = {}
        for r in self.runs.values():
            if self.filter.admits(infra=r.infra, project=r.project):
                groups.setdefault((r.project, r.scenario, r.infra), []).append(r)
        rows = []
        for (project, scenario, infra), runs in groups.items():
            running = [r.run_id for r in runs if r.outcome == "RUNNING"]
            done = sorted((r for r in runs if r.outcome != "RUNNING"),
                          key=lambda r: r.finished_at or r.started_at)
            last = done[-1] if done else None
            rows.append(RunRow(
                project=project, scenario=scenario, infra=infra, running=running,
                last_outcome=last.outcome if last else None,
                last_run=last.run_id if last else None,
                last_finished_at=last.finished_at if last else None,
                last_duration_s=last.duration_s if last else None,
                last_error=last.error if last else ""))
        return sorted(rows, key=lambda r: (r.project, r.scenario, r.infra))

    def lag_ms(self, *qs: float) -> list[float | None]:
        """Quantiles ``qs`` of the feed lag (a beat's ``ts`` to its arrival here), in ms."""
        if not self.lags:
            return [None for _ in qs]
        ordered = sorted(self.lags)
        return [round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)
                for q in qs]

    def snapshot(self) -> Snapshot:
        now = self.clock()
        p50, p99 = self.lag_ms(0.5, 0.99)
        return Snapshot(
            at=self.wall(), filter=self.filter.describe(), nats=self.nats,
            deployer=self.deployer,
            deployer_age_s=None if self.deployer_at is None else round(now - self.deployer_at,
                                                                       1),
            feed_lag_p50_ms=p50, feed_lag_p99_ms=p99,
            nodes=self.node_rows(), deployments=self.deployment_rows(),
            traffic=self.traffic_rows(), runs=self.run_rows(), events=list(self.events))


def _quantile(buckets: list[int], q: float) -> float | None:
    """Upper bound of the ``q`` quantile, in ms (None: no requests; inf: above the top)."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= q * total:
            return round(LATENCY_BUCKETS_S[i] * 1000, 2) if i < len(LATENCY_BUCKETS_S) \
                else float("inf")
    return float("inf")


def _actual(v: DeploymentView) -> str:
    """What the online nodes run: ``2/2 v3``, or each version with its count."""
    online = [n for n in v.nodes if n.status == ONLINE]
    if not online:
        return "no online node"
    counts: dict[str, int] = {}
    for n in online:
        key = n.running or "-"
        if n.error:
            key += " (failed)"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{c}/{len(online)} {what}" for what, c in
                     sorted(counts.items(), key=lambda kv: -kv[1]))


def _scope(event: Event) -> tuple[str | None, str | None, str | None]:
    """An event's infra, project (or service) and node role, where it has them."""
    if isinstance(event, RunFinished):
        return event.run.infra, event.run.project, None
    if isinstance(event, InfraCreatedEvent):
        return event.name, None, None
    infra = getattr(event, "infra", None)
    project = getattr(event, "project", None) or getattr(event, "service", None)
    role = getattr(event, "role", None)
    return (infra if isinstance(infra, str) else None,
            project if isinstance(project, str) else None,
            role if isinstance(role, str) else None)
