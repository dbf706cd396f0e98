"""Forged and malformed inbound messages against a real Deployer: each is dropped and
counted, and the Deployer keeps its connection, its registry and its KV writes."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from nodes.deployer import DeployerNode
from nodes.deployer.registry import Record
from nodes.runtime import natscompat
from nodes.runtime.calls import Caller
from nodes.runtime.connection import ConnectionClosed, connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.events import read_events
from nodes.runtime.inbound import Drops
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import ApiMetricsReport, EndpointMetrics
from protocol.base import encode
from protocol.events import NodeForgotten, NodeLost, NodeOnline
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import LOST, REGISTRY_VALUE, ListNodes, NodeInfo
from protocol.reports import REPORT, NodeExit
from protocol.scenarios import RunStarted
from tests.helpers import Background, running, shipyard, shipyard_argv, wait_for, wait_until
from tests.probe import ProbeNode


def deployer(settings: NatsSettings, **kw: Any) -> DeployerNode:
    return DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2, **kw)


def heartbeat(name: str, **kw: Any) -> Heartbeat:
    fields: dict[str, Any] = dict(node=name, role="automation", infra="prod", version="9.9",
                                  host="h1", pid=4242, uptime_s=1.0, interval_s=0.1, seq=1)
    fields.update(kw)
    return Heartbeat(**fields)


async def send_beat(nc: NATS, hb: Heartbeat, subject: str | None = None) -> None:
    await nc.publish(subject or subjects.heartbeat(hb.role, hb.node), HEARTBEAT.encode(hb))


async def names(nc: NATS) -> dict[str, NodeInfo]:
    reply = await Caller(nc).call(ListNodes(), timeout=2)
    return {n.name: n for n in reply.nodes}


async def stored(nc: NATS, name: str) -> NodeInfo | None:
    kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
    try:
        entry = await kv.get(name)
    except nats.js.errors.KeyNotFoundError:
        return None
    return REGISTRY_VALUE.decode(entry.value) if entry.value else None


async def node_events(nc: NATS, name: str) -> list[object]:
    return [e.event async for e in read_events(nc)
            if e.event is not None and getattr(e.event, "node", None) == name]


async def test_a_heartbeat_with_a_5000_character_name_does_not_disconnect_the_deployer(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        huge = "n" * 5000
        # The subject is short (it is the sender's); the name inside is what used to
        # reach a KV key and close the Deployer's connection.
        await send_beat(nc, heartbeat(huge), subject=subjects.heartbeat("automation", "x"))
        await wait_for(lambda: d.heartbeats_bad == 1, message="forged beat counted")
        await send_beat(nc, heartbeat("after"))
        await wait_for(lambda: stored(nc, "after"), message="later node persisted in KV")
        listed = await names(nc)
        assert d.nc.is_connected and not d.nc.is_closed
        assert "after" in listed and huge not in listed
        assert d.heartbeat().dropped == 1  # every node shows what it dropped
    await nc.close()


async def test_a_heartbeat_whose_node_does_not_match_its_subject_is_dropped_and_counted(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        await send_beat(nc, heartbeat("victim"), subject=subjects.heartbeat("automation", "me"))
        await send_beat(nc, heartbeat("victim", role="api"),
                        subject=subjects.heartbeat("automation", "victim"))
        await wait_for(lambda: d.heartbeats_bad == 2, message="mismatched beats counted")
        await send_beat(nc, heartbeat("honest"))
        await wait_for(lambda: names(nc), message="registry answers")
        listed = await wait_for(lambda: _with(nc, "honest"), message="honest registered")
        assert "victim" not in listed and "me" not in listed
    await nc.close()


async def _with(nc: NATS, name: str) -> dict[str, NodeInfo] | None:
    listed = await names(nc)
    return listed if name in listed else None


async def test_heartbeats_with_out_of_bounds_numbers_are_refused(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        await send_beat(nc, heartbeat("phantom", interval_s=1e9))
        await send_beat(nc, heartbeat("too-fast", interval_s=0.001))
        await send_beat(nc, heartbeat("negative", seq=-1))
        raw = HEARTBEAT.encode(heartbeat("infinite")).replace(b'"uptime_s":1.0',
                                                               b'"uptime_s":1e999')
        await nc.publish(subjects.heartbeat("automation", "infinite"), raw)
        await wait_for(lambda: d.heartbeats_bad == 4, message="4 refused beats counted")
        await send_beat(nc, heartbeat("sane", interval_s=300.0))
        listed = await wait_for(lambda: _with(nc, "sane"), message="sane beat registered")
        assert set(listed) & {"phantom", "too-fast", "negative", "infinite"} == set()
    await nc.close()


async def test_a_record_that_cannot_be_written_does_not_block_later_ones(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        # A record no heartbeat can create any more (say, from an older release).
        bad = NodeInfo(name="bad name*", role="automation", infra="prod", status="online",
                       last_seen=0.0, first_seen=0.0, version="1", host="h", pid=1,
                       uptime_s=0.0, interval_s=2.0)
        d.registry.nodes[bad.name] = Record(info=bad, judge_from=d.registry.clock())
        await send_beat(nc, heartbeat("joins-later"))
        info = await wait_for(lambda: stored(nc, "joins-later"), timeout=5,
                              message="the valid node persisted despite the bad record")
        assert info.status == "online"
        assert d.nc.is_connected
    await nc.close()


async def test_a_forged_exit_report_does_not_keep_a_beating_node_lost(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    live = ProbeNode(name="live", nats=settings, heartbeat_interval=0.1)
    async with running(deployer(settings), live):
        await wait_for(lambda: _with(nc, "live"), message="live registered")
        forged = NodeExit(node="live", role="probe", infra="default", pid=live.pid,
                          reason="forged", instance=live.instance)
        await nc.publish(forged.subject(), REPORT.encode(forged))
        events = await wait_for(lambda: _events_after_lost(nc, "live"), timeout=5,
                                message="lost, then online again")
        listed = await names(nc)
    lost, back = events
    assert isinstance(lost, NodeLost) and lost.reason == "forged"
    assert isinstance(back, NodeOnline) and back.reason == "resumed"
    assert listed["live"].status == "online"
    await nc.close()


async def _events_after_lost(nc: NATS, name: str) -> list[object] | None:
    events = await node_events(nc, name)
    for i, e in enumerate(events):
        if isinstance(e, NodeLost) and i + 1 < len(events):
            return [e, events[i + 1]]
    return None


async def test_lost_nodes_are_forgotten_after_the_period(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings, forget_after=0.5)
    async with running(d):
        await send_beat(nc, heartbeat("gone", interval_s=0.1))
        await wait_for(lambda: stored(nc, "gone"), message="gone persisted")
        await wait_for(lambda: _gone(nc, "gone"), timeout=10, message="gone forgotten")
        await wait_for(lambda: _not_stored(nc, "gone"), message="KV record deleted")
        events = await wait_for(lambda: _n_events(nc, "gone", 3), message="3 events")
    assert [type(e) for e in events] == [NodeOnline, NodeLost, NodeForgotten]
    assert "lost for more than 0.5s" in events[2].reason  # type: ignore[attr-defined]
    await nc.close()


async def _gone(nc: NATS, name: str) -> bool:
    return name not in await names(nc)


async def _not_stored(nc: NATS, name: str) -> bool:
    return await stored(nc, name) is None


async def _n_events(nc: NATS, name: str, n: int) -> list[object] | None:
    events = await node_events(nc, name)
    return events if len(events) >= n else None


def _report(node: str, **row: Any) -> ApiMetricsReport:
    fields: dict[str, Any] = dict(service="svc", endpoint="predict", generation="v1",
                                  shadow=False, requests=10, errors=1, inflight=0,
                                  latency_sum_s=0.5, buckets=[10])
    fields.update(row)
    return ApiMetricsReport(node=node, infra="api", ts=1.0, interval_s=5.0,
                            endpoints=[EndpointMetrics(**fields)])


async def test_metrics_reports_with_absurd_counts_are_refused(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        absurd = _report("a1", requests=10**15, buckets=[10**15])
        await nc.publish(absurd.subject(), encode(absurd))
        negative = _report("a2", errors=-5)
        await nc.publish(negative.subject(), encode(negative))
        inf = encode(_report("a3")).replace(b"0.5", b"1e999")  # latency_sum_s: infinity
        await nc.publish(subjects.report("metrics", "a3"), inf)
        await nc.publish(subjects.report("metrics", "a4"), b'{"type":"api.metrics",NaN}')
        await wait_for(lambda: d.drops.count("metrics report") == 4,
                       message="4 refused reports counted")
        fine = _report("a5")
        await nc.publish(fine.subject(), encode(fine))
        await wait_for(lambda: "a5" in d.apis.reports, message="a sane report kept")
        assert set(d.apis.reports) == {"a5"}
    await nc.close()


async def test_node_forget_through_the_cli(settings: NatsSettings, cli_env: dict[str, str],
                                           tmp_path: Path) -> None:
    env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
    nc = await connect(settings, name="t")

    async def cli(*args: str) -> Any:
        return await anyio.to_thread.run_sync(
            lambda: shipyard("node", "forget", *args, env=env, cwd=tmp_path))

    live = ProbeNode(name="busy", nats=settings, heartbeat_interval=0.2)
    async with running(deployer(settings), live):
        await send_beat(nc, heartbeat("retired", interval_s=0.1))
        await wait_for(lambda: _status(nc, "retired", LOST), message="retired lost")
        await wait_for(lambda: _with(nc, "busy"), message="busy registered")

        unknown = await cli("nobody")
        assert unknown.returncode == 1
        assert "unknown node 'nobody'" in unknown.stderr
        online = await cli("busy")
        assert online.returncode == 1 and "is online" in online.stderr
        assert "--force" in online.stderr
        done = await cli("retired", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["name"] == "retired"
        await wait_for(lambda: _not_stored(nc, "retired"), message="KV record deleted")
        assert "retired" not in await names(nc)
        forced = await cli("busy", "--force")
        assert forced.returncode == 0 and "forgot node busy" in forced.stdout
        events = await wait_for(lambda: _forgotten(nc, "retired"), message="event stored")
    assert events[-1].by  # type: ignore[attr-defined]
    await nc.close()


async def _status(nc: NATS, name: str, status: str) -> bool:
    info = (await names(nc)).get(name)
    return info is not None and info.status == status


async def _forgotten(nc: NATS, name: str) -> list[object] | None:
    events = [e for e in await node_events(nc, name) if isinstance(e, NodeForgotten)]
    return events or None


async def test_serve_raises_when_the_connection_is_closed_for_good(
        settings: NatsSettings) -> None:
    node = ProbeNode(name="p1", nats=settings, heartbeat_interval=0.2)
    raised: list[BaseException] = []
    ended = anyio.Event()

    async def serve(*, task_status: Any) -> None:
        try:
            await node.serve(task_status=task_status)
        except ConnectionClosed as exc:
            raised.append(exc)
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        # A control line past the server's limit: the server answers with -ERR and the
        # client library closes the connection for good (what a 5,000-character KV key
        # once did to the Deployer).
        await node.nc.publish("sy." + "x" * 5000, b"")
        with anyio.fail_after(10):
            await ended.wait()
    assert raised, "serve() returned normally after losing its connection"
    assert "maximum control line exceeded" in str(raised[0])


def test_a_node_process_exits_non_zero_when_its_connection_is_closed_for_good(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_control_line: 4096\n")
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None,
                          log_file=tmp_path / "nats.log", extra_args=["-c", str(conf)])
    server.start()
    try:
        env = dict(cli_env, SHIPYARD_NATS_URL=server.url)
        proc = Background(shipyard_argv("node", "start", "deployer", "--name", "d1",
                                        "--heartbeat-interval", "0.2"), env=env)
        try:
            proc.wait_line("node ready", timeout=30)
            # The operator lowers the control line limit and reloads: the node's next
            # heartbeat breaks it and the server closes the connection with -ERR.
            conf.write_text("max_control_line: 16\n")
            assert server.proc is not None
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: proc.proc.poll() is not None, timeout=20,
                       message="node process exited")
        finally:
            code = proc.stop(signal.SIGTERM)
        assert code == 2, proc.output()
        assert "closed for good" in proc.output()
    finally:
        server.stop()


async def test_a_failing_handler_never_escapes_and_later_messages_are_handled(
        settings: NatsSettings) -> None:
    node = ProbeNode(name="p1", nats=settings, heartbeat_interval=0.2)
    seen: list[str] = []

    async def handler(hb: Heartbeat) -> None:
        if hb.node == "boom":
            raise RuntimeError("handler bug")
        seen.append(hb.node)

    nc = await connect(settings, name="t")
    async with running(node):
        await node.subscribe_decoded("test.beats", HEARTBEAT, handler, kind="beat")
        await natscompat.flush(node.nc)
        for name in ("boom", "boom", "ok"):
            await nc.publish("test.beats", HEARTBEAT.encode(heartbeat(name)))
        await nc.publish("test.beats", b"\xff\xfe not json")
        await wait_for(lambda: seen == ["ok"] and node.drops.count("beat") == 1,
                       message="good message handled after failures")
        assert node.drops.count("beat (handler failed)") == 2
        assert node.nc.is_connected
    await nc.close()


class _Log:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(dict(kw, event=event))


def test_malformed_messages_are_logged_once_per_sender_with_bounded_memory() -> None:
    log = _Log()
    drops = Drops(log, max_senders=100, logs_per_minute=1000)
    for _ in range(50):
        drops.drop("heartbeat", "sy.hb.api.a1", "sy.hb.api.a1", "bad interval")
    assert drops.count("heartbeat") == 50 and len(log.lines) == 1
    assert log.lines[0]["sender"] == "sy.hb.api.a1" and "bad interval" in log.lines[0]["error"]
    for i in range(10_000):  # a flood of made-up senders
        drops.drop("heartbeat", f"s{i}", f"sy.hb.api.s{i}", "bad")
    assert drops.remembered == 100
    assert drops.total == 10_050


def test_a_flood_of_new_senders_is_logged_at_a_capped_rate() -> None:
    log = _Log()
    drops = Drops(log, logs_per_minute=5)
    for i in range(100):
        drops.drop("metrics report", f"n{i}", f"sy.rpt.metrics.n{i}", "bad")
    assert len(log.lines) == 5 and drops.total == 100


async def test_stored_records_whose_name_is_not_their_key_are_skipped_on_load(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    async with running(deployer(settings)):
        pass  # creates the bucket
    kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)
    good = NodeInfo(name="kept", role="automation", infra="prod", status="online",
                    last_seen=0.0, first_seen=0.0, version="1", host="h", pid=1,
                    uptime_s=0.0, interval_s=5.0)
    await kv.put("kept", encode(good))
    await kv.put("smuggled", encode(msgspec.structs.replace(good, name="bad name*")))
    await kv.put("n" * 200, encode(msgspec.structs.replace(good, name="n" * 200)))
    d = deployer(settings)
    async with running(d):
        listed = await names(nc)
        assert set(listed) >= {"kept"}
        assert not {"bad name*", "smuggled", "n" * 200} & set(listed)
        await send_beat(nc, heartbeat("fresh"))
        await wait_for(lambda: stored(nc, "fresh"), message="writes still work")
    await nc.close()


async def test_run_events_with_invalid_names_never_reach_the_run_history(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        forged = RunStarted(run_id="r" * 5000, project="p", scenario="s", infra="prod",
                            node="a1", bundle="b", trigger="manual", firing="f")
        # Stored under a valid subject: only the body is forged.
        await nc.jetstream().publish(subjects.event("run", "p", "short"), encode(forged))
        honest = RunStarted(run_id="p-s-1", project="p", scenario="build a,b", infra="prod",
                            node="a1", bundle="b", trigger="manual", firing="f")
        await nc.jetstream().publish(honest.subject(), encode(honest))
        await wait_for(lambda: "p-s-1" in d.runs.runs, message="honest run folded")
        await wait_for(lambda: d.drops.count("run event") == 1, message="forged one counted")
        assert list(d.runs.runs) == ["p-s-1"]
    await nc.close()


async def test_a_full_registry_refuses_new_names_but_keeps_known_nodes(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        await wait_for(lambda: "deployer" in d.registry.nodes, message="own beat")
        d.registry.max_nodes = len(d.registry.nodes) + 2
        for name in ("n1", "n2", "n3"):
            await send_beat(nc, heartbeat(name, interval_s=5.0))
        await wait_for(lambda: d.heartbeats_bad == 1, message="the third name refused")
        await send_beat(nc, heartbeat("n1", interval_s=5.0, seq=2))
        await wait_for(lambda: d.registry.nodes["n1"].seq == 2, message="n1 still beating")
        assert "n3" not in d.registry.nodes and "n2" in d.registry.nodes
    await nc.close()


async def test_a_reply_over_the_servers_max_payload_is_a_typed_too_large_error(
        settings: NatsSettings) -> None:
    """An unfiltered listing of many nodes with large (but valid) states would be a reply
    nats-server refuses; the caller gets ``too_large`` at once instead of a timeout, and
    a filtered listing still works."""
    from protocol.errors import TooLarge
    from protocol.state import AutomationState, BundleState

    state = AutomationState(bundles={f"p{i}": BundleState(active="v1", target="v1",
                                                          cached=["v1", "v0"])
                                     for i in range(400)})
    nc = await connect(settings, name="test")
    async with running(deployer(settings)) as (d,):
        for i in range(40):
            await send_beat(nc, heartbeat(f"big-{i}", state=state,
                                          infra="prod" if i else "small"))
        await wait_for(lambda: len(d.registry.nodes) >= 40, message="40 nodes registered")
        with pytest.raises(TooLarge, match=r"max_payload .* filters"):
            await Caller(nc).call(ListNodes(), timeout=5)
        reply = await Caller(nc).call(ListNodes(infra="small"), timeout=5)
        assert [n.name for n in reply.nodes] == ["big-0"]
    await nc.close()
