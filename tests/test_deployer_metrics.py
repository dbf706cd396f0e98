"""The Deployer's /metrics on the dashboard port, and the API nodes' own exposition,
parsed with prometheus_client's parser and held to Prometheus naming conventions."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nodes.api.metrics import Metrics
from nodes.deployer import DeployerNode
from nodes.deployer.dashboard.access import ensure_token_file
from nodes.deployer.dashboard.config import DashboardConfig
from nodes.deployer.metrics import HEALTH_VALUE
from nodes.design import DesignNode
from nodes.runtime import natscompat
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.jetstream import publish_event
from nodes.runtime.settings import NatsSettings
from protocol.api import LATENCY_BUCKETS_S, ApiMetricsReport, EndpointMetrics
from protocol.base import encode
from protocol.bundles import CreateBundle
from protocol.deploy import CreateInfra, DeployBundle, ListDeployments
from protocol.scenarios import RunFinished, RunSummary, StepSummary
from tests.helpers import fleet, wait_for
from tests.projects import make_project

NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# Words that name a quantity measured in time: such a series must be in seconds.
TIMED = ("latency", "duration", "age", "time", "timestamp")


def conventions(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Parse an exposition; fail on any series that breaks Prometheus conventions.
    Returns family name -> samples (name, labels, value)."""
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        assert NAME.match(name), f"{name}: not snake_case"
        assert family.documentation, f"{name}: no help text"
        if family.type == "counter":
            assert all(s.name.endswith("_total") or s.name.endswith("_created")
                       for s in family.samples), f"{name}: counter samples must end in _total"
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        words = name.split("_")
        if any(w in TIMED for w in words):
            assert name.endswith("_seconds"), f"{name}: time must be in seconds"
        assert not any(w in ("ms", "milliseconds", "minutes", "bytes_kb") for w in words), \
            f"{name}: use base units"
        for s in family.samples:
            for label in s.labels:
                assert NAME.match(label) and not label.startswith("__"), \
                    f"{name}: label {label!r}"
        out[name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def value(series: dict[str, list[tuple[str, dict[str, str], float]]], family: str,
          sample: str | None = None, **labels: str) -> float:
    found = [v for n, lab, v in series.get(family, [])
             if n == (sample or family) and all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{sample or family}{labels}: {found} in {series.get(family)}"
    return found[0]


def endpoint(generation: str, requests: int, errors: int, inflight: int = 0,
             ) -> EndpointMetrics:
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    if requests:
        buckets[3] = requests - 1  # <= 5 ms
        buckets[8] = 1  # <= 250 ms
    return EndpointMetrics(service="scorer", endpoint="predict", generation=generation,
                           shadow=False, requests=requests, errors=errors, inflight=inflight,
                           latency_sum_s=0.01 * requests, buckets=buckets)


def report(node: str, requests: int, errors: int, *more: EndpointMetrics,
           ) -> ApiMetricsReport:
    return ApiMetricsReport(node=node, infra="api", ts=time.time(), interval_s=0.2,
                            endpoints=[endpoint("v1", requests, errors), *more])


async def test_deployer_metrics_expose_fleet_health_traffic_and_runs_by_convention(
        settings: NatsSettings, tmp_path: Path) -> None:
    token = ensure_token_file(tmp_path / "dashboard.token", "ops")
    board = DashboardConfig(token_file=tmp_path / "dashboard.token", port=0)
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        deployer = DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2,
                                dashboard=board)
        await f.start(deployer)
        await f.start(DesignNode(name="design", nats=settings, workspace=tmp_path / "ws",
                                 heartbeat_interval=0.2))
        nc = await connect(settings, name="test")
        try:
            caller = Caller(nc, sender="test")
            await caller.call(CreateInfra(name="prod", kind="automation"))
            await caller.call(CreateBundle(project="churn", bundle_id="v1"))
            await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
            run = RunSummary(run_id="r1", project="churn", scenario="nightly", infra="prod",
                             node="automation-1", bundle="v1", trigger="cron",
                             started_at=time.time() - 1.5, finished_at=time.time(),
                             outcome="SUCCESS", duration_s=1.5,
                             steps=[StepSummary(index=0, kind="build", name="build clean",
                                                outcome="SUCCESS")])
            await publish_event(nc.jetstream(), RunFinished(run=run))
            # Two reports from one API node: counters summed, a rate measured between them.
            # The second one brings a generation's first traffic, and requests queued
            # before any generation was picked (in flight, never counted as handled).
            await nc.publish("sy.rpt.metrics.api-9", encode(report("api-9", 10, 1)))
            await natscompat.flush(nc)
            await wait_for(lambda: "api-9" in deployer.apis.reports, message="first report")
            await nc.publish("sy.rpt.metrics.api-9", encode(report(
                "api-9", 30, 2, endpoint("v2", 8, 4), endpoint("*", 0, 0, inflight=3))))
            await natscompat.flush(nc)
            await wait_for(lambda: deployer.apis.reports.get("api-9", (None, None))[1],
                           message="second report")
            await wait_for(lambda: "r1" in deployer.runs.runs, message="run folded")

            assert deployer.dashboard is not None
            url = deployer.dashboard.url
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                reply = await http.get("/metrics")
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
                series = conventions(reply.text)

                assert value(series, "shipyard_node_up", node="deployer", role="deployer") == 1
                assert value(series, "shipyard_node_up", node="design") == 1
                assert value(series, "shipyard_node_heartbeat_age_seconds",
                              node="design") < 5
                view = (await caller.call(ListDeployments(project="churn"))).deployments[0]
                assert value(series, "shipyard_deployment_health", kind="bundle",
                             name="churn", infra="prod") == HEALTH_VALUE[view.health]
                labels = dict(service="scorer", endpoint="predict", generation="v1",
                              traffic="live")
                assert value(series, "shipyard_fleet_api_requests",
                             "shipyard_fleet_api_requests_total", **labels) == 30
                assert value(series, "shipyard_fleet_api_errors",
                             "shipyard_fleet_api_errors_total", **labels) == 2
                assert value(series, "shipyard_fleet_api_requests_per_second", **labels) > 0
                assert value(series, "shipyard_fleet_api_latency_seconds",
                             "shipyard_fleet_api_latency_seconds_count", **labels) == 30
                assert value(series, "shipyard_fleet_api_latency_seconds",
                             "shipyard_fleet_api_latency_seconds_bucket", le="0.005",
                             **labels) == 29
                v2 = {**labels, "generation": "v2"}
                assert value(series, "shipyard_fleet_api_requests_per_second", **v2) > 0
                assert not [lab for family, samples in series.items() for _, lab, _ in samples
                            if family.startswith("shipyard_fleet_api_")
                            and lab.get("generation") == "*"]
                # The same interval as the deployment view counts it, for the dashboard's
                # charts: between the node's last two reports, not since it started.
                rows = {r["generation"]: r
                        for r in deployer.apis._metrics("scorer", {"api-9"})}
                assert (rows["v1"]["recent_requests"], rows["v1"]["recent_errors"]) == (20, 1)
                assert (rows["v2"]["recent_requests"], rows["v2"]["recent_errors"]) == (8, 4)
                assert rows["v2"]["rps"] > 0 and rows["v2"]["recent_p95_ms"] == 250.0
                assert rows["v1"]["requests"] == 30 and rows["*"]["inflight"] == 3
                run_labels = dict(project="churn", infra="prod", scenario="nightly")
                assert value(series, "shipyard_scenario_runs", outcome="SUCCESS",
                             **run_labels) == 1
                assert value(series, "shipyard_scenario_last_run_duration_seconds",
                             **run_labels) == 1.5
                assert value(series, "shipyard_scenario_last_run_failed", **run_labels) == 0

                # The Flow of the deployed bundle, read from its manifest, with the run's
                # build outcome on the dataset the step built.
                auth = {"Authorization": f"Bearer {token}"}

                async def flow() -> dict[str, object] | None:
                    state = (await http.get("/api/state", headers=auth)).json()
                    flows = [x for x in state["flows"] if x.get("graph")]
                    return flows[0] if flows else None

                picture = await wait_for(flow, message="the Flow of churn", timeout=15)
                boxes = {(b["kind"], b["name"]): b for b in picture["graph"]["boxes"]}
                assert set(boxes) == {("dataset", "raw"), ("dataset", "clean"),
                                      ("recipe", "clean")}
                assert boxes[("dataset", "clean")]["build"]["outcome"] == "SUCCESS"
                assert boxes[("dataset", "clean")]["build"]["run"] == "r1"
                assert len(picture["graph"]["edges"]) == 2
        finally:
            await close(nc)


def test_api_node_metrics_follow_the_same_conventions() -> None:
    m = Metrics("api-1", "api")
    row = ["scorer", "predict", "v1", False, 5, 1, 0.02, [1, 4] + [0] * 13]
    m.worker_stats(0, [row], [["scorer", "predict", 3]], overloaded=2, mismatches=0)
    m.count_http("scorer", "predict", 200)
    series = conventions(m.render().decode())
    # Requests not yet given a generation are in flight, and nothing else.
    assert value(series, "shipyard_api_inflight", node="api-1", generation="*") == 3
    assert [lab["generation"] for _, lab, _ in series["shipyard_api_requests"]] == ["v1"]
    assert value(series, "shipyard_api_requests", "shipyard_api_requests_total",
                 node="api-1", generation="v1") == 5
    assert value(series, "shipyard_api_latency_seconds",
                 "shipyard_api_latency_seconds_count", node="api-1") == 5
