"""API workers: one request, one worker, one service.  A request whose user code kills
its worker fails alone and fast, and is not run again elsewhere; a slow ``load()`` of
one service holds back no other; a stalled worker's requests are answered through the
hedge by a worker that runs; a worker's memory limit fails only the request that hit it;
what user code starts dies with its worker.  Real nats-server, real worker processes."""

from __future__ import annotations

import mmap
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import click
import httpx
import msgspec
import pytest
from nats.aio.msg import Msg

from nodes.api import wire
from nodes.api.gateway import HedgingRequester
from nodes.api.node import ApiNode
from nodes.cli.apinodes import api_node_extra
from nodes.runtime import framing, natscompat
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import CreateApiPackage, DeployApi
from protocol.deploy import ListDeployments
from tests.apiproject import make_api_project
from tests.apistack import SERVICE, Stack, api_stack, url
from tests.helpers import gather, wait_for

OTHER = "other-api"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"  # exited, not reaped
    except FileNotFoundError:
        return True


async def _deploy_other(s: Stack, *, wait: bool = True) -> None:
    await s.caller.call(CreateApiPackage(project="other", service=OTHER, version="v1"))
    view = await s.caller.call(DeployApi(service=OTHER, infra="prod", generations={"v1": 100}))

    async def served() -> bool:
        reply = await s.caller.call(ListDeployments(project=OTHER, infra="prod"))
        v = next(v for v in reply.deployments if v.kind == "api")
        return v.update_id == view.update_id and v.state == "in_sync"
    if wait:
        await wait_for(served, timeout=60, message=f"{OTHER} served")


async def _other_stays_healthy(s: Stack, node: ApiNode, stop: anyio.Event) -> list[int]:
    codes = []
    while not stop.is_set():
        r = await s.http.post(url(node, service=OTHER), json={"features": {"x": 1}})
        codes.append(r.status_code)
    return codes


async def _crash_alone(s: Stack, node: ApiNode, features: dict[str, Any]) -> httpx.Response:
    """Send one crashing request while the other service is under load; the other
    service answers every request, and exactly one worker dies."""
    before = set(node.pool.pids())
    stop = anyio.Event()
    other: list[int] = []
    copies = []  # every copy of a request to the crashing service, hedged ones too

    async def seen(msg: Msg) -> None:
        copies.append(msg.subject)

    sub = await s.nc.subscribe(subjects.api_service_prefix(SERVICE) + ".>", cb=seen)
    await natscompat.flush(s.nc)  # the server has the subscription before the request is sent

    async def load() -> None:
        other.extend(await _other_stays_healthy(s, node, stop))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        r = await s.http.post(url(node), json={"features": features})
        await wait_for(lambda: len(node.pool.pids()) == 2 and node.pool.crashes >= 1
                       and all(w.ready for w in node.pool.workers),
                       timeout=30, message="worker replaced and serving")
        stop.set()
    await sub.unsubscribe()
    assert other and set(other) == {200}, other
    assert node.pool.crashes == 1 and len(set(node.pool.pids()) - before) == 1
    assert node.pool.died_running == 1
    assert copies == [subjects.api_endpoint(SERVICE, "predict")]  # never sent again
    return r


async def test_a_predict_that_exits_its_worker_fails_alone_and_is_not_retried(
        settings: NatsSettings, tmp_path: Path) -> None:
    """The predict runs 0.6 s (past the 0.25 s hedge) and then calls ``os._exit``: the
    node's "working" notices hold the hedge back, the node answers for the dead worker,
    the second worker never runs the request, and the other service sees no error."""
    make_api_project(tmp_path / "ws", version="1")
    make_api_project(tmp_path / "ws", key="other", service=OTHER, version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2, retry_after=0.25)
        await s.package("v1")
        await s.deploy({"v1": 100})
        await _deploy_other(s)
        r = await _crash_alone(s, node, {"crash_after": 0.6})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == "user_code"
        assert "worker process running this request died (exit code 3)" in error["message"]
        assert "not retried" in error["message"]
        r = await s.http.post(url(node), json={"features": {"x": 1}})
        assert r.status_code == 200, r.text


