"""The HTTP side of API services: each HTTP request becomes a NATS request to the
service's queue group.  Every API node runs one; the ``gateway`` role runs one alone.

The gateway knows which services and endpoints exist (and their auth mode) from the
desired-state KV (a watched, re-read copy), so it answers 404 and 401 itself and sends
only real work over NATS; a reply maps to a response without being decoded (errors carry
their HTTP status in the nats.micro error headers).

Predictions are idempotent, so one that nobody runs is sent again: when neither a reply
nor a notice has come after ``retry_after`` (at least the configured floor, more for
endpoints whose recent first-copy latencies are long), another copy goes out
(``HedgingRequester``), and whichever reply comes first wins.  The API node says
"working" while a worker runs the request, and the worker (or the node) says "queued,
starts within N s" while it waits in a queue: those hold the copy back, so only a
request that is truly stalled (its worker died, hangs or is stopped, its node is gone) is
copied, not one queued behind busy workers (measured: during a 10x step load, copying
queued requests made new workers spend their first seconds on duplicates).  A node that
answers ``overloaded`` also gets one retry elsewhere.  A client
therefore does not see one API node die, nor one worker stall; a request that kills its
worker is answered with that error by the worker's node, and is not sent again.  While
this node's own NATS connection is down, every call is answered 503 at once instead of
waiting out its deadline.  Error bodies and their statuses come from ``protocol.api``
(``error_reply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, ClassVar

import nats.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from nodes.api.http import HttpServer
from nodes.api.httplimits import HttpLimits
from nodes.api.keys import KeyCache
from nodes.api.metrics import Metrics
from nodes.runtime.connection import PublishDenied
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache
from nodes.runtime.logs import get_logger
from nodes.runtime.node import Node
from nodes.runtime.requests import NO_RESPONDERS, Requester
from protocol import subjects
from protocol.api import (
    API_DEPLOYMENT_VALUE,
    DISPATCH_HEADER,
    ERROR_CODE_HEADER,
    GENERATION_HEADER,
    OP_HEADER,
    OP_MULTI,
    ApiDeploymentRecord,
    error_reply,
    notice_wait,
)
from protocol.deploy import deployment_keys
from protocol.state import GatewayState

ACTIONS = {"predict": "prediction", "predict-multi": "prediction", "run": "function"}
_OFFLINE = (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)


class HedgingRequester(Requester):
    """The lean requester, plus hedged copies that share the first one's future.

    A copy goes out when neither a reply nor a notice has come for ``retry_after``.  A
    "working" notice (an API node saying that one of its workers runs the request,
    repeated while it runs) pushes the next copy back by ``retry_after``, so a request
    that is slow, or that kills its worker, is not sent again; a "queued" notice (a
    worker, or its node, holds the request and expects to start it within N seconds,
    repeated while it waits) pushes it back by N + ``retry_after``, so a request queued
    behind busy workers is not copied either.  Only one that nobody holds, or whose
    holder stopped saying so (lost with a node or a worker, queued behind a stalled
    worker), is.  Copies
    alternate between the API nodes (``hedge_subject``: the node hands the copy to a
    worker that is not stalled) and the queue group, ``max_copies`` at most.
    """

    def __init__(self, nc: NATS, *, max_copies: int = 3) -> None:
        super().__init__(nc)
        self.max_copies = max_copies
        self._notices: dict[str, _Hedge] = {}  # token -> its request's hedge state
        self._fallbacks: dict[str, _Hedge] = {}  # tokens of copies sent to API nodes
        self._notices_subscribed = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def _start(self) -> None:
        await super()._start()
        if not self._notices_subscribed:
            self._notices_subscribed = True
            await self.nc.subscribe(subjects.api_working_all(self._prefix),
                                    cb=self._on_working, pending_msgs_limit=100_000)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix):]
        if self._fallbacks:
            hedge = self._fallbacks.pop(token, None)
            if hedge is not None and not msg.data and msg.headers and \
                    msg.headers.get("Status") == NO_RESPONDERS:
                hedge.to_queue_group()  # no API node takes copies: the queue group does
                return
        entry = self._pending.pop(token, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    async def _on_working(self, msg: Msg) -> None:
        hedge = self._notices.get(msg.subject[len(self._prefix):msg.subject.rfind(".")])
        if hedge is not None:
            hedge.postpone(notice_wait(msg.data))

    async def hedged(self, subject: str, payload: bytes, *, timeout: float,
                     retry_after: float, headers: dict[str, str] | None,
                     hedge_subject: str | None = None,
                     on_retry: Callable[[], None] | None = None) -> tuple[Msg, bool]:
        """The reply, and whether it answered the first copy (not a hedged one)."""
        if not self._prefix:
            await self._start()
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[Msg] = loop.create_future()
        hedge = _Hedge(self, loop, future, subject, hedge_subject, payload, headers,
                       retry_after, on_retry)
        first = hedge.token(subject)

        def expire() -> None:
            if not future.done():
                future.set_exception(nats.errors.TimeoutError())

        timer = loop.call_later(timeout, expire)
        hedge.arm()
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + first,
                                  headers=headers)
            msg = await future
        finally:
            timer.cancel()
            hedge.close()
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not msg.data:
            raise nats.errors.NoRespondersError
        return msg, msg.subject == self._prefix + first


class _Hedge:
    """One hedged request's copies: their tokens, the timer of the next one."""

    __slots__ = ("copies", "future", "headers", "hedge_subject", "loop", "on_retry",
                 "owner", "payload", "retry_after", "subject", "timer", "tokens")

    def __init__(self, owner: HedgingRequester, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Msg], subject: str, hedge_subject: str | None,
                 payload: bytes, headers: dict[str, str] | None, retry_after: float,
                 on_retry: Callable[[], None] | None) -> None:
        self.owner, self.loop, self.future = owner, loop, future
        self.subject, self.hedge_subject = subject, hedge_subject
        self.payload, self.headers = payload, headers
        self.retry_after, self.on_retry = retry_after, on_retry
        self.tokens: list[str] = []
        self.copies = 0
        self.timer: asyncio.TimerHandle | None = None

    def token(self, subject: str) -> str:
        owner = self.owner
        token = owner._tokens.next()
        self.tokens.append(token)
        owner._pending[token] = (self.future, subject)
        owner._notices[token] = self
        return token

    def arm(self, wait: float = 0.0) -> None:
        if self.copies < self.owner.max_copies:
            self.timer = self.loop.call_later(wait + self.retry_after, self.fire)

    def postpone(self, wait: float) -> None:
        """Someone runs the request (``wait`` 0), or holds it in a queue and expects to
        start it within ``wait`` seconds: no copy before that, and ``retry_after``."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.arm(wait)

    def fire(self) -> None:
        self.timer = None
        if self.future.done():
            return
        self.copies += 1
        to_nodes = self.hedge_subject is not None and self.copies % 2 == 1
        self._send(self.hedge_subject if to_nodes and self.hedge_subject else self.subject,
                   to_nodes)
        self.arm()

    def to_queue_group(self) -> None:
        if not self.future.done():  # the same copy, sent on: not counted again
            self._send(self.subject, False, count=False)

    def _send(self, subject: str, to_nodes: bool, *, count: bool = True) -> None:
        token = self.token(subject)
        if to_nodes:
            self.owner._fallbacks[token] = self
        if count and self.on_retry is not None:
            self.on_retry()
        task = self.loop.create_task(self._publish(subject, token))
        self.owner._tasks.add(task)  # held until done
        task.add_done_callback(self.owner._tasks.discard)

    async def _publish(self, subject: str, token: str) -> None:
        with contextlib.suppress(nats.errors.Error):  # the first copy's outcome decides
            await self.owner.nc.publish(subject, self.payload,
                                        reply=self.owner._prefix + token,
                                        headers=self.headers)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        owner = self.owner
        for t in self.tokens:
            owner._pending.pop(t, None)
            owner._notices.pop(t, None)
            owner._fallbacks.pop(t, None)


class Gateway:
    def __init__(self, nc: NATS, metrics: Metrics, *, timeout: float = 31.0,
                 retry_after: float = 0.25, max_body: int = 512 * 1024,
                 resync_interval: float = 5.0) -> None:
        self.nc = nc
        self.metrics = metrics
        self.timeout = timeout
        self.retry_floor = retry_after
        self.max_body = max_body
        self.resync_interval = resync_interval
        self.requester = HedgingRequester(nc)
        self.services: dict[str, ApiDeploymentRecord] = {}
        self._subjects: dict[tuple[str, str], str] = {}
        self._hedges: dict[str, str] = {}  # endpoint subject -> its hedged copies' subject
        self._slow: dict[str, float] = {}  # subject -> decaying recent maximum latency
        self._deployments: KVCache[ApiDeploymentRecord] | None = None
        self.keys: KeyCache | None = None

    async def start(self, tg: TaskGroup, js: Any, replicas: int) -> None:
        deploy = await ensure_kv(js, subjects.DEPLOY_BUCKET, replicas=replicas)
        keys = await ensure_kv(js, subjects.API_KEYS_BUCKET, replicas=replicas)
        self._deployments = KVCache(deploy, deployment_keys("api"), API_DEPLOYMENT_VALUE.decode,
                                    on_change=self._changed,
                                    resync_interval=self.resync_interval)
        self.keys = KeyCache(keys, resync_interval=self.resync_interval)
        await tg.start(self._deployments.run)
        await tg.start(self.keys.cache.run)

    def resync(self) -> None:
        if self._deployments is not None:
            self._deployments.resync()
        if self.keys is not None:
            self.keys.cache.resync()

    async def _changed(self, key: str, entry: Entry[ApiDeploymentRecord] | None) -> None:
        assert self._deployments is not None
        self.services = {e.value.service: e.value for e in self._deployments.entries.values()}

    def urls(self, base: str) -> list[str]:
        return [f"{base}/public/api/v1/{s}/{e}/{'run' if k == 'function' else 'predict'}"
                for s, rec in sorted(self.services.items())
                for e, k in sorted(rec.endpoints.items())]

    @property
    def connected(self) -> bool:
        """Whether the node's NATS connection is up (not reconnecting, not closed)."""
        return bool(self.nc.is_connected)

    def known(self, service: str, endpoint: str) -> bool:
        """Whether the desired state (KV) has this endpoint: only those get series."""
        rec = self.services.get(service)
        return rec is not None and endpoint in rec.endpoints

    def subject(self, service: str, endpoint: str) -> str:
        key = (service, endpoint)
        subject = self._subjects.get(key)
        if subject is None:
            subject = self._subjects[key] = subjects.api_endpoint(service, endpoint)
            self._hedges[subject] = subjects.api_hedge(service, endpoint)
        return subject

    def disconnected(self) -> None:
        """The NATS connection dropped: answer every request in flight 503 now.  Their
        replies, if any, are lost with the connection, so waiting only turns a 503 into
        a 504 at the deadline."""
        failed = self.requester.fail_pending(nats.errors.ConnectionReconnectingError())
        if failed:
            get_logger(component="gateway").warning(
                "NATS connection dropped: in-flight requests answered 503", requests=failed)

    async def handle(self, service: str, endpoint: str, action: str, body: bytes,
                     authorization: str | None, generation: str | None,
                     dispatch_key: str | None) -> tuple[int, bytes]:
        """One API call: (HTTP status, JSON body).  Never raises for a bad request."""
        if not self.connected:  # fail fast: a request now would wait out its deadline
            return error_reply("unavailable", "this node has lost its NATS connection and "
                                              "is reconnecting; try again shortly")
        rec = self.services.get(service)
        if rec is None:
            known = ", ".join(sorted(self.services)) or "none is deployed"
            return error_reply("not_found", f"unknown API service {service!r} "
                                            f"(services: {known})")
        kind = rec.endpoints.get(endpoint)
        if kind is None:
            return error_reply("not_found", f"service {service} has no endpoint "
                                            f"{endpoint!r} (endpoints: "
                                            f"{', '.join(sorted(rec.endpoints))})")
        if ACTIONS[action] != kind:
            use = "run" if kind == "function" else "predict or predict-multi"
            return error_reply("not_found", f"{endpoint} is a {kind} endpoint: POST "
                                            f"/public/api/v1/{service}/{endpoint}/{use}")
        if rec.mapping.auth == "api-key":
            assert self.keys is not None
            problem = self.keys.check(service, authorization)
            if problem is not None:
                return error_reply("unauthorized", problem)
        headers: dict[str, str] | None = None
        if action == "predict-multi" or generation or dispatch_key:
            headers = {}
            if action == "predict-multi":
                headers[OP_HEADER] = OP_MULTI
            if generation:
                headers[GENERATION_HEADER] = generation
            if dispatch_key:
                headers[DISPATCH_HEADER] = dispatch_key
        subject = self.subject(service, endpoint)
        try:
            if kind == "prediction":
                msg = await self._predict(subject, body, headers)
            else:
                msg = await self.requester.request(subject, body, timeout=self.timeout,
                                                   headers=headers)
        except nats.errors.NoRespondersError:
            return error_reply("unavailable", f"no API node serves {service} right now")
        except nats.errors.TimeoutError:
            return error_reply("timeout", f"{service}/{endpoint} did not answer within "
                                          f"{self.timeout:g}s")
        except _OFFLINE as exc:
            return error_reply("unavailable", f"this node's NATS connection dropped while "
                                              f"the request was out ({type(exc).__name__}); "
                                              "try again shortly")
        except PublishDenied as exc:  # its identity lacks the role: not the caller's fault
            return error_reply("unavailable", f"the NATS server does not let this node's "
                                              f"identity send requests to {exc.subject}: run "
                                              "it with gateway or api credentials")
        hdrs = msg.headers
        if hdrs:
            code = hdrs.get(ERROR_CODE_HEADER)
            if code is not None:
                status = int(code) if code.isdigit() else 500
                return (status if 400 <= status <= 599 else 500), msg.data
        return 200, msg.data

    async def _predict(self, subject: str, body: bytes, headers: dict[str, str] | None) -> Msg:
        slow = self._slow.get(subject, 0.0)
        retry_after = min(max(self.retry_floor, 3 * slow), self.timeout / 2)
        t0 = time.monotonic()
        msg, first = await self.requester.hedged(subject, body, timeout=self.timeout,
                                                 retry_after=retry_after, headers=headers,
                                                 hedge_subject=self._hedges.get(subject),
                                                 on_retry=self._count_retry)
        hdrs = msg.headers
        if hdrs and hdrs.get(ERROR_CODE_HEADER) == "503" and b'"overloaded"' in msg.data:
            self._count_retry()  # that node is full: once more, elsewhere
            msg = await self.requester.request(subject, body, timeout=self.timeout,
                                               headers=headers)
        elif first:  # a hedged copy's reply says nothing of this endpoint's latency
            elapsed = time.monotonic() - t0
            self._slow[subject] = max(elapsed, slow * 0.995)
        return msg

    def _count_retry(self) -> None:
        self.metrics.retries += 1


