"""The Deployer's node registry: heartbeats in, online/lost transitions out, persisted."""

from __future__ import annotations

import os
import time

import anyio
import anyio.lowlevel
from nats.aio.client import Client as NATS

from nodes.deployer import DeployerNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.events import NodeLost, NodeOnline
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import ListNodes, NodeInfo
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
                   uptime_s=1.0, interval_s=interval, seq=seq, state={"bundles": {}})
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
