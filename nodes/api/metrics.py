"""Per service, endpoint, generation and node: requests, errors, latency, in-flight.

Counting is on the request path, so it is a few integer increments on plain objects
(``Stat``), resolved once per request; prometheus_client only renders them, at scrape
time, through a custom collector.  The same counters go to the Deployer as an
``ApiMetricsReport`` every few seconds.

What an autoscaler outside the node reads (a Kubernetes HorizontalPodAutoscaler through
a Prometheus adapter, or KEDA's Prometheus scaler) is here too, per node:
``shipyard_api_worker_utilization`` (busy workers / workers, 0..1, the mean of the last
10 s: a scraper samples every 15 s or so, an instant would be noise),
``shipyard_api_queue_depth`` (requests received and waiting for a worker) and
``shipyard_api_requests_in_flight`` (running or waiting); and the node's own scaling:
workers now, its bounds, and its scale events by direction.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from protocol.api import ANY_GENERATION, LATENCY_BUCKETS_S, ApiMetricsReport, EndpointMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The service and endpoint label of HTTP responses to names the node does not serve:
# names come from clients, so they never become series of their own (50,000 requests to
# random names once grew /metrics to 14.6 MB).
OTHER = "(unknown)"
_BOUNDS = list(LATENCY_BUCKETS_S)


class Stat:
    """Counters of one (service, endpoint, generation, shadow)."""

    __slots__ = ("buckets", "errors", "inflight", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.inflight = 0
        self.latency_sum = 0.0
        self.buckets = [0] * (len(_BOUNDS) + 1)

    def observe(self, elapsed: float, error: bool) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        self.latency_sum += elapsed
        self.buckets[bisect.bisect_left(_BOUNDS, elapsed)] += 1


Key = tuple[str, str, str, bool]


class Metrics:
    """A node's view: its workers' counters (sent every second), summed, plus the
    gateway's HTTP counters.  Counters of a worker that ended are kept, so totals never
    go backwards."""

    def __init__(self, node: str, role: str) -> None:
        self.node = node
        self.role = role
        self.per_worker: dict[int, dict[Key, tuple[int, int, float, list[int]]]] = {}
        self.backlogs: dict[int, dict[tuple[str, str], int]] = {}
        self.worker_counts: dict[int, tuple[int, int]] = {}  # overloaded, mismatches
        self.retired: dict[Key, Stat] = {}
        self.retired_counts = (0, 0)
        self.capture_counts: dict[int, tuple[int, int]] = {}  # captured, dropped
        self.retired_capture = (0, 0)
        self.http: dict[tuple[str, str, int], int] = {}
        self.retries = 0
        self.overloaded_at_node = 0  # requests workers passed on that the node shed
        self.workers = 0
        self.workers_busy = 0
        self.workers_min = 0
        self.workers_max = 0
        self.utilization = 0.0  # busy / workers, smoothed (set by the node's sampler)
        self.scale_events = {"up": 0, "down": 0}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def worker_stats(self, index: int, rows: list[list[Any]], backlog: list[list[Any]],
                     overloaded: int, mismatches: int) -> None:
        self.per_worker[index] = {(r[0], r[1], r[2], bool(r[3])): (int(r[4]), int(r[5]),
                                                                     float(r[6]), list(r[7]))
                                  for r in rows}
        self.backlogs[index] = {(b[0], b[1]): int(b[2]) for b in backlog}
        self.worker_counts[index] = (int(overloaded), int(mismatches))

    def retire_worker(self, index: int) -> None:
        for key, row in self.per_worker.pop(index, {}).items():
            _add(self.retired.setdefault(key, Stat()), row)
        self.backlogs.pop(index, None)
        o, m = self.worker_counts.pop(index, (0, 0))
        self.retired_counts = (self.retired_counts[0] + o, self.retired_counts[1] + m)
        c, d = self.capture_counts.pop(index, (0, 0))
        self.retired_capture = (self.retired_capture[0] + c, self.retired_capture[1] + d)

    def capture_stats(self, index: int, captured: int, dropped: int) -> None:
        """One worker's capture counters (cumulative)."""
        self.capture_counts[index] = (int(captured), int(dropped))

    @property
    def captured(self) -> int:
        return self.retired_capture[0] + sum(c[0] for c in self.capture_counts.values())

    @property
    def capture_dropped(self) -> int:
        return self.retired_capture[1] + sum(c[1] for c in self.capture_counts.values())

    @property
    def stats(self) -> dict[Key, Stat]:
        out: dict[Key, Stat] = {}
        for key, st in self.retired.items():
            _add(out.setdefault(key, Stat()),
                 (st.requests, st.errors, st.latency_sum, st.buckets))
        for rows in list(self.per_worker.values()):
            for key, row in rows.items():
                _add(out.setdefault(key, Stat()), row)
        for backlog in list(self.backlogs.values()):
            for (service, endpoint), n in backlog.items():
                out.setdefault((service, endpoint, ANY_GENERATION, False), Stat()).inflight += n
        return out

    @property
    def queued(self) -> int:
        """Requests the workers have received and not started (as of their last
        report, at most a second old)."""
        return sum(n for backlog in list(self.backlogs.values()) for n in backlog.values())

    def live_buckets(self) -> list[int]:
        """Latency bucket counts of every live request so far (not shadow copies)."""
        total = [0] * (len(_BOUNDS) + 1)
        for key, st in self.stats.items():
            if not key[3]:
                total = [a + b for a, b in zip(total, st.buckets, strict=False)]
        return total

    @property
    def overloaded(self) -> int:
        return self.retired_counts[0] + self.overloaded_at_node + \
            sum(c[0] for c in self.worker_counts.values())

    @property
    def shadow_mismatches(self) -> int:
        return self.retired_counts[1] + sum(c[1] for c in self.worker_counts.values())

    def count_http(self, service: str, endpoint: str, status: int) -> None:
        """Count one HTTP response; callers pass ``OTHER`` for names not deployed."""
        key = (service, endpoint, status)
        self.http[key] = self.http.get(key, 0) + 1

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def report(self, infra: str, interval: float) -> ApiMetricsReport:
        return ApiMetricsReport(
            node=self.node, infra=infra, ts=time.time(), interval_s=interval,
            endpoints=[EndpointMetrics(service=k[0], endpoint=k[1], generation=k[2],
                                       shadow=k[3], requests=s.requests, errors=s.errors,
                                       inflight=s.inflight,
                                       latency_sum_s=round(s.latency_sum, 6),
                                       buckets=list(s.buckets))
                       for k, s in self.stats.items()],
            overloaded=self.overloaded, workers=self.workers, workers_busy=self.workers_busy)


