"""Failover with real processes, each bounded in time: SIGKILL of the active Deployer
mid-deploy with a standby running, SIGKILL of one of three NATS servers under API load,
and a restart of the single NATS server of a plain stack with API traffic
(``tests/test_cli_up_resilience.py`` has that one under ``shipyard up``).  The figures
(p50 over several runs) are in ``bench/cluster.py``."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import pytest

from nodes.runtime.embedded import EmbeddedCluster, EmbeddedNats
from nodes.runtime.events import read_events
from nodes.runtime.lease import lease_stream
from protocol import subjects
from protocol.api import ApiDeploymentFinished, ApiDeploymentRequested
from protocol.deploy import FAILED, IN_SYNC, DeploymentView
from protocol.errors import OperationError
from protocol.events import Event
from protocol.leases import LeaderChanged
from tests.apiproject import make_api_project
from tests.failstack import Deployer, FailStack, Load, fail_stack, load_loop, url
from tests.helpers import wait_for

TAKEOVER_S = 5.0  # what the control plane promises after a SIGKILL


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[EmbeddedNats]]:
    cluster = EmbeddedCluster(tmp_path / "nats", log_dir=tmp_path / "logs")
    with cluster:
        yield cluster.servers


async def _view(s: FailStack) -> DeploymentView | None:
    """The API deployment's view, or None while no Deployer answers."""
    try:
        return await s.stack.view()
    except OperationError:
        return None


async def _event_ids(s: FailStack) -> list[str]:
    return [e.event.id async for e in read_events(s.stack.nc, subject=subjects.EVENTS_ALL)
            if e.event is not None]


async def _event_ids_once_readable(s: FailStack) -> list[str]:
    """Every stored event's id, once the event stream answers (its leader may be in
    election after a server's death)."""
    async def read() -> list[str] | None:
        try:
            return await _event_ids(s)
        except (nats.errors.Error, TimeoutError):
            return None
    ids: list[str] = await wait_for(read, timeout=30, interval=0.2,
                                    message="the event stream answering")
    return ids


