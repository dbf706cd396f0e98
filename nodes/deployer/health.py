"""Health: the one place that judges a deployment, an infrastructure and the fleet.

Pure rules over what the Deployer already knows (the registry, the deployment views,
the run history, the API nodes' metrics reports); no I/O, and the clocks are injectable,
so every rule is unit-tested without a server (``tests/test_health.py``).

A deployment's health is the worst (``protocol.health.worst``) of:

* node liveness and the activation result (``fleet_health``, applied by
  ``nodes.deployer.updates.judge``): a node that refused the desired version, or no online
  node at all, is ERROR; a lost node while others serve, or a node still behind, is
  WARNING; no node in the infra is UNKNOWN;
* the last finished run of each scenario of the project (``runs_verdict``): FAILED is
  ERROR, WARNING (a soft check bound) is WARNING; a cancelled run says nothing;
* API traffic over the last ``WINDOW_S`` seconds against the deployment's thresholds
  (``traffic_verdict``): an error rate above ``max_error_rate`` is WARNING and at
  ``ERROR_FACTOR`` times it (or every request failing) ERROR; a p95 latency above
  ``max_p95_ms`` is WARNING (slow is degraded, not down).  Fewer than ``MIN_REQUESTS``
  requests in the window judge nothing: one failed request of two is no 50% error rate;
* governance warnings recorded on the update that set the desired state
  (``governance_verdict``): WARNING.

An infrastructure's health (``infra_health``) is the worst of its deployments and its
nodes: a lost node is ERROR (it stays so until it comes back or is forgotten with
``shipyard node forget``), an infra with no node at all is UNKNOWN, and an infra whose
nodes are all online and that has nothing deployed is HEALTHY.  The fleet's is the worst
of its infras (``rollup``).  Nodes of an infra that has no record (the control plane's
``default``) are rolled up under that name too, so a lost Design node is seen.

``HealthTracker`` turns successive rollups into ``HealthChanged`` events: a new value
must hold for ``hold_s`` seconds before it is reported, so a deploy's brief WARNING
while nodes fetch a bundle (seconds) is not an alert.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from protocol.api import LATENCY_BUCKETS_S, ApiMetricsReport
from protocol.deploy import (
    ERROR,
    FAILED,
    HEALTHY,
    UNKNOWN,
    WARNING,
    DeploymentView,
    Infra,
    Update,
)
from protocol.events import HealthChanged
from protocol.health import (
    DeploymentHealth,
    HealthReport,
    InfraHealth,
    NodeHealth,
    worst,
)
from protocol.registry import ONLINE, NodeInfo
from protocol.scenarios import RunSummary

WINDOW_S = 60.0  # API traffic is judged over about the last minute
MIN_REQUESTS = 20  # below this many requests in the window, rates judge nothing
ERROR_FACTOR = 5.0  # an error rate this many times the threshold is ERROR
MAX_SAMPLES = 128  # metrics reports kept per node (bounds memory at any report rate)
DEFAULT_HOLD_S = 10.0  # how long a new health value must hold before it is reported

Verdict = tuple[str, list[str]]


def combine(*verdicts: Verdict) -> Verdict:
    """The worst health of ``verdicts``, with every reason in order."""
    return worst(*(h for h, _ in verdicts)), [r for _, rs in verdicts for r in rs]


# -- one deployment ----------------------------------------------------------------------

def fleet_health(state: str, any_online: bool, reasons: list[str], has_nodes: bool = True,
                 ) -> str:
    """Node liveness and activation result, from a deployment's state (``judge``)."""
    if not has_nodes:
        return UNKNOWN
    if state == FAILED or not any_online:
        return ERROR
    return WARNING if reasons else HEALTHY


def runs_verdict(runs: Iterable[RunSummary]) -> Verdict:
    """The last finished run of each scenario: FAILED is ERROR, WARNING is WARNING."""
    last: dict[str, RunSummary] = {}
    for run in runs:
        if run.finished_at is None or run.outcome in ("RUNNING", "CANCELLED"):
            continue
        seen = last.get(run.scenario)
        if seen is None or run.finished_at >= (seen.finished_at or 0.0):
            last[run.scenario] = run
    health, reasons = HEALTHY, []
    for scenario, run in sorted(last.items()):
        if run.outcome == "FAILED":
            health = ERROR
            reasons.append(f"last run {run.run_id} of scenario {scenario} failed: "
                           f"{run.error or 'no error message'} (its log: shipyard run logs "
                           f"{run.run_id})")
        elif run.outcome == "WARNING":
            health = worst(health, WARNING)
            warned = [f"{s.name}: {s.message}" if s.message else s.name
                      for s in run.steps if s.outcome == "WARNING"]
            reasons.append(f"last run {run.run_id} of scenario {scenario} warned"
                           + (f" ({'; '.join(warned)})" if warned else ""))
    return health, reasons


