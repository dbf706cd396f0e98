"""Replaying captured calls against another version of a service, and comparing.

The mechanism is the forced generation of the ordinary request path: each captured
request is sent again on ``sy.api.v1.<service>.<endpoint>`` with ``Sy-Generation: V``
and ``Sy-Replay``, from the caller's own connection, so the answer comes back to the
caller's inbox alone and never reaches a client.  The version must be loaded on the
service's API nodes: live, as the shadow, or with weight 0, which loads it without
sending it any traffic (``shipyard deploy api SVC --split v1=100,v2=0``); a version that
is not loaded is refused before anything is sent, with that command in the message.
Live traffic shares the nodes with the replay, so it is paced (``rate`` requests per
second, a few in flight at most) and a replayed request is never captured itself.  The
worker that runs a replayed request puts its own running time in the reply
(``Sy-Latency``), so replayed latencies compare with captured ones (both measured in
the worker, without the network nor the queue).

A captured request whose fields were redacted is sent without them (the captured copy
is all there is): the report counts those, since their answers may differ for that
reason alone.  The same fields are removed from the new answer before it is compared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from nodes.api.capture import answer_of
from nodes.auth.permissions import REPLAY_ROLE
from nodes.runtime.connection import PublishDenied
from nodes.runtime.requests import requester
from protocol import subjects
from protocol.api import ERROR_CODE_HEADER, GENERATION_HEADER, OP_HEADER, OP_MULTI
from protocol.capture import LATENCY_HEADER, REPLAY_HEADER, CapturedCall
from protocol.errors import Forbidden

MAX_IN_FLIGHT = 8
MAX_EXAMPLES = 5
_encode = msgspec.json.Encoder().encode


@dataclass
class Replayed:
    """One captured call sent again, and what came back."""

    call: CapturedCall
    status: int | None = None  # None: no answer (timeout, nobody serves it)
    answer: Any = None
    latency_s: float | None = None  # in the worker (Sy-Latency)
    round_trip_s: float = 0.0
    error: str = ""
    same: bool = False

    def example(self) -> dict[str, Any]:
        c = self.call
        return {"id": c.id, "endpoint": c.endpoint, "request": msgspec.json.decode(c.request),
                "redacted": c.redacted,
                "captured": {"generation": c.generation, "status": c.status,
                             "answer": msgspec.json.decode(c.response)},
                "replayed": {"status": self.status, "answer": self.answer,
                             "error": self.error}}


@dataclass
class ReplayReport:
    service: str
    version: str
    results: list[Replayed] = field(default_factory=list)

    @property
    def differ(self) -> list[Replayed]:
        return [r for r in self.results if r.status is not None and not r.same]

    @property
    def unanswered(self) -> list[Replayed]:
        return [r for r in self.results if r.status is None]

    def summary(self) -> dict[str, Any]:
        rs = self.results
        captured = [r.call.latency_s for r in rs]
        replayed = [r.latency_s for r in rs if r.latency_s is not None]
        return {
            "service": self.service, "version": self.version, "replayed": len(rs),
            "same": sum(1 for r in rs if r.same), "differ": len(self.differ),
            "unanswered": len(self.unanswered),
            "redacted": sum(1 for r in rs if r.call.redacted),
            "latency_ms": {"captured": _percentiles(captured),
                           "replayed": _percentiles(replayed),
                           "replayed_round_trip": _percentiles([r.round_trip_s for r in rs
                                                               if r.status is not None])},
            "examples": [r.example() for r in self.differ[:MAX_EXAMPLES]],
            "unanswered_examples": [r.example() for r in self.unanswered[:MAX_EXAMPLES]],
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def at(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": at(0.5), "p99": at(0.99)}


def request_of(call: CapturedCall) -> tuple[bytes, dict[str, str]]:
    """The body and headers that send ``call``'s request again (without the forced
    generation)."""
    request = msgspec.json.decode(call.request)
    headers = {REPLAY_HEADER: "1"}
    if call.op == "predict":
        return _encode({"features": request}), headers
    if call.op == "multi":
        headers[OP_HEADER] = OP_MULTI
        items = request if isinstance(request, list) else []
        return _encode({"items": [{"features": f} for f in items]}), headers
    if call.text and isinstance(request, str):  # a body that was not JSON: as it came
        return request.encode(), headers
    return bytes(call.request), headers


def compare(call: CapturedCall, status: int, answer: Any) -> bool:
    """Whether a new answer is the captured one: the same status and answer, or for two
    failures the same status and error code (messages may name a process or a time)."""
    captured = msgspec.json.decode(call.response)
    if status != call.status:
        return False
    if status == 200:
        return bool(answer == captured)
    return bool(_code(answer) == _code(captured))


def _code(body: Any) -> Any:
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


async def replay_one(nc: NATS, call: CapturedCall, version: str, timeout: float) -> Replayed:
    """Send one call again; raises ``PublishDenied`` as soon as the NATS server refuses
    this identity the request (instead of waiting out ``timeout``)."""
    body, headers = request_of(call)
    headers[GENERATION_HEADER] = version
    out = Replayed(call=call)
    t0 = time.perf_counter()
    try:
        msg = await requester(nc).request(subjects.api_endpoint(call.service, call.endpoint),
                                          body, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        out.error = "no API node serves this endpoint"
        return out
    except nats.errors.TimeoutError:
        out.error = f"no answer within {timeout:g}s"
        return out
    out.round_trip_s = time.perf_counter() - t0
    hdrs = msg.headers or {}
    out.status = int(hdrs.get(ERROR_CODE_HEADER, 200))
    if LATENCY_HEADER in hdrs:
        try:
            out.latency_s = float(hdrs[LATENCY_HEADER])
        except ValueError:
            out.latency_s = None
    if out.status == 200:
        out.answer = answer_of(call.op, msg.data, call.redact)
    else:
        try:
            out.answer = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            out.answer = msg.data.decode("utf-8", "replace")
    out.same = compare(call, out.status, out.answer)
    return out


async def replay(nc: NATS, calls: list[CapturedCall], version: str, *, rate: float,
                 timeout: float = 10.0) -> ReplayReport:
    """Send every call again to ``version``, ``rate`` per second at most, in order of
    start; a report of what came back.  Raises ``Forbidden`` (and sends nothing more)
    when this identity may not send API requests."""
    report = ReplayReport(service=calls[0].service if calls else "", version=version)
    slots: list[Replayed | None] = [None] * len(calls)
    limiter = anyio.CapacityLimiter(max(1, min(MAX_IN_FLIGHT, int(rate) or 1)))
    start = time.monotonic()

    denied: list[PublishDenied] = []

    async def one(i: int, call: CapturedCall) -> None:
        async with limiter:
            try:
                slots[i] = await replay_one(nc, call, version, timeout)
            except PublishDenied as exc:
                denied.append(exc)
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, i, call)
    if denied:
        raise Forbidden(f"this identity may not send API requests (the NATS server refused "
                        f"a publish to {denied[0].subject}): replay needs a {REPLAY_ROLE} "
                        "or admin identity", details={"reason": "nats_permission"})
    report.results = [r for r in slots if r is not None]
    return report
