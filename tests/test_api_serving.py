"""API services end to end against a real nats-server: package on Design, deploy through
the API Deployer, serve over HTTP (httpx) and NATS from API nodes whose workers are
real processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import (
    ApiKeyCreated,
    CreateApiKey,
    CreateApiPackage,
    DeployApi,
    ListApiPackages,
    RevokeApiKey,
    RollbackApi,
    key_record_key,
)
from protocol.errors import BadRequest, Conflict, NotFound
from tests.apiproject import make_api_project
from tests.apistack import SERVICE, api_stack, url
from tests.helpers import gather, wait_for

SCHEMAS = Path(__file__).resolve().parent / "schemas" / "nats-micro-v1"


async def test_package_deploy_and_call_over_http_and_nats(settings: NatsSettings,
                                                          tmp_path: Path) -> None:
    """A package holds code and artifacts only; a deploy serves it over HTTP and NATS."""
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2)
        created = await s.package("v1")
        assert sorted(created.added) == ["api/helpers.py", "api/predict.py", "api/score.py",
                                         "models/model.json", "shipyard.toml"]
        assert created.package.endpoints == {"predict": "prediction", "score": "function"}
        with pytest.raises(Conflict, match="versions are immutable"):
            await s.package("v1")
        listed = await s.caller.call(ListApiPackages(service=SERVICE))
        assert [p.version for p in listed.packages] == ["v1"]
        with pytest.raises(NotFound, match="not found"):
            await s.deploy({"v9": 100})

        view = await s.deploy({"v1": 100})
        assert (view.kind, view.desired, view.health) == ("api", "v1", "HEALTHY")
        assert [(n.node, n.running) for n in view.nodes] == [("api-1", "v1")]

        r = await s.http.post(url(node), json={"features": {"x": 1}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["generation"] == "v1"
        assert body["result"]["prediction"] == "yes"
        assert body["result"]["probas"] == {"yes": 1.0, "no": 0.0}
        assert body["result"]["pid"] != os.getpid()  # user code ran in a worker process

        r = await s.http.post(url(node, action="predict-multi"),
                              json={"items": [{"features": {"x": 1}}, {"features": {"x": 0}}]})
        assert r.status_code == 200, r.text
        assert [x["prediction"] for x in r.json()["results"]] == ["yes", "no"]

        r = await s.http.post(url(node, "score", "run"), json=[1, {"a": 2}])
        assert r.status_code == 200, r.text
        assert r.json() == {"response": {"echo": [1, {"a": 2}], "version": "1"},
                            "generation": "v1"}

        msg = await s.nc.request(subjects.api_endpoint(SERVICE, "predict"),
                                 b'{"features": {"x": 0.2}}', timeout=5)
        assert json.loads(msg.data)["result"]["prediction"] == "no"

        alive = await s.http.get(f"{node.http.url}/isAlive")  # type: ignore[union-attr]
        assert alive.status_code == 200 and alive.json()["alive"] is True

        async def counted() -> str | None:
            text = (await s.http.get(f"{node.http.url}/metrics")).text  # type: ignore
            line = ('shipyard_api_requests_total{endpoint="predict",generation="v1",'
                    'node="api-1",service="churn-api",traffic="live"} 3.0')
            return text if line in text else None
        text = await wait_for(counted, timeout=10, message="metrics for 3 predictions")
        assert "shipyard_api_latency_seconds_bucket" in text
        assert 'shipyard_http_responses_total{endpoint="predict",node="api-1",' in text

        async def reported() -> Any:
            v = await s.view()
            rows = [m for m in v.extra["metrics"] if m["endpoint"] == "predict"
                    and m["generation"] == "v1"]
            return rows[0] if rows and rows[0]["requests"] == 3 else None
        row = await wait_for(reported, timeout=10, message="metrics reported to the Deployer")
        assert row["errors"] == 0 and row["p95_ms"] is not None


async def test_every_error_has_its_status_code_and_a_json_body(settings: NatsSettings,
                                                               tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1, max_body=2048)
        await s.package("v1")
        await s.deploy({"v1": 100})
        post = s.http.post
        cases: list[tuple[Any, int, str, str]] = [
            (post(url(node), content=b"{nope"), 400, "bad_request", "expected {\"features\""),
            (post(url(node), json={"items": []}), 400, "bad_request", "features"),
            (post(url(node), json={"features": [1, 2]}), 400, "bad_request",
             "expected a JSON object"),
            (post(url(node, "score", "run"), content=b"[1,"), 400, "bad_request",
             "malformed JSON"),
            (post(url(node, service="nope"), json={}), 404, "not_found",
             "unknown API service 'nope'"),
            (post(url(node, "nope"), json={}), 404, "not_found", "has no endpoint 'nope'"),
            (post(url(node, "score", "predict"), json={}), 404, "not_found",
             "is a function endpoint"),
            (post(url(node), json={"features": {}, "generation": "v9"}), 404, "not_found",
             "generation 'v9'"),
            (post(url(node), content=b"x" * 4096), 413, "too_large", "over the limit"),
            (post(url(node), json={"features": {"boom": "bad input"}}), 500, "user_code",
             "ValueError: boom: bad input"),
            (s.http.get(url(node)), 405, "method_not_allowed", "takes POST"),
            (s.http.get(f"{node.http.url}/nope"), 404, "not_found", "no route"),  # type: ignore
        ]
        for request, status, code, needle in cases:
            r = await request
            assert r.status_code == status, (status, r.text)
            assert r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert error["code"] == code and needle in error["message"], (needle, error)
            assert "Traceback" not in r.text

        # No API node serves a service: 503 at once (NATS has no responders).
        await s.caller.call(_infra("empty"))
        make_api_project(tmp_path / "ws", key="other", service="other-api")
        await s.caller.call(CreateApiPackage(project="other", service="other-api",
                                             version="v1"))
        await s.caller.call(DeployApi(service="other-api", infra="empty",
                                      generations={"v1": 100}))
        await wait_for(lambda: "other-api" in node.gateway.services, timeout=10)  # type: ignore
        t0 = anyio.current_time()
        r = await post(url(node, service="other-api"), json={"features": {}})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "unavailable")
        assert anyio.current_time() - t0 < 1.0


def _infra(name: str) -> Any:
    from protocol.deploy import CreateInfra
    return CreateInfra(name=name, kind="api")


async def test_overload_and_timeout_answer_fast_with_503_and_504(settings: NatsSettings,
                                                                 tmp_path: Path) -> None:
    """One worker, a 0.4 s function: excess requests are shed with 503 instead of waiting
    past the queue timeout; a call longer than the request timeout gets 504."""
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1, queue_timeout=0.5, request_timeout=1.5)
        await s.package("v1")
        await s.deploy({"v1": 100})
        slow = {"sleep": 0.4}
        await s.http.post(url(node, "score", "run"), json=slow)  # learn the service time
        t0 = anyio.current_time()
        replies = await gather(*(s.http.post(url(node, "score", "run"), json=slow)
                                 for i in range(8)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 1 and codes.count(503) >= 3, codes
        assert all(r.json()["error"]["code"] == "overloaded" for r in replies
                   if r.status_code == 503)
        assert anyio.current_time() - t0 < 8 * 0.4
        r = await s.http.post(url(node, "score", "run"), json={"sleep": 3})
        assert (r.status_code, r.json()["error"]["code"]) == (504, "timeout")


async def test_split_is_proportional_dispatch_is_sticky_and_generation_can_be_forced(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2)
        for v in ("1", "2"):
            make_api_project(tmp_path / "ws", version=v)
            await s.package(f"v{v}")
        view = await s.deploy({"v1": 80, "v2": 20})
        assert view.desired == "v1=80,v2=20"
        subject = subjects.api_endpoint(SERVICE, "predict")
        seen = {"v1": 0, "v2": 0}

        async def one() -> None:
            msg = await s.nc.request(subject, b'{"features": {"x": 1}}', timeout=5)
            seen[json.loads(msg.data)["generation"]] += 1

        for _ in range(10):
            await gather(*(one() for _ in range(100)))

        # Binomial(1000, 0.2): mean 200, sd 12.6; +-4 sd.
        assert 150 <= seen["v2"] <= 250, seen

        by_key: dict[str, set[str]] = {}
        for i in range(40):
            key = f"customer-{i}"
            for _ in range(5):
                r = await s.http.post(url(node), json={"features": {"x": 1},
                                                       "dispatch_key": key})
                by_key.setdefault(key, set()).add(r.json()["generation"])
        assert all(len(g) == 1 for g in by_key.values()), by_key  # same key, same generation
        assert {g for gens in by_key.values() for g in gens} == {"v1", "v2"}

        for gen in ("v1", "v2"):
            r = await s.http.post(url(node), json={"features": {}, "generation": gen})
            assert r.json()["generation"] == gen
            r = await s.http.post(url(node, "score", "run"), json={},
                                  headers={"X-Shipyard-Generation": gen})
            assert r.json()["generation"] == gen


async def test_switching_under_load_fails_no_request_and_rollback_goes_back(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with api_stack(settings, tmp_path) as s:
        nodes = [await s.api_node("api-1", workers=2), await s.api_node("api-2", workers=1)]
        for v in ("1", "2"):
            make_api_project(tmp_path / "ws", version=v)
            await s.package(f"v{v}")
        await s.deploy({"v1": 100})
        failures: list[str] = []
        seen: list[str] = []
        stop = anyio.Event()

        async def client(i: int) -> None:
            node = nodes[i % 2]
            while not stop.is_set():
                r = await s.http.post(url(node), json={"features": {"x": i}})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.append(r.json()["generation"])

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(client, i)
            await wait_for(lambda: len(seen) > 50, message="load running")
            await s.deploy({"v2": 100})
            await wait_for(lambda: seen[-20:] == ["v2"] * 20, message="traffic on v2")
            back = await s.caller.call(RollbackApi(service=SERVICE, infra="prod"))
            assert back.desired == "v1" and back.previous == "v2"
            await s.settled(back.update_id)
            await wait_for(lambda: seen[-20:] == ["v1"] * 20, message="traffic on v1 again")
            stop.set()
        assert failures == []
        assert len(seen) > 100
        history = (await s.view()).last_update
        assert history is not None and history.action == "rollback"


async def test_a_failing_load_keeps_the_previous_generation_serving(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2)
        make_api_project(tmp_path / "ws", version="1")
        await s.package("v1")
        make_api_project(tmp_path / "ws", version="2", load_fails=True)
        await s.package("v2")
        await s.deploy({"v1": 100})
        bad = await s.deploy({"v2": 100}, wait=False)
        failed = await s.settled(bad.update_id, state="failed")
        assert failed.health == "ERROR"
        assert "RuntimeError: model file is corrupt" in failed.reasons[0]
        assert "still serving v1" in failed.reasons[0]
        assert failed.nodes[0].running == "v1"
        r = await s.http.post(url(node), json={"features": {"x": 1}})
        assert r.status_code == 200 and r.json()["generation"] == "v1"
        kinds = [e.as_dict()["type"] for e in [x async for x in read_events(s.nc, last=50)]]
        assert "api.generation.failed" in kinds and "api.deploy.finished" in kinds


async def test_shadow_generation_gets_a_copy_of_every_request_and_is_only_measured(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1)
        for v in ("1", "2"):
            make_api_project(tmp_path / "ws", version=v)
            await s.package(f"v{v}")
        view = await s.deploy({"v1": 100}, shadow="v2")
        assert view.desired == "v1 (+shadow v2)"
        for _ in range(10):
            r = await s.http.post(url(node), json={"features": {"x": 1}})
            assert r.json()["generation"] == "v1"

        async def shadowed() -> Any:
            v = await s.view()
            rows = {(m["generation"], m["shadow"]): m for m in v.extra["metrics"]
                    if m["endpoint"] == "predict"}
            shadow = rows.get(("v2", True))
            return rows if shadow is not None and shadow["requests"] == 10 else None
        rows = await wait_for(shadowed, timeout=10, message="shadow requests measured")
        assert rows[("v1", False)]["requests"] == 10


async def test_api_keys_are_checked_and_only_their_hash_is_stored(settings: NatsSettings,
                                                                  tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1")
        await s.package("v1")
        await s.deploy({"v1": 100}, auth="api-key")
        created: ApiKeyCreated = await s.caller.call(CreateApiKey(service=SERVICE,
                                                                  name="ci"))
        key = created.secret
        kv = await s.nc.jetstream().key_value(subjects.API_KEYS_BUCKET)
        stored = (await kv.get(key_record_key(SERVICE, created.key.id))).value or b""
        assert key.split("_", 2)[2].encode() not in stored and b"sha256" in stored

        async def status(headers: dict[str, str]) -> int:
            r = await s.http.post(url(node), json={"features": {}}, headers=headers)
            return r.status_code

        assert await status({}) == 401
        assert await status({"Authorization": "Bearer sy_nope_nope"}) == 401
        assert await status({"Authorization": f"Basic {key}"}) == 401
        assert await wait_for(lambda: status({"Authorization": f"Bearer {key}"}),
                              timeout=10) == 200
        r = await s.http.post(url(node), json={"features": {}})
        assert r.json()["error"]["code"] == "unauthorized"
        await s.caller.call(RevokeApiKey(service=SERVICE, id=created.key.id))

        async def refused() -> bool:
            return await status({"Authorization": f"Bearer {key}"}) == 401
        await wait_for(refused, timeout=10, message="revoked key refused")
        with pytest.raises(BadRequest):
            await s.caller.call(DeployApi(service=SERVICE, infra="prod",
                                          generations={"v1": 100}, auth="maybe"))


async def test_micro_discovery_replies_are_valid_against_the_official_schemas(
        settings: NatsSettings, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {v: json.loads((SCHEMAS / f"{v}_response.json").read_text())
               for v in ("ping", "info", "stats")}
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        await s.api_node("api-1", workers=2)
        await s.package("v1")
        await s.deploy({"v1": 100})
        await s.nc.request(subjects.api_endpoint(SERVICE, "predict"), b'{"features":{}}',
                           timeout=5)
        for verb in ("PING", "INFO", "STATS"):
            replies = await _collect(s.nc, f"$SRV.{verb}.{SERVICE}")
            assert len(replies) == 2, replies  # one micro instance per worker process
            for reply in replies:
                jsonschema.validate(reply, schemas[verb.lower()])
                assert reply["name"] == SERVICE
                assert reply["metadata"]["node"] == "api-1"
            if verb == "INFO":
                info = replies[0]
                assert info["description"] == "Scoring for tests"
                assert {e["name"]: (e["subject"], e["queue_group"]) for e in
                        info["endpoints"]} == {
                    "predict": ("sy.api.v1.churn-api.predict", SERVICE),
                    "score": ("sy.api.v1.churn-api.score", SERVICE)}
            if verb == "STATS":
                total = sum(e["num_requests"] for r in replies for e in r["endpoints"]
                            if e["name"] == "predict")
                assert total == 1
                assert all(isinstance(e["data"], dict) for r in replies
                           for e in r["endpoints"])


async def _collect(nc: Any, subject: str, window: float = 0.5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    inbox = nc.new_inbox()

    async def on_msg(msg: Any) -> None:
        out.append(msgspec.json.decode(msg.data))

    sub = await nc.subscribe(inbox, cb=on_msg)
    await nc.publish(subject, b"", reply=inbox)
    await anyio.sleep(window)  # discovery has no end marker: collect for a window
    await sub.unsubscribe()
    return out


async def test_a_crashing_predict_kills_a_worker_not_the_node(settings: NatsSettings,
                                                              tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2, request_timeout=1.0, retry_after=5.0)
        await s.package("v1")
        await s.deploy({"v1": 100})
        before = set(node.pool.pids())
        r = await s.http.post(url(node), json={"features": {"crash": True}})
        assert r.status_code == 500, r.text  # answered for the dead worker; never a hang
        assert "worker process running this request died" in r.json()["error"]["message"]
        await wait_for(lambda: len(node.pool.pids()) == 2 and node.pool.crashes >= 1,
                       timeout=20, message="worker replaced")
        assert set(node.pool.pids()) != before
        r = await s.http.post(url(node), json={"features": {"x": 1}})
        assert r.status_code == 200 and r.json()["generation"] == "v1"
        assert not node.stopping_requested
        os.kill(node.pool.pids()[0], signal.SIGKILL)  # and a worker killed from outside
        await wait_for(lambda: node.pool.crashes >= 2 and len(node.pool.pids()) == 2,
                       timeout=20, message="second worker replaced")
