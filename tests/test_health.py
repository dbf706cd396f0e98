"""Health: the pure rules (nodes.deployer.health, with injected clocks), then
``shipyard status`` against a real Deployer: exit 0 when healthy, 1 naming a node killed
with SIGKILL (a real process), 1 naming a failed run; and an API's error rate over its
threshold, measured from real requests to a real API node."""

from __future__ import annotations

import json
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from nodes.deployer.health import (
    MIN_REQUESTS,
    WINDOW_S,
    HealthTracker,
    TrafficWindow,
    governance_verdict,
    infra_health,
    rollup,
    runs_verdict,
    traffic_verdict,
)
from nodes.deployer.updates import judge
from nodes.runtime.settings import NatsSettings
from protocol.api import LATENCY_BUCKETS_S, ApiMetricsReport, DeployApi, EndpointMetrics
from protocol.deploy import (
    ERROR,
    HEALTHY,
    UNKNOWN,
    WARNING,
    CreateInfra,
    DeployBundle,
    DeploymentView,
    Infra,
    NodeDeployment,
    Update,
)
from protocol.errors import BadRequest, NotFound
from protocol.health import GetHealth, HealthReport, worst
from protocol.registry import LOST, ONLINE, NodeInfo
from protocol.scenarios import RunScenario, RunSummary, StepSummary
from tests.helpers import Background, fleet, shipyard, shipyard_argv, wait_for

# -- pure rules ------------------------------------------------------------------------


def _node(name: str, status: str = ONLINE, infra: str = "prod",
          role: str = "automation") -> NodeInfo:
    return NodeInfo(name=name, role=role, infra=infra, status=status, last_seen=0.0,
                    first_seen=0.0, version="1", host="h", pid=1, uptime_s=1.0,
                    interval_s=1.0, last_seen_s=0.0 if status == ONLINE else 12.0)


def _view(name: str, health: str, reasons: list[str] | None = None, infra: str = "prod",
          kind: str = "bundle") -> DeploymentView:
    return DeploymentView(project=name, infra=infra, desired="v1", previous=None,
                          revision=1, update_id="u", updated_at=0.0, updated_by="t",
                          state="in_sync", health=health, reasons=reasons or [], kind=kind)


def _run(run_id: str, scenario: str, outcome: str, finished_at: float | None,
         **kw: Any) -> RunSummary:
    return RunSummary(run_id=run_id, project="flows", scenario=scenario, infra="prod",
                      node="a1", bundle="v1", trigger="manual", finished_at=finished_at,
                      outcome=outcome, **kw)


def test_health_values_order_healthy_unknown_warning_error() -> None:
    assert worst() == HEALTHY
    assert worst(HEALTHY, UNKNOWN) == UNKNOWN
    assert worst(UNKNOWN, WARNING, HEALTHY) == WARNING
    assert worst(WARNING, ERROR, UNKNOWN) == ERROR


def test_an_api_node_with_no_ready_worker_degrades_its_deployment() -> None:
    """Its workers keep dying (a crash at start): it runs the version but answers
    nothing, so it counts as a node that cannot serve."""
    def health(*nodes: NodeDeployment) -> tuple[str, str, list[str]]:
        return judge(want="v1", infra="api", role="api", verbs=("serves", "serving", "served"),
                     pending=False, per_node=list(nodes))

    ok = NodeDeployment(node="api-1", status=ONLINE, running="v1", activity="serving")
    broken = NodeDeployment(node="api-2", status=ONLINE, running="v1", activity="serving",
                            degraded="no worker process is ready to serve (7 crashed)")
    state, h, reasons = health(ok, broken)
    assert (state, h) == ("in_sync", WARNING)
    assert reasons == ["api-2: no worker process is ready to serve (7 crashed)"]
    assert health(broken)[1] == ERROR  # no node left that can answer


