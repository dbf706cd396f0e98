"""Prediction capture and replay: a real nats-server, Deployer, Design and an API node
with two worker processes (one stack for the module), requests over HTTP and NATS, and
the real CLI for ``deploy api --capture``, ``api queries`` and ``api replay``."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from nodes.api.capture import Capturer, Pending, ensure_capture_stream, read_captures
from nodes.api.replay import replay
from nodes.api.usercode import OP_MULTI as OP_MULTI_CODE
from nodes.api.usercode import OP_PREDICT, OP_RUN
from nodes.cli.capture import replay_refusal
from nodes.runtime import natscompat
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import GENERATION_HEADER, OP_HEADER, OP_MULTI, CreateApiPackage, DeployApi
from protocol.capture import (
    REQUEST_ID_HEADER,
    CapturedCall,
    CaptureSettings,
    capture_settings,
    parse_redact,
    redact,
    sampled,
)
from protocol.deploy import CreateInfra, ListDeployments
from protocol.errors import Forbidden
from tests.authstack import auth_stack
from tests.helpers import Background, shipyard, shipyard_argv, wait_for, wait_until
from tests.test_cli_hardening import _on_a_terminal
from tests.test_cli_stack import free_port
from tests.test_progress import PROGRESS_NOISE

CAP, QUIET, HALF = "cap-api", "quiet-api", "half-api"

MANIFEST = """\
[project]
key = "capt"
""" + "".join(f"""
[api_services.{svc}]
description = "capture tests"

[api_services.{svc}.endpoints.predict]
kind = "prediction"
code = "api/predict.py"

[api_services.{svc}.endpoints.echo]
kind = "function"
code = "api/echo.py"
function = "echo"
""" for svc in (CAP, QUIET, HALF))

PREDICT = """\
import time

from helpers import THRESHOLD


def predict(features):
    time.sleep(float(features.get("sleep", 0)))
    x = float(features.get("x", 0))
    return {"label": "yes" if x > THRESHOLD else "no", "x": x, "token": "t-%s" % x,
            "detail": {"pin": 1234, "keep": True}}
"""

ECHO = """\
def echo(body):
    return body
