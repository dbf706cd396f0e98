"""One active instance per control-plane role, chosen by a JetStream KV lease, and
``shipyard up --cluster 3``: three nats-servers, every stream at R3, two Deployers.
Real nats-server processes throughout."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.js.api import KeyValueConfig

from nodes.deployer import DeployerNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import CannotReachNats, connect
from nodes.runtime.embedded import EmbeddedCluster, EmbeddedNats, free_port
from nodes.runtime.events import read_events
from nodes.runtime.lease import (
    LEASE_TTL_S,
    TAKEN,
    Lease,
    LeaseLost,
    bucket_ttl,
    leases_js,
    open_leases,
)
from nodes.runtime.settings import NatsSettings, split_servers
from protocol import subjects
from protocol.errors import OperationError, Unavailable
from protocol.leases import ACTIVE, STANDBY, LeaderChanged, lease_key
from protocol.registry import ListNodes
from protocol.state import DeployerState
from tests.helpers import (
    Background,
    fleet,
    pid_alive,
    shipyard,
    shipyard_argv,
    wait_for,
    wait_until,
)


def _lease(kv: Any, nc: Any, node: str, instance: str, role: str = "deployer",
           **timing: Any) -> Lease:
    return Lease(kv, js=leases_js(nc), role=role, node=node, instance=instance,
                 **{"ttl": 1.0, "renew_every": 0.3, "slack": 0.2, "poll": 0.05, **timing})


async def test_one_instance_holds_the_lease_and_a_standby_takes_it_only_once_unrenewed_for_a_ttl(
        nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        kv = await open_leases(nc)
        assert not (await kv.status()).ttl  # the server never expires the key by itself
        a, b = _lease(kv, nc, "a", "ia"), _lease(kv, nc, "b", "ib")
        assert await a.try_acquire() and a.held
        assert not await b.try_acquire()
        assert b.previous == "a"  # who holds it, for the leader event

        # While A renews, B never takes it, however long it watches (3 TTLs here).
        lost: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.hold, lost.append)
            with anyio.move_on_after(3.0):
                while True:
                    assert not await b.try_acquire()
                    await anyio.sleep(b.poll)
            tg.cancel_scope.cancel()  # A stops renewing: a SIGKILL, as B can tell
        assert not lost and a.revision is not None

        # B takes the key once it has seen it unchanged for a TTL, and never while A
        # could still act by its own clock.
        stopped = anyio.current_time()
        with anyio.fail_after(5):
            while not await b.try_acquire():
                assert a.held or not b.held
                await anyio.sleep(b.poll)
        assert anyio.current_time() - stopped >= b.ttl - b.renew_every
        assert not a.held and b.held
        # A's next renewal is judged by the compare-and-set: B holds the key, so A is out.
        assert await a.renew() == TAKEN
        assert a.revision is None and not a.held

        # The same instance in a new term (a holder that stepped down and starts over in
        # its process) takes its own key back at once: nobody else wrote it since.
        b2 = _lease(kv, nc, "b", "ib")
        assert await b2.try_acquire() and b2.reclaimed and b2.held
        assert await b.renew() == TAKEN  # the old term's token is spent

        # Renewals are fenced by the revision: once another write moved it on, hold()
        # steps down through on_lost.
        c = _lease(kv, nc, "c", "ic", role="govern")
        assert await c.try_acquire()
        await kv.delete("govern")  # someone else's write: the revision moves on
        with anyio.fail_after(3):
            await c.hold(lost.append)
        assert lost == [TAKEN]

        # A holder whose event loop stalled past its own deadline, while nobody else took
        # its key, keeps the lease on its next renewal.
        now = [100.0]
        d = _lease(kv, nc, "d", "id", role="design", clock=lambda: now[0])
        assert await d.try_acquire()
        now[0] += 60.0  # frozen for a minute by its own clock; nobody wrote the key
        assert not d.held
        assert await d.renew() is None and d.held

        # A graceful release hands over within one poll, not one TTL.
        await b2.release()
        assert await a.try_acquire()
    finally:
        await nc.close()


async def test_a_standby_counts_its_ttl_again_after_no_answer_so_the_holder_returns_first(
        nats_server: EmbeddedNats) -> None:
    """What keeps the role with its holder through a JetStream election: while the
    stream answers nothing neither can write; afterwards the standby needs a whole TTL of
    answers, and the holder (a new term of the same instance) takes its key back at once."""
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.1)
    try:
        kv = await open_leases(nc)
        # An outage of 0.3 s counts here (2 s in production, shorter than any election).
        a, b = _lease(kv, nc, "a", "ia"), _lease(kv, nc, "b", "ib", outage=0.3)
        assert await a.try_acquire()
        watched = anyio.current_time()
        while anyio.current_time() - watched < 0.7 * b.ttl:  # most of a TTL, unrenewed
            assert not await b.try_acquire()
            await anyio.sleep(b.poll)
        assert nats_server.proc is not None
        nats_server.proc.kill()  # the stream's only server: no answer, as in an election
        nats_server.proc.wait()
        down = anyio.current_time()
        while anyio.current_time() - down < 0.5 * b.ttl:
            assert not await b.try_acquire()
            assert await b.read() is None
        nats_server.respawn()
        await anyio.to_thread.run_sync(nats_server.wait_ready, 20.0)
        # Unchanged for longer than a TTL by now, but not in one unbroken run of answers.
        assert await wait_for(b.read, timeout=10) is not None
        assert not await b.try_acquire()
        a2 = _lease(kv, nc, "a", "ia")  # the holder's next term, in the same process
        assert await a2.try_acquire() and a2.reclaimed and a2.held
        assert not await b.try_acquire() and b.previous == "a"
    finally:
        await nc.close()


async def test_an_older_lease_bucket_that_expires_keys_stops_expiring_them_when_opened(
        nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket=subjects.LEASES_BUCKET, history=1,
                                                 ttl=1.0))
        kv = await open_leases(nc)
        assert not (await kv.status()).ttl
        assert await bucket_ttl(kv) == LEASE_TTL_S
    finally:
        await nc.close()


def test_a_lease_whose_renewal_cannot_fit_in_its_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Lease(None, js=None, role="deployer", node="a",  # type: ignore[arg-type]
              instance="i", ttl=1.0, renew_every=0.8, slack=0.5)


async def _answered_by(caller: Caller) -> str | None:
    """Which Deployer answers (the one whose state says active), or None."""
    try:
        reply = await caller.call(ListNodes(role="deployer"), timeout=2)
    except Unavailable:
        return None
    active = [n.name for n in reply.nodes if n.status == "online"
              and isinstance(n.state, DeployerState) and n.state.lease == ACTIVE]
    return active[0] if len(active) == 1 else None


async def test_a_standby_deployer_serves_nothing_and_takes_over_when_the_active_stops(
        settings: NatsSettings) -> None:
    nc = await nats.connect(settings.url)
    caller = Caller(nc, sender="test")
    try:
        async with fleet() as f:
            d1 = await f.start(DeployerNode(name="d1", nats=settings,
                                            heartbeat_interval=0.2))
            d2 = DeployerNode(name="d2", nats=settings, heartbeat_interval=0.2)
            f.tg.start_soon(d2.serve)
            await wait_for(lambda: d2.heartbeat().state.lease == STANDBY  # type: ignore
                           and _standby_seen(d1), timeout=10,
                           message="d2 heartbeating as standby, seen by d1")
            assert d1.lease_state == ACTIVE and not d2.ready.is_set()
            # Every command goes to d1: d2 has no command subscription at all.
            for _ in range(5):
                assert await _answered_by(caller) == "d1"
            assert d2.requests_handled == 0 and d2.heartbeats_seen == 0

            await f.stop(d1)  # a graceful stop releases the lease at once
            with anyio.fail_after(5):
                await d2.ready.wait()
            assert await wait_for(lambda: _answered_by(caller), timeout=5,
                                  message="d2 answering as the active Deployer") == "d2"
            changes = [e.event async for e in read_events(nc, subject=subjects.event(
                "leader", "deployer")) if isinstance(e.event, LeaderChanged)]
            assert [(c.node, c.previous) for c in changes] == [("d1", ""), ("d2", "d1")]
            assert changes[1].term > changes[0].term
            d2.stop()
    finally:
        await nc.close()


def _standby_seen(active: DeployerNode) -> bool:
    info = active.registry.get("d2")
    return info is not None and isinstance(info.state, DeployerState) \
        and info.state.lease == STANDBY


def _healthy(monitor_url: str) -> bool:
    try:
        return bool(_json(f"{monitor_url}/healthz")["status"] == "ok")
    except OSError:  # 503 while JetStream catches up
        return False


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_cluster_servers_share_the_auth_config_and_routes_need_their_own(
        tmp_path: Path) -> None:
    auth = tmp_path / "auth.conf"
    auth.write_text('authorization { users = [ { user: "u", password: "p" } ] }\n')
    with EmbeddedCluster(tmp_path / "nats", config_file=auth, log_dir=tmp_path) as c:
        for s in c.servers:
            conf = s.main_config.read_text()
            assert 'include "../../auth.conf"' in conf
            assert "authorization { user: \"route\"" in conf
            assert f'listen: "127.0.0.1:{s.cluster.port}"' in conf  # type: ignore[union-attr]

        def routed() -> bool:
            return all(_json(f"{s.monitor_url}/routez")["num_routes"] >= 2 for s in c.servers)
        wait_until(routed, timeout=15, message="every server routed to the other two")


async def _leases(stack: dict[str, Any]) -> dict[str, str]:
    """Deployer and Govern instances by lease state, once one of each role is active and
    one standby (as the admin, through the active Deployer)."""
    settings = NatsSettings(servers=split_servers(stack["nats_url"]),
                            creds_file=stack["credentials"])
    nc = await connect(settings, name="test")
    caller = Caller(nc, sender="test")

    async def rows() -> dict[str, str] | None:
        try:
            reply = await caller.call(ListNodes(status="online"), timeout=2)
        except OperationError:
            return None
        found = {n.name: str(getattr(n.state, "lease", "")) for n in reply.nodes
                 if n.role in ("deployer", "govern")}
        return found if sorted(found.values()) == [ACTIVE, ACTIVE, STANDBY, STANDBY] \
            else None
    try:
        result: dict[str, str] = await wait_for(rows, timeout=30, interval=0.1,
                                                message="one active, one standby per role")
        return result
    finally:
        await nc.close()


async def _admitted(url: str, creds: str) -> bool:
    """Whether the server at ``url`` lets the identity of ``creds`` connect."""
    settings = NatsSettings(servers=(url,), creds_file=creds)
    try:
        nc = await connect(settings, name="test")
    except CannotReachNats:
        return False
    await nc.close()
    return True


def _stream_replicas(url: str, creds: str) -> dict[str, int]:
    async def main() -> dict[str, int]:
        nc = await connect(NatsSettings(servers=split_servers(url), creds_file=creds),
                           name="test")
        try:
            return {s.config.name: s.config.num_replicas or 1
                    for s in await nc.jetstream().streams_info()}
        finally:
            await nc.close()
    return anyio.run(main)


def test_up_cluster_3_runs_three_servers_r3_state_and_an_active_and_a_standby_deployer(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    up = Background(shipyard_argv("up", "--cluster", "3", "--nats-port", "-1",
                                  "--monitor-port", "-1", "--http-port", str(free_port()),
                                  "--heartbeat-interval", "0.5", "--api-nodes", "0",
                                  "--automation-nodes", "0"),
                    env=cli_env, cwd=tmp_path)
    stack_file = tmp_path / ".shipyard" / "stack.json"
    try:
        up.wait_line("ready:", timeout=90)
        stack = json.loads(stack_file.read_text())
        servers = stack["servers"]
        assert [s["name"] for s in servers] == ["shipyard-1", "shipyard-2", "shipyard-3"]
        assert stack["nats_url"] == ",".join(s["url"] for s in servers)
        assert stack["replicas"] == 3 and len({s["monitor_port"] for s in servers}) == 3
        for s in servers:  # healthy: JetStream current on each (it may still be syncing)
            wait_until(lambda s=s: _healthy(s["monitor_url"]), timeout=20,
                       message=f"{s['name']} /healthz ok")

        # One CLI call shows the lease column; the polling talks to NATS in-process.
        rows = anyio.run(_leases, stack)
        assert rows.keys() == {"deployer", "deployer-2", "govern", "govern-2"}
        text = shipyard("nodes", env=cli_env, cwd=tmp_path, check=True).stdout
        assert "LEASE" in text and " active " in text and " standby " in text

        replicas = _stream_replicas(stack["nats_url"], stack["credentials"])
        assert {"SY_EVENTS", "SY_AUDIT", "KV_sy_registry", "KV_sy_deploy", "KV_sy_leases",
                "KV_sy_identities"} <= replicas.keys()
        assert set(replicas.values()) == {3}, replicas

        # A new identity is known to every server: all three include the auth config
        # and `auth user add` reloads each of them.
        vera = json.loads(shipyard("auth", "user", "add", "vera", "--role", "viewer",
                                   "--json", env=cli_env, cwd=tmp_path,
                                   check=True).stdout)["credentials"]
        for s in servers:
            wait_until(lambda s=s: anyio.run(_admitted, s["url"], vera), timeout=15,
                       message=f"vera admitted by {s['name']}")

        # A killed server is restarted on its ports and store, and rejoins the cluster.
        victim = servers[1]
        os.kill(victim["pid"], signal.SIGKILL)
        up.wait_line("NATS        server shipyard-2 killed by SIGKILL", timeout=10)
        up.wait_line("NATS        shipyard-2 restarted", timeout=30)
        after = json.loads(stack_file.read_text())["servers"][1]
        assert after["url"] == victim["url"] and after["pid"] != victim["pid"]
        assert pid_alive(after["pid"]) and not pid_alive(victim["pid"])
        wait_until(lambda: _json(f"{after['monitor_url']}/routez")["num_routes"] >= 2,
                   timeout=20, message="the restarted server routed to the others again")
    finally:
        code = up.stop(signal.SIGINT, timeout=40)
    assert code == 0, up.output()
    assert "Traceback" not in up.output()


def test_cluster_ports_are_the_next_ones_up_and_a_taken_one_is_a_usage_error() -> None:
    import socket

    import click

    from nodes.cli.stack import _cluster_ports
    assert _cluster_ports(1, 4222, 8222, 8080) is None
    assert _cluster_ports(3, -1, -1, 8080) == ([-1, -1, -1], [-1, -1, -1])
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = int(held.getsockname()[1])
        base = port - 1
        with pytest.raises(click.BadParameter, match=f"--cluster 3 needs ports {base}-"
                                                     f"{base + 2}, and {port} is taken"):
            _cluster_ports(3, base, -1, 8080)
    http = free_port()
    with pytest.raises(click.BadParameter, match=f"{http} is taken"):
        _cluster_ports(3, -1, http - 1, http)  # the second monitoring port is the HTTP one


async def test_an_active_deployer_whose_lease_is_taken_stops_acting_and_exits(
        settings: NatsSettings) -> None:
    """Fencing: once another write moved the lease key on, the holder's next renewal
    fails its compare-and-set; it cancels everything, unsubscribes and ``serve`` raises
    ``LeaseLost`` (the process exits with code 3, and a supervisor restarts it)."""
    nc = await nats.connect(settings.url)
    caller = Caller(nc, sender="test")
    node = DeployerNode(name="d1", nats=settings, heartbeat_interval=0.2)
    lost: list[LeaseLost] = []
    ended = anyio.Event()

    async def serve(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await node.serve(task_status=task_status)
        except LeaseLost as exc:
            lost.append(exc)
        finally:
            ended.set()

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(serve)
            assert await _answered_by(caller) == "d1"
            kv = await open_leases(nc)
            await kv.put(lease_key("deployer"), b'{"role":"deployer","node":"x",'
                                                b'"instance":"other"}')
            with anyio.fail_after(5):
                await ended.wait()
        assert lost and lost[0].reason == "taken by another instance"
        assert node.lease_state == STANDBY
        with pytest.raises(Unavailable):  # no command subscription is left
            await caller.call(ListNodes(), timeout=2)
    finally:
        await nc.close()
