"""What the dashboard shows, read from the Deployer's memory: no NATS call, no KV read.

Each section is plain JSON-able data built from what the Deployer already holds: the
registry (fleet), the two deployment desks' KV caches and their views (the same views
``shipyard deployments`` prints, so the health judgement is the Deployer's own), the run
history, the API nodes' last metrics reports, and the recent events.  Building every
section for 1,000 nodes took 10-17 ms on this loaded 2-core machine, so it runs in the
event loop, where the state it reads is never half-changed (``feed`` bounds how often).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from nodes.runtime.kvcache import Entry
from protocol.api import ANY_GENERATION, ApiDeploymentRecord, parse_split
from protocol.base import tag_of
from protocol.deploy import DeploymentRecord, DeploymentView, Update

if TYPE_CHECKING:
    from nodes.deployer.node import DeployerNode

HISTORY_SHOWN = 20  # updates per deployment
RUNS_SHOWN = 100
TRAFFIC_POINTS = 300  # samples kept per (service, generation): 10 min at one per 2 s
TRAFFIC_EVERY_S = 2.0
EVENTS_SHOWN = 200
# Node fields worth a column when a heartbeat carries them (a newer node may).
RESOURCE_FIELDS = ("cpu_percent", "cpu", "memory_bytes", "rss_bytes", "mem_percent",
                   "memory_percent", "rss_mb")


def bundle_records(d: DeployerNode) -> list[Entry[DeploymentRecord]]:
    return d.projects.records()


def api_records(d: DeployerNode) -> list[Entry[ApiDeploymentRecord]]:
    return d.apis.records()


def deployment_views(d: DeployerNode) -> list[DeploymentView]:
    """Every deployment as ``shipyard deployments`` shows it (bundle and API)."""
    views = [d.projects.view(e.value, e.revision) for e in bundle_records(d)]
    views += [d.apis.view(e.value, e.revision) for e in api_records(d)]
    return sorted(views, key=lambda v: (v.kind, v.project, v.infra))


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def nodes_section(d: DeployerNode) -> list[dict[str, Any]]:
    out = []
    for info in d.registry.query():
        row = {k: v for k, v in msgspec.structs.asdict(info).items() if k != "state"}
        state = msgspec.structs.asdict(info.state)
        for name in RESOURCE_FIELDS:
            if name in state and name not in row:
                row[name] = state[name]
        out.append(_plain(row))
    return out


def redeployable(kind: str, update: Update) -> str | None:
    """What a "redeploy" of ``update`` sends: a bundle id, or an API split ``v1=90,v2=10``
    (None for a mapping with a shadow, which a click cannot say whole)."""
    target = update.to_bundle
    if kind == "bundle":
        return target
    if "(" in target:
        return None
    try:
        if "=" in target:
            parse_split(target)
            return target
        parse_split(f"{target}=100")
    except ValueError:
        return None
    return f"{target}=100"


def deployments_section(d: DeployerNode, views: list[DeploymentView],
                        ) -> list[dict[str, Any]]:
    histories: dict[tuple[str, str, str], list[Update]] = {}
    for b in bundle_records(d):
        histories[("bundle", b.value.infra, b.value.project)] = b.value.history
    for a in api_records(d):
        histories[("api", a.value.infra, a.value.service)] = a.value.history
    out = []
    for view in views:
        row = _plain(view)
        history = histories.get((view.kind, view.infra, view.project), [])
        shown = []
        for update in reversed(history[-HISTORY_SHOWN:]):
            item = _plain(update)
            item["redeploy"] = redeployable(view.kind, update)
            shown.append(item)
        row["history"] = shown
        row["can_rollback"] = view.previous is not None
        out.append(row)
    return out


def runs_section(d: DeployerNode) -> list[dict[str, Any]]:
    runs = list(d.runs.runs.values())[-RUNS_SHOWN:]
    out = []
    for run in reversed(runs):
        row = _plain(run)
        row.pop("log_tail", None)  # the log comes on demand
        out.append(row)
    return out


class Traffic:
    """Request rate, error rate and p95 per API service and generation, sampled every
    ``TRAFFIC_EVERY_S`` from the deployment views into bounded rings.  Each point is the
    traffic between the API nodes' last two reports (the views' ``rps`` and ``recent_*``),
    not since the nodes started, so a burst of errors shows when it happens and fades when
    it ends; with no request in that interval the error rate and p95 are None."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], deque[list[float | None]]] = {}
        self._last = 0.0

    def sample(self, views: list[DeploymentView], now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self._last < TRAFFIC_EVERY_S:
            return False
        self._last = now
        live: set[tuple[str, str]] = set()
        for view in views:
            if view.kind != "api":
                continue
            per_gen: dict[str, list[float]] = {}
            for row in view.extra.get("metrics") or []:
                if row.get("shadow") or row.get("generation") == ANY_GENERATION:
                    continue  # shadow copies; requests queued before a generation was picked
                acc = per_gen.setdefault(str(row.get("generation")), [0.0, 0.0, 0.0, 0.0])
                acc[0] += float(row.get("rps") or 0.0)
                acc[1] += float(row.get("recent_requests") or 0)
                acc[2] += float(row.get("recent_errors") or 0)
                acc[3] = max(acc[3], float(row.get("recent_p95_ms") or 0.0))
            for gen, (rps, n, errs, p95) in per_gen.items():
                key = (view.project, gen)
                live.add(key)
                ring = self.series.setdefault(key, deque(maxlen=TRAFFIC_POINTS))
                ring.append([round(now, 1), round(rps, 2), round(errs / n, 4) if n else None,
                             p95 or None])
        for key in [k for k in self.series if k not in live]:
            if self.series[key] and now - (self.series[key][-1][0] or 0) > 3600:
                del self.series[key]  # a generation gone for an hour
        return True

    def section(self) -> list[dict[str, Any]]:
        return [{"service": s, "generation": g, "points": list(ring)}
                for (s, g), ring in sorted(self.series.items())]


class RecentEvents:
    """The last ``EVENTS_SHOWN`` events, as one line each."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=EVENTS_SHOWN)
        self.version = 0

    def add(self, seq: int, subject: str, event: Any) -> None:
        try:
            summary = event.summary() if event is not None else subject
        except Exception:
            summary = subject
        kind = tag_of(type(event)) if event is not None else "unknown"
        self.items.append({"seq": seq, "ts": getattr(event, "ts", time.time()),
                           "type": str(kind), "subject": subject, "summary": summary})
        self.version += 1

    def section(self) -> list[dict[str, Any]]:
        return list(self.items)