"""

REDACT = "email,card.number,token,detail.pin"


def _project(ws: Path, threshold: float) -> None:
    d = ws / "capt"
    (d / "api").mkdir(parents=True, exist_ok=True)
    (d / "shipyard.toml").write_text(MANIFEST)
    (d / "api" / "predict.py").write_text(PREDICT)
    (d / "api" / "echo.py").write_text(ECHO)
    (d / "api" / "helpers.py").write_text(f"THRESHOLD = {threshold!r}\n")


@dataclass
class Stack:
    settings: NatsSettings
    env: dict[str, str]
    http: str  # the API node's base URL

    def cli(self, *args: str, check: bool = True) -> Any:
        return shipyard(*args, env=self.env, check=check, timeout=60)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)


async def _setup(settings: NatsSettings, ws: Path) -> None:
    """Packages v1 (threshold 1) and v2 (threshold 2) of every service; quiet and half
    deployed here, cap-api by the CLI (with --capture)."""
    nc = await connect(settings, name="test-setup")
    try:
        caller = Caller(nc, sender="test")
        await wait_for(lambda: _deployer_up(caller), timeout=30, message="the Deployer")
        await caller.call(CreateInfra(name="prod", kind="api", stage="production"))
        for version, threshold in (("v1", 1.0), ("v2", 2.0)):
            _project(ws, threshold)
            for svc in (CAP, QUIET, HALF):
                await caller.call(CreateApiPackage(project="capt", service=svc,
                                                   version=version), timeout=60)
        await caller.call(DeployApi(service=QUIET, infra="prod", generations={"v1": 100}))
        await caller.call(DeployApi(service=HALF, infra="prod", generations={"v1": 100},
                                    capture=0.5))
    finally:
        await nc.close()


async def _deployer_up(caller: Caller) -> bool:
    try:
        await caller.call(ListDeployments(), timeout=1)
    except Exception:
        return False
    return True


async def _states(settings: NatsSettings) -> dict[str, Any]:
    nc = await connect(settings, name="test-wait")
    try:
        reply = await Caller(nc, sender="test").call(ListDeployments(infra="prod"))
    finally:
        await nc.close()
    return {v.project: (v.state, v.reasons) for v in reply.deployments}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("capture")
    server = EmbeddedNats(tmp / "nats", port=-1, monitor_port=None, log_file=tmp / "nats.log")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(SHIPYARD_LOG_FORMAT="json", SHIPYARD_NATS_URL=server.url,
               SHIPYARD_CAPTURE_MAX_BYTES=str(64 << 20), SHIPYARD_CAPTURE_MAX_AGE_S="3600")
    ws = tmp / "ws"
    ws.mkdir()
    port = free_port()
    procs = [
        Background(shipyard_argv("node", "start", "deployer", "--name", "deployer",
                                 "--heartbeat-interval", "0.2"), env=env),
        Background(shipyard_argv("node", "start", "design", "--name", "design", "--workspace",
                                 str(ws), "--data-dir", str(tmp / "design"),
                                 "--heartbeat-interval", "0.2"), env=env),
        Background(shipyard_argv("node", "start", "api", "--name", "api-1", "--infra", "prod",
                                 "--data-dir", str(tmp / "api-1"), "--workers", "2",
                                 "--http-port", str(port), "--http-host", "127.0.0.1",
                                 "--heartbeat-interval", "0.2"), env=env),
    ]
    settings = NatsSettings(servers=(server.url,))
    try:
        for p in procs:
            p.wait_line("node ready", timeout=30)
        anyio.run(_setup, settings, ws)
        s = Stack(settings=settings, env=env,
                  http=f"http://127.0.0.1:{port}/public/api/v1")
        done = s.cli("deploy", "api", CAP, "--split", "v1=100,v2=0", "--infra", "prod",
                     "--capture", "1", "--redact", REDACT, "--wait")
        assert "capture 1" in done.stdout, done.stdout
        states: dict[str, Any] = {}

        def in_sync() -> bool:
            states.update(anyio.run(_states, settings))
            return len(states) == 3 and all(st == "in_sync" for st, _ in states.values())
        try:
            wait_until(in_sync, timeout=60, message="every service in sync")
        except AssertionError:
            raise AssertionError(f"not in sync: {states}") from None
        yield s
    finally:
        for p in procs:
            p.stop(signal.SIGTERM)
        server.stop()
    for p in procs:
        assert "Traceback" not in p.output(), p.output()


# -- helpers -----------------------------------------------------------------------------

async def _predict(nc: NATS, service: str, features: dict[str, Any], *,
                   request_id: str | None = None, generation: str | None = None) -> Any:
    headers = {}
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    if generation:
        headers[GENERATION_HEADER] = generation
    msg = await nc.request(subjects.api_endpoint(service, "predict"),
                           json.dumps({"features": features}).encode(), timeout=10,
                           headers=headers or None)
    return json.loads(msg.data)


async def _captured(settings: NatsSettings, service: str, **kw: Any) -> list[CapturedCall]:
    nc = await connect(settings, name="test-read")
    try:
        found = await read_captures(nc, service, limit=10_000, **kw)
    finally:
        await nc.close()
    assert not found.timed_out
    return [c for _, c in found.entries]


async def _settle(nc: NATS, settings: NatsSettings, n: int = 12) -> None:
    """Send ``n`` marker requests to cap-api (captured: fraction 1) and wait until every
    one is stored.  A worker publishes its captures in order on one connection, and
    markers land on both workers, so whatever either worker captured before is stored
    too."""
    tag = uuid.uuid4().hex[:8]
    ids = {f"marker-{tag}-{i}" for i in range(n)}
    for rid in ids:
        await _predict(nc, CAP, {"x": -1, "marker": tag}, request_id=rid)

    async def stored() -> bool:
        return ids <= {c.id for c in await _captured(settings, CAP)}
    await wait_for(stored, timeout=15, message="marker captures stored")


@asynccontextmanager
async def _client(stack: Stack) -> AsyncIterator[NATS]:
    nc = await connect(stack.settings, name="test")
    try:
        yield nc
    finally:
        await nc.close()


def _features(call: CapturedCall) -> Any:
    return msgspec.json.decode(call.request)


# -- tests -------------------------------------------------------------------------------

async def test_capture_at_1_records_every_call_with_the_fields_redacted(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    nc = await connect(stack.settings, name="test")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(10):
                r = await http.post(f"{stack.http}/{CAP}/predict/predict", json={
                    "features": {"x": i, "tag": tag, "email": "a@b.c",
                                 "card": {"number": "4111", "brand": "visa"}}})
                assert (r.status_code, r.json()["result"]["token"]) == (200, f"t-{float(i)}")
            r = await http.post(f"{stack.http}/{CAP}/predict/predict",
                                json={"features": {"x": "boom", "tag": tag}})
            assert r.status_code == 500
            r = await http.post(f"{stack.http}/{CAP}/echo/run",
                                json={"tag": tag, "email": "a@b.c", "n": 1})
            assert r.status_code == 200
        multi = await nc.request(
            subjects.api_endpoint(CAP, "predict"),
            json.dumps({"items": [{"features": {"x": 5, "tag": tag, "email": "m"}},
                                  {"features": {"x": 0, "tag": tag}}]}).encode(),
            timeout=10, headers={OP_HEADER: OP_MULTI})
        assert len(json.loads(multi.data)["results"]) == 2
        await _settle(nc, stack.settings)
    finally:
        await nc.close()

    def mine(c: CapturedCall) -> bool:
        req = _features(c)
        items = req if isinstance(req, list) else [req]
        return any(isinstance(i, dict) and i.get("tag") == tag for i in items)

    everything = await _captured(stack.settings, CAP)
    calls = [c for c in everything if mine(c)]
    assert len(calls) == 13, everything[:3]
    assert len({c.id for c in calls}) == 13
    predicted = sorted((c for c in calls if c.op == "predict" and c.status == 200),
                       key=lambda c: _features(c)["x"])
    assert [_features(c) for c in predicted] == [
        {"x": i, "tag": tag, "card": {"brand": "visa"}} for i in range(10)]
    for c in predicted:
        assert msgspec.json.decode(c.response) == {
            "label": "yes" if _features(c)["x"] > 1 else "no",
            "x": float(_features(c)["x"]), "detail": {"keep": True}}
        assert (c.generation, c.node, c.redacted) == ("v1", "api-1", ["email", "card.number"])
        assert c.redact == REDACT.split(",") and 0 < c.latency_s < 5 and c.worker in (0, 1)
    [failed] = [c for c in calls if c.status != 200]
    assert (failed.status, msgspec.json.decode(failed.response)["error"]["code"]) == (
        500, "user_code")
    [echo] = [c for c in calls if c.op == "run"]
    assert (_features(echo), msgspec.json.decode(echo.response)) == (
        {"tag": tag, "n": 1}, {"tag": tag, "n": 1})
    [multi_call] = [c for c in calls if c.op == "multi"]
    assert _features(multi_call) == [{"x": 5, "tag": tag}, {"x": 0, "tag": tag}]
    assert [r["label"] for r in msgspec.json.decode(multi_call.response)] == ["yes", "no"]
    assert all("token" not in r for r in msgspec.json.decode(multi_call.response))

    def metrics() -> str:
        return httpx.get(stack.http.replace("/public/api/v1", "/metrics"), timeout=5).text

    def counted() -> bool:
        line = next((x for x in metrics().splitlines()
                     if x.startswith("shipyard_api_captured_total")), "")
        return bool(line) and float(line.split()[-1]) >= 13
    wait_until(counted, timeout=10, message="the captured counter in /metrics")
    assert 'shipyard_api_capture_dropped_total{node="api-1"} 0.0' in metrics()


async def test_capture_off_records_nothing(stack: Stack) -> None:
    nc = await connect(stack.settings, name="test")
    try:
        for i in range(20):
            assert (await _predict(nc, QUIET, {"x": i}))["generation"] == "v1"
        await _settle(nc, stack.settings)
    finally:
        await nc.close()
    assert await _captured(stack.settings, QUIET) == []
    out = stack.cli("api", "queries", QUIET).stdout
    assert "no captured calls of quiet-api" in out and "--capture" in out


async def test_a_version_added_at_weight_0_is_loaded_by_the_wait_and_replays_leave_no_traffic(
        stack: Stack) -> None:
    done = stack.cli("deploy", "api", QUIET, "--split", "v1=100,v2=0", "--infra", "prod",
                     "--wait")
    assert "v1 -> v1=100,v2=0 on prod" in done.stdout, done.stdout
    forced = 12
    async with _client(stack) as nc:
        assert await replay_refusal(nc, QUIET, "v2") == ""
        # Replayed calls that v2 fails (x is not a number): answered, never counted as
        # the service's requests or errors, so its health and /metrics stay its own.
        calls = [CapturedCall(id=f"c{i}", service=QUIET, endpoint="predict", generation="v1",
                              op="predict", ts=time.time(), latency_s=0.001, status=200,
                              node="api-1", request=msgspec.Raw(b'{"x": "nan?"}'),
                              response=msgspec.Raw(b'{"label": "no"}')) for i in range(10)]
        report = await replay(nc, calls, "v2", rate=500)
        assert [r.status for r in report.results] == [500] * 10
        for _ in range(forced):
            answer = await _predict(nc, QUIET, {"x": 1.5}, generation="v2")
            assert (answer["generation"], answer["result"]["label"]) == ("v2", "no"), answer
        assert (await _predict(nc, QUIET, {"x": 1.5}))["generation"] == "v1"

    def v2_counts() -> tuple[float, float]:
        text = httpx.get(stack.http.replace("/public/api/v1", "/metrics"), timeout=5).text
        found = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                 if f'service="{QUIET}"' in line and 'generation="v2"' in line}
        return (found.get("shipyard_api_requests_total", 0.0),
                found.get("shipyard_api_errors_total", 0.0))
    # Every worker that answered a forced call reported after it, so after the replays.
    wait_until(lambda: v2_counts()[0] >= forced, timeout=10, message="v2's requests counted")
    assert v2_counts() == (forced, 0)


def test_deploy_api_wait_draws_a_bar_on_a_terminal_and_stage_lines_in_a_pipe(
        stack: Stack) -> None:
    args = ["deploy", "api", QUIET, "v1", "--infra", "prod", "--wait"]
    drawn = _on_a_terminal(args, stack.env).decode()
    assert f"{QUIET} on prod: waiting for the API nodes" in drawn and "━" in drawn, drawn
    assert f"serves {QUIET} v1" in drawn
    piped = stack.cli("deploy", "api", QUIET, "--split", "v1=100,v2=0", "--infra", "prod",
                      "--wait")
    assert "serving" in piped.stderr and "done" in piped.stdout, piped
    for noise in PROGRESS_NOISE:
        assert noise not in piped.stdout + piped.stderr, noise


async def test_sampling_follows_the_request_id_hash_exactly_and_the_fraction_without(
        stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{i}" for i in range(200)]
    expected = {rid for rid in ids if sampled(rid, 0.5)}
    assert 60 < len(expected) < 140  # the hash spreads ids (checked, not assumed)
    nc = await connect(stack.settings, name="test")
    try:
        for rid in ids:
            await _predict(nc, HALF, {"x": 1, "tag": tag}, request_id=rid)
        for _ in range(400):  # no request id: sampled at random
            await _predict(nc, HALF, {"x": 2, "tag": tag})
        await _settle(nc, stack.settings)
    finally:
        await nc.close()
    calls = [c for c in await _captured(stack.settings, HALF) if _features(c)["tag"] == tag]
    assert {c.id for c in calls if _features(c)["x"] == 1} == expected
    # Binomial(400, 0.5): 120..280 is more than 8 standard deviations either side.
    assert 120 <= sum(1 for c in calls if _features(c)["x"] == 2) <= 280


async def test_queries_filter_by_generation_and_since(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    nc = await connect(stack.settings, name="test")
    try:
        await _predict(nc, CAP, {"x": 0, "tag": tag, "step": "before"})
        await _settle(nc, stack.settings, n=4)
        since = time.time()
        await anyio.sleep(0.05)
        for i in range(3):
            await _predict(nc, CAP, {"x": i, "tag": tag, "step": "after"})
            reply = await _predict(nc, CAP, {"x": i, "tag": tag, "step": "after"},
                                   generation="v2")
            assert reply["generation"] == "v2"
        await _settle(nc, stack.settings, n=4)
    finally:
        await nc.close()

    def mine(calls: list[CapturedCall]) -> list[tuple[str, str]]:
        return sorted((c.generation, _features(c)["step"]) for c in calls
                      if isinstance(_features(c), dict) and _features(c).get("tag") == tag)

    after = [("v1", "after")] * 3 + [("v2", "after")] * 3
    assert mine(await _captured(stack.settings, CAP)) == sorted([("v1", "before"), *after])
    assert mine(await _captured(stack.settings, CAP, generation="v2")) == [("v2", "after")] * 3
    assert mine(await _captured(stack.settings, CAP, since=since)) == sorted(after)
    # The command line: the same filters, ISO 8601 for --since, a table without --json.
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)) + f".{int(since % 1 * 1000):03d}Z"
    rows = stack.cli_json("api", "queries", CAP, "--since", iso, "--generation", "v2")
    assert sorted((r["generation"], r["request"].get("step")) for r in rows
                  if r["request"].get("tag") == tag) == [("v2", "after")] * 3
    assert all(r["time"].endswith("Z") and r["seq"] > 0 for r in rows)
    table = stack.cli("api", "queries", CAP, "--since", f"{since:.3f}", "--limit", "3").stdout
    assert table.count("api-1") == 3 and "200" in table and "first 3; more follow" in table


async def test_replay_with_calls_left_unanswered_reports_them_and_exits_1(
        stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    nc = await connect(stack.settings, name="test")
    try:
        since = time.time()
        await _predict(nc, CAP, {"x": 3, "tag": tag})
        await _predict(nc, CAP, {"x": 3, "tag": tag, "sleep": 1.0})  # longer than --timeout
        await _settle(nc, stack.settings, n=4)
    finally:
        await nc.close()
    args = ("api", "replay", CAP, "--version", "v2", "--since", f"{since:.3f}",
            "--timeout", "0.5", "--rate", "200")
    proc = stack.cli(*args, "--json", check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    report = json.loads(proc.stdout)
    mine = [e for e in report["unanswered_examples"] if e["request"].get("tag") == tag]
    assert [e["request"].get("sleep") for e in mine] == [1.0]
    # (calls queued behind the slow one on the worker may time out too)
    assert report["unanswered"] >= 1 and report["replayed"] > report["unanswered"]
    text = stack.cli(*args, check=False)
    assert text.returncode == 1 and re.search(r" [1-9]\d* unanswered", text.stdout), \
        text.stdout
    assert "unanswered: predict" in text.stdout and "Traceback" not in text.stderr


async def test_replay_against_a_changed_version_reports_the_differences(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    nc = await connect(stack.settings, name="test")
    try:
        since = time.time()
        for x in (0, 1, 2, 3, 1.5, 2.5):  # v1 says yes above 1, v2 above 2
            await _predict(nc, CAP, {"x": x, "tag": tag, "email": "a@b.c"})
        await _settle(nc, stack.settings, n=4)
    finally:
        await nc.close()
    before = len(await _captured(stack.settings, CAP, generation="v2"))
    report = stack.cli_json("api", "replay", CAP, "--version", "v2", "--since",
                            f"{since:.3f}", "--rate", "200")
    # The markers (x = -1) answer "no" in both versions: the same.
    assert (report["replayed"], report["differ"], report["unanswered"]) == (10, 2, 0)
    assert report["redacted"] == 6
    assert sorted(e["request"]["x"] for e in report["examples"]) == [1.5, 2]
    for e in report["examples"]:
        assert "email" not in e["request"]
        assert (e["captured"]["generation"], e["captured"]["answer"]["label"],
                e["replayed"]["answer"]["label"]) == ("v1", "yes", "no")
        assert "token" not in e["replayed"]["answer"]  # redacted alike before comparing
    latency = report["latency_ms"]
    assert all(latency[side][q] is not None and latency[side][q] > 0
               for side in ("captured", "replayed") for q in ("p50", "p99"))
    text = stack.cli("api", "replay", CAP, "--version", "v2", "--since", f"{since:.3f}",
                     "--limit", "3", "--rate", "200").stdout
    assert "replayed 3 captured calls of cap-api against v2: 1 differ" in text, text
    assert "p99" in text and "answers that differ" in text
    # Replayed requests are answered by v2 but never captured.
    nc = await connect(stack.settings, name="test")
    try:
        await _settle(nc, stack.settings, n=4)
    finally:
        await nc.close()
    assert len(await _captured(stack.settings, CAP, generation="v2")) == before
    async with _client(stack) as nc:
        refusal = await replay_refusal(nc, CAP, "v9")
    assert refusal.startswith("version v9 of cap-api is not loaded on infra prod")
    assert "shipyard deploy api cap-api --split v1=100,v2=0,v9=0 --infra prod" in refusal
    # Nothing captured in the window: said so, exit 1, nothing sent.
    empty = stack.cli("api", "replay", CAP, "--version", "v2", "--since",
                      f"{time.time() + 3600:.3f}", check=False)
    assert empty.returncode == 1, empty
    assert "no captured calls of cap-api since" in empty.stderr
    assert "nothing to replay" in empty.stderr and "Traceback" not in empty.stderr


async def test_a_function_body_that_was_not_json_is_replayed_as_it_came(stack: Stack) -> None:
    """A body that is not JSON is stored as its text: replay sends that text, not a JSON
    string of it, so the same version answers the same (400, not 200 with an echo)."""
    tag = uuid.uuid4().hex[:8]
    since = time.time()
    async with httpx.AsyncClient(timeout=10) as http:
        plain = await http.post(f"{stack.http}/{CAP}/echo/run", content=f"plain {tag}")
        quoted = await http.post(f"{stack.http}/{CAP}/echo/run", json=f"quoted {tag}")
    assert (plain.status_code, quoted.status_code) == (400, 200)
    async with _client(stack) as nc:
        await _settle(nc, stack.settings, n=4)
    mine = {bytes(c.request): c.text for c in await _captured(stack.settings, CAP, since=since,
                                                       endpoint="echo")
            if tag in bytes(c.request).decode()}
    assert mine == {f'"plain {tag}"'.encode(): True, f'"quoted {tag}"'.encode(): False}
    report = stack.cli_json("api", "replay", CAP, "--version", "v1", "--endpoint", "echo",
                            "--since", f"{since:.3f}", "--rate", "200")
    assert (report["replayed"], report["same"], report["differ"]) == (2, 2, 0), report


async def test_the_capture_stream_is_bounded_by_size_and_age(stack: Stack) -> None:
    nc = await connect(stack.settings, name="test")
    try:
        info = await nc.jetstream().stream_info(subjects.CAPTURE_STREAM)
    finally:
        await nc.close()
    assert (info.config.max_bytes, info.config.max_age) == (64 << 20, 3600.0)
    assert info.config.subjects == [subjects.CAPTURE_ALL]


async def test_with_auth_api_nodes_publish_captures_viewers_read_them_deployers_replay(
        tmp_path: Path) -> None:
    with auth_stack(tmp_path, ("vera", "user", "viewer", None),
                    ("dora", "user", "deployer", None)) as s:
        async with s.connect("admin") as admin, s.connect("api-1") as api, \
                s.connect("vera") as viewer, s.connect("dora") as deployer:
            await ensure_capture_stream(admin.nc.jetstream())
            call = CapturedCall(id="r1", service="svc", endpoint="predict", generation="v1",
                                op="predict", ts=time.time(), latency_s=0.001, status=200,
                                node="api-1", request=msgspec.Raw(b'{"x":1}'),
                                response=msgspec.Raw(b'{"y":2}'))
            await api.nc.publish(subjects.capture("svc", "predict"), msgspec.json.encode(call))
            await natscompat.flush(api.nc)
            found = await wait_for(lambda: _read_as(viewer.nc), timeout=10,
                                   message="the viewer reads the capture")
            assert [c.id for c in found] == ["r1"]
            await viewer.nc.publish(subjects.capture("svc", "predict"), b"{}")
            await viewer.denied(subjects.capture("svc", "predict"))

            async def answer(msg: Any) -> None:
                await msg.respond(b"{}")
            await admin.nc.subscribe(subjects.api_endpoint("svc", "predict"), cb=answer)
            await natscompat.flush(admin.nc)

            async def replayed() -> bytes | None:
                # A "no responders" answer already shows the publish was allowed (a denied
                # one gets none); the reply itself is waited for.
                try:
                    reply = await deployer.nc.request(subjects.api_endpoint("svc", "predict"),
                                                      b"{}", timeout=5)
                except nats.errors.NoRespondersError:
                    return None
                return reply.data
            assert await wait_for(replayed, timeout=10, message="the deployer's request "
                                  "answered") == b"{}"
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await viewer.nc.request(subjects.api_endpoint("svc", "predict"), b"{}",
                                        timeout=2)
            await viewer.denied(subjects.api_endpoint("svc", "predict"))
            assert api.violations() == [] and deployer.violations() == []


async def test_a_replay_by_an_identity_that_may_not_send_api_requests_fails_at_once(
        tmp_path: Path) -> None:
    """The server refuses a viewer's requests: the replay stops with that reason, instead
    of waiting out every call's deadline and reporting them unanswered."""
    with auth_stack(tmp_path, ("vera", "user", "viewer", None)) as s:
        nc = await connect(s.settings("vera"), name="test-viewer")
        try:
            calls = [CapturedCall(id=f"r{i}", service="svc", endpoint="predict",
                                  generation="v1", op="predict", ts=time.time(),
                                  latency_s=0.001, status=200, node="api-1",
                                  request=msgspec.Raw(b'{"x":1}'))
                     for i in range(3)]
            with anyio.fail_after(10), pytest.raises(Forbidden) as refused:
                await replay(nc, calls, "v2", rate=100, timeout=60)
        finally:
            await nc.close()
    assert "sy.api.v1.svc.predict" in str(refused.value)
    assert "replay needs a deployer or admin identity" in str(refused.value)


