"""``shipyard monitor``: the state model (pure, on an injected clock), its drawing, and
the command against a real stack that deploys and runs a scenario (piped, with no
progress noise), then loses its Deployer and its NATS server."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from rich.console import Console

from nodes.cli.monitor import HISTORY_EVENTS, Feed, plain_text, render
from nodes.cli.monitor_model import BadFilter, Filter, MonitorModel
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.jetstream import ensure_events_stream, publish_event
from nodes.runtime.settings import NatsSettings
from protocol.api import ANY_GENERATION, LATENCY_BUCKETS_S, ApiMetricsReport, EndpointMetrics
from protocol.deploy import DeploymentView, InfraCreatedEvent, NodeDeployment
from protocol.events import NodeLost, NodeOnline
from protocol.heartbeat import Heartbeat
from protocol.registry import NodeInfo
from protocol.scenarios import RunFinished, RunProgress, RunStarted, RunSummary
from tests.helpers import Background, shipyard, shipyard_argv, wait_until
from tests.projects import make_flow_project
from tests.test_progress import PROGRESS_NOISE


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def beat(node: str, *, role: str = "automation", infra: str = "prod", seq: int = 1,
         uptime: float = 10.0, cpu: float = 1.0, rss: int = 50 << 20, pid: int = 7,
         ts: float = 0.0) -> Heartbeat:
    return Heartbeat(node=node, role=role, infra=infra, version="1.0", host="h", pid=pid,
                     uptime_s=uptime, interval_s=1.0, seq=seq, ts=ts, cpu_s=cpu,
                     rss_bytes=rss)


def model(filter_text: str | None = None) -> tuple[MonitorModel, Clock]:
    clock = Clock()
    return MonitorModel(filter=Filter.parse(filter_text), clock=clock,
                        wall=lambda: 5000.0 + clock.t), clock


def test_a_node_shows_its_cpu_share_between_two_beats_and_turns_lost_after_three_intervals(
        ) -> None:
    m, clock = model()
    m.on_heartbeat(beat("a1", uptime=10.0, cpu=1.0))
    [row] = m.node_rows()
    assert (row.status, row.cpu_pct, row.rss_bytes) == ("online", None, 50 << 20)
    clock.t += 1.0
    m.on_heartbeat(beat("a1", seq=2, uptime=12.0, cpu=1.5))
    [row] = m.node_rows()
    assert row.cpu_pct == 25.0 and row.age_s == 0.0
    clock.t += 3.5  # more than 3 intervals of 1 s
    [row] = m.node_rows()
    assert (row.status, row.age_s, row.cpu_pct) == ("lost", 3.5, None)
    # Its exit report makes it lost at once; a report about another process does not.
    m.on_heartbeat(beat("a1", seq=3, uptime=14.0, cpu=1.6))
    m.on_exit("a1", pid=99)
    assert m.node_rows()[0].status == "online"
    m.on_exit("a1", pid=7)
    assert m.node_rows()[0].status == "lost"
    # A restart (new pid) has no CPU share until its second beat.
    m.on_heartbeat(beat("a1", pid=8, uptime=0.5, cpu=0.1))
    [row] = m.node_rows()
    assert (row.status, row.cpu_pct) == ("online", None)


def test_a_node_not_heard_yet_takes_the_deployers_verdict_and_a_forgotten_one_goes() -> None:
    m, clock = model()
    info = NodeInfo(name="a2", role="automation", infra="prod", status="lost",
                    last_seen=1.0, first_seen=1.0, version="1.0", host="h", pid=3,
                    uptime_s=1.0, interval_s=1.0, last_seen_s=40.0)
    m.on_nodes([info])
    clock.t += 2
    [row] = m.node_rows()
    assert (row.name, row.status, row.age_s) == ("a2", "lost", 42.0)
    # Beats seen here decide, whatever an older answer said; an exit the Deployer
    # learnt of after the last beat makes the node lost at once.
    m.on_heartbeat(beat("a2", pid=3))
    m.on_nodes([msgspec_replace(info, status="online")])
    clock.t += 3.5
    assert m.node_rows()[0].status == "lost"
    m.on_heartbeat(beat("a2", pid=3, seq=2))
    clock.t += 0.1
    m.on_nodes([info])
    assert m.node_rows()[0].status == "lost"
    m.on_nodes([])  # forgotten (it goes once silent here too)
    clock.t += 3.5
    m.on_nodes([])
    assert m.node_rows() == []
    m.on_heartbeat(beat("a3"))  # never listed lost: kept, and judged lost here
    clock.t += 3.5
    m.on_nodes([])
    assert [(r.name, r.status) for r in m.node_rows()] == [("a3", "lost")]


def test_the_first_round_lists_every_node_so_the_view_is_whole_before_their_beats() -> None:
    m, clock = model()
    online = NodeInfo(name="a4", role="automation", infra="prod", status="online",
                      last_seen=1.0, first_seen=1.0, version="1.0", host="h", pid=4,
                      uptime_s=1.0, interval_s=10.0, last_seen_s=2.0)
    m.on_nodes([online], everyone=True)
    assert [(r.name, r.status) for r in m.node_rows()] == [("a4", "online")]
    clock.t += 2
    m.on_nodes([])  # later rounds ask for the lost ones: a4 is not among them
    assert [(r.name, r.status, r.age_s) for r in m.node_rows()] == [("a4", "online", 4.0)]
    m.on_heartbeat(beat("a4", pid=4))
    m.on_nodes([])
    assert [(r.name, r.status, r.age_s) for r in m.node_rows()] == [("a4", "online", 0.0)]


def metrics(node: str, gen: str, requests: int, errors: int, fast: int, slow: int,
            service: str = "shop") -> ApiMetricsReport:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    buckets[LATENCY_BUCKETS_S.index(0.005)] = fast
    buckets[LATENCY_BUCKETS_S.index(0.25)] = slow
    return ApiMetricsReport(node=node, infra="apis", ts=0.0, interval_s=1.0, endpoints=[
        EndpointMetrics(service=service, endpoint="predict", generation=gen, shadow=False,
                        requests=requests, errors=errors, inflight=0, latency_sum_s=0.0,
                        buckets=buckets),
        EndpointMetrics(service=service, endpoint="predict", generation=ANY_GENERATION,
                        shadow=False, requests=0, errors=0, inflight=1, latency_sum_s=0.0,
                        buckets=[0] * (len(LATENCY_BUCKETS_S) + 1))])


def test_traffic_per_generation_has_rate_quantiles_and_error_rate_over_the_window() -> None:
    m, clock = model()
    m.on_metrics(metrics("n1", "v1", 100, 0, 100, 0))
    m.on_metrics(metrics("n2", "v1", 50, 0, 50, 0))
    clock.t += 2.0
    # n1: 200 more requests (2 errors, 2 slow); n2: 100 more; over 2 s.
    m.on_metrics(metrics("n1", "v1", 300, 2, 298, 2))
    m.on_metrics(metrics("n2", "v1", 150, 0, 150, 0))
    [row] = m.traffic_rows()  # not the "*" row of requests queued in the workers
    assert (row.service, row.generation, row.infra, row.nodes) == ("shop", "v1", "apis", 2)
    assert row.rps == 150.0 and row.requests == 300
    assert row.error_rate == round(2 / 300, 4)
    assert row.p50_ms == 5.0 and row.p99_ms == 5.0
    # A node restart (counters back to 0) is not a negative rate; a silent node leaves.
    clock.t += 2.0
    m.on_metrics(metrics("n2", "v1", 3, 0, 3, 0))
    clock.t += 20.0
    m.on_metrics(metrics("n1", "v1", 400, 2, 398, 2))
    [row] = m.traffic_rows()
    assert row.nodes == 1 and row.rps >= 0


def test_a_new_generations_first_requests_count_in_its_rate() -> None:
    """v2 appears between two reports of a node: its 40 requests are traffic of that
    interval, not a baseline."""
    m, clock = model()
    m.on_metrics(metrics("n1", "v1", 100, 0, 100, 0))
    clock.t += 2.0
    report = metrics("n1", "v1", 140, 0, 140, 0)
    report.endpoints.append(EndpointMetrics(
        service="shop", endpoint="predict", generation="v2", shadow=False, requests=40,
        errors=4, inflight=0, latency_sum_s=0.0, buckets=metrics("n1", "v2", 40, 0, 40, 0)
        .endpoints[0].buckets))
    m.on_metrics(report)
    rows = {r.generation: r for r in m.traffic_rows()}
    assert (rows["v1"].rps, rows["v2"].rps) == (20.0, 20.0)
    assert rows["v2"].requests == 40 and rows["v2"].error_rate == 0.1


def test_the_filter_narrows_every_panel_and_a_bad_one_says_what_is_expected() -> None:
    m, _ = model("infra=prod,role=automation,project=shop")
    m.on_heartbeat(beat("a1"))
    m.on_heartbeat(beat("x1", infra="dev"))
    m.on_heartbeat(beat("api1", role="api"))
    m.on_metrics(metrics("api1", "v1", 1, 0, 1, 0, service="other"))
    view = DeploymentView(project="shop", infra="prod", desired="b2", previous=None,
                          revision=1, update_id="u", updated_at=0.0, updated_by="me",
                          state="in_sync", health="HEALTHY",
                          nodes=[NodeDeployment(node="a1", status="online", running="b2")])
    m.on_deployments([view, DeploymentView(
        project="blog", infra="prod", desired="b1", previous=None, revision=1, update_id="u",
        updated_at=0.0, updated_by="me", state="in_sync", health="HEALTHY")])
    m.on_event(NodeLost(node="x1", role="automation", infra="dev", last_seen=0.0,
                        silent_s=3.0))
    m.on_event(NodeLost(node="a1", role="automation", infra="prod", last_seen=0.0,
                        silent_s=3.0))
    # Events that name their infra otherwise: an infra's own, a run's steps.
    m.on_event(InfraCreatedEvent(name="dev", kind="automation", stage="dev", by="me"))
    m.on_event(RunStarted(run_id="r9", project="shop", scenario="s", infra="dev",
                          node="x1", bundle="b1", trigger="manual", firing="f9"))
    m.on_event(RunProgress(run_id="r9", project="shop", scenario="s", node="x1", step=1,
                           kind="build", name="out", status="STARTED"))
    s = m.snapshot()
    assert [n.name for n in s.nodes] == ["a1"]
    assert [(d.name, d.actual) for d in s.deployments] == [("shop", "1/1 b2")]
    assert s.traffic == []
    assert [e.text for e in s.events] == [m.events[0].text] and "a1" in s.events[0].text
    with pytest.raises(BadFilter, match=r"unknown role 'wizard': expected one of .*api"):
        Filter.parse("role=wizard")
    with pytest.raises(BadFilter, match="unknown filter key 'colour'"):
        Filter.parse("colour=red")
    with pytest.raises(BadFilter, match="is not key=value"):
        Filter.parse("infra")


def test_runs_show_the_running_ones_and_the_last_outcome_and_events_show_once() -> None:
    m, _ = model()
    started = RunStarted(run_id="r1", project="shop", scenario="nightly", infra="prod",
                         node="a1", bundle="b1", trigger="manual", firing="f1")
    m.on_event(started)
    m.on_event(started)  # the same event, from history and live
    [row] = m.run_rows()
    assert row.running == ["r1"] and row.last_outcome is None
    done = RunSummary(run_id="r1", project="shop", scenario="nightly", infra="prod",
                      node="a1", bundle="b1", trigger="manual", outcome="FAILED",
                      started_at=1.0, finished_at=2.0, duration_s=1.0, error="boom")
    m.on_event(RunFinished(run=done))
    m.on_runs([msgspec_replace(done, outcome="RUNNING")])  # a stale answer
    [row] = m.run_rows()
    assert (row.running, row.last_outcome, row.last_error) == ([], "FAILED", "boom")
    assert len(m.events) == 2
    small = MonitorModel(events_kept=3)
    for i in range(10):
        small.on_event(NodeLost(node=f"n{i}", role="api", infra="x", last_seen=0.0,
                                silent_s=1.0))
    assert [e.text.split()[1] for e in small.events] == ["n7", "n8", "n9"]


def msgspec_replace(r: Any, **kw: Any) -> Any:
    return msgspec.structs.replace(r, **kw)


def test_the_view_draws_every_panel_and_caps_rows_on_a_terminal() -> None:
    m, clock = model()
    for i in range(30):
        m.on_heartbeat(beat(f"node{i:02d}"))
    m.on_metrics(metrics("api1", "v1", 1, 0, 1, 0))
    clock.t += 1
    m.on_metrics(metrics("api1", "v1", 11, 1, 11, 0))
    console = Console(record=True, width=160, force_terminal=True, file=io.StringIO())
    console.print(render(m.snapshot(), node_rows=5, event_rows=3))
    text = console.export_text()
    for title in ("nodes (30/30 online)", "deployments", "API traffic", "scenario runs",
                  "events", "node00", "... and 25 more", "shop", "10.0%"):
        assert title in text
    assert "node29" not in text
    plain = plain_text(m.snapshot())
    assert "node29" in plain and "\x1b[" not in plain


# -- against a real stack -----------------------------------------------------------------

async def test_a_filtered_view_opens_with_its_own_events_though_others_came_since(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    try:
        js = nc.jetstream()
        await ensure_events_stream(js)
        for i in range(3):
            await publish_event(js, NodeOnline(node=f"edge-{i}", role="automation",
                                               infra="edge", host="h", pid=i))
        for i in range(HISTORY_EVENTS * 3):  # a busy infra's events, all after edge's
            await publish_event(js, NodeOnline(node=f"prod-{i}", role="automation",
                                               infra="prod", host="h", pid=i))
        edge, _ = model("infra=edge")
        await Feed(nc, edge).history()
        assert [e.text.split()[1] for e in edge.events] == ["edge-0", "edge-1", "edge-2"]
        # Unfiltered, the tail is the latest events, as many as the view shows.
        everything, _ = model()
        await Feed(nc, everything).history()
        assert len(everything.events) == HISTORY_EVENTS
        assert everything.events[-1].text.split()[1] == f"prod-{HISTORY_EVENTS * 3 - 1}"
    finally:
        await nc.close()


def _snapshots(p: Background, since: int) -> list[dict[str, Any]]:
    out = []
    for line in p.lines[since:]:
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _latest(p: Background, since: int, check: Any) -> Any:
    return next((s for s in reversed(_snapshots(p, since)) if check(s)), None)


def test_monitor_shows_a_deployment_and_its_run_and_follows_the_fleet_across_restarts(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None,
                          log_file=tmp_path / "nats.log")
    server.start()
    env = dict(cli_env, SHIPYARD_NATS_URL=server.url)
    deployer_argv = shipyard_argv("node", "start", "deployer", "--name", "deployer",
                                  "--heartbeat-interval", "0.2")
    ws = tmp_path / "ws"
    make_flow_project(ws)
    procs = [Background(deployer_argv, env=env),
             Background(shipyard_argv("node", "start", "design", "--name", "design",
                                      "--workspace", str(ws), "--data-dir",
                                      str(tmp_path / "design"), "--heartbeat-interval",
                                      "0.2"), env=env),
             Background(shipyard_argv("node", "start", "automation", "--name", "a1",
                                      "--infra", "prod", "--data-dir", str(tmp_path / "a1"),
                                      "--heartbeat-interval", "0.2"), env=env)]
    watcher: Background | None = None
    try:
        for p in procs:
            p.wait_line("node ready", timeout=30)
        # Long operations, piped: their results, and no progress bar in the output.
        shipyard("infra", "create", "prod", "--kind", "automation", env=env, check=True)
        steps = [shipyard("bundle", "create", "flows", "--id", "v1", env=env, check=True),
                 shipyard("deploy", "bundle", "flows", "v1", "--infra", "prod", "--wait",
                          env=env, timeout=60, check=True),
                 shipyard("scenario", "run", "flows", "nightly", "--infra", "prod",
                          "--wait", env=env, timeout=60, check=True)]
        assert "bundle flows v1 created" in steps[0].stdout
        assert "step 1" in steps[2].stdout  # the run's steps still print, as lines
        for r in steps:
            for noise in PROGRESS_NOISE:
                assert noise not in r.stdout and noise not in r.stderr, (noise, r.args)

        once = shipyard("monitor", "--once", "--json", "--interval", "0.6", env=env,
                        cwd=tmp_path, check=True)
        snap = json.loads(once.stdout)
        assert snap["deployer"] == "ok" and snap["nats"] == "connected"
        a1 = next(n for n in snap["nodes"] if n["name"] == "a1")
        assert a1["status"] == "online" and a1["rss_bytes"] > 1 << 20
        assert a1["cpu_pct"] is not None and a1["cpu_pct"] >= 0
        [nightly] = [r for r in snap["runs"] if r["scenario"] == "nightly"]
        assert nightly["running"] == [] and nightly["last_outcome"] in ("SUCCESS", "WARNING")
        # A run that ended WARNING (a soft check) makes the deployment WARNING too.
        health = "WARNING" if nightly["last_outcome"] == "WARNING" else "HEALTHY"
        [dep] = snap["deployments"]
        assert (dep["name"], dep["desired"], dep["actual"], dep["state"], dep["health"]) == (
            "flows", "v1", "1/1 v1", "in_sync", health)
        kinds = {e["kind"] for e in snap["events"]}
        assert {"node.online", "run.finished"} <= kinds

        text = shipyard("monitor", "--once", "--interval", "0.3", "--filter",
                        "role=automation", env=env, cwd=tmp_path, check=True).stdout
        assert "a1" in text and "automation" in text and "\x1b[" not in text
        assert not any(line.split()[:2] == ["deployer", "deployer"]
                       for line in text.splitlines())

        # Piped: the first snapshot already has the Deployer's answer and every node; a
        # reader that leaves (| head) ends the monitor quietly.
        piped = subprocess.Popen(shipyard_argv("monitor", "--interval", "0.3"), env=env,
                                 cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert piped.stdout is not None and piped.stderr is not None
        first = piped.stdout.readline()
        assert first.startswith("shipyard monitor") and "deployer ok" in first, first
        nodes = next(line for line in iter(piped.stdout.readline, "")
                     if line.startswith("nodes ("))
        assert nodes.startswith("nodes (3/3 online)"), nodes
        piped.stdout.close()
        assert piped.wait(timeout=15) == 1
        assert piped.stderr.read() == ""
        piped.stderr.close()
        bad = shipyard("monitor", "--once", "--filter", "role=wizard", env=env)
        assert bad.returncode == 2 and "unknown role 'wizard'" in bad.stderr, bad.stderr

        watcher = Background(shipyard_argv("monitor", "--json", "--interval", "0.3",
                                           "--poll", "0.3", "--timeout", "0.5"), env=env)
        wait_until(lambda: _latest(watcher, 0, lambda s: s["deployer"] == "ok"),
                   timeout=15, message="the monitor hearing from the Deployer")

        # The Deployer stops: the view says so and keeps the live fleet; it comes back.
        procs[0].stop(signal.SIGTERM)
        mark = len(watcher.lines)
        gone = wait_until(lambda: _latest(watcher, mark, lambda s: s["deployer"] != "ok"),
                          timeout=15, message="the monitor seeing the Deployer gone")
        assert any(n["name"] == "a1" and n["status"] == "online" for n in gone["nodes"])
        procs[0] = Background(deployer_argv, env=env)
        procs[0].wait_line("node ready", timeout=30)
        mark = len(watcher.lines)
        wait_until(lambda: _latest(watcher, mark, lambda s: s["deployer"] == "ok"),
                   timeout=15, message="the monitor hearing from the new Deployer")

        # nats-server restarts on the same port: the subscriptions come back by themselves.
        server.stop()
        mark = len(watcher.lines)
        wait_until(lambda: _latest(watcher, mark, lambda s: s["nats"] != "connected"),
                   timeout=15, message="the monitor seeing NATS gone")
        wait_until(lambda: _latest(watcher, mark, lambda s: any(
            n["name"] == "a1" and n["status"] == "lost" for n in s["nodes"])),
            timeout=15, message="a1 silent while NATS is down")
        server = EmbeddedNats(tmp_path / "nats", port=server.port, monitor_port=None,
                              log_file=tmp_path / "nats-2.log")
        server.start()
        mark = len(watcher.lines)
        back = wait_until(lambda: _latest(watcher, mark, lambda s: s["nats"] == "connected"
                                          and s["deployer"] == "ok" and any(
            n["name"] == "a1" and n["status"] == "online" for n in s["nodes"])),
            timeout=30, message="the view live again after the NATS restart")
        assert back["feed_lag_p99_ms"] is not None
    finally:
        if watcher is not None:
            watcher.stop(signal.SIGINT, timeout=10)
        for p in procs:
            p.stop(signal.SIGTERM, timeout=10)
        server.stop()


async def test_a_fleet_too_large_for_one_listing_still_opens_the_view(
        tmp_path: Path) -> None:
    """The first round asks for every node; when the Deployer's answer would pass the
    server's max_payload (thousands of nodes; here a server with a small limit), the
    monitor asks for the lost ones instead, and the deployments still load."""
    from nodes.cli.monitor import poll_deployer
    from nodes.deployer import DeployerNode
    from nodes.runtime.calls import Caller
    from protocol import subjects
    from protocol.errors import TooLarge
    from protocol.heartbeat import HEARTBEAT
    from protocol.registry import ListNodes
    from protocol.state import AutomationState
    from tests.helpers import running, wait_for

    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 8192\n")
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None, config_file=conf)
    server.start()
    try:
        settings = NatsSettings(servers=(server.url,))
        nc = await connect(settings, name="test")
        async with running(DeployerNode(name="deployer", nats=settings,
                                        heartbeat_interval=0.5)):
            for i in range(40):
                hb = Heartbeat(node=f"a-{i:02d}", role="automation", infra="prod",
                               version="1", host="h", pid=100 + i, uptime_s=1.0,
                               interval_s=60.0, seq=1, state=AutomationState())
                await nc.publish(subjects.heartbeat("automation", hb.node),
                                 HEARTBEAT.encode(hb))
            caller = Caller(nc, sender="test")

            async def too_large_to_list() -> bool:
                try:
                    await caller.call(ListNodes(), timeout=5.0)
                except TooLarge:
                    return True
                return False

            await wait_for(too_large_to_list, message="a listing over max_payload")
            m, _ = model()
            assert await poll_deployer(caller, m, 5.0, everyone=True) is True
            assert m.deployer == "ok"
            assert m.deployments == []  # asked, and answered, after the nodes
        await nc.close()
    finally:
        server.stop()
