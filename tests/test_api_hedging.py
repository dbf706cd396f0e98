"""Hedging copies only stalled requests: a request that waits in a live worker's queue is
not sent again (the worker says "queued, starts within N s" while it waits), one queued
in a worker that stops is, and is answered by a worker that runs; a worker's overflow
waits at its node for a worker being added instead of being shed.  Real nats-server,
real worker processes, real HTTP."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import httpx
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nodes.api.autoscale import ScaleSettings
from nodes.api.gateway import HedgingRequester
from nodes.runtime import natscompat
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import notice_wait, queued_notice
from tests.apiproject import make_api_project
from tests.apistack import SERVICE, api_stack, url
from tests.helpers import gather, wait_for


def test_a_queued_notice_carries_its_wait_and_nonsense_reads_as_running_now() -> None:
    assert notice_wait(queued_notice(0.42)) == 0.42
    assert notice_wait(b"") == 0.0  # "working": a worker runs it now
    assert [notice_wait(b) for b in (b"-1", b"nan", b"soon")] == [0.0, 0.0, 0.0]
    assert notice_wait(b"1e9") == notice_wait(b"inf") == 300.0


async def test_a_queued_request_is_copied_only_after_the_wait_it_was_promised(
        settings: NatsSettings) -> None:
    """Against a responder in the queue group alone: a request whose holder says it
    starts within 1 s is answered after 0.5 s (twice the 0.25 s hedge) with no copy; one
    whose holder promised 0.2 s and then went silent is copied."""
    subject = subjects.api_endpoint("svc", "ep")
    seen: list[bytes] = []
    nc = await connect(settings, name="responder")
    client = await connect(settings, name="client")
    try:
        async def respond(msg: Msg) -> None:
            seen.append(msg.data)
            if msg.data == b"queued":
                await nc.publish(subjects.api_working(msg.reply), queued_notice(1.0))
                await anyio.sleep(0.5)
            elif msg.data == b"stalled" and seen.count(b"stalled") == 1:
                await nc.publish(subjects.api_working(msg.reply), queued_notice(0.2))
                return  # its holder stalls: no reply, no more notices
            await msg.respond(msg.data)

        await nc.subscribe(subject, queue="svc", cb=respond)
        await natscompat.flush(nc)
        retries: list[int] = []
        requester = HedgingRequester(client)
        msg, first = await requester.hedged(
            subject, b"queued", timeout=5, retry_after=0.25, headers=None,
            hedge_subject=subjects.api_hedge("svc", "ep"), on_retry=lambda: retries.append(1))
        assert (msg.data, first, seen.count(b"queued"), retries) == (b"queued", True, 1, [])
        msg, first = await requester.hedged(
            subject, b"stalled", timeout=5, retry_after=0.25, headers=None,
            hedge_subject=subjects.api_hedge("svc", "ep"), on_retry=lambda: retries.append(1))
        assert (msg.data, first, seen.count(b"stalled")) == (b"stalled", False, 2)
        assert retries == [1]
    finally:
        await nc.close()
        await client.close()


async def _copies(nc: NATS, into: list[str]) -> Subscription:
    """Subscribe to every copy of every request to the service (hedged ones too)."""
    async def seen(msg: Msg) -> None:
        into.append(msg.subject)

    sub = await nc.subscribe(subjects.api_service_prefix(SERVICE) + ".>", cb=seen)
    await natscompat.flush(nc)  # the server has the subscription before a request is sent
    return sub


async def test_requests_queued_behind_a_busy_worker_are_not_copied(
        settings: NatsSettings, tmp_path: Path) -> None:
    """One worker, a 0.15 s predict, 8 requests at once: the last waits ~1 s, four
    times the 0.25 s hedge, yet every request runs once (no copy reaches NATS, the
    gateway counts no retry, the node hands no copy to a worker)."""
    make_api_project(tmp_path / "ws", version="1", sleep=0.15)
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1, retry_after=0.25, queue_timeout=5.0)
        await s.package("v1")
        await s.deploy({"v1": 100})
        copies: list[str] = []
        sub = await _copies(s.nc, copies)
        replies = await gather(*(s.http.post(url(node), json={"features": {"x": i}})
                                 for i in range(8)))
        await sub.unsubscribe()
        assert [r.status_code for r in replies] == [200] * 8
        assert copies == [subjects.api_endpoint(SERVICE, "predict")] * 8
        assert (node.metrics.retries, node.pool.hedged) == (0, 0)


async def test_requests_queued_in_a_worker_that_stops_are_copied_to_the_other(
        settings: NatsSettings, tmp_path: Path) -> None:
    """Two workers, a 0.3 s predict, 8 requests at once: each worker takes its share in
    and says so.  One worker is stopped (SIGSTOP) while both run: its requests (the one
    it runs, those it had promised to start) stop being announced, are copied, and the
    node hands the copies to the worker that runs; every request is answered while the
    stopped worker is still stopped."""
    make_api_project(tmp_path / "ws", version="1", sleep=0.3)
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=2, retry_after=0.25, queue_timeout=5.0)
        await s.package("v1")
        await s.deploy({"v1": 100})
        stopped, running = node.pool.pids()
        replies: list[httpx.Response] = []
        try:
            async with anyio.create_task_group() as tg:
                async def burst() -> None:
                    replies.extend(await gather(*(
                        s.http.post(url(node), json={"features": {"x": i}}, timeout=15)
                        for i in range(8))))
                tg.start_soon(burst)
                await wait_for(lambda: node.pool.busy == 2, timeout=10,
                               message="both workers running a request")
                os.kill(stopped, signal.SIGSTOP)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert [r.status_code for r in replies] == [200] * 8
        pids = [r.json()["result"]["pid"] for r in replies]
        assert pids.count(running) >= 4  # its own share, and copies of the other's
        assert node.metrics.retries >= 1 and node.pool.hedged >= 1


async def test_a_busy_workers_overflow_waits_for_a_worker_being_added_not_shed(
        settings: NatsSettings, tmp_path: Path) -> None:
    """An elastic node (1..2 workers) with one worker, a 0.1 s predict and a 3 s queue
    timeout gets 36 requests at once: the worker takes what it can start within 3 s,
    passes the rest to its node, which holds them (workers may be added); a second
    worker is added and runs them.  Nothing is shed, nothing is copied."""
    make_api_project(tmp_path / "ws", version="1", sleep=0.1)
    async with api_stack(settings, tmp_path) as s:
        scaling = ScaleSettings(min_workers=1, max_workers=2, up_after_s=60,
                                down_after_s=60)  # the test adds the worker itself
        node = await s.api_node("api-1", workers=None, scaling=scaling, retry_after=0.25,
                                queue_timeout=3.0)
        await s.package("v1")
        await s.deploy({"v1": 100})
        r = await s.http.post(url(node), json={"features": {"x": 0}})  # the service time
        first = r.json()["result"]["pid"]
        replies: list[httpx.Response] = []
        async with anyio.create_task_group() as tg:
            async def burst() -> None:
                replies.extend(await gather(*(
                    s.http.post(url(node), json={"features": {"x": i}}, timeout=20)
                    for i in range(36))))
            tg.start_soon(burst)
            await wait_for(lambda: node.pool.held, timeout=10,
                           message="the worker's overflow held at the node")
            node.pool.scale_to(2)
        assert [r.status_code for r in replies] == [200] * 36
        pids = {r.json()["result"]["pid"] for r in replies}
        assert pids - {first}, "the added worker ran some"
        assert node.pool.passed_on >= 1 and node.metrics.overloaded == 0
        assert (node.metrics.retries, node.pool.hedged) == (0, 0)