async def _read_as(nc: NATS) -> list[CapturedCall]:
    found = await read_captures(nc, "svc", timeout=5)
    return [c for _, c in found.entries]


# -- the parts, without the stack ---------------------------------------------------------

def test_redaction_removes_top_level_and_dotted_fields_and_says_which() -> None:
    value = {"email": "a", "card": {"number": "4111", "brand": "visa"}, "items": [{"pin": 1}]}
    assert redact(value, ["email", "card.number", "card.cvv", "nope"]) == [
        "email", "card.number"]
    assert value == {"card": {"brand": "visa"}, "items": [{"pin": 1}]}
    assert redact("not an object", ["email"]) == []
    assert parse_redact(" email, card.number ,email") == ["email", "card.number"]
    for bad in ("a..b", ".a", "a b", "x" * 300):
        with pytest.raises(ValueError, match="invalid field to redact"):
            parse_redact(bad)


def test_redaction_reaches_into_every_object_of_a_list_on_the_path() -> None:
    value = {"items": [{"secret": 1, "v": 1}, {"v": 2}, 3, [{"secret": 2}]],
             "rows": [{"card": {"number": "4111", "brand": "visa"}}]}
    assert redact(value, ["items.secret", "rows.card.number", "items.nope"]) == [
        "items.secret", "rows.card.number"]
    assert value == {"items": [{"v": 1}, {"v": 2}, 3, [{}]],
                     "rows": [{"card": {"brand": "visa"}}]}
    answer: Any = [{"email": "a", "ok": True}, {"email": "b"}]  # an answer that is a list
    assert redact(answer, ["email"]) == ["email"]
    assert answer == [{"ok": True}, {}]
    deep: Any = [{"email": "a"}]
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert redact(deep, ["email"]) == ["email"]


