"""Elastic API workers.  The scaling policy alone, on a fake clock: more workers on
sustained load, not on a blip; fewer after a quiet period; never outside the bounds;
cooldowns between changes.  Then a real API node (real nats-server, real worker
processes) under a step load: it scales up and back down to its minimum, every request
is answered, the decisions are events, /metrics has the gauges an autoscaler reads."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import anyio
import click
import msgspec
import pytest
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from nodes.api.autoscale import (
    Decision,
    RecentQuantile,
    Sample,
    ScalePolicy,
    ScaleSettings,
    WindowMean,
    sample_interval,
)
from nodes.cli.apinodes import api_node_extra
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.events import ApiScaled
from protocol.registry import ListNodes
from protocol.state import ApiState
from tests.apiproject import make_api_project
from tests.apistack import api_stack, url
from tests.helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy(**kw: float | int | None) -> tuple[ScalePolicy, Clock]:
    settings = dict(min_workers=1, max_workers=4, up_after_s=2.0, down_after_s=10.0,
                    up_cooldown_s=3.0, down_cooldown_s=5.0)
    settings.update(kw)
    clock = Clock()
    return ScalePolicy(ScaleSettings(**settings), clock=clock), clock  # type: ignore[arg-type]


def _feed(policy: ScalePolicy, clock: Clock, seconds: float, workers: int, busy: int,
          queued: int = 0, p99: float | None = None, every: float = 0.1) -> list[Decision]:
    """Sample every ``every`` s for ``seconds`` or until the first decision: [it] or []."""
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now += every
        d = policy.observe(Sample(workers=workers, busy=min(busy, workers), queued=queued,
                                  p99_s=p99))
        if d is not None:
            return [d]
    return []


def test_sustained_load_scales_up_to_what_carries_it_at_the_target_utilization() -> None:
    policy, clock = _policy()
    assert _feed(policy, clock, 5, workers=1, busy=0) == []
    # 1 worker busy and 2 requests waiting: the 2 s mean reaches 0.85 after 1.7 s;
    # demand 3 at target 0.6 -> 5 workers, the maximum is 4.
    assert _feed(policy, clock, 1.5, workers=1, busy=1, queued=2) == []
    decisions = _feed(policy, clock, 0.5, workers=1, busy=1, queued=2)
    assert [(d.frm, d.to, d.direction) for d in decisions] == [(1, 4, "up")]
    assert decisions[0].reason.startswith("load 0.85 >= 0.85 for 2s (mean 2.")
    assert decisions[0].reason.endswith("requests running or waiting on 1 workers)")


def test_a_blip_of_ten_times_the_load_does_not_scale_up() -> None:
    policy, clock = _policy()
    assert _feed(policy, clock, 5, workers=1, busy=0) == []
    for _ in range(5):  # 0.3 s of 10x load every 2 s: the mean stays low
        assert _feed(policy, clock, 0.3, workers=1, busy=1, queued=9) == []
        assert _feed(policy, clock, 1.7, workers=1, busy=0) == []


def test_a_backlog_reported_beside_an_idle_worker_is_not_load() -> None:
    policy, clock = _policy()
    _feed(policy, clock, 1, workers=2, busy=0)
    # A backlog report is up to a second old: with a worker idle, nothing really waits.
    assert _feed(policy, clock, 5, workers=2, busy=1, queued=3) == []
    [d] = _feed(policy, clock, 5, workers=2, busy=2, queued=3)
    assert (d.frm, d.to) == (2, 4)


def test_load_just_short_of_the_window_does_not_scale_up_and_the_window_does() -> None:
    policy, clock = _policy()
    _feed(policy, clock, 5, workers=2, busy=0)
    assert _feed(policy, clock, 1.0, workers=2, busy=2) == []  # half the window
    assert _feed(policy, clock, 0.6, workers=2, busy=2) == []  # the quiet part counts
    [d] = _feed(policy, clock, 0.2, workers=2, busy=2)
    assert (d.frm, d.to) == (2, 4)  # sized by the last quarter: demand 2 at 0.6


def test_a_quiet_period_scales_down_to_the_minimum_and_not_before() -> None:
    policy, clock = _policy()
    _feed(policy, clock, 5, workers=1, busy=0)
    [up] = _feed(policy, clock, 2.05, workers=1, busy=1, queued=5)
    assert up.to == 4
    assert _feed(policy, clock, 9.9, workers=4, busy=0) == []  # quiet, not long enough
    [down] = _feed(policy, clock, 0.3, workers=4, busy=0)
    assert (down.frm, down.to, down.direction) == (4, 1, "down")
    assert down.reason == "quiet: load 0.00 <= 0.3 for 10s"
    assert _feed(policy, clock, 60, workers=1, busy=0) == []  # never below the minimum


def test_moderate_load_scales_down_only_to_what_carries_it() -> None:
    policy, clock = _policy(min_workers=1, max_workers=8)
    _feed(policy, clock, 5, workers=1, busy=0)
    [up] = _feed(policy, clock, 2.05, workers=1, busy=1, queued=7)
    assert up.to == 8
    # One of eight busy for the quiet period: 1 / 0.6 -> 2 workers, not 1.
    [down] = _feed(policy, clock, 10.05, workers=8, busy=1)
    assert (down.frm, down.to) == (8, 2)
    assert _feed(policy, clock, 1, workers=2, busy=1) == []
    # Between the thresholds (load 0.5 on 2 workers): no change either way.
    assert _feed(policy, clock, 30, workers=2, busy=1) == []


def test_the_maximum_is_never_passed_and_a_count_out_of_bounds_is_brought_back() -> None:
    policy, clock = _policy(min_workers=2, max_workers=3)
    clock.now += 1
    d = policy.observe(Sample(workers=1, busy=0, queued=0))
    assert d is not None and (d.frm, d.to) == (1, 2) and "minimum (2..3)" in d.reason
    d = policy.observe(Sample(workers=5, busy=0, queued=0))
    assert d is not None and (d.frm, d.to) == (5, 3) and "maximum (2..3)" in d.reason
    assert _feed(policy, clock, 30, workers=3, busy=3, queued=50) == []  # at the maximum


def test_after_a_scale_up_the_next_waits_for_the_cooldown_and_a_fresh_window() -> None:
    policy, clock = _policy(max_workers=10, up_cooldown_s=3.0)
    _feed(policy, clock, 5, workers=1, busy=0)
    [first] = _feed(policy, clock, 2.05, workers=1, busy=1, queued=3)
    assert (first.frm, first.to) == (1, 7)  # demand 4 now, at 0.6
    t0 = policy.changed_at
    # Still saturated with 6: the window is full after 2 s, the cooldown after 3 s.
    [second] = _feed(policy, clock, 5, workers=6, busy=6, queued=4)
    assert (second.frm, second.to) == (6, 10)
    assert 3.0 <= policy.changed_at - t0 < 3.15


def test_a_scale_down_does_not_delay_the_next_scale_up_beyond_a_fresh_window() -> None:
    policy, clock = _policy(down_after_s=1.0, up_cooldown_s=3.0)
    _feed(policy, clock, 5, workers=1, busy=0)
    [up] = _feed(policy, clock, 2.05, workers=1, busy=1, queued=3)
    [down] = _feed(policy, clock, 8, workers=up.to, busy=0)
    assert down.to == 1
    t0 = policy.changed_at
    [again] = _feed(policy, clock, 5, workers=1, busy=1, queued=3)  # a step right after
    assert (again.frm, again.to) == (1, 4)
    assert 2.0 <= policy.changed_at - t0 < 2.15  # one fresh 2 s window, no 3 s cooldown


def test_no_scale_down_within_the_down_cooldown_of_a_change() -> None:
    policy, clock = _policy(down_after_s=1.0, down_cooldown_s=6.0)
    _feed(policy, clock, 5, workers=1, busy=0)
    [up] = _feed(policy, clock, 2.05, workers=1, busy=1, queued=3)
    t0 = policy.changed_at
    [down] = _feed(policy, clock, 8, workers=up.to, busy=0)
    assert down.to == 1 and 6.0 <= policy.changed_at - t0 < 6.15


def test_p99_over_the_target_scales_up_only_when_the_workers_are_loaded() -> None:
    policy, clock = _policy(latency_target_s=0.1)
    _feed(policy, clock, 5, workers=2, busy=0)
    # Slow requests but idle workers: another worker would not make them faster.
    assert _feed(policy, clock, 5, workers=2, busy=0, p99=0.5) == []
    # Loaded (0.75, under the 0.85 of the load rule) and slow: one more.
    decisions: list[Decision] = []
    for _ in range(20):
        decisions += _feed(policy, clock, 0.1, workers=2, busy=2, p99=0.5)
        decisions += _feed(policy, clock, 0.1, workers=2, busy=1, p99=0.5)
        if decisions:
            break
    assert [(d.frm, d.to) for d in decisions] == [(2, 3)]
    assert decisions[0].reason == "p99 over the 100 ms target for 2s at load 0.60"


def test_a_slow_p99_holds_back_a_scale_down() -> None:
    policy, clock = _policy(latency_target_s=0.1, min_workers=1)
    _feed(policy, clock, 5, workers=3, busy=0)
    assert _feed(policy, clock, 20, workers=3, busy=0, p99=0.5) == []
    [d] = _feed(policy, clock, 10.05, workers=3, busy=0, p99=0.05)
    assert (d.frm, d.to) == (3, 1)


def test_a_periodic_light_load_sampled_at_random_moments_does_not_scale_up() -> None:
    """One worker busy 20 ms of every 100 ms (10 req/s of a 20 ms endpoint, sent on the
    dot).  Sampled on the dot every ~0.1 s, the sampler locks in phase with the load and
    sees the worker busy for seconds in a row: a scale-up.  Sampled at the node's random
    moments, the load is seen as what it is: no scale-up in two simulated minutes."""
    def busy(t: float) -> int:
        return 1 if (t - 1000.0) % 0.1 < 0.02 else 0

    def ups(interval: Callable[[], float]) -> list[Decision]:
        policy, clock = _policy(up_after_s=1.0, down_after_s=5.0)
        out = []
        while clock.now < 1120.0:
            clock.now += interval()
            d = policy.observe(Sample(workers=1, busy=busy(clock.now), queued=0))
            if d is not None:
                out.append(d)
        return out

    on_the_dot = ups(lambda: 0.1003)  # a loop sleeping 0.1 s and a little more
    assert on_the_dot and on_the_dot[0].to == 2
    assert "load 1.00" in on_the_dot[0].reason
    rand = random.Random(7)
    settings = ScaleSettings(min_workers=1, max_workers=4)
    assert ups(lambda: sample_interval(settings, rand.random())) == []


def test_settings_that_cannot_work_are_refused_with_what_was_expected() -> None:
    with pytest.raises(ValueError, match="max_workers \\(1\\) is below min_workers \\(2\\)"):
        ScaleSettings(min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match="min_workers is 0: expected at least 1"):
        ScaleSettings(min_workers=0)
    with pytest.raises(ValueError, match="expected 0 < down_utilization < target"):
        ScaleSettings(down_utilization=0.7)
    with pytest.raises(ValueError, match="down_after_s is 0: expected > 0"):
        ScaleSettings(down_after_s=0)
    assert not ScaleSettings(min_workers=3, max_workers=3).elastic


def test_recent_quantile_and_window_mean_forget_what_is_older_than_the_window() -> None:
    q = RecentQuantile([0.01, 0.1, 1.0], window_s=5)
    assert q.add(0, [0, 0, 0, 0]) is None
    assert q.add(1, [100, 0, 0, 0]) == 0.01
    assert q.add(2, [100, 0, 5, 0]) == 1.0  # 5 of 105 slow: the p99 is slow
    assert q.add(7, [100, 0, 5, 0]) is None  # nothing new in the last 5 s
    assert q.add(8, [100, 50, 5, 0]) == 0.1
    m = WindowMean(window_s=10)
    assert m.add(0, 1.0) == 1.0
    assert m.add(5, 0.0) == 0.5
    assert m.add(12, 0.0) == 0.0  # the 1.0 at t=0 is out of the window



# -- a real API node under a step load -------------------------------------------------

SCALING = ScaleSettings(min_workers=1, max_workers=3, up_after_s=0.5, down_after_s=1.0,
                        up_cooldown_s=0.5, down_cooldown_s=0.0, sample_every_s=0.05)


async def test_a_step_load_scales_workers_up_and_back_to_the_minimum_failing_no_request(
        settings: NatsSettings, tmp_path: Path) -> None:
    """Each predict sleeps 50 ms.  One client pausing 0.1 s between requests (a third
    of a worker), then ten (the step, within one second): the node adds workers, which
    serve only once loaded; then one client at a sixth of a worker: after the 1 s
    quiet period the node retires workers back to its minimum, draining them.  Every
    response of every phase is a 200."""
    make_api_project(tmp_path / "ws", version="1", sleep=0.05)
    async with api_stack(settings, tmp_path) as s:
        events: list[ApiScaled] = []
        decoder = msgspec.json.Decoder(ApiScaled)

        async def on_event(msg: Msg) -> None:
            events.append(decoder.decode(msg.data))

        sub = await s.nc.subscribe(subjects.event("api", "prod", "api-1", "scaled"),
                                   cb=on_event)
        node = await s.api_node("api-1", workers=None, scaling=SCALING)
        await s.package("v1")
        await s.deploy({"v1": 100})
        codes: list[int] = []
        pids: set[int] = set()
        phase = {"clients": 1, "pause": 0.1}
        stop = anyio.Event()

        async def client(i: int) -> None:
            while not stop.is_set() and i < phase["clients"]:
                r = await s.http.post(url(node), json={"features": {"x": 1}})
                codes.append(r.status_code)
                if r.status_code == 200:
                    pids.add(r.json()["result"]["pid"])
                await anyio.sleep(phase["pause"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(client, 0)
            await wait_for(lambda: len(codes) >= 5, timeout=10, message="baseline load")
            assert node.pool.size == 1
            phase["clients"] = 10
            for i in range(1, 10):  # ten times the load, within one second
                tg.start_soon(client, i)
                await anyio.sleep(0.1)
            await wait_for(lambda: len(node.pool.serving) > 1, timeout=15,
                           message="a worker added and serving")
            added = len(codes)
            await wait_for(lambda: len(codes) >= added + 30, timeout=15,
                           message="requests served after scaling up")
            assert len(pids) > 1  # the added workers took traffic
            phase["clients"], phase["pause"] = 1, 0.3  # one client, ~0.15 of a worker
            await wait_for(lambda: node.pool.size == 1 and len(node.pool.workers) == 1,
                           timeout=15, message="back to the minimum of 1 worker")
            done = len(codes)
            await wait_for(lambda: len(codes) >= done + 3, timeout=10,
                           message="the last worker serving")
            stop.set()
        await sub.unsubscribe()
        assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        await wait_for(lambda: any(e.direction == "down" for e in events), timeout=5,
                       message="the scale-down event")
        ups = [e for e in events if e.direction == "up"]
        downs = [e for e in events if e.direction == "down"]
        assert ups and downs and events.index(ups[0]) < events.index(downs[-1])
        assert ups[0].from_workers == 1 and 1 < ups[0].to_workers <= 3
        assert downs[-1].to_workers == 1 and downs[-1].reason.startswith("quiet: load")
        assert {(e.node, e.infra, e.min_workers, e.max_workers) for e in events} == \
            {("api-1", "prod", 1, 3)}

        r = await s.http.get(f"{node.http.url}/metrics")  # type: ignore[union-attr]
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        values = {(x.name, tuple(sorted(x.labels.items()))): x.value
                  for f in families.values() for x in f.samples}
        node_label = (("node", "api-1"),)
        assert 0.0 <= values[("shipyard_api_worker_utilization", node_label)] <= 1.0
        assert values[("shipyard_api_queue_depth", node_label)] >= 0
        assert values[("shipyard_api_requests_in_flight", node_label)] >= 0
        assert values[("shipyard_api_workers_bound", (("bound", "max"), *node_label))] == 3
        assert values[("shipyard_api_workers_bound", (("bound", "min"), *node_label))] == 1
        scaled = "shipyard_api_scale_events_total"
        assert values[(scaled, (("direction", "up"), *node_label))] == len(ups)
        assert values[(scaled, (("direction", "down"), *node_label))] == len(downs)

        async def registered() -> ApiState | None:
            reply = await s.caller.call(ListNodes(role="api"))
            state = reply.nodes[0].state if reply.nodes else None
            return state if isinstance(state, ApiState) and state.max_workers == 3 else None
        state = await wait_for(registered, timeout=10, message="bounds in the heartbeat")
        assert (state.workers, state.min_workers) == (1, 1)


def test_worker_bounds_are_api_node_options_and_workers_is_a_fixed_count() -> None:
    extra = api_node_extra("api", {"min_workers": 2, "max_workers": 5,
                                   "scale_down_after": 30.0})
    assert extra["scaling"] == ScaleSettings(min_workers=2, max_workers=5, down_after_s=30)
    assert "workers" not in extra
    assert api_node_extra("api", {"workers": 3}) == {"workers": 3, "debug": False}
    assert api_node_extra("api", {"max_workers": 4})["scaling"].min_workers == 1
    tuned = api_node_extra("api", {"latency_target": 0.2})["scaling"]
    assert not tuned.elastic and tuned.latency_target_s == 0.2  # the default fixed count
    with pytest.raises(click.BadParameter, match="--max-workers 2 is below --min-workers 3"):
        api_node_extra("api", {"min_workers": 3, "max_workers": 2})
    with pytest.raises(click.BadParameter, match="--workers is a fixed count"):
        api_node_extra("api", {"workers": 2, "max_workers": 4})
    with pytest.raises(click.BadParameter, match="--max-workers is not an option of gateway"):
        api_node_extra("gateway", {"max_workers": 4})
