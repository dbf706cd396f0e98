"""The Deployer's node registry: heartbeats in, online/lost transitions out, persisted."""

from __future__ import annotations

import os
import time

import anyio
import anyio.lowlevel
import msgspec
from nats.aio.client import Client as NATS

from nodes.deployer import DeployerNode
from nodes.deployer.registry import Registry
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.events import NodeForgotten, NodeLost, NodeOnline
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import ListNodes, NodeInfo, registry_key
from protocol.state import AutomationState
from tests.helpers import running, wait_for
from tests.probe import ProbeNode


def deployer(settings: NatsSettings) -> DeployerNode:
    return DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2)


async def node_info(nc: NATS, name: str) -> NodeInfo | None:
    reply = await Caller(nc).call(ListNodes(), timeout=2)
    return next((n for n in reply.nodes if n.name == name), None)


async def status_of(nc: NATS, name: str) -> str | None:
    info = await node_info(nc, name)
    return info.status if info else None


async def beat(nc: NATS, name: str, *, pid: int = 4242, interval: float = 0.1,
               seq: int = 1) -> None:
    hb = Heartbeat(node=name, role="automation", infra="prod", version="9.9", host="h1", pid=pid,
                   uptime_s=1.0, interval_s=interval, seq=seq, state=AutomationState())
    await nc.publish(subjects.heartbeat("automation", name), HEARTBEAT.encode(hb))


async def events_for(nc: NATS, name: str) -> list[object]:
    return [e.event async for e in read_events(nc)
            if e.event is not None and getattr(e.event, "node", None) == name]