def _add(st: Stat, row: tuple[int, int, float, list[int]]) -> None:
    st.requests += row[0]
    st.errors += row[1]
    st.latency_sum += row[2]
    st.buckets = [a + b for a, b in zip(st.buckets, row[3], strict=False)]


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        labels = ["service", "endpoint", "generation", "traffic", "node"]
        requests = CounterMetricFamily("shipyard_api_requests", "Requests handled", labels=labels)
        errors = CounterMetricFamily("shipyard_api_errors", "Requests that failed",
                                     labels=labels)
        inflight = GaugeMetricFamily("shipyard_api_inflight", "Requests in flight",
                                     labels=labels)
        latency = HistogramMetricFamily("shipyard_api_latency_seconds",
                                        "Request latency in the node (queue and worker)",
                                        labels=labels)
        for (service, endpoint, generation, shadow), s in m.stats.items():
            values = [service, endpoint, generation, "shadow" if shadow else "live", m.node]
            inflight.add_metric(values, s.inflight)
            if generation == ANY_GENERATION:
                continue  # requests queued before a generation was picked: in flight only
            requests.add_metric(values, s.requests)
            errors.add_metric(values, s.errors)
            cumulative, buckets = 0, []
            for bound, count in zip(_BOUNDS, s.buckets, strict=False):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", s.requests))
            latency.add_metric(values, buckets, s.latency_sum)
        http = CounterMetricFamily("shipyard_http_responses", "HTTP responses by status",
                                   labels=["service", "endpoint", "status", "node"])
        for (service, endpoint, status), n in list(m.http.items()):
            http.add_metric([service, endpoint, str(status), m.node], n)
        overloaded = CounterMetricFamily("shipyard_api_overloaded",
                                         "Requests shed because the node was at its limit",
                                         labels=["node"])
        overloaded.add_metric([m.node], m.overloaded)
        retries = CounterMetricFamily("shipyard_http_retries",
                                      "Predictions retried on another node", labels=["node"])
        retries.add_metric([m.node], m.retries)
        workers = GaugeMetricFamily("shipyard_api_workers", "Worker processes",
                                    labels=["node", "state"])
        workers.add_metric([m.node, "total"], m.workers)
        workers.add_metric([m.node, "busy"], m.workers_busy)
        bounds = GaugeMetricFamily("shipyard_api_workers_bound",
                                   "The least and most worker processes the node scales "
                                   "between", labels=["node", "bound"])
        bounds.add_metric([m.node, "min"], m.workers_min)
        bounds.add_metric([m.node, "max"], m.workers_max)
        scaled = CounterMetricFamily("shipyard_api_scale_events",
                                     "Times the node changed its worker count",
                                     labels=["node", "direction"])
        for direction, n in sorted(m.scale_events.items()):
            scaled.add_metric([m.node, direction], n)
        utilization = GaugeMetricFamily("shipyard_api_worker_utilization",
                                        "Busy workers / workers, mean of the last 10 s "
                                        "(0..1)", labels=["node"])
        utilization.add_metric([m.node], round(m.utilization, 4))
        queued = m.queued
        depth = GaugeMetricFamily("shipyard_api_queue_depth",
                                  "Requests received by workers and waiting for one",
                                  labels=["node"])
        depth.add_metric([m.node], queued)
        active = GaugeMetricFamily("shipyard_api_requests_in_flight",
                                   "Requests running or waiting for a worker",
                                   labels=["node"])
        active.add_metric([m.node], queued + m.workers_busy)
        mismatches = CounterMetricFamily("shipyard_api_shadow_mismatches",
                                         "Shadow replies that differed from the live reply",
                                         labels=["node"])
        mismatches.add_metric([m.node], m.shadow_mismatches)
        captured = CounterMetricFamily("shipyard_api_captured",
                                       "Calls published to the capture stream",
                                       labels=["node"])
        captured.add_metric([m.node], m.captured)
        dropped = CounterMetricFamily("shipyard_api_capture_dropped",
                                      "Sampled calls not captured: the worker's capture "
                                      "queue was full or the publish failed",
                                      labels=["node"])
        dropped.add_metric([m.node], m.capture_dropped)
        yield from (requests, errors, inflight, latency, http, overloaded, retries, workers,
                    bounds, scaled, utilization, depth, active, mismatches, captured, dropped)


def quantile(buckets: list[int], q: float) -> float | None:
    """An upper bound of the ``q`` quantile from bucket counts (None if empty)."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return _BOUNDS[i] if i < len(_BOUNDS) else float("inf")
    return float("inf")
