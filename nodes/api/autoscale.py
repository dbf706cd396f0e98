"""When an API node adds or retires worker processes: a pure policy with its own clock.

The policy sees what the node measures every ``sample_every_s`` (a ``Sample``: workers,
busy workers, requests waiting for a worker, the recent p99 of worker latency) and
answers with a ``Decision`` (from, to, why) or nothing.  It starts no process and reads
no clock but the one it is given, so every rule below is a unit test
(tests/test_autoscale.py); ``nodes.api.node`` feeds it and ``WorkerPool.scale_to`` acts.

The rules, with hysteresis so that a load near a threshold does not flap:

* **load** of a sample is ``min(1, (busy + queued) / workers)``: the share of the workers
  that requests occupy, capped so that one burst of queued requests cannot outweigh a
  whole window of quiet (a 0.3 s blip of 10x load moves a 1 s mean by at most 0.3).
  Queued requests (in the workers' queues, read from their busy pages at each sample,
  and those the node holds for a worker) count only while every worker is busy: a
  request seen waiting beside an idle worker is about to run.
* **up** when the mean load over the last ``up_after_s`` is at least ``up_utilization``
  (or every p99 seen in that window is over ``latency_target_s`` while the load is at
  least ``target_utilization``: more workers help only when there are requests to share),
  to ``ceil(demand / target_utilization)`` workers, at least one more, where demand is
  the mean of the window or of its last quarter, whichever is higher (a step load is
  sized by what it is now, not by a window that is half the quiet before it);
* **down** when the mean load over the quiet period ``down_after_s`` is at most
  ``down_utilization`` and no p99 in it was over the target, to the count that carries
  the mean demand at ``target_utilization`` (with no load: ``min_workers``);
* a window counts only samples taken after the last change, so the load measured with
  fewer workers never argues for more after they came; on top of that, no scale-up for
  ``up_cooldown_s`` after a scale-up (new workers take a moment to be felt; a scale-down
  does not delay a scale-up: a step load right after a quiet period is the case that
  matters) and no scale-down for ``down_cooldown_s`` after any change;
* never below ``min_workers``, never above ``max_workers``: a count outside them is
  brought back at once.

Defaults follow Kubernetes' HorizontalPodAutoscaler where it has one (act on scale-up
quickly, on scale-down after a long quiet period), with a target utilization of 0.6 so
that a node scaled for its load still absorbs a 1.5x burst without queueing.  Measured
on a loaded 2-core machine (bench/RESULTS.md, "Autoscaling"): a 10x step is decided
(1 -> 4 workers in one step) 1-1.5 s after it begins; the new workers serve 1-4 s later.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleSettings:
    """How an API node scales its workers (see the module docstring for the rules)."""

    min_workers: int = 1
    max_workers: int = 1
    target_utilization: float = 0.6
    up_utilization: float = 0.85
    down_utilization: float = 0.3
    latency_target_s: float | None = None  # p99 of worker latency; None: not a trigger
    up_after_s: float = 1.0  # sustained load before scaling up
    down_after_s: float = 60.0  # quiet period before scaling down
    up_cooldown_s: float = 3.0  # after a scale-up
    down_cooldown_s: float = 0.0  # after any change (the quiet period counts from it)
    sample_every_s: float = 0.1  # the mean time between samples (``sample_interval``)

    def __post_init__(self) -> None:
        if self.min_workers < 1:
            raise ValueError(f"min_workers is {self.min_workers}: expected at least 1")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers "
                             f"({self.min_workers}): expected max >= min")
        if not 0 < self.down_utilization < self.target_utilization < self.up_utilization <= 1:
            raise ValueError("expected 0 < down_utilization < target_utilization < "
                             f"up_utilization <= 1, got {self.down_utilization}, "
                             f"{self.target_utilization}, {self.up_utilization}")
        if self.latency_target_s is not None and self.latency_target_s <= 0:
            raise ValueError(f"latency_target_s is {self.latency_target_s}: expected > 0")
        for name in ("up_after_s", "down_after_s", "sample_every_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} is {getattr(self, name)}: expected > 0")
        for name in ("up_cooldown_s", "down_cooldown_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}: expected >= 0")

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.min_workers


def sample_interval(settings: ScaleSettings, u: float) -> float:
    """The time to the next sample, for ``u`` uniform in [0, 1): 0.5 to 1.5 times
    ``sample_every_s``.  Not a fixed pace: one locks in phase with a periodic load (a
    20 ms request every 0.1 s, sampled every 0.1 s, looked busy in ~40 samples in a row
    every ~20 s, which a 1 s window reads as full load)."""
    return settings.sample_every_s * (0.5 + u)


@dataclass(frozen=True)
class Sample:
    """What the node measured at one moment."""

    workers: int  # the count the pool keeps (ready or starting)
    busy: int  # workers running a request now
    queued: int  # requests received by workers and waiting for them
    p99_s: float | None = None  # recent p99 of worker latency (None: no requests)


@dataclass(frozen=True)
class Decision:
    frm: int
    to: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.to > self.frm else "down"


@dataclass(frozen=True)
class _Seen:
    at: float
    load: float  # capped share of the workers that requests occupy
    demand: float  # busy + queued
    slow: bool | None  # p99 over the target (None: no p99 or no target)


class ScalePolicy:
    """Feed it ``observe(sample)`` at a steady pace; act on what it returns."""

    def __init__(self, settings: ScaleSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.changed_at = clock()  # the pool started at min_workers now
        self.grown_at = -math.inf  # the last scale-up
        self._seen: deque[_Seen] = deque()
        self._since = self.changed_at  # the first moment the window may count

    def observe(self, sample: Sample) -> Decision | None:
        s, now = self.settings, self.clock()
        n = sample.workers
        if n < s.min_workers or n > s.max_workers:
            to = min(max(n, s.min_workers), s.max_workers)
            bound = "minimum" if n < s.min_workers else "maximum"
            return self._change(n, to, f"{n} workers is outside the {bound} "
                                       f"({s.min_workers}..{s.max_workers})", now)
        busy = max(0, sample.busy)
        demand = float(busy + (max(0, sample.queued) if busy >= n else 0))
        slow = None if sample.p99_s is None or s.latency_target_s is None \
            else sample.p99_s > s.latency_target_s
        self._seen.append(_Seen(now, min(1.0, demand / n), demand, slow))
        horizon = now - max(s.up_after_s, s.down_after_s)
        while self._seen and self._seen[0].at < horizon:
            self._seen.popleft()
        return self._up(n, now) or self._down(n, now)

    def _window(self, seconds: float, now: float) -> list[_Seen] | None:
        """The samples of the last ``seconds``, or None if the policy has not watched
        that long since the last change."""
        if now - self._since < seconds:
            return None
        return [x for x in self._seen if x.at >= now - seconds]

    def _up(self, n: int, now: float) -> Decision | None:
        s = self.settings
        if n >= s.max_workers or now - self.grown_at < s.up_cooldown_s:
            return None
        window = self._window(s.up_after_s, now)
        if not window:
            return None
        load = sum(x.load for x in window) / len(window)
        demand = sum(x.demand for x in window) / len(window)
        last = [x.demand for x in window if x.at >= now - s.up_after_s / 4]
        now_demand = max(demand, sum(last) / len(last)) if last else demand
        timed = [x.slow for x in window if x.slow is not None]
        if load >= s.up_utilization:
            why = (f"load {load:.2f} >= {s.up_utilization:g} for {s.up_after_s:g}s "
                   f"(mean {demand:.1f} requests running or waiting on {n} workers)")
        elif timed and all(timed) and load >= s.target_utilization:
            assert s.latency_target_s is not None
            why = (f"p99 over the {s.latency_target_s * 1000:.0f} ms target for "
                   f"{s.up_after_s:g}s at load {load:.2f}")
        else:
            return None
        to = min(s.max_workers, max(n + 1, math.ceil(now_demand / s.target_utilization)))
        return self._change(n, to, why, now)

    def _down(self, n: int, now: float) -> Decision | None:
        s = self.settings
        if n <= s.min_workers or now - self.changed_at < s.down_cooldown_s:
            return None
        window = self._window(s.down_after_s, now)
        if not window:
            return None
        load = sum(x.load for x in window) / len(window)
        if load > s.down_utilization or any(x.slow for x in window):
            return None
        demand = sum(x.demand for x in window) / len(window)
        to = max(s.min_workers, math.ceil(demand / s.target_utilization))
        if to >= n:
            return None
        return self._change(n, to, f"quiet: load {load:.2f} <= {s.down_utilization:g} "
                                   f"for {s.down_after_s:g}s", now)

    def _change(self, frm: int, to: int, reason: str, now: float) -> Decision:
        self.changed_at = self._since = now
        if to > frm:
            self.grown_at = now
        self._seen.clear()
        return Decision(frm=frm, to=to, reason=reason)


class RecentQuantile:
    """A quantile of the latency histograms' last ``window_s`` seconds, from the
    cumulative bucket counts the workers report (one snapshot a call)."""

    def __init__(self, bounds: list[float], window_s: float = 5.0) -> None:
        self.bounds = bounds
        self.window_s = window_s
        self._snaps: deque[tuple[float, list[int]]] = deque()

    def add(self, now: float, buckets: list[int], q: float = 0.99) -> float | None:
        """Record ``buckets`` (cumulative counts) at ``now``; the ``q`` quantile (an upper
        bound) of what was counted since the oldest snapshot in the window, or None."""
        self._snaps.append((now, list(buckets)))
        while len(self._snaps) > 1 and self._snaps[1][0] <= now - self.window_s:
            self._snaps.popleft()
        old = self._snaps[0][1]
        recent = [max(0, a - (old[i] if i < len(old) else 0)) for i, a in enumerate(buckets)]
        total = sum(recent)
        if not total:
            return None
        seen = 0
        for i, count in enumerate(recent):
            seen += count
            if seen >= q * total:
                return self.bounds[i] if i < len(self.bounds) else math.inf
        return math.inf


class WindowMean:
    """The mean of a sampled value over the last ``window_s`` seconds (the utilization
    that /metrics exports: smoothed, since a scraper samples every 15 s or so)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._values: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> float:
        self._values.append((now, value))
        while self._values[0][0] < now - self.window_s:
            self._values.popleft()
        return sum(v for _, v in self._values) / len(self._values)
