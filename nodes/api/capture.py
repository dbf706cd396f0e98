"""Prediction capture in an API worker, the stream that keeps it, and reading it back.

Each worker captures what it answers itself: it already holds the request, the answer
and the generation, so nothing is copied to its node, and a node with N workers
publishes from N processes.  It publishes on a second NATS connection of its own, opened
when the first call is captured: on the connection that carries replies, a server slow
to take in captures made replies wait behind them in the client's outgoing buffer (one
request in flight, no-op endpoint: p50 0.72 ms -> 5.2 ms; bench/RESULTS.md).  On the request path a
captured request costs a sampling decision and one append to a bounded queue, after the
reply has been published (``Capturer.offer``); a background task of the worker decodes,
redacts, encodes and publishes each entry between requests.  A full queue drops the
entry and counts it (``dropped``; the node's ``/metrics`` shows
``shipyard_api_capture_dropped_total``), so capture never makes a client wait nor fail.

Entries are core NATS publishes into the ``SY_CAPTURE`` stream (no acknowledgement to
wait for), with the request id as ``Nats-Msg-Id``: a request that ran twice (a hedged
copy) with the same id is stored once.  A publish that fails (the connection is down
past its buffer, an entry larger than the server's max payload) is dropped and counted
the same way.  Measured on the API benchmark: bench/RESULTS.md, "Prediction capture".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from nodes.api.usercode import OP_MULTI, OP_PREDICT
from nodes.runtime.jetstream import DEDUP_WINDOW_S, ensure_stream
from nodes.runtime.logs import get_logger
from protocol import subjects
from protocol.base import new_id
from protocol.capture import (
    CAPTURED_CALL,
    CapturedCall,
    CaptureSettings,
    redact,
    sampled,
)

# The stream's limits: the oldest entries go first when either is reached.
MAX_BYTES_ENV = "SHIPYARD_CAPTURE_MAX_BYTES"
MAX_AGE_ENV = "SHIPYARD_CAPTURE_MAX_AGE_S"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0

# The worker's queue of entries not yet published.
MAX_PENDING = 1000
MAX_PENDING_BYTES = 16 << 20
RECONNECT_S = 5.0  # a capture connection that could not be opened is retried after this

_OP_NAMES = {OP_PREDICT: "predict", OP_MULTI: "multi"}
_JSON = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode
_ANSWER = {"predict": "result", "multi": "results", "run": "response"}
_PREFIX = {op: b'{"' + key.encode() + b'":' for op, key in _ANSWER.items()}


def stream_limits() -> tuple[int, float]:
    """(max bytes, max age in seconds) of ``SY_CAPTURE``: the defaults, or
    ``$SHIPYARD_CAPTURE_MAX_BYTES`` and ``$SHIPYARD_CAPTURE_MAX_AGE_S`` in the Deployer's
    environment.  Raises ``ValueError`` for a value that is not a positive number."""
    def positive(name: str, default: float) -> float:
        text = os.environ.get(name, "").strip()
        if not text:
            return default
        value = float(text)
        if not value > 0:
            raise ValueError(f"${name} is {text!r}: expected a positive number")
        return value
    return int(positive(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)), positive(MAX_AGE_ENV,
                                                                      DEFAULT_MAX_AGE_S)


def capture_stream_config(replicas: int = 1, max_bytes: int | None = None,
                          max_age_s: float | None = None) -> StreamConfig:
    try:
        default_bytes, default_age = stream_limits()
    except ValueError as exc:
        get_logger(component="capture").error("capture stream limits ignored; using the "
                                              "defaults", error=str(exc))
        default_bytes, default_age = DEFAULT_MAX_BYTES, DEFAULT_MAX_AGE_S
    return StreamConfig(
        name=subjects.CAPTURE_STREAM,
        description="captured API requests and answers (shipyard api queries, replay)",
        subjects=[subjects.CAPTURE_ALL],
        max_bytes=max_bytes or default_bytes,
        max_age=max_age_s or default_age,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DEDUP_WINDOW_S,
    )


async def ensure_capture_stream(js: JetStreamContext, replicas: int = 1,
                                max_bytes: int | None = None,
                                max_age_s: float | None = None) -> None:
    """Create ``SY_CAPTURE`` (the Deployer does, at start), or bring its limits up to
    date."""
    await ensure_stream(js, capture_stream_config(replicas, max_bytes, max_age_s))


# -- the worker side ---------------------------------------------------------------------

@dataclass(slots=True)
class Pending:
    """What the request path hands over: raw, not yet decoded nor redacted."""

    settings: CaptureSettings
    request_id: str
    service: str
    endpoint: str
    generation: str
    op: int
    payload: Any  # features (Raw), each item's features (list of bytes), or the body
    status: int
    answer: Any  # the reply body (bytes), or (code, message) for a failure
    latency: float
    ts: float
    size: int


class Capturer:
    """One worker's capture: sampling and a bounded queue on the request path, the rest
    in ``run``."""

    def __init__(self, connect: Callable[[], Awaitable[NATS]], *, node: str, worker: int,
                 max_pending: int = MAX_PENDING, max_bytes: int = MAX_PENDING_BYTES,
                 rand: Callable[[], float] = random.random) -> None:
        """``connect``: opens the capture connection (on first need; again after a
        failed attempt, at most every ``RECONNECT_S``)."""
        self._connect = connect
        self.nc: NATS | None = None
        self._next_connect = 0.0
        self.node = node
        self.worker = worker
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._rand = rand
        self._queue: deque[Pending] = deque()
        self._bytes = 0
        self._wake = anyio.Event()
        self.captured = 0  # published
        self.dropped = 0  # queue full, or the publish failed
        self.log = get_logger(component="capture", worker=worker)
        self._last_error = ""

    def sample(self, settings: CaptureSettings, request_id: str | None) -> str | None:
        """The request id to capture this request under, or None when it is not sampled
        (by the id's hash when it has one, else at random)."""
        if request_id:
            return request_id if sampled(request_id, settings.fraction) else None
        if settings.fraction >= 1.0 or self._rand() < settings.fraction:
            return new_id()
        return None

    def offer(self, entry: Pending) -> None:
        """Queue one entry, or drop and count it when the queue is full.  Never waits."""
        if len(self._queue) >= self.max_pending or self._bytes + entry.size > self.max_bytes:
            self.dropped += 1
            return
        self._queue.append(entry)
        self._bytes += entry.size
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Publish queued entries, forever; a failure drops the entry it was for."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                nc = self.nc or await self._open()
                while self._queue:
                    entry = self._queue.popleft()
                    self._bytes -= entry.size
                    if nc is None:
                        self.dropped += 1
                        continue
                    await self._publish(nc, entry)
                    await anyio.lowlevel.checkpoint()  # requests waiting here go first
        finally:
            if self.nc is not None:
                with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
                    await self.nc.drain()

    async def _open(self) -> NATS | None:
        """The capture connection, or None (the queued entries are dropped) when it
        cannot be opened now."""
        now = time.monotonic()
        if now < self._next_connect:
            return None
        try:
            self.nc = await self._connect()
        except Exception as exc:
            self._next_connect = now + RECONNECT_S
            self.log.warning("capture connection failed; captured calls are dropped",
                             error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        return self.nc

    async def _publish(self, nc: NATS, p: Pending) -> None:
        try:
            data = _encode(self.entry(p))
            await nc.publish(subjects.capture(p.service, p.endpoint), data,
                                  headers={"Nats-Msg-Id": p.request_id})
            self.captured += 1
        except Exception as exc:
            self.dropped += 1
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if error != self._last_error:  # once per kind of failure, not per entry
                self._last_error = error
                self.log.warning("captured call dropped", service=p.service, error=error)

    def entry(self, p: Pending) -> CapturedCall:
        """Decode, redact and wrap one pending capture (without redaction, an answered
        call's JSON is sliced, not decoded and encoded again)."""
        op = _OP_NAMES.get(p.op, "run")
        paths = p.settings.redact
        if not paths and p.status == 200:
            fast = _raw_answer(op, p.answer)
            if fast is not None:
                return self._wrap(p, op, _raw_request(op, p.payload), fast, [], paths)
        request: Any
        removed: list[str] = []
        text = False
        if op == "multi":
            request = [_value(bytes(raw)) for raw in p.payload]
            for item in request:
                removed += [r for r in redact(item, paths) if r not in removed]
        else:
            request, text = _decode(bytes(p.payload))
            removed = redact(request, paths)
        if p.status == 200:
            response = answer_of(op, p.answer, paths)
        else:
            code, message = p.answer
            response = {"error": {"code": code, "message": message}}
        return self._wrap(p, op, _encode(request), _encode(response), removed, paths,
                          text=text and op == "run")

    def _wrap(self, p: Pending, op: str, request: bytes, response: bytes, removed: list[str],
              paths: list[str], *, text: bool = False) -> CapturedCall:
        return CapturedCall(id=p.request_id, service=p.service, endpoint=p.endpoint,
                            generation=p.generation, op=op, ts=p.ts,
                            latency_s=round(p.latency, 6), status=p.status, node=self.node,
                            worker=self.worker, request=msgspec.Raw(request),
                            response=msgspec.Raw(response), redacted=removed,
                            redact=list(paths), text=text)


def _raw_request(op: str, payload: Any) -> bytes:
    """The request as JSON, from what the endpoint was given (already valid JSON: the
    call was answered)."""
    if op == "multi":
        return b"[" + b",".join(bytes(raw) for raw in payload) + b"]"
    return bytes(payload)


def _raw_answer(op: str, body: bytes) -> bytes | None:
    """The answer's JSON inside a reply body built by ``nodes.sandbox.usercode``
    (``{"result":...,"generation":"v1"}``), or None if the body is not of that shape."""
    prefix = _PREFIX[op]
    end = body.rfind(b',"generation":')
    if not body.startswith(prefix) or end < len(prefix):
        return None
    return body[len(prefix):end]


def _value(raw: bytes) -> Any:
    """JSON ``raw`` decoded, or its text when it is not JSON (a malformed body)."""
    return _decode(raw)[0]


def _decode(raw: bytes) -> tuple[Any, bool]:
    """(JSON ``raw`` decoded, False), or (its text, True) when it is not JSON."""
    try:
        return _JSON.decode(raw), False
    except (msgspec.DecodeError, RecursionError):
        return raw.decode("utf-8", "replace"), True


def answer_of(op: str, body: bytes, paths: list[str]) -> Any:
    """The answer in a successful reply body (without the generation that made it),
    with ``paths`` removed: what a capture stores and what replay compares."""
    value = _value(body)
    if not isinstance(value, dict):
        return value
    answer = value.get(_ANSWER.get(op, "response"))
    if paths:
        for item in answer if op == "multi" and isinstance(answer, list) else [answer]:
            redact(item, paths)
    return answer


# -- reading -----------------------------------------------------------------------------

@dataclass
class Captures:
    """What ``read_captures`` found: entries oldest first, with their stream sequence."""

    entries: list[tuple[int, CapturedCall]]
    more: bool = False  # stopped at the limit with more matching entries after
    timed_out: bool = False
    unreadable: int = 0  # entries that did not decode (a newer writer, a damaged one)


async def read_captures(nc: NATS, service: str, *, since: float | None = None,
                        generation: str | None = None, endpoint: str | None = None,
                        limit: int = 100, timeout: float = 10.0) -> Captures:
    """Captured calls of ``service`` from ``since`` on (seconds since the epoch; None:
    the oldest kept), of one generation and endpoint if given, at most ``limit``, read
    with an ordered consumer filtered by subject and ended after ``timeout`` seconds in
    any case."""
    js = nc.jetstream()
    found = Captures(entries=[])
    try:
        await js.stream_info(subjects.CAPTURE_STREAM)
    except nats.js.errors.NotFoundError:
        return found
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
    if since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = dt.datetime.fromtimestamp(since, dt.UTC)
    else:
        config.deliver_policy = DeliverPolicy.ALL
    filter_subject = (subjects.capture(service, endpoint) if endpoint
                      else subjects.captures_of(service))
    send, recv = anyio.create_memory_object_stream[Msg](256)

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(msg)

    with anyio.move_on_after(timeout) as scope:
        sub = await js.subscribe(filter_subject, stream=subjects.CAPTURE_STREAM, cb=on_msg,
                                 ordered_consumer=True, config=config)
        try:
            consumer = await sub.consumer_info()
            delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
            if consumer.num_pending or delivered:
                async for msg in recv:
                    meta = msg.metadata
                    try:
                        call = CAPTURED_CALL.decode(msg.data)
                    except (msgspec.DecodeError, RecursionError):
                        found.unreadable += 1
                        call = None
                    if call is not None and (generation is None
                                             or call.generation == generation):
                        if len(found.entries) >= limit:
                            found.more = True
                            break
                        found.entries.append((meta.sequence.stream, call))
                    if meta.num_pending == 0:
                        break
        finally:
            send.close()
            recv.close()
            with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()
    found.timed_out = scope.cancelled_caught
    return found