def test_the_deployer_reads_a_node_without_ready_workers_as_degraded() -> None:
    from nodes.deployer.api_deployments import _node_deployment
    from protocol.api import ApiDeploymentRecord, ApiMapping
    from protocol.registry import NodeInfo
    from protocol.state import ApiState, ServiceState

    def node(ready: int | None) -> NodeInfo:
        state = ApiState(workers=2, ready_workers=ready, worker_crashes=3, services={
            "shop": ServiceState(stage="serving", mapping="v1")})
        return NodeInfo(name="api-1", role="api", infra="api", status=ONLINE, last_seen=0.0,
                        first_seen=0.0, version="1", host="h", pid=1, uptime_s=1.0,
                        interval_s=1.0, state=state)

    rec = ApiDeploymentRecord(service="shop", infra="api",
                              mapping=ApiMapping(generations={"v1": 100}), update_id="u")
    assert "3 crashed" in _node_deployment(node(0), rec).degraded
    assert _node_deployment(node(1), rec).degraded == ""
    assert _node_deployment(node(None), rec).degraded == ""  # a node that does not say


def test_node_liveness_and_activation_judge_a_deployment() -> None:
    def health(*nodes: NodeDeployment) -> tuple[str, list[str]]:
        _, h, reasons = judge(want="v1", infra="prod", role="automation",
                              verbs=("runs", "running", "ran"), pending=False,
                              per_node=list(nodes))
        return h, reasons

    ok = NodeDeployment(node="a1", status=ONLINE, running="v1")
    lost = NodeDeployment(node="a2", status=LOST, running="v1")
    refused = NodeDeployment(node="a3", status=ONLINE, running="v0", error="bad digest")
    assert health(ok) == (HEALTHY, [])
    h, reasons = health(ok, lost)  # one lost, one serving: degraded
    assert h == WARNING and reasons == ["a2 is lost (last ran v1)"]
    assert health(lost)[0] == ERROR  # nobody left to run it
    h, reasons = health(ok, refused)
    assert h == ERROR and "a3: refused v1: bad digest" in reasons[0]
    assert health()[0] == UNKNOWN  # no node has joined


def test_the_last_run_of_each_scenario_judges_a_project() -> None:
    assert runs_verdict([]) == (HEALTHY, [])
    # nightly failed, then succeeded: healthy again; report's last run failed: ERROR.
    runs = [_run("r1", "nightly", "FAILED", 1.0, error="boom"),
            _run("r2", "nightly", "SUCCESS", 2.0),
            _run("r3", "report", "FAILED", 1.5, error="ValueError: bad row 7"),
            _run("r4", "report", "RUNNING", None),
            _run("r5", "slow", "CANCELLED", 3.0)]
    health, reasons = runs_verdict(runs)
    assert health == ERROR
    assert reasons == ["last run r3 of scenario report failed: ValueError: bad row 7 "
                       "(its log: shipyard run logs r3)"]
    warned = _run("r6", "nightly", "WARNING", 4.0, steps=[
        StepSummary(index=0, kind="check", name="clean", outcome="WARNING",
                    message="row_count 3 < soft_min 4")])
    health, reasons = runs_verdict([runs[1], warned])
    assert health == WARNING
    assert reasons == ["last run r6 of scenario nightly warned (clean: row_count 3 < "
                       "soft_min 4)"]


def test_governance_warnings_of_the_current_update_warn() -> None:
    update = Update(id="u", at=0.0, by="t", action="deploy", from_bundle=None, to_bundle="v1",
                    warnings=["bundle flows v1 is not approved"])
    assert governance_verdict(update) == (
        WARNING, ["govern warning: bundle flows v1 is not approved"])
    assert governance_verdict(None) == (HEALTHY, [])