async def test_sigkill_of_the_active_deployer_mid_deploy_hands_over_and_the_deploy_ends(
        servers: list[EmbeddedNats], tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with fail_stack(servers, tmp_path) as s:
        await s.stack.api_node("api-1")
        await s.stack.package("v1")
        await s.stack.package("v2")
        first = await s.stack.deploy({"v1": 100})
        assert first.desired == "v1" and await s.holder() == "deployer-1"

        asked = await s.stack.deploy({"v2": 100}, wait=False)
        killed = time.monotonic()
        s.deployer("deployer-1").kill()  # no goodbye, no lease release

        await wait_for(lambda: _is(s.holder(), "deployer-2"), timeout=TAKEOVER_S,
                       interval=0.05, message="the standby holding the lease")
        took_over = time.monotonic() - killed
        assert took_over < TAKEOVER_S

        async def ended() -> DeploymentView | None:
            v = await _view(s)
            return v if v is not None and v.update_id == asked.update_id \
                and v.state in (IN_SYNC, FAILED) else None
        final = await wait_for(ended, timeout=30, interval=0.1,
                               message="the deploy completed or reported failed")
        assert (final.state, final.desired) == (IN_SYNC, "v2"), final.reasons

        # Nothing doubled, nothing lost: one request and one finish per update.
        events = [e.event async for e in read_events(s.stack.nc, subject=subjects.EVENTS_ALL)]
        requested = [e for e in events if isinstance(e, ApiDeploymentRequested)]
        assert [e.update_id for e in requested] == [first.update_id, asked.update_id]

        def finished() -> list[str]:
            return [e.update_id for e in events if isinstance(e, ApiDeploymentFinished)]
        assert finished().count(asked.update_id) <= 1 and first.update_id in finished()
        leaders = [(e.node, e.previous) for e in events if isinstance(e, LeaderChanged)]
        assert leaders == [("deployer-1", ""), ("deployer-2", "deployer-1")]


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


def _stream_messages(server: EmbeddedNats, stream: str) -> int | None:
    """How many messages ``server``'s own replica of ``stream`` holds (monitoring)."""
    try:
        with urllib.request.urlopen(f"{server.monitor_url}/jsz?streams=1",
                                    timeout=2) as r:
            data = json.loads(r.read())
    except OSError:
        return None
    for account in data.get("account_details") or []:
        for st in account.get("stream_detail") or []:
            if st.get("name") == stream:
                return int(st["state"]["messages"])
    return None


async def test_sigkill_of_one_of_three_nats_servers_under_api_load_loses_nothing(
        servers: list[EmbeddedNats], tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with fail_stack(servers, tmp_path) as s:
        node = await s.stack.api_node("api-1")
        await s.stack.package("v1")
        await s.stack.package("v2")
        before = await s.stack.deploy({"v1": 100})
        load = Load()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load_loop, s.stack.http, url(node), load)
            await wait_for(lambda: load.first_ok_after(0), timeout=10,
                           message="API traffic before the fault")
            events = await _event_ids(s)
            victim = s.server_of(node)  # the API node's own server: it must reconnect
            killed = time.monotonic()
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait()
            resumed = await wait_for(lambda: load.first_ok_after(killed + 0.2), timeout=10,
                                     interval=0.05, message="API requests after the kill")
            assert resumed - killed < TAKEOVER_S
            victim.respawn()
            await anyio.to_thread.run_sync(victim.wait_ready, 20.0)
            tg.cancel_scope.cancel()
        assert load.first_ok_after(resumed)  # traffic kept flowing

        # Nothing lost: desired state, its history, every event stored before the fault.
        now = await wait_for(lambda: _view(s), timeout=30, interval=0.2,
                             message="a Deployer answering after the fault")
        assert (now.desired, now.update_id) == (before.desired, before.update_id)
        # The update as it was recorded (its result may have been closed since: the view
        # turns in_sync from the nodes' reports, before the Deployer writes "succeeded").
        assert now.last_update is not None and before.last_update is not None
        recorded = ("id", "at", "by", "action", "from_bundle", "to_bundle")
        assert [getattr(now.last_update, f) for f in recorded] == [
            getattr(before.last_update, f) for f in recorded]
        assert now.last_update.result in ("pending", "succeeded")
        after = await _event_ids_once_readable(s)
        assert set(events) <= set(after)

        # The control plane takes a deploy again (a standby may have taken over).
        async def deployed() -> DeploymentView | None:
            try:
                return await s.stack.deploy({"v2": 100}, wait=False)
            except OperationError:
                return None
        asked = await wait_for(deployed, timeout=30, interval=0.2, message="a new deploy")

        async def in_sync() -> DeploymentView | None:
            v = await _view(s)
            return v if v and v.update_id == asked.update_id and v.state == IN_SYNC else None
        await wait_for(in_sync, timeout=30, interval=0.1, message="v2 in sync")

        # The restarted server rejoined and caught up: its own replicas hold everything.
        async def caught_up() -> bool:
            total = len(await _event_ids_once_readable(s))
            mine = await anyio.to_thread.run_sync(_stream_messages, victim,
                                                  subjects.EVENTS_STREAM)
            deploys = await anyio.to_thread.run_sync(_stream_messages, victim,
                                                     f"KV_{subjects.DEPLOY_BUCKET}")
            return mine == total and bool(deploys)
        await wait_for(caught_up, timeout=20, interval=0.2,
                       message="the restarted server's copies of events and desired state")


async def test_restart_of_the_single_nats_server_resumes_everything_without_restarting_a_node(
        tmp_path: Path) -> None:
    """kill -9 and restart (same port and store) of a plain stack's one server: the same
    Deployer process keeps its lease, the API node reconnects, resubscribes and serves,
    heartbeats and deployments resume."""
    make_api_project(tmp_path / "ws", version="1")
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None,
                          log_file=tmp_path / "nats.log")
    await server.astart()
    try:
        async with fail_stack([server], tmp_path, deployers=1) as s:
            node = await s.stack.api_node("api-1")
            await s.stack.package("v1")
            await s.stack.package("v2")
            await s.stack.deploy({"v1": 100})
            deployer = s.deployer("deployer-1")
            load = Load()
            async with anyio.create_task_group() as tg:
                tg.start_soon(load_loop, s.stack.http, url(node), load)
                await wait_for(lambda: load.first_ok_after(0), timeout=10,
                               message="API traffic before the restart")
                assert server.proc is not None
                server.proc.kill()
                server.proc.wait()
                killed = time.monotonic()
                server.respawn()
                await anyio.to_thread.run_sync(server.wait_ready, 20.0)
                await wait_for(lambda: load.first_ok_after(killed + 0.2), timeout=10,
                               interval=0.05, message="API requests after the restart")
                tg.cancel_scope.cancel()
            up = node.uptime
            await wait_for(lambda: _online_after(s, "api-1", up), timeout=10,
                           message="the API node's heartbeats reaching the Deployer")
            asked = await wait_for(lambda: _deploy_v2(s), timeout=20, interval=0.2,
                                   message="a deploy accepted after the restart")
            await wait_for(lambda: _in_sync(s, asked.update_id), timeout=30, interval=0.1,
                           message="v2 in sync")
            # Nobody restarted: the same Deployer process, still the lease holder.
            assert deployer.proc.poll() is None and await s.holder() == "deployer-1"
            assert node in s.stack.fleet.nodes and not node.stopping_requested
    finally:
        await server.astop()


async def _online_after(s: FailStack, name: str, uptime: float) -> bool:
    """``name`` online in the registry with a heartbeat sent after it was ``uptime`` old
    (the same process: its uptime kept counting)."""
    from protocol.registry import ListNodes
    try:
        reply = await s.stack.caller.call(ListNodes(), timeout=2)
    except OperationError:
        return False
    return any(n.name == name and n.status == "online" and n.uptime_s > uptime
               for n in reply.nodes)


async def _deploy_v2(s: FailStack) -> DeploymentView | None:
    try:
        return await s.stack.deploy({"v2": 100}, wait=False)
    except OperationError:
        return None


