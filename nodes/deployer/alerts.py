"""Webhook delivery: alerts POSTed to every webhook of an infra, never holding anything up.

Each webhook URL has its own bounded queue (``Policy.queue_size``) and its own worker
task, which delivers that URL's alerts one at a time, in order.  So a dead or slow
receiver only delays its own alerts: ``send`` never waits (it appends and returns), and
when a queue is full its oldest alert is dropped, counted and logged.

A delivery is retried on a connection error, a timeout, a 5xx, 408 or 429, with
exponential backoff and jitter (``Policy.base_delay_s`` doubling up to
``max_delay_s``; half of each delay is random, so receivers coming back are not hit by
every Deployer at once), at most ``Policy.attempts`` times.  Any other answer outside
2xx (a 4xx says the receiver refused this body; a 3xx is not followed) ends it at once.
Every attempt is bounded by ``Policy.timeout_s`` in total, and the response body is never
read, so a receiver cannot hold a worker or fill memory.  Every attempt carries the
alert's id in the ``Idempotency-Key`` header: receivers drop the copies a retry sends
after an answer that was lost.

URLs may hold secrets (chat webhooks carry tokens in their path): logs show the scheme,
host and port only.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from anyio.abc import TaskGroup, TaskStatus

from nodes import __version__
from protocol.base import encode
from protocol.health import IDEMPOTENCY_HEADER, Alert, WebhookResult

RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Policy:
    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    timeout_s: float = 5.0
    queue_size: int = 100


@dataclass
class Delivery:
    """One alert on its way to one webhook; ``done`` is set once ``result`` is known."""

    alert: Alert
    url: str
    attempts: int
    body: bytes = b""
    done: anyio.Event = field(default_factory=anyio.Event)
    result: WebhookResult | None = None

    def finish(self, result: WebhookResult) -> None:
        self.result = result
        self.done.set()


def where(url: str) -> str:
    """``url`` without its path and query (which may hold a token), for logs."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
    except ValueError:
        return "?"


class Alerter:
    def __init__(self, log: Any, policy: Policy | None = None, *,
                 rand: Callable[[], float] = random.random) -> None:
        self.log = log
        self.policy = policy or Policy()
        self.rand = rand
        self.queues: dict[str, deque[Delivery]] = {}
        self._working: set[str] = set()
        self._tg: TaskGroup | None = None
        self._client: httpx.AsyncClient | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the HTTP client and the workers until cancelled."""
        timeout = httpx.Timeout(self.policy.timeout_s)
        headers = {"User-Agent": f"shipyard-deployer/{__version__}",
                   "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=timeout, headers=headers,
                                     follow_redirects=False) as client, \
                anyio.create_task_group() as tg:
            self._client, self._tg = client, tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def send(self, alert: Alert, urls: list[str], *, attempts: int | None = None,
             ) -> list[Delivery]:
        """Queue ``alert`` for each of ``urls``; never waits."""
        body = encode(alert)
        out = []
        for url in urls:
            d = Delivery(alert=alert, url=url, body=body,
                         attempts=max(1, attempts or self.policy.attempts))
            out.append(d)
            if self._tg is None:
                d.finish(WebhookResult(url=url, delivered=False, attempts=0,
                                       error="the Deployer is not sending alerts (stopping)"))
                continue
            q = self.queues.setdefault(url, deque())
            if len(q) >= self.policy.queue_size:
                old = q.popleft()
                self.dropped += 1
                old.finish(WebhookResult(url=url, delivered=False, attempts=0,
                                         error="dropped: the webhook's queue was full"))
                self.log.warning("alert dropped: webhook queue full", webhook=where(url),
                                 alert=old.alert.id, kind=old.alert.kind,
                                 queue=self.policy.queue_size, dropped_total=self.dropped)
            q.append(d)
            if url not in self._working:
                self._working.add(url)
                self._tg.start_soon(self._worker, url)
        return out

    async def _worker(self, url: str) -> None:
        q = self.queues[url]
        try:
            while q:
                d = q.popleft()
                try:
                    await self._deliver(d)
                except Exception as exc:  # never lose the worker to one delivery
                    d.finish(WebhookResult(url=url, delivered=False, attempts=0,
                                           error=f"{type(exc).__name__}: {exc}"))
                    self.log.exception("alert delivery crashed", webhook=where(url))
        finally:
            self._working.discard(url)
            if not q:
                self.queues.pop(url, None)

    def delay(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1``: half fixed, half random."""
        cap = min(self.policy.max_delay_s,
                  self.policy.base_delay_s * float(2 ** max(0, attempt - 1)))
        return float(cap / 2 + cap / 2 * self.rand())

    async def _deliver(self, d: Delivery) -> None:
        assert self._client is not None
        status: int | None = None
        error = ""
        attempt = 0
        for attempt in range(1, d.attempts + 1):
            status, error = None, ""
            try:
                with anyio.fail_after(self.policy.timeout_s):
                    async with self._client.stream(
                            "POST", d.url, content=d.body,
                            headers={IDEMPOTENCY_HEADER: d.alert.id}) as resp:
                        status = resp.status_code
            except TimeoutError:
                error = f"no answer within {self.policy.timeout_s:g}s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if status is not None:
                if 200 <= status < 300:
                    self.sent += 1
                    d.finish(WebhookResult(url=d.url, delivered=True, attempts=attempt,
                                           status=status))
                    return
                error = f"HTTP {status}"
                if status < 500 and status not in RETRY_STATUSES:
                    break  # refused: the same body would be refused again
            if attempt < d.attempts:
                self.log.info("alert delivery failed, retrying", webhook=where(d.url),
                              alert=d.alert.id, attempt=attempt, error=error)
                await anyio.sleep(self.delay(attempt))
        self.failed += 1
        self.log.warning("alert not delivered", webhook=where(d.url), alert=d.alert.id,
                         kind=d.alert.kind, attempts=attempt, error=error)
        d.finish(WebhookResult(url=d.url, delivered=False, attempts=attempt, status=status,
                               error=error))