def _report(node: str, *, requests: int, errors: int, slow: int = 0,
            shadow: bool = False) -> ApiMetricsReport:
    fast = [0] * (len(LATENCY_BUCKETS_S) + 1)
    fast[2] = requests - slow  # 2.5 ms
    fast[10] += slow  # 1 s
    rows = [EndpointMetrics(service="svc", endpoint="predict", generation="v1", shadow=False,
                            requests=requests, errors=errors, inflight=0, latency_sum_s=0.0,
                            buckets=fast)]
    if shadow:  # a shadow that fails everything: not the service's health
        rows.append(EndpointMetrics(service="svc", endpoint="predict", generation="v2",
                                    shadow=True, requests=requests, errors=requests,
                                    inflight=0, latency_sum_s=0.0, buckets=fast))
    return ApiMetricsReport(node=node, infra="prod", ts=0.0, interval_s=5.0, endpoints=rows)


def test_api_error_rate_and_p95_against_thresholds_over_a_sliding_window() -> None:
    now = [1000.0]
    window = TrafficWindow(clock=lambda: now[0])
    judge_now = lambda: traffic_verdict(window.traffic("svc", ["n1", "n2"]),  # noqa: E731
                                        max_error_rate=0.01, max_p95_ms=200)
    assert judge_now() == (HEALTHY, [])  # no report yet
    window.add(_report("n1", requests=MIN_REQUESTS - 1, errors=MIN_REQUESTS - 1))
    assert judge_now() == (HEALTHY, [])  # too few requests to judge a rate
    # n1 restarted (its error count went down): 100 requests since, 2 errors (2%): above
    # 1%, below 5 x 1%: WARNING.  Its failing shadow does not count.
    window.add(_report("n1", requests=100, errors=2, shadow=True))
    health, [reason] = judge_now()
    assert health == WARNING and reason.startswith("error rate 2.0% ")
    assert "(2 of 100 requests) is above 1.0%" in reason
    # A second node: 100 more requests, 8 errors: 10 of 200 = 5%: ERROR.
    now[0] += 5
    window.add(_report("n2", requests=100, errors=8))
    assert judge_now()[0] == ERROR
    # A minute later n1 reports again with no new errors; n2 restarted (counters reset).
    now[0] += WINDOW_S
    window.add(_report("n1", requests=300, errors=2, slow=100))
    window.add(_report("n2", requests=50, errors=0))
    traffic = window.traffic("svc", ["n1", "n2"])
    assert traffic is not None and (traffic.requests, traffic.errors) == (250, 0)
    health, [reason] = judge_now()
    assert health == WARNING and reason.startswith("p95 latency 1000 ms") \
        and "above 200 ms" in reason
    window.forget("n1")
    assert window.traffic("svc", ["n1"]) is None


def test_infra_rollup_worst_of_nodes_and_deployments() -> None:
    prod = Infra(name="prod", kind="automation", stage="production")
    healthy = infra_health("prod", prod, [_node("a1")], [_view("flows", HEALTHY)])
    assert (healthy.health, healthy.reasons) == (HEALTHY, [])
    nothing_deployed = infra_health("prod", prod, [_node("a1")], [])
    assert nothing_deployed.health == HEALTHY
    empty = infra_health("prod", prod, [], [])
    assert (empty.health, empty.reasons) == (UNKNOWN, ["no node has joined infra prod"])
    lost = infra_health("prod", prod, [_node("a1"), _node("a2", LOST)],
                        [_view("flows", WARNING, ["a2 is lost (last ran v1)"])])
    assert lost.health == ERROR
    assert lost.reasons[0].startswith("node a2 (automation) is lost, silent for 12s")
    assert lost.reasons[1] == "bundle flows is WARNING: a2 is lost (last ran v1)"
    assert [n.health for n in lost.nodes] == [HEALTHY, ERROR]
    failing = infra_health("prod", prod, [_node("a1")],
                           [_view("flows", ERROR, ["last run r1 failed", "x"])])
    assert failing.reasons == ["bundle flows is ERROR: last run r1 failed (and 1 more)"]