async def test_a_predict_that_segfaults_fails_alone_with_the_signal_named(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    make_api_project(tmp_path / "ws", key="other", service=OTHER, version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2)
        await s.package("v1")
        await s.deploy({"v1": 100})
        await _deploy_other(s)
        r = await _crash_alone(s, node, {"segfault": True})
        assert r.status_code == 500, r.text
        assert "died (killed by SIGSEGV)" in r.json()["error"]["message"]


async def test_a_slow_load_of_one_service_does_not_hold_back_another(
        settings: NatsSettings, tmp_path: Path) -> None:
    """churn-api's ``load()`` takes 10 s; other-api, deployed after it, serves meanwhile
    (its helper module has a name of its own: same-named helpers load one after the
    other, ``test_sandbox``)."""
    make_api_project(tmp_path / "ws", version="1", load_sleep=10.0)
    make_api_project(tmp_path / "ws", key="other", service=OTHER, version="1",
                     helpers="other_helpers")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2)
        await s.package("v1")
        slow = await s.deploy({"v1": 100}, wait=False)
        await wait_for(lambda: SERVICE in node.services
                       and node.services[SERVICE].stage == "loading",
                       timeout=30, message="churn-api loading")
        await _deploy_other(s)
        r = await s.http.post(url(node, service=OTHER), json={"features": {"x": 1}})
        assert r.status_code == 200, r.text
        assert node.services[SERVICE].stage == "loading"  # still in its load()
        await s.settled(slow.update_id)  # and it gets there
        r = await s.http.post(url(node), json={"features": {"x": 1}})
        assert r.status_code == 200, r.text


async def test_requests_queued_behind_a_stopped_worker_are_answered_by_the_other(
        settings: NatsSettings, tmp_path: Path) -> None:
    """One of two workers is stopped (SIGSTOP): every request is answered, those that
    went to the stopped worker through the hedge, by the worker that runs."""
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2, retry_after=0.25)
        await s.package("v1")
        await s.deploy({"v1": 100})
        stopped, running = node.pool.pids()
        os.kill(stopped, signal.SIGSTOP)
        try:
            replies = []
            for _ in range(4):  # 4 rounds of 10 concurrent requests
                replies += await gather(*(s.http.post(url(node), json={"features": {"x": i}})
                                          for i in range(10)))
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert [r.status_code for r in replies] == [200] * 40
        assert {r.json()["result"]["pid"] for r in replies} == {running}
        # Requests NATS handed to the stopped worker took the retry path, and the node
        # gave their copies to the worker that runs.
        assert node.metrics.retries >= 1
        assert node.pool.hedged >= 1


async def test_a_predict_past_the_worker_memory_limit_fails_alone_and_the_worker_is_replaced(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2, worker_memory_mb=1024)
        await s.package("v1")
        await s.deploy({"v1": 100})
        r = await s.http.post(url(node), json={"features": {"allocate_mb": 64}})
        assert r.status_code == 200 and r.json()["result"]["allocated"] == 64 * 1024 * 1024
        before = set(node.pool.pids())
        r = await s.http.post(url(node), json={"features": {"allocate_mb": 2048}})
        assert r.status_code == 500, r.text
        message = r.json()["error"]["message"]
        assert "MemoryError" in message and "limit of 1024 MB" in message, message
        await wait_for(lambda: len(node.pool.pids()) == 2 and node.pool.crashes == 1,
                       timeout=30, message="worker replaced")
        assert len(set(node.pool.pids()) - before) == 1
        replies = await gather(*(s.http.post(url(node), json={"features": {"x": 1}})
                                 for _ in range(10)))
        assert [r.status_code for r in replies] == [200] * 10


async def test_a_process_that_user_code_starts_dies_with_its_worker(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1)
        await s.package("v1")
        await s.deploy({"v1": 100})
        r = await s.http.post(url(node), json={"features": {"spawn": True}})
        assert r.status_code == 200, r.text
        child, worker = r.json()["result"]["child"], r.json()["result"]["pid"]
        assert not _gone(child)
        os.kill(worker, signal.SIGKILL)
        await wait_for(lambda: _gone(child), timeout=10, message="user process killed")
        await wait_for(lambda: node.pool.crashes == 1 and len(node.pool.pids()) == 1,
                       timeout=30, message="worker replaced")


