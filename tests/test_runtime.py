"""The Node runtime against a real nats-server: dispatch, errors, concurrency, shutdown."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from nodes.deployer import DeployerNode
from nodes.runtime import natscompat
from nodes.runtime.calls import Caller
from nodes.runtime.connection import CannotReachNats, connect
from nodes.runtime.requests import pending_count
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import Reply, encode, make_request
from protocol.errors import BadRequest, Internal, NotFound, Timeout, Unavailable
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.state import DeployerState, NoState
from protocol.system import Echo, Ping
from tests.helpers import gather, running, wait_for
from tests.probe import PROBE, Boom, Done, ProbeNode, Unhandled, Work


def probe(settings: NatsSettings, name: str = "p1", **kw: object) -> ProbeNode:
    return ProbeNode(name=name, nats=settings, heartbeat_interval=0.2, **kw)  # type: ignore[arg-type]


async def client(settings: NatsSettings) -> NATS:
    return await connect(settings, name="test")


async def test_ready_means_subscribed_and_answering(settings: NatsSettings) -> None:
    node = probe(settings)
    nc = await client(settings)
    async with running(node):
        # No wait: readiness is only signalled once subscriptions exist.
        done = await Caller(nc).call(Work(label="first"), timeout=2)
        pong = await Caller(nc).call(Ping(), node="p1", timeout=2)
    assert done == Done(label="first")
    assert pong.node == "p1" and pong.role == "probe"
    await nc.close()


async def test_heartbeats_carry_identity_and_role_state(settings: NatsSettings) -> None:
    nc = await client(settings)
    beats: dict[str, list[Heartbeat]] = {"p1": [], "d1": []}

    async def on_beat(msg: object) -> None:
        hb = HEARTBEAT.decode(msg.data)  # type: ignore[attr-defined]
        beats[hb.node].append(hb)

    await nc.subscribe(subjects.heartbeat("probe", "p1"), cb=on_beat)
    await nc.subscribe(subjects.heartbeat("deployer", "d1"), cb=on_beat)
    node = probe(settings)
    deployer = DeployerNode(name="d1", nats=settings, heartbeat_interval=0.2)
    async with running(deployer, node):
        await Caller(nc).call(Work(label="x"), timeout=2)

        def registry_of_two() -> DeployerState | None:
            state = beats["d1"][-1].state if beats["d1"] else None
            return state if isinstance(state, DeployerState) and state.nodes == 2 else None

        state = await wait_for(registry_of_two, message="the Deployer's state counts 2 nodes")
        assert state.heartbeats >= 2
        await wait_for(lambda: len(beats["p1"]) >= 2, message="2 probe beats")
    hb = beats["p1"][-1]
    assert (hb.node, hb.role, hb.infra, hb.interval_s) == ("p1", "probe", "default", 0.2)
    assert hb.pid > 0 and hb.host and hb.version and hb.uptime_s >= 0
    assert hb.state == NoState()  # a role without a state type carries none
    assert hb.seq >= 2
    await nc.close()


async def test_slow_handler_does_not_stall_other_requests_on_the_same_subject(
        settings: NatsSettings) -> None:
    node = probe(settings)
    nc = await client(settings)
    caller = Caller(nc)
    async with running(node), anyio.create_task_group() as tg:
        tg.start_soon(lambda: caller.call(Work(label="slow", seconds=3.0), timeout=10))
        await wait_for(lambda: "slow" in node.started_work, message="slow request started")
        t0 = time.monotonic()
        fast = await gather(*(caller.call(Work(label=f"f{i}"), timeout=5) for i in range(20)))
        fast_done = time.monotonic() - t0
        assert "slow" not in node.finished_work, "fast requests waited for the slow one"
        tg.cancel_scope.cancel()
    assert [d.label for d in fast] == [f"f{i}" for i in range(20)]
    assert fast_done < 3.0
    await nc.close()


async def test_concurrency_is_bounded(settings: NatsSettings) -> None:
    node = probe(settings, max_concurrency=3)
    nc = await client(settings)
    caller = Caller(nc)
    async with running(node), anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(lambda i=i: caller.call(Work(label=f"w{i}", seconds=0.5), timeout=10))
        await wait_for(lambda: len(node.started_work) == 3, message="3 requests started")
        # The other three wait for a slot instead of running beside them.
        assert len(node.started_work) == 3
        await wait_for(lambda: len(node.finished_work) == 6, message="all 6 finished")
    await nc.close()


async def test_malformed_payload_gets_a_typed_error_and_the_node_keeps_serving(
        settings: NatsSettings) -> None:
    node = probe(settings)
    nc = await client(settings)
    async with running(node):
        for payload in (b"not json", b'{"id":"1","ts":0,"body":{"type":"work"}}',
                        b'{"id":"1","ts":0,"body":{"type":"work","label":5}}', b""):
            msg = await nc.request(subjects.command("probe", "work"), payload, timeout=2)
            reply = PROBE.replies.decode(msg.data)
            assert reply.ok is None and reply.error is not None
            assert reply.error.code == "bad_request"
            assert "malformed 'work' request" in reply.error.message
            assert "expected" in reply.error.message
            # The reply names the request's id when its bytes carry one.
            assert reply.re == ("1" if payload.startswith(b"{") else None)
        # A body whose type does not match the subject's verb is refused too.
        msg = await nc.request(subjects.command("probe", "work"),
                               make_request(Boom()), timeout=2)
        reply = PROBE.replies.decode(msg.data)
        assert reply.error is not None and "sent to verb 'work'" in reply.error.message
        assert await Caller(nc).call(Work(label="still"), timeout=2) == Done(label="still")
    await nc.close()


async def test_handler_exceptions_become_typed_error_replies(settings: NatsSettings) -> None:
    node = probe(settings)
    nc = await client(settings)
    caller = Caller(nc)
    async with running(node):
        with pytest.raises(NotFound, match="widget-7"):
            await caller.call(Boom(typed=True), timeout=2)
        with pytest.raises(Internal, match="ZeroDivisionError: division by zero"):
            await caller.call(Boom(), timeout=2)
        with pytest.raises(BadRequest, match="does not handle 'unhandled'"):
            await caller.call(Unhandled(), timeout=2)
        assert await caller.call(Echo(payload="ok"), node="p1", timeout=2)
    assert node.requests_failed == 3
    await nc.close()


async def test_a_call_takes_only_its_own_reply_on_a_re_used_reply_subject(
        settings: NatsSettings) -> None:
    """Calls re-use reply subjects one at a time.  A responder that answers a request
    twice sends its second answer to a subject the next call now waits on: that call
    still gets its own reply (the one naming its request id), not the stale one."""
    nc = await client(settings)
    responder = await client(settings)
    replies: list[str] = []
    stale: list[bytes] = []

    async def answer(msg: Msg) -> None:
        request = PROBE.requests.decode(msg.data)
        assert isinstance(request.body, Work)
        replies.append(msg.reply)
        data = encode(Reply(ok=Done(label=request.body.label), re=request.id))
        if stale:  # the first request's second answer goes first
            await responder.publish(msg.reply, stale.pop())
        else:
            stale.append(data)
        await responder.publish(msg.reply, data)

    await responder.subscribe(subjects.command("probe", "work"), cb=answer)
    await natscompat.flush(responder, 2)
    caller = Caller(nc)
    assert await caller.call(Work(label="first"), timeout=2) == Done(label="first")
    assert await caller.call(Work(label="second"), timeout=2) == Done(label="second")
    assert replies[0] == replies[1] and not stale  # the same subject, the stale reply sent
    await responder.close()
    await nc.close()


async def test_a_late_reply_finds_no_one_after_its_call_timed_out(
        settings: NatsSettings) -> None:
    """A timed-out call's reply subject is not used again: its late reply cannot answer
    a later call, and the later call is answered."""
    node = probe(settings)
    nc = await client(settings)
    caller = Caller(nc)
    seen: list[str] = []

    async def watch(msg: Msg) -> None:
        seen.append(msg.reply)

    await nc.subscribe(subjects.command("probe", "work"), cb=watch)
    async with running(node):
        with pytest.raises(Timeout):
            await caller.call(Work(label="slow", seconds=0.6), timeout=0.2)
        late = caller.call(Work(label="after", seconds=0.8), timeout=3)
        assert await late == Done(label="after")  # the slow reply came meanwhile
        assert "slow" in node.finished_work
    assert len(seen) == 2 and seen[0] != seen[1]
    assert pending_count(nc) == 0
    await nc.close()


async def test_nothing_serving_is_unavailable_at_once(settings: NatsSettings) -> None:
    nc = await client(settings)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="no probe node is running"):
        await Caller(nc).call(Work(label="x"), timeout=5)
    assert time.monotonic() - t0 < 1.0
    await nc.close()


async def test_graceful_shutdown_finishes_in_flight_requests(settings: NatsSettings) -> None:
    node = probe(settings)
    nc = await client(settings)
    caller = Caller(nc)
    result: list[Done] = []
    async with anyio.create_task_group() as tg:
        await tg.start(node.serve)

        async def slow() -> None:
            result.append(await caller.call(Work(label="inflight", seconds=1.0), timeout=10))

        tg.start_soon(slow)
        await wait_for(lambda: "inflight" in node.started_work, message="request started")
        node.stop()
        # serve() returns only after the in-flight request was answered.
    assert result == [Done(label="inflight")]
    assert node.nc.is_closed
    await nc.close()


async def test_first_connect_is_bounded() -> None:
    settings = NatsSettings(servers=("nats://127.0.0.1:1",), connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CannotReachNats, match=r"cannot reach NATS at nats://127\.0\.0\.1:1"):
        await connect(settings, name="t")
    assert time.monotonic() - t0 < 3.0


async def test_node_reconnects_after_a_server_restart(tmp_path: object, settings: NatsSettings,
                                                      nats_server: object) -> None:
    from nodes.runtime.embedded import EmbeddedNats
    assert isinstance(nats_server, EmbeddedNats)
    node = probe(settings)
    async with running(node):
        port = nats_server.port
        nats_server.stop()
        restarted = EmbeddedNats(nats_server.store_dir, port=port, monitor_port=None)
        await restarted.astart()
        try:
            nc = await client(settings)
            got = await wait_for(lambda: _try(nc), timeout=10, message="node serving again")
            assert got == Done(label="back")
            await nc.close()
        finally:
            node.stop()
            await anyio.lowlevel.checkpoint()
    restarted.stop()


async def _try(nc: NATS) -> Done | None:
    try:
        return await Caller(nc).call(Work(label="back"), timeout=0.5)
    except (Unavailable, Exception):
        return None


@pytest.mark.parametrize(("env", "expected"), [(None, "400"), ("150", "150")])
def test_the_embedded_server_gets_a_gc_default_the_environment_can_override(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    """``GOGC`` defaults to ``DEFAULT_GOGC`` for the server process; a ``GOGC`` already in
    the environment wins.  Read back from the running process itself."""
    from nodes.runtime.embedded import DEFAULT_GOGC, EmbeddedNats
    assert str(DEFAULT_GOGC) == "400"
    if env is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", env)
    with EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None) as server:
        assert server.proc is not None
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"GOGC={expected}".encode() in environ