def test_fleet_rollup_covers_every_infra_and_control_plane_nodes() -> None:
    infras = [Infra(name="prod", kind="automation"), Infra(name="edge", kind="api")]
    nodes = [_node("a1"), _node("design", LOST, infra="default", role="design")]
    report = rollup(infras, nodes, [_view("flows", WARNING, ["w"])], clock=lambda: 42.0)
    assert report.ts == 42.0 and report.health == ERROR
    assert {i.name: i.health for i in report.infras} == {
        "default": ERROR, "edge": UNKNOWN, "prod": WARNING}
    only = rollup(infras, nodes, [], only="prod")
    assert [i.name for i in only.infras] == ["prod"] and only.health == HEALTHY
    assert rollup([], [], []).health == UNKNOWN


def test_a_health_change_is_reported_once_it_held() -> None:
    now = [0.0]
    tracker = HealthTracker(hold_s=5.0, clock=lambda: now[0])
    prod = Infra(name="prod", kind="automation")

    def report(health: str) -> HealthReport:
        return rollup([prod], [_node("a1")], [_view("flows", health, ["why"])])

    assert tracker.changes(report(HEALTHY)) == []  # the starting point
    now[0] = 1.0
    assert tracker.changes(report(WARNING)) == []  # not held yet
    now[0] = 3.0
    assert tracker.changes(report(HEALTHY)) == []  # a blip: back before the hold
    now[0] = 4.0
    assert tracker.changes(report(ERROR)) == []
    now[0] = 9.5
    changes = tracker.changes(report(ERROR))
    assert sorted((c.about, c.name, c.previous, c.health) for c in changes) == [
        ("deployment", "flows", HEALTHY, ERROR), ("infra", "prod", HEALTHY, ERROR)]
    deployment = next(c for c in changes if c.about == "deployment")
    assert deployment.kind == "bundle" and deployment.reasons == ["why"]
    assert deployment.subject() == "sy.evt.health.prod.bundle.flows"
    assert tracker.changes(report(ERROR)) == []  # reported once


# -- against a real Deployer -----------------------------------------------------------