async def test_heartbeat_puts_a_node_in_the_registry(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    p1 = ProbeNode(name="p1", nats=settings, infra="lab", heartbeat_interval=0.2)
    async with running(deployer(settings), p1):
        info = await wait_for(lambda: node_info(nc, "p1"), message="p1 registered")
    assert (info.role, info.infra, info.status, info.pid) == ("probe", "lab", "online", os.getpid())
    assert info.version and info.host and info.last_seen_s < 1.0
    await nc.close()


async def test_silent_node_is_lost_after_three_intervals_and_online_when_beats_resume(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    async with running(deployer(settings)):
        await beat(nc, "ghost", seq=1)
        await wait_for(lambda: status_of(nc, "ghost"), message="ghost registered")
        silent_from = time.monotonic()
        await wait_for(lambda: _is(nc, "ghost", "lost"), timeout=5, message="ghost lost")
        lost_after = time.monotonic() - silent_from
        await beat(nc, "ghost", seq=2)
        await wait_for(lambda: _is(nc, "ghost", "online"), timeout=5, message="ghost online")
        events = await wait_for(lambda: _n_events(nc, "ghost", 3), message="3 events stored")
    # 3 intervals of 0.1 s, judged by a sweeper that runs every 0.05 s.
    assert 0.3 <= lost_after < 1.5
    kinds = [(type(e).__name__, getattr(e, "reason", "")) for e in events]
    assert kinds == [("NodeOnline", "first_seen"), ("NodeLost", ""), ("NodeOnline", "resumed")]
    lost = events[1]
    assert isinstance(lost, NodeLost) and lost.silent_s >= 0.3
    await nc.close()


async def _is(nc: NATS, name: str, status: str) -> bool:
    return await status_of(nc, name) == status


async def _n_events(nc: NATS, name: str, n: int) -> list[object] | None:
    events = await events_for(nc, name)
    return events if len(events) >= n else None


async def test_graceful_stop_marks_a_node_lost_at_once(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    slow_interval = ProbeNode(name="p2", nats=settings, heartbeat_interval=30.0)
    async with running(deployer(settings)):
        async with running(slow_interval):
            await wait_for(lambda: _is(nc, "p2", "online"), message="p2 online")
        # Its interval is 30 s, so only the exit report can explain a fast "lost".
        await wait_for(lambda: _is(nc, "p2", "lost"), timeout=3, message="p2 lost")
        events = await wait_for(lambda: _n_events(nc, "p2", 2), message="events")
    assert isinstance(events[1], NodeLost) and events[1].reason == "stopped"
    await nc.close()


async def test_a_restarted_process_is_reported_as_restarted(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    async with running(deployer(settings)):
        await beat(nc, "r1", pid=100, interval=5.0)
        await wait_for(lambda: _is(nc, "r1", "online"), message="r1 online")
        await beat(nc, "r1", pid=101, interval=5.0)
        events = await wait_for(lambda: _n_events(nc, "r1", 2), message="events")
    assert isinstance(events[1], NodeOnline) and events[1].reason == "restarted"
    await nc.close()


async def test_registry_survives_a_deployer_restart(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    async with running(deployer(settings)):
        await beat(nc, "keep-1", interval=5.0)
        await beat(nc, "keep-2", interval=5.0)
        await wait_for(lambda: _is(nc, "keep-2", "online"), message="registered")
    # A new Deployer process, and no heartbeat from keep-1/keep-2 since.
    async with running(deployer(settings)):
        reply = await Caller(nc).call(ListNodes(role="automation"), timeout=2)
        by_name = {n.name: n for n in reply.nodes}
        assert {"keep-1", "keep-2"} <= set(by_name)
        assert by_name["keep-1"].status == "online"  # still within its grace period
        assert by_name["keep-1"].version == "9.9" and by_name["keep-1"].infra == "prod"
        # The restart is not a transition: no duplicate "online" event.
        await beat(nc, "keep-1", interval=5.0, seq=2)
        await anyio.lowlevel.checkpoint()
    events = await events_for(nc, "keep-1")
    assert [type(e).__name__ for e in events] == ["NodeOnline"]
    await nc.close()


async def test_a_graceful_stop_waits_for_a_registry_write_in_flight(
        settings: NatsSettings) -> None:
    """A record the registry writer is storing when the Deployer is told to stop is
    stored before the connection drains: the next Deployer lists the node."""
    nc = await connect(settings, name="t")
    node = deployer(settings)
    entered, release = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(node.serve)
        real_put = node.kv.put

        async def held_put(key: str, value: bytes, **kw: object) -> int:
            if key == registry_key("late-1"):
                entered.set()
                await release.wait()
            return await real_put(key, value, **kw)  # type: ignore[arg-type]

        node.kv.put = held_put  # type: ignore[method-assign]
        await beat(nc, "late-1", interval=5.0)
        with anyio.fail_after(10):
            await entered.wait()
        node.stop()
        # Let the write go once the last write pass of the stop waits behind it.
        await wait_for(lambda: node._write_lock.statistics().tasks_waiting > 0,
                       message="the stop's write pass waits for the writer's")
        release.set()
    async with running(deployer(settings)):
        assert await status_of(nc, "late-1") == "online"
    await nc.close()


async def test_malformed_heartbeat_is_ignored_and_counted(settings: NatsSettings) -> None:
    nc = await connect(settings, name="t")
    d = deployer(settings)
    async with running(d):
        await nc.publish(subjects.heartbeat("api", "junk"), b"{not json")
        await nc.publish(subjects.heartbeat("api", "junk"), b'{"type":"heartbeat","node":1}')
        await beat(nc, "fine")
        await wait_for(lambda: _is(nc, "fine", "online"), message="good beat still processed")
        await wait_for(lambda: d.heartbeats_bad == 2, message="bad beats counted")
        assert await status_of(nc, "junk") is None
    await nc.close()


# -- the pure state machine, with injected clocks --------------------------------------

class Clocks:
    """A monotonic clock and a wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall_time = 1_700_000_000.0

    def registry(self, **kw: object) -> Registry:
        return Registry(clock=lambda: self.mono, wall=lambda: self.wall_time,
                        **kw)  # type: ignore[arg-type]

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_time += seconds


def hb(name: str = "n1", seq: int = 1, **kw: object) -> Heartbeat:
    fields: dict[str, object] = dict(node=name, role="automation", infra="prod",
                                     version="1", host="h1", pid=7, uptime_s=1.0,
                                     interval_s=1.0, seq=seq, instance="i1")
    fields.update(kw)
    return Heartbeat(**fields)  # type: ignore[arg-type]


def test_liveness_follows_the_monotonic_clock_not_the_wall_clock() -> None:
    clocks = Clocks()
    reg = clocks.registry()
    reg.on_heartbeat(hb())
    clocks.wall_time += 3600.0  # the wall clock steps an hour ahead (NTP, a resumed VM)
    assert reg.sweep() == []
    assert reg.get("n1").status == "online"  # type: ignore[union-attr]
    clocks.wall_time -= 7200.0  # and back, past where it was
    clocks.mono += 2.9
    assert reg.sweep() == []
    clocks.mono += 0.2  # 3.1 intervals of real silence
    events = reg.sweep()
    assert [type(e) for e in events] == [NodeLost]
    assert events[0].silent_s == 3.1  # type: ignore[union-attr]


def test_a_nodes_cpu_share_and_memory_come_from_its_last_two_beats() -> None:
    reg = Clocks().registry()
    reg.on_heartbeat(hb(uptime_s=10.0, cpu_s=2.0, rss_bytes=50 << 20))
    first = reg.get("n1")
    assert first is not None and first.cpu_pct is None and first.rss_bytes == 50 << 20
    reg.on_heartbeat(hb(seq=2, uptime_s=12.0, cpu_s=2.5, rss_bytes=60 << 20))
    second = reg.get("n1")
    assert second is not None and (second.cpu_pct, second.rss_bytes) == (25.0, 60 << 20)
    reg.on_heartbeat(hb(seq=3, uptime_s=14.0))  # an older node: no CPU time to compare
    third = reg.get("n1")
    assert third is not None and third.cpu_pct is None
    reg.on_heartbeat(hb(seq=1, pid=8, uptime_s=0.5, cpu_s=0.4))  # a new process
    restarted = reg.get("n1")
    assert restarted is not None and restarted.cpu_pct is None


def test_an_exit_report_is_not_sticky_while_the_process_keeps_beating() -> None:
    clocks = Clocks()
    reg = clocks.registry()
    reg.on_heartbeat(hb(seq=5))
    assert isinstance(reg.on_exit("n1", 7, "stopped", "i1"), NodeLost)
    # A beat already in flight when the process said goodbye is ignored...
    assert reg.on_heartbeat(hb(seq=6)) is None
    assert reg.get("n1").status == "lost"  # type: ignore[union-attr]
    # ...but a process that keeps beating is alive, whatever the report said.
    back = reg.on_heartbeat(hb(seq=7))
    assert isinstance(back, NodeOnline) and back.reason == "resumed"
    assert reg.get("n1").status == "online"  # type: ignore[union-attr]


def test_lost_nodes_are_forgotten_after_the_period_and_names_handed_to_the_writer() -> None:
    clocks = Clocks()
    reg = clocks.registry(forget_after=60.0)
    reg.on_heartbeat(hb())
    clocks.advance(4.0)
    assert [type(e) for e in reg.sweep()] == [NodeLost]
    clocks.advance(59.0)
    assert reg.sweep() == []
    clocks.advance(1.0)
    events = reg.sweep()
    assert [type(e) for e in events] == [NodeForgotten]
    assert reg.get("n1") is None and reg.take_removed() == ["n1"]


def test_a_forgotten_node_that_beats_again_is_not_deleted_from_kv() -> None:
    clocks = Clocks()
    reg = clocks.registry()
    reg.on_heartbeat(hb())
    reg.forget("n1", reason="on request")
    reg.on_heartbeat(hb(seq=2))
    assert reg.take_removed() == []
    assert [i.name for i in reg.take_dirty()] == ["n1"]


def test_records_loaded_from_kv_get_a_grace_period_and_a_bounded_interval() -> None:
    clocks = Clocks()
    reg = clocks.registry(forget_after=100.0)
    phantom = NodeInfo(name="ph", role="automation", infra="prod", status="online",
                       last_seen=clocks.wall_time - 5, first_seen=0.0, version="1",
                       host="h", pid=1, uptime_s=0.0, interval_s=1e9)
    old_lost = msgspec.structs.replace(phantom, name="old", status="lost",
                                       last_seen=clocks.wall_time - 1000, interval_s=1.0)
    reg.load([phantom, old_lost])
    assert reg.get("ph").interval_s == 300.0  # type: ignore[union-attr]
    events = reg.sweep()
    assert [(type(e), e.node) for e in events] == [(NodeForgotten, "old")]
    clocks.advance(901.0)
    assert [(type(e), e.node) for e in reg.sweep()] == [(NodeLost, "ph")]


def test_grace_judges_online_nodes_afresh_and_leaves_lost_ones_lost() -> None:
    clocks = Clocks()
    reg = clocks.registry()
    reg.on_heartbeat(hb("up"))
    reg.on_heartbeat(hb("down", pid=8))
    clocks.advance(5.0)
    assert {e.node for e in reg.sweep()} == {"up", "down"}  # both silent for 5 s
    reg.on_heartbeat(hb("up", seq=2))
    clocks.advance(10.0)  # the Deployer was stopped: "up" beat meanwhile, unread
    reg.grace()
    assert reg.sweep() == []
    assert reg.get("down").status == "lost"  # type: ignore[union-attr]
    clocks.advance(3.1)  # still silent three intervals after the grace: lost
    assert [e.node for e in reg.sweep()] == ["up"]


async def test_a_deployer_that_was_stopped_does_not_call_its_beating_nodes_lost(
        settings: NatsSettings) -> None:
    """The whole process stalls for 2.5 s (a paused VM), while a node's beats are due
    every 0.1 s: when it runs again, it does not judge the node on beats it has not
    read yet."""
    nc = await connect(settings, name="t")
    async with running(deployer(settings)), anyio.create_task_group() as tg:
        seq = 0

        async def keep_beating() -> None:
            nonlocal seq
            while True:
                seq += 1
                await beat(nc, "steady", seq=seq)
                await anyio.sleep(0.1)

        tg.start_soon(keep_beating)
        await wait_for(lambda: _is(nc, "steady", "online"), message="steady registered")
        time.sleep(2.5)  # noqa: ASYNC251 -- the fault: this whole process stops
        after = seq
        await wait_for(lambda: seq >= after + 10, message="ten more beats")
        assert await _is(nc, "steady", "online")
        tg.cancel_scope.cancel()
    kinds = [type(e).__name__ for e in await events_for(nc, "steady")]
    assert kinds == ["NodeOnline"], kinds
    await nc.close()