async def _in_sync(s: FailStack, update_id: str) -> DeploymentView | None:
    v = await _view(s)
    return v if v and v.update_id == update_id and v.state == IN_SYNC else None


async def _lease_leader(s: FailStack, timeout: float = 10) -> EmbeddedNats:
    """The live server that leads the lease bucket's stream (waiting for an election)."""
    js = s.stack.nc.jetstream(timeout=2.0)
    alive = {x.server_name: x for x in s.servers if x.proc is not None
             and x.proc.poll() is None}

    async def leader() -> str | None:
        try:
            info = await js.stream_info(lease_stream())
        except (nats.errors.Error, TimeoutError):
            return None
        name = info.cluster.leader if info.cluster is not None else None
        return name if name in alive else None
    name = await wait_for(leader, timeout=timeout, interval=0.1,
                          message="a live leader of the lease stream")
    return alive[name]


async def _leaders_changed(s: FailStack) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]] | None:
        try:
            return [(e.event.node, e.event.previous) async for e in read_events(
                s.stack.nc, subject=subjects.event("leader", "deployer"))
                if isinstance(e.event, LeaderChanged)]
        except (nats.errors.Error, TimeoutError):
            return None
    found: list[tuple[str, str]] = await wait_for(read, timeout=20, interval=0.2,
                                                  message="the leader events")
    return found


def _lines(d: Deployer, text: str) -> int:
    return sum(1 for line in d.log.read_text(errors="replace").splitlines() if text in line)


async def test_sigkill_of_the_nats_server_leading_the_lease_keeps_the_active_deployer(
        servers: list[EmbeddedNats], tmp_path: Path) -> None:
    """The lease stream has no leader for seconds, longer than the holder may act without
    renewing: it stops acting, and takes its own key back in the same process once the
    new leader answers, before the standby has watched the key for a TTL.  Then the
    active Deployer's SIGKILL still hands over to the standby within 5 s."""
    make_api_project(tmp_path / "ws", version="1")
    async with fail_stack(servers, tmp_path) as s:
        await s.stack.package("v1")
        await s.stack.package("v2")
        first = await s.stack.deploy({"v1": 100}, wait=False)
        d1, d2 = s.deployer("deployer-1"), s.deployer("deployer-2")
        await wait_for(lambda: _lines(d2, "standby: another instance holds the lease") > 0,
                       timeout=20, message="deployer-2 waiting as a standby")
        victim = await _lease_leader(s)
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait()
        await _lease_leader(s, timeout=30)  # the election is over
        asked = await wait_for(lambda: _deploy_v2(s), timeout=30, interval=0.2,
                               message="a deploy accepted after the lease leader's death")
        # If the election outlasted the holder's grace it stopped acting; it is back.
        await wait_for(lambda: _lines(d1, "lease lost: stepping down") == _lines(
            d1, "lease taken back: active again"), timeout=10,
            message="deployer-1 active again")

        # The same process still holds the role, and nobody else acted meanwhile: one
        # leader event, one request event per deploy.
        assert d1.proc.poll() is None and d2.proc.poll() is None
        assert await wait_for(s.holder, timeout=10) == "deployer-1"
        assert await _leaders_changed(s) == [("deployer-1", "")]
        assert _lines(d2, "lease acquired") == 0
        assert _lines(d1, "lease taken back: active again") <= 1
        assert _requested_once(await _events(s)) >= {first.update_id, asked.update_id}

        # Then the active Deployer's own SIGKILL (two servers of three left): the standby
        # takes over within 5 s.
        killed = time.monotonic()
        d1.kill()
        await wait_for(lambda: _is(s.holder(), "deployer-2"), timeout=TAKEOVER_S,
                       interval=0.05, message="the standby holding the lease")
        assert time.monotonic() - killed < TAKEOVER_S
        again = await wait_for(lambda: _deploy(s, {"v1": 100}), timeout=20, interval=0.2,
                               message="a deploy accepted by the new active Deployer")
        assert await _leaders_changed(s) == [("deployer-1", ""), ("deployer-2", "deployer-1")]
        assert _requested_once(await _events(s)) >= {first.update_id, again.update_id}


async def _events(s: FailStack) -> list[Event]:
    async def read() -> list[Event] | None:
        try:
            return [e.event async for e in read_events(s.stack.nc, subject=subjects.EVENTS_ALL)
                    if e.event is not None]
        except (nats.errors.Error, TimeoutError):
            return None
    found: list[Event] = await wait_for(read, timeout=20, interval=0.2,
                                        message="the event stream answering")
    return found


def _requested_once(events: list[Event]) -> set[str]:
    """The updates requested, each stored once (a deploy the test sent again after a
    timeout is a second request, with its own update), and no event stored twice."""
    assert len({e.id for e in events}) == len(events)
    ids = [e.update_id for e in events if isinstance(e, ApiDeploymentRequested)]
    assert len(ids) == len(set(ids)), ids
    return set(ids)


async def _deploy(s: FailStack, generations: dict[str, int]) -> DeploymentView | None:
    try:
        return await s.stack.deploy(generations, wait=False)
    except OperationError:
        return None