class GatewayNode(Node):
    """``shipyard node start gateway``: HTTP for API services, and nothing else."""

    role: ClassVar[str] = "gateway"

    def __init__(self, *, http_port: int = 8080, http_host: str = "0.0.0.0",
                 request_timeout: float = 31.0, retry_after: float = 0.25,
                 max_body: int = 512 * 1024, resync_interval: float = 5.0,
                 http_limits: HttpLimits | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.http_limits = http_limits or HttpLimits()
        self.http_port = http_port
        self.http_host = http_host
        self.metrics = Metrics(self.name, self.role)
        self.request_timeout = request_timeout
        self.retry_after = retry_after
        self.max_body = max_body
        self.resync_interval = resync_interval
        self.gateway: Gateway | None = None
        self.http: HttpServer | None = None

    async def setup(self) -> None:
        self.gateway = Gateway(self.nc, self.metrics, timeout=self.request_timeout,
                               retry_after=self.retry_after, max_body=self.max_body,
                               resync_interval=self.resync_interval)

    async def started(self, tg: TaskGroup) -> None:
        assert self.gateway is not None
        await self.gateway.start(tg, self.js, self.settings.replicas)
        self.http = HttpServer(self.gateway, self.metrics, host=self.http_host,
                               port=self.http_port, node=self.name, limits=self.http_limits)
        await tg.start(self.http.serve)

    def disconnected(self) -> None:
        if self.gateway is not None:
            self.gateway.disconnected()

    async def reconnected(self) -> None:
        if self.gateway is not None:
            self.gateway.resync()

    async def stopping(self) -> None:
        if self.http is not None:
            await self.http.shutdown()

    def state(self) -> GatewayState:
        return GatewayState(http=self.http.url if self.http else None,
                            services=sorted(self.gateway.services) if self.gateway else [])