@dataclass(frozen=True)
class Traffic:
    """Requests of one service over a window, summed over its nodes (shadow excluded)."""

    requests: int
    errors: int
    buckets: tuple[int, ...]
    window_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        """An upper bound of the p95 latency (the bucket it falls in), None if empty."""
        total = sum(self.buckets)
        if not total:
            return None
        seen = 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= 0.95 * total:
                return LATENCY_BUCKETS_S[i] * 1000 if i < len(LATENCY_BUCKETS_S) \
                    else float("inf")
        return float("inf")


# Where the thresholds are set, told beside every traffic reason.
THRESHOLD_HINT = " (thresholds: shipyard deploy api ... --max-error-rate R --max-p95-ms MS)"


def traffic_verdict(traffic: Traffic | None, *, max_error_rate: float,
                    max_p95_ms: float) -> Verdict:
    """API error rate and p95 latency against a deployment's thresholds."""
    if traffic is None or traffic.requests < MIN_REQUESTS:
        return HEALTHY, []
    health, reasons = HEALTHY, []
    rate = traffic.error_rate
    window = f"last {traffic.window_s:.0f}s"
    if rate > max_error_rate:
        health = ERROR if rate >= min(1.0, max_error_rate * ERROR_FACTOR) else WARNING
        reasons.append(f"error rate {rate:.1%} over the {window} ({traffic.errors} of "
                       f"{traffic.requests} requests) is above {max_error_rate:.1%}"
                       f"{THRESHOLD_HINT}")
    p95 = traffic.p95_ms
    if p95 is not None and p95 > max_p95_ms:
        health = worst(health, WARNING)
        shown = "above the largest bucket" if p95 == float("inf") else f"{p95:g} ms"
        reasons.append(f"p95 latency {shown} over the {window} is above {max_p95_ms:g} ms"
                       f"{THRESHOLD_HINT}")
    return health, reasons


def governance_verdict(last: Update | None) -> Verdict:
    """The warnings the infra's ``warn`` policy let through on the current update."""
    if last is None or not last.warnings:
        return HEALTHY, []
    return WARNING, [f"govern warning: {w}" for w in last.warnings]


# -- API traffic windows ----------------------------------------------------------------

_Counts = dict[str, tuple[int, int, tuple[int, ...]]]  # service -> requests, errors, buckets


def _counts(report: ApiMetricsReport) -> _Counts:
    out: _Counts = {}
    for m in report.endpoints:
        if m.shadow:
            continue  # a shadow's replies are dropped: they do not make a service's health
        req, err, buckets = out.get(m.service, (0, 0, ()))
        merged = tuple(a + b for a, b in zip(buckets or (0,) * len(m.buckets), m.buckets,
                                             strict=False))
        out[m.service] = (req + m.requests, err + m.errors, merged)
    return out


@dataclass
class TrafficWindow:
    """The API nodes' cumulative counters, kept per node long enough to difference them
    over ``window_s``.  A node's first report counts since it started; a counter that
    went down (the node restarted) starts over."""

    window_s: float = WINDOW_S
    clock: Callable[[], float] = time.monotonic
    samples: dict[str, deque[tuple[float, _Counts]]] = field(default_factory=dict)

    def add(self, report: ApiMetricsReport) -> None:
        now = self.clock()
        q = self.samples.setdefault(report.node, deque(maxlen=MAX_SAMPLES))
        q.append((now, _counts(report)))
        # Keep one sample at or before the window's start: the baseline.
        while len(q) > 1 and q[1][0] <= now - self.window_s:
            q.popleft()

    def forget(self, node: str) -> None:
        self.samples.pop(node, None)

    def traffic(self, service: str, nodes: Iterable[str]) -> Traffic | None:
        """``service``'s traffic on ``nodes`` over the window (None: no report seen)."""
        now = self.clock()
        requests = errors = 0
        buckets: tuple[int, ...] = ()
        span = 0.0
        seen = False
        for node in nodes:
            q = self.samples.get(node)
            if not q:
                continue
            seen = True
            t_last, last = q[-1]
            t_first, first = q[0]
            r1, e1, b1 = last.get(service, (0, 0, ()))
            r0, e0, b0 = first.get(service, (0, 0, ()))
            if len(q) == 1 or r1 < r0 or e1 < e0:
                r0, e0, b0 = 0, 0, ()
                t_first = t_last
            requests += r1 - r0
            errors += e1 - e0
            delta = tuple(max(0, a - b) for a, b in zip(b1, b0 or (0,) * len(b1),
                                                        strict=False))
            buckets = tuple(a + b for a, b in zip(buckets or (0,) * len(delta), delta,
                                                  strict=False))
            span = max(span, now - t_first)
        if not seen:
            return None
        return Traffic(requests=requests, errors=errors, buckets=buckets,
                       window_s=min(span, self.window_s) or self.window_s)


# -- infrastructures and the fleet -------------------------------------------------------

