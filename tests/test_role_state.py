"""Role state is typed: each role's state round-trips, the untagged object nodes of the
previous release send still decodes (and a real Deployer shows it), and a malformed
state is refused by decoding and counted, never raised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from nodes.deployer import DeployerNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import encode
from protocol.deploy import IN_SYNC, DeploymentRecord, ListDeployments, deployment_key
from protocol.errors import DecodeError, InvalidMessage
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import REGISTRY_VALUE, ListNodes, NodeInfo
from protocol.state import (
    MAX_ENTRIES,
    ApiState,
    AutomationState,
    BundleFailure,
    BundleState,
    DeployerState,
    DesignState,
    GatewayState,
    GovernState,
    MappingFailure,
    NoState,
    RoleState,
    RunState,
    ServiceState,
)
from tests.helpers import running, shipyard, wait_for

STATES: dict[str, RoleState] = {
    "automation": AutomationState(
        data_dir="/var/a1",
        bundles={"churn": BundleState(active="v2", previous="v1", stage="idle",
                                      cached=["v1", "v2"], target="v2", update="u2"),
                 "fraud": BundleState(active="v1", stage="failed", update="u3",
                                      failed=BundleFailure(bundle="v9", update="u3",
                                                           reason="bad archive"))},
        runs={"churn-nightly-1": RunState(project="churn", scenario="nightly",
                                          trigger="cron", started_at=1764628000.5)}),
    "api": ApiState(
        data_dir="/var/api", workers=2, worker_pids=[11, 12], worker_crashes=1,
        http="http://127.0.0.1:8080",
        services={"scoring": ServiceState(mapping="g1", stage="serving", target="g1",
                                          update="u1", generations={"g1": 100}),
                  "broken": ServiceState(stage="failed", update="u2",
                                         failed=MappingFailure(update="u2", reason="boom"))}),
    "gateway": GatewayState(http="http://127.0.0.1:8081", services=["scoring"]),
    "design": DesignState(workspace="/ws", runs={"b1": RunState(project="churn")}),
    "deployer": DeployerState(nodes=3, heartbeats=120),
    "govern": GovernState(),
}

# Exactly what each role put in ``state`` in the previous release (an untagged object),
# and the typed state it must become.
LEGACY: dict[str, tuple[dict[str, Any], RoleState]] = {
    "automation": (
        {"data_dir": "/var/a1",
         "bundles": {"churn": {"active": "v1", "previous": None, "stage": "idle",
                               "cached": ["v1"], "target": "v1", "update": "u1"},
                     "fraud": {"active": None, "previous": None, "target": "v9",
                               "stage": "failed", "update": "u3",
                               "failed": {"bundle": "v9", "update": "u3",
                                          "reason": "bad archive"}}},
         "runs": {"churn-nightly-1": {"project": "churn", "scenario": "nightly",
                                      "trigger": "cron", "started_at": 1764628000}}},
        AutomationState(
            data_dir="/var/a1",
            bundles={"churn": BundleState(active="v1", stage="idle", cached=["v1"],
                                          target="v1", update="u1"),
                     "fraud": BundleState(target="v9", stage="failed", update="u3",
                                          failed=BundleFailure(bundle="v9", update="u3",
                                                               reason="bad archive"))},
            runs={"churn-nightly-1": RunState(project="churn", scenario="nightly",
                                              trigger="cron", started_at=1764628000.0)})),
    "api": (
        {"data_dir": "/var/api", "workers": 2, "worker_pids": [11, 12], "worker_crashes": 0,
         "http": None, "http_error": "address in use",
         "services": {"scoring": {"mapping": "g1", "stage": "serving", "target": "g1",
                                  "update": "u1", "generations": {"g1": 100},
                                  "shadow": None},
                      "broken": {"mapping": None, "stage": "failed", "target": "g2",
                                 "update": "u2",
                                 "failed": {"update": "u2", "reason": "load failed"}}}},
        ApiState(data_dir="/var/api", workers=2, worker_pids=[11, 12],
                 http_error="address in use",
                 services={"scoring": ServiceState(mapping="g1", stage="serving",
                                                   target="g1", update="u1",
                                                   generations={"g1": 100}),
                           "broken": ServiceState(stage="failed", target="g2", update="u2",
                                                  failed=MappingFailure(
                                                      update="u2",
                                                      reason="load failed"))})),
    "gateway": ({"http": None, "services": ["scoring"]}, GatewayState(services=["scoring"])),
    "design": ({"workspace": "/ws", "runs": {}}, DesignState(workspace="/ws")),
    "deployer": ({"nodes": 3, "heartbeats": 120}, DeployerState(nodes=3, heartbeats=120)),
    "govern": ({}, GovernState()),
}


def legacy_beat(node: str, role: str, state: Any, *, interval_s: float = 5.0) -> bytes:
    """A heartbeat as the previous release encoded it (``state`` an untagged object)."""
    return json.dumps({
        "type": "heartbeat", "v": 1, "node": node, "role": role, "infra": "prod",
        "version": "0.9.0", "host": "old-host", "pid": 4242, "uptime_s": 12.5,
        "interval_s": interval_s, "seq": 7, "ts": 1764628000.25, "instance": "abc123",
        "state": state, "dropped": 0}).encode()


def beat(role: str, state: RoleState, node: str = "n1") -> Heartbeat:
    return Heartbeat(node=node, role=role, infra="prod", version="1.0", host="h", pid=2,
                     uptime_s=1.5, interval_s=2.0, seq=3, state=state)


@pytest.mark.parametrize("role", sorted(STATES))
def test_each_roles_state_round_trips_in_a_heartbeat_and_a_registry_record(role: str) -> None:
    hb = beat(role, STATES[role])
    back = HEARTBEAT.decode(HEARTBEAT.encode(hb))
    assert back == hb and type(back.state) is type(STATES[role])
    back.validate(subjects.heartbeat(role, "n1"))
    assert json.loads(HEARTBEAT.encode(hb))["state"]["role"] == role  # tagged on the wire
    info = NodeInfo(name="n1", role=role, infra="prod", status="online", last_seen=1.0,
                    first_seen=0.5, version="1.0", host="h", pid=2, uptime_s=1.5,
                    interval_s=2.0, state=STATES[role])
    assert REGISTRY_VALUE.decode(encode(info)) == info


@pytest.mark.parametrize("role", sorted(LEGACY))
def test_a_previous_release_heartbeat_decodes_into_its_roles_typed_state(role: str) -> None:
    legacy, typed = LEGACY[role]
    hb = HEARTBEAT.decode(legacy_beat("old", role, legacy))
    assert hb.state == typed
    hb.validate(subjects.heartbeat(role, "old"))
    assert (hb.node, hb.seq, hb.instance) == ("old", 7, "abc123")


def test_a_heartbeat_without_state_and_a_role_this_release_does_not_know_still_decode(
        ) -> None:
    bare = json.loads(legacy_beat("old", "automation", {}))
    del bare["state"]
    assert HEARTBEAT.decode(json.dumps(bare).encode()).state == NoState()
    newer = HEARTBEAT.decode(legacy_beat("q1", "quantum", {"role": "quantum", "qubits": 5}))
    assert newer.state == NoState() and newer.role == "quantum"
    newer.validate(subjects.heartbeat("quantum", "q1"))
    old_unknown = HEARTBEAT.decode(legacy_beat("q2", "quantum", {"qubits": 5}))
    assert old_unknown.state == NoState()
    # A newer release's extra fields are ignored.
    extra = HEARTBEAT.decode(legacy_beat("a1", "automation",
                                         {"role": "automation", "gpus": 8, "bundles": {}}))
    assert extra.state == AutomationState()


MALFORMED = [
    pytest.param({"bundles": 5}, "Expected `object`, got `int`", id="legacy-bundles-int"),
    pytest.param({"bundles": {"churn": {"active": 7}}}, "Expected `str | null`, got `int`",
                 id="legacy-active-int"),
    pytest.param({"role": "automation", "bundles": []}, "Expected `object`, got `array`",
                 id="typed-bundles-list"),
    pytest.param({"runs": {"r": {"started_at": "soon"}}}, "Expected `float`, got `str`",
                 id="legacy-started-at-text"),
    pytest.param([1, 2], "Expected `object`, got `array`", id="state-not-an-object"),
]


@pytest.mark.parametrize(("state", "error"), MALFORMED)
def test_a_state_of_the_wrong_types_is_refused_by_decoding(state: Any, error: str) -> None:
    with pytest.raises(DecodeError) as caught:
        HEARTBEAT.decode(legacy_beat("a1", "automation", state), "sy.hb.automation.a1")
    assert error in str(caught.value) and "$.state" in str(caught.value)


def test_a_state_of_another_role_or_with_too_many_entries_fails_validation() -> None:
    with pytest.raises(InvalidMessage, match="automation node sent the state of a api node"):
        beat("automation", ApiState()).validate(subjects.heartbeat("automation", "n1"))
    crowded = AutomationState(bundles={f"p{i}": BundleState() for i in range(MAX_ENTRIES + 1)})
    with pytest.raises(InvalidMessage, match=f"expected at most {MAX_ENTRIES}"):
        beat("automation", crowded).validate(subjects.heartbeat("automation", "n1"))
    long = ApiState(services={"s": ServiceState(failed=MappingFailure(reason="x" * 70000))})
    with pytest.raises(InvalidMessage, match="refusal reason"):
        beat("api", long).validate(subjects.heartbeat("api", "n1"))


def deployer(settings: NatsSettings) -> DeployerNode:
    return DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2)


async def _nodes(nc: NATS) -> dict[str, NodeInfo]:
    reply = await Caller(nc).call(ListNodes(), timeout=2)
    return {n.name: n for n in reply.nodes}


async def test_a_previous_release_node_is_registered_listed_and_counted_in_deployment_views(
        settings: NatsSettings, cli_env: dict[str, str], tmp_path: Path) -> None:
    nc = await connect(settings, name="t")
    legacy, typed = LEGACY["automation"]
    async with running(deployer(settings)):
        kv = await nc.jetstream().key_value(subjects.DEPLOY_BUCKET)
        desired = DeploymentRecord(project="churn", infra="prod", desired="v1", update_id="u1")
        await kv.put(deployment_key("bundle", "prod", "churn"), encode(desired))
        await nc.publish(subjects.heartbeat("automation", "old-a1"),
                         legacy_beat("old-a1", "automation", legacy))

        async def listed() -> NodeInfo | None:
            return (await _nodes(nc)).get("old-a1")

        info = await wait_for(listed, message="the old node registered")
        assert info.status == "online" and info.state == typed

        async def churn_view() -> Any:
            reply = await Caller(nc).call(ListDeployments(project="churn"), timeout=2)
            views = [v for v in reply.deployments if v.kind == "bundle" and v.nodes]
            return views[0] if views else None

        view = await wait_for(churn_view, message="a view of churn with the old node")
        assert [(n.node, n.running, n.activity) for n in view.nodes] == [
            ("old-a1", "v1", "idle")]
        assert view.state == IN_SYNC

        env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
        proc = await anyio.to_thread.run_sync(
            lambda: shipyard("nodes", "--json", env=env, cwd=tmp_path, check=True))
        shown = {n["name"]: n for n in json.loads(proc.stdout)}
        assert shown["old-a1"]["state"]["bundles"]["churn"]["active"] == "v1"
        assert shown["old-a1"]["state"]["role"] == "automation"
    await nc.close()


async def test_registry_records_stored_by_the_previous_release_still_load(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    async with running(deployer(settings)):
        pass  # creates the bucket
    kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
    legacy, typed = LEGACY["api"]
    record = {"name": "old-api", "role": "api", "infra": "prod", "status": "online",
              "last_seen": 1764628000.0, "first_seen": 1764627000.0, "version": "0.9.0",
              "host": "old-host", "pid": 4242, "uptime_s": 12.5, "interval_s": 5.0,
              "state": legacy, "last_seen_s": 0.0, "dropped": 0}
    await kv.put("old-api", json.dumps(record).encode())
    async with running(deployer(settings)):
        info = (await _nodes(nc))["old-api"]
        assert info.state == typed and info.role == "api"
    await nc.close()


async def test_malformed_states_are_dropped_and_counted_and_the_deployer_keeps_serving(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        for i, bad in enumerate(p.values[0] for p in MALFORMED):
            await nc.publish(subjects.heartbeat("automation", f"bad{i}"),
                             legacy_beat(f"bad{i}", "automation", bad))
        # Decodes, but is the state of another role: refused by validation.
        await nc.publish(subjects.heartbeat("automation", "mixed"),
                         legacy_beat("mixed", "automation", {"role": "api"}))
        await wait_for(lambda: d.heartbeats_bad == len(MALFORMED) + 1,
                       message="every malformed beat counted")
        await nc.publish(subjects.heartbeat("automation", "good"),
                         HEARTBEAT.encode(beat("automation", STATES["automation"], "good")))

        async def good() -> dict[str, NodeInfo] | None:
            nodes = await _nodes(nc)
            return nodes if "good" in nodes else None

        nodes = await wait_for(good, message="a sane beat still registered")
        assert not ({f"bad{i}" for i in range(len(MALFORMED))} | {"mixed"}) & set(nodes)
        assert nodes["good"].state == STATES["automation"]
        assert d.nc.is_connected and d.heartbeat().dropped == len(MALFORMED) + 1
        assert msgspec.to_builtins(d.heartbeat().state)["role"] == "deployer"
    await nc.close()