async def test_with_debug_an_error_reply_carries_a_traceback_from_the_users_code(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", debug=True)
        await s.package("v1")
        await s.deploy({"v1": 100})
        r = await s.http.post(url(node), json={"features": {"boom": "x"}})
        assert r.status_code == 500, r.text
        message = r.json()["error"]["message"]
        first, _, trace = message.partition("\n")
        assert first == "ValueError: boom: x"
        files = [line.split('"')[1] for line in trace.splitlines() if 'File "' in line]
        # The worker's own frames (serving, the call wrapper) are not shown.
        assert [Path(f).name for f in files] == ["predict.py"], message


def test_worker_memory_is_an_api_node_option_in_megabytes() -> None:
    assert api_node_extra("api", {"worker_memory": 512}) == {"worker_memory_mb": 512,
                                                             "debug": False}
    with pytest.raises(click.BadParameter, match="--worker-memory is not an option of "
                                                 "gateway nodes"):
        api_node_extra("gateway", {"worker_memory": 512})


async def test_a_running_request_is_not_hedged_and_a_lost_one_is(settings: NatsSettings) -> None:
    """Against a responder in the queue group alone (no API node takes hedged copies):
    a request whose runner says "working" is sent once however long it runs; one that
    nobody picks up gets a copy, which falls back from the nodes' subject (nobody
    there) to the queue group."""
    subject = subjects.api_endpoint("svc", "ep")
    seen: list[bytes] = []
    nc = await connect(settings, name="responder")
    client = await connect(settings, name="client")
    try:
        async def respond(msg: Msg) -> None:
            seen.append(msg.data)
            if msg.data == b"slow":  # runs 1 s, saying so every 0.1 s
                for _ in range(10):
                    await nc.publish(subjects.api_working(msg.reply), b"")
                    await anyio.sleep(0.1)
            elif msg.data == b"lost" and seen.count(b"lost") == 1:
                return  # the first copy is lost
            await msg.respond(msg.data)

        await nc.subscribe(subject, queue="svc", cb=respond)
        await natscompat.flush(nc)
        retries: list[int] = []
        requester = HedgingRequester(client)
        msg, first = await requester.hedged(
            subject, b"slow", timeout=5, retry_after=0.25, headers=None,
            hedge_subject=subjects.api_hedge("svc", "ep"), on_retry=lambda: retries.append(1))
        assert (msg.data, first, seen.count(b"slow"), retries) == (b"slow", True, 1, [])
        msg, first = await requester.hedged(
            subject, b"lost", timeout=5, retry_after=0.25, headers=None,
            hedge_subject=subjects.api_hedge("svc", "ep"), on_retry=lambda: retries.append(1))
        assert (msg.data, first, seen.count(b"lost")) == (b"lost", False, 2)
        assert retries == [1]  # one copy: to the nodes' subject, then the queue group
    finally:
        await nc.close()
        await client.close()


def test_worker_frames_round_trip_typed_and_a_broken_stream_is_an_error() -> None:
    to_worker = [wire.Load(service="s", generation="v1", directory="/d",
                           endpoints=[wire.EndpointCode("p", "prediction", "api/p.py",
                                                        "predict")]),
                 wire.Route(service="s", mapping=b"{}", kinds={"v1": {"p": "prediction"}},
                            description=""),
                 wire.Drain(), wire.Serve(service="s", endpoint="p", reply="r", data=b"{}")]
    from_worker = [wire.Loaded(service="s", generation="v1", error="", seconds=0.1),
                   wire.Routed(service="s", error="x"), wire.Drained(),
                   wire.Stats(rows=[wire.StatRow("s", "p", "v1", False, 1, 0, 0.1, [1])],
                              backlog=[wire.Backlog("s", "p", 2)], overloaded=0,
                              shadow_mismatches=0),
                   wire.Retiring(reason="MemoryError"),
                   wire.PassOn(service="s", endpoint="p", reply="r", data=b"{}",
                               headers={"Sy-Op": "multi"})]
    deframer = framing.Deframer()
    data = b"".join(framing.frame(m) for m in to_worker)
    bodies = deframer.feed(data[:7]) + deframer.feed(data[7:])
    assert [wire.decode_to_worker(b) for b in bodies] == to_worker
    assert [wire.decode_from_worker(deframer.feed(framing.frame(m))[0])
            for m in from_worker] == from_worker
    with pytest.raises(msgspec.ValidationError):
        wire.decode_to_worker(framing.frame(wire.Loaded(service="s", generation="v",
                                                        error="", seconds=0))[4:])
    with pytest.raises(framing.FrameError, match="over the limit"):
        framing.Deframer().feed(framing.HEADER.pack(framing.MAX_FRAME + 1))


def test_the_busy_page_carries_the_queue_length_beside_the_running_request() -> None:
    page = wire.BusyPage(mmap.mmap(-1, wire.PAGE_SIZE))
    longest = "r" * wire.MAX_REPLY
    page.set_queued(7)
    page.start(12.5, longest)
    assert (page.read(), page.queued()) == ((12.5, longest), 7)
    page.stop()
    page.set_queued(0)
    assert (page.read(), page.queued()) == ((0.0, ""), 0)
    page.set_queued(-3)  # nonsense is clamped, never a struct error
    assert page.queued() == 0