def node_health(info: NodeInfo) -> NodeHealth:
    if info.status == ONLINE:
        return NodeHealth(name=info.name, role=info.role, status=info.status, health=HEALTHY,
                          last_seen_s=info.last_seen_s)
    return NodeHealth(
        name=info.name, role=info.role, status=info.status, health=ERROR,
        last_seen_s=info.last_seen_s,
        reasons=[f"node {info.name} ({info.role}) is {info.status}, silent for "
                 f"{info.last_seen_s:.0f}s (if it is gone for good: shipyard node forget "
                 f"{info.name})"])


def deployment_health(view: DeploymentView) -> DeploymentHealth:
    return DeploymentHealth(kind=view.kind, name=view.project, infra=view.infra,
                            desired=view.desired, state=view.state, health=view.health,
                            reasons=list(view.reasons))


def infra_health(name: str, infra: Infra | None, nodes: list[NodeInfo],
                 views: list[DeploymentView]) -> InfraHealth:
    """The worst of ``infra``'s deployments and nodes (``infra`` None: nodes of an infra
    with no record, such as the control plane's ``default``)."""
    node_rows = [node_health(n) for n in sorted(nodes, key=lambda n: n.name)]
    deps = [deployment_health(v) for v in sorted(views, key=lambda v: (v.kind, v.project))]
    health, reasons = HEALTHY, []
    if not node_rows:
        health, reasons = UNKNOWN, [f"no node has joined infra {name}"]
    for n in node_rows:
        health = worst(health, n.health)
        reasons += n.reasons
    for d in deps:
        health = worst(health, d.health)
        if d.health != HEALTHY:
            first = f": {d.reasons[0]}" if d.reasons else ""
            more = f" (and {len(d.reasons) - 1} more)" if len(d.reasons) > 1 else ""
            reasons.append(f"{d.kind} {d.name} is {d.health}{first}{more}")
    return InfraHealth(name=name, kind=infra.kind if infra else "",
                       stage=infra.stage if infra else "", health=health, reasons=reasons,
                       nodes=node_rows, deployments=deps)


def rollup(infras: Iterable[Infra], nodes: Iterable[NodeInfo],
           views: Iterable[DeploymentView], *, only: str | None = None,
           clock: Callable[[], float] = time.time) -> HealthReport:
    """The whole health rollup (or ``only`` one infra's): what ``shipyard status``, the
    dashboard and the exporters read.  Pure: give it the registry's ``query()``, the
    infra records and every deployment view."""
    records = {i.name: i for i in infras}
    by_infra_nodes: dict[str, list[NodeInfo]] = {}
    for n in nodes:
        by_infra_nodes.setdefault(n.infra, []).append(n)
    by_infra_views: dict[str, list[DeploymentView]] = {}
    for v in views:
        by_infra_views.setdefault(v.infra, []).append(v)
    names = sorted({*records, *by_infra_nodes, *by_infra_views})
    if only is not None:
        names = [n for n in names if n == only]
    rows = [infra_health(n, records.get(n), by_infra_nodes.get(n, []),
                         by_infra_views.get(n, [])) for n in names]
    return HealthReport(health=worst(*(r.health for r in rows)) if rows else UNKNOWN,
                        ts=clock(), infras=rows)


# -- changes ---------------------------------------------------------------------------

@dataclass
class _Seen:
    reported: str  # the value last reported (or first seen)
    candidate: str  # the value seen now
    since: float  # when ``candidate`` was first seen


@dataclass
class HealthTracker:
    """Successive rollups in, ``HealthChanged`` events out.  The first value seen for a
    deployment or infra is its starting point (no event); a different value is reported
    once it held for ``hold_s`` seconds; one that disappears is dropped."""

    hold_s: float = DEFAULT_HOLD_S
    clock: Callable[[], float] = time.monotonic
    seen: dict[tuple[str, str, str, str], _Seen] = field(default_factory=dict)

    def changes(self, report: HealthReport) -> list[HealthChanged]:
        now = self.clock()
        out: list[HealthChanged] = []
        current: set[tuple[str, str, str, str]] = set()
        for infra in report.infras:
            items = [(("infra", infra.name, "infra", infra.name), infra.health,
                      infra.reasons)]
            items += [(("deployment", infra.name, d.kind, d.name), d.health, d.reasons)
                      for d in infra.deployments]
            for key, health, reasons in items:
                current.add(key)
                s = self.seen.get(key)
                if s is None:
                    self.seen[key] = _Seen(reported=health, candidate=health, since=now)
                    continue
                if health != s.candidate:
                    s.candidate, s.since = health, now
                if s.candidate != s.reported and now - s.since >= self.hold_s:
                    about, infra_name, kind, name = key
                    out.append(HealthChanged(infra=infra_name, about=about, kind=kind,
                                             name=name, health=health, previous=s.reported,
                                             reasons=list(reasons)))
                    s.reported = s.candidate
        if report.infras and len(current) != len(self.seen):
            for key in set(self.seen) - current:
                if any(i.name == key[1] for i in report.infras):
                    del self.seen[key]
        return out