def test_deploys_keep_capture_settings_unless_they_change_them() -> None:
    on = capture_settings(None, 0.25, ["email"])
    assert on == CaptureSettings(fraction=0.25, redact=["email"])
    assert capture_settings(on, None, None) is on  # a deploy that says nothing keeps it
    assert capture_settings(on, 0.5, None) == CaptureSettings(fraction=0.5, redact=["email"])
    assert capture_settings(on, 0.0, []) is None
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="invalid capture fraction"):
            capture_settings(None, bad, None)


async def test_a_full_queue_a_failed_publish_or_connection_drops_and_counts_never_raises(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    try:
        await ensure_capture_stream(nc.jetstream())
        capturer = Capturer(partial(connect, settings, name="test-capture"), node="n1",
                            worker=3, max_pending=3)
        on = CaptureSettings(fraction=1.0, redact=["secret"])

        def pending(rid: str, answer: bytes) -> Pending:
            return Pending(on, rid, "svc", "predict", "v1", OP_PREDICT,
                           msgspec.Raw(b'{"x":1,"secret":"s"}'), 200, answer, 0.001,
                           time.time(), len(answer))

        huge = b'{"result":{"blob":"' + b"x" * (2 << 20) + b'"},"generation":"v1"}'
        capturer.offer(pending("a", b'{"result":{"y":2,"secret":"t"},"generation":"v1"}'))
        capturer.offer(pending("too-big", huge))  # over the server's max payload
        capturer.offer(pending("b", b'{"result":{"y":3},"generation":"v1"}'))
        for rid in ("c", "d"):  # the queue holds 3
            capturer.offer(pending(rid, b'{"result":{},"generation":"v1"}'))
        assert (capturer.pending, capturer.dropped) == (3, 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(capturer.run)
            await wait_for(lambda: capturer.pending == 0 and capturer.captured == 2,
                           message="the queue published")
            tg.cancel_scope.cancel()
        assert capturer.dropped == 3

        async def refused() -> NATS:
            raise OSError("connection refused")
        broken = Capturer(refused, node="n1", worker=4)
        broken.offer(pending("e", b'{"result":{},"generation":"v1"}'))
        async with anyio.create_task_group() as tg:
            tg.start_soon(broken.run)
            await wait_for(lambda: broken.dropped == 1, message="dropped, not raised")
            tg.cancel_scope.cancel()
        found = await read_captures(nc, "svc", timeout=5)
    finally:
        await nc.close()
    calls = [c for _, c in found.entries]
    assert [(c.id, c.node, c.worker) for c in calls] == [("a", "n1", 3), ("b", "n1", 3)]
    assert msgspec.json.decode(calls[0].request) == {"x": 1}
    assert msgspec.json.decode(calls[0].response) == {"y": 2}
    assert calls[0].redacted == ["secret"]


def test_captured_json_is_the_same_with_and_without_the_redaction_path() -> None:
    capturer = Capturer(partial(connect, NatsSettings()), node="n1", worker=0)  # unused
    cases = [
        (OP_PREDICT, msgspec.Raw(b'{"x": 1}'), b'{"result":{"y":[1,2]},"generation":"v1"}',
         {"x": 1}, {"y": [1, 2]}),
        (OP_MULTI_CODE, [b'{"x":1}', b'{"x":2}'],
         b'{"results":[{"y":1},{"y":2}],"generation":"v1"}', [{"x": 1}, {"x": 2}],
         [{"y": 1}, {"y": 2}]),
        (OP_RUN, b'"hi"', b'{"response":"hi","generation":"v1"}', "hi", "hi"),
    ]
    for op, payload, body, request, answer in cases:
        for paths in ([], ["unused"]):
            call = capturer.entry(Pending(CaptureSettings(fraction=1.0, redact=paths), "id",
                                          "svc", "ep", "v1", op, payload, 200, body, 0.001,
                                          0.0, 1))
            assert (msgspec.json.decode(call.request), msgspec.json.decode(call.response)) \
                == (request, answer), (op, paths)