async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, waited for in a thread: the nodes it talks to run
    in this event loop."""
    return await anyio.to_thread.run_sync(partial(shipyard, *args, env=env))


async def _status(env: dict[str, str], *args: str) -> tuple[int, Any]:
    proc = await _cli(env, "status", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


async def test_status_exits_1_naming_a_lost_node_and_a_failed_run_and_0_when_healthy(
        settings: NatsSettings, tmp_path: Path, cli_env: dict[str, str]) -> None:
    from tests.projects import make_flow_project
    from tests.test_deploy import HB, automation, control_plane, converged
    broken = {"recipes/clean.py": "def run(ctx):\n    raise ValueError('bad row 7')\n"}
    make_flow_project(tmp_path / "ws", files=broken)
    env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        await f.start(automation(settings, tmp_path, "a1"))
        await caller.call(CreateInfra(name="edge", kind="automation"))
        edge = Background(shipyard_argv("node", "start", "automation", "--name", "e1",
                                        "--infra", "edge", "--data-dir", str(tmp_path / "e1"),
                                        "--heartbeat-interval", str(HB)), env=env)
        try:
            from protocol.bundles import CreateBundle
            await caller.call(CreateBundle(project="flows", bundle_id="v1"), timeout=30)
            await caller.call(DeployBundle(project="flows", bundle_id="v1", infra="prod"))
            await wait_for(lambda: converged(caller, "v1", 1, project="flows"), timeout=20,
                           message="flows v1 active")

            async def healthy() -> HealthReport | None:
                report = await caller.call(GetHealth())
                names = {n.name for i in report.infras for n in i.nodes}
                return report if report.health == HEALTHY and "e1" in names else None
            await wait_for(healthy, timeout=20, message="a healthy fleet with e1")
            text = await _cli(env, "status")
            assert text.returncode == 0 and "fleet: HEALTHY" in text.stdout, text.stderr
            with pytest.raises(NotFound, match="unknown infra 'nope'"):
                await caller.call(GetHealth(infra="nope"))
            with pytest.raises(BadRequest, match="invalid infra"):
                await caller.call(GetHealth(infra="a.b"))

            # A node killed with SIGKILL: its infra is ERROR, named; prod is unaffected.
            edge.proc.send_signal(signal.SIGKILL)
            await wait_for(lambda: _infra_health(caller, "edge", ERROR), timeout=10,
                           message="edge ERROR")
            code, report = await _status(env, "--infra", "edge")
            assert code == 1 and report["health"] == ERROR
            [infra] = report["infras"]
            assert infra["reasons"][0].startswith("node e1 (automation) is lost")
            assert await _infra_health(caller, "prod", HEALTHY)

            # A failed scenario run: prod's deployment is ERROR, naming the run.
            accepted = await caller.call(RunScenario(project="flows", scenario="nightly",
                                                     infra="prod"))
            await wait_for(lambda: _infra_health(caller, "prod", ERROR), timeout=30,
                           message="prod ERROR after the failed run")
            [dep] = (await caller.call(GetHealth(infra="prod"))).deployments()
            assert any(accepted.run_id in r and "ValueError: bad row 7" in r
                       for r in dep.reasons)
            text = await _cli(env, "status", "--infra", "prod")
            assert text.returncode == 1 and accepted.run_id in text.stdout, text.stderr
            # The infra's row says which deployment made it ERROR, not just "-".
            [row] = [line for line in text.stdout.splitlines() if line.startswith("prod ")]
            assert "ERROR" in row and "bundle flows is ERROR" in row, text.stdout
        finally:
            edge.stop(signal.SIGKILL)
        await nc.close()


async def test_status_without_a_deployer_exits_2_saying_health_is_unknown(
        settings: NatsSettings, cli_env: dict[str, str]) -> None:
    env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
    for args in ((), ("--json",), ("--infra", "prod")):
        proc = await _cli(env, "status", *args)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.startswith("shipyard: health unknown: no deployer node is "
                                      "running"), proc.stderr
        assert "Traceback" not in proc.stderr


async def _infra_health(caller: Any, infra: str, health: str) -> bool:
    report = await caller.call(GetHealth(infra=infra))
    return bool(report.infras[0].health == health)


async def test_an_api_error_rate_over_its_threshold_is_a_warning(
        settings: NatsSettings, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """4% errors against --max-error-rate 0.01: WARNING (ERROR from 5%); status exits 0."""
    from tests.apiproject import make_api_project
    from tests.apistack import SERVICE, api_stack, url
    make_api_project(tmp_path / "ws", version="1")
    env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1")
        await s.package("v1")
        await s.deploy({"v1": 100})
        with pytest.raises(BadRequest, match="invalid max_error_rate"):
            await s.caller.call(DeployApi(service=SERVICE, infra="prod",
                                          generations={"v1": 100}, max_error_rate=2.0))
        view = await s.caller.call(DeployApi(service=SERVICE, infra="prod",
                                             generations={"v1": 100}, max_error_rate=0.01))
        assert view.extra["max_error_rate"] == 0.01 and view.extra["max_p95_ms"] == 1000.0
        for i in range(25):
            features = {"boom": "x"} if i == 0 else {"x": 1}
            r = await s.http.post(url(node), json={"features": features})
            assert r.status_code == (200 if i else 500), r.text

        async def warned() -> Any:
            report = await s.caller.call(GetHealth(infra="prod"))
            [dep] = report.infras[0].deployments
            return dep if dep.health == WARNING else None
        dep = await wait_for(warned, timeout=15, message="WARNING from the error rate")
        assert any(r.startswith("error rate 4.0% ") and "(1 of 25 requests)" in r
                   and "above 1.0%" in r for r in dep.reasons)
        code, report = await _status(env, "--infra", "prod")
        assert code == 0 and report["health"] == WARNING

