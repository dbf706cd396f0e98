"""The HTTP side of API services: each HTTP request becomes a NATS request to the
service's queue group.  Every API node runs one; the ``gateway`` role runs one alone.

The gateway knows which services and endpoints exist (and their auth mode) from the
desired-state KV (a watched, re-read copy), so it answers 404 and 401 itself and sends
only real work over NATS; a reply maps to a response without being decoded (errors carry
their HTTP status in the nats.micro error headers).

Predictions are idempotent, so a lost one is sent again, once: when no reply has come
after ``retry_after`` (at least the configured floor, more for endpoints whose recent
latencies are long), a second copy goes to the queue group, and whichever reply comes
first wins; a node that answers ``overloaded`` also gets one retry elsewhere.  A client
therefore does not see one API node die.  While this node's own NATS connection is down,
every call is answered 503 at once instead of waiting out its deadline.  Error bodies and
their statuses come from ``protocol.api`` (``error_reply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, ClassVar

import nats.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from nodes.api.http import HttpServer
from nodes.api.httplimits import HttpLimits
from nodes.api.keys import KeyCache
from nodes.api.metrics import Metrics
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache
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
)
from protocol.deploy import deployment_keys
from protocol.state import GatewayState

ACTIONS = {"predict": "prediction", "predict-multi": "prediction", "run": "function"}
_OFFLINE = (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)


class HedgingRequester(Requester):
    """The lean requester, plus one hedged retry that shares the first one's future."""

    async def hedged(self, subject: str, payload: bytes, *, timeout: float,
                     retry_after: float, headers: dict[str, str] | None,
                     on_retry: Any = None) -> Msg:
        if not self._prefix:
            await self._start()
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[Msg] = loop.create_future()
        tokens = [format(next(self._ids), "x")]
        self._pending[tokens[0]] = future
        copies: list[asyncio.Task[None]] = []  # the hedged copy's publish, owned by this call

        def expire() -> None:
            if not future.done():
                future.set_exception(nats.errors.TimeoutError())

        def retry() -> None:
            if future.done():
                return
            token = format(next(self._ids), "x")
            tokens.append(token)
            self._pending[token] = future
            if on_retry is not None:
                on_retry()
            copies.append(loop.create_task(self.nc.publish(
                subject, payload, reply=self._prefix + token, headers=headers)))

        timer = loop.call_later(timeout, expire)
        second = loop.call_later(retry_after, retry)
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + tokens[0],
                                  headers=headers)
            msg = await future
        finally:
            timer.cancel()
            second.cancel()
            for t in tokens:
                self._pending.pop(t, None)
            for copy in copies:  # finished (or cancelled with us) before this call returns
                with contextlib.suppress(Exception):
                    await copy
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not msg.data:
            raise nats.errors.NoRespondersError
        return msg


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
        return subject

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
            return error_reply("unavailable", f"this node's NATS connection failed while "
                                              f"sending the request ({type(exc).__name__})")
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
        msg = await self.requester.hedged(subject, body, timeout=self.timeout,
                                          retry_after=retry_after, headers=headers,
                                          on_retry=self._count_retry)
        hdrs = msg.headers
        if hdrs and hdrs.get(ERROR_CODE_HEADER) == "503" and b'"overloaded"' in msg.data:
            self._count_retry()  # that node is full: once more, elsewhere
            msg = await self.requester.request(subject, body, timeout=self.timeout,
                                               headers=headers)
        else:
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

    async def reconnected(self) -> None:
        if self.gateway is not None:
            self.gateway.resync()

    async def stopping(self) -> None:
        if self.http is not None:
            await self.http.shutdown()

    def state(self) -> GatewayState:
        return GatewayState(http=self.http.url if self.http else None,
                            services=sorted(self.gateway.services) if self.gateway else [])
