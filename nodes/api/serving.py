"""Serving API services over NATS, inside a worker process.

Every worker of every API node runs one nats.micro service per API service; each
endpoint subscribes ``sy.api.v1.<service>.<endpoint>`` in queue group ``<service>``, so
adding a node (or a worker) anywhere adds capacity and a request crosses no extra hop:
NATS hands it to the process that runs the user code.

Per request, when it arrives (``_accept``): check its size; if the worker's queue would
make it wait longer than ``queue_timeout`` (at the recent service time), hand it back to
the node (``pass_on``: it gives it to an idle worker, holds it while workers start, or
sheds it as ``overloaded``); else queue it (bounded) and tell its requester "queued,
starts within N s" (``<reply>.working`` with N in the body), which holds the gateway's
hedged copy back.  The queue runs one request at a time (``run``), in order; between two,
the event loop gets a few turns, so what arrived while user code held it is taken in and
announced, and the requesters of those still waiting hear again.  Measured on a 10x step
load: copying requests that merely waited behind a busy worker kept p99 in seconds for
~10 s; announced, they are not copied (bench/RESULTS.md, "Autoscaling").
Per request, when it runs: check its shape, pick the generation (forced, sticky by
dispatch key, or by weight), run the user code (here, or in the user-code host of the
generation's code environment: ``hosts``), reply, and only then run a shadow copy and,
when the service captures calls and this one is sampled, queue it for the worker's
``capture.Capturer`` (an append; it is published between requests).
A worker runs one request at a time, so a generation that leaves the route has no
request in flight: it is dropped at once.  micro counts requests as they are taken in
(its processing time is that of taking them in; ``stats`` has the real latencies).  While user code
runs, the worker's busy page names the request's reply subject: if the worker dies, its
node answers that request (it is not retried: it may be what killed the worker).  A
``MemoryError`` (the worker's memory limit) fails that request alone, and the worker then
retires (``on_memory_error``): its node replaces it with a fresh process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import Endpoint, EndpointStats, Service, ServiceConfig

import nodes
from nodes.api.capture import Capturer, Pending
from nodes.api.metrics import Stat
from nodes.api.usercode import (
    OP_MULTI,
    OP_PREDICT,
    OP_RUN,
    Failed,
    Runnable,
    same_result,
)
from nodes.api.wire import BusyPage, Serve
from nodes.runtime import natscompat
from nodes.runtime.logs import get_logger
from nodes.sandbox.tracebacks import user_traceback
from protocol import subjects
from protocol.api import (
    DISPATCH_HEADER,
    GENERATION_HEADER,
    OP_HEADER,
    ApiMapping,
    http_status,
    micro_error,
    pick_generation,
    queued_notice,
)
from protocol.api import (
    OP_MULTI as MULTI_VALUE,
)
from protocol.base import NESTED_TOO_DEEPLY
from protocol.capture import LATENCY_HEADER, REPLAY_HEADER, REQUEST_ID_HEADER, CaptureSettings

PREDICT_SHAPE = ('expected {"features": {...}} with optional "dispatch_key" and '
                 '"generation"')
MULTI_SHAPE = ('expected {"items": [{"features": {...}}, ...]} with optional '
               '"dispatch_key" and "generation"')


class PredictBody(msgspec.Struct, frozen=True):
    features: msgspec.Raw
    dispatch_key: str | None = None
    generation: str | None = None


class Item(msgspec.Struct, frozen=True):
    features: msgspec.Raw


class MultiBody(msgspec.Struct, frozen=True):
    items: list[Item]
    dispatch_key: str | None = None
    generation: str | None = None


_PREDICT = msgspec.json.Decoder(PredictBody)
_MULTI = msgspec.json.Decoder(MultiBody)


@dataclass(frozen=True)
class EndpointRoute:
    kind: str
    weights: list[tuple[str, int]]  # generations that have the endpoint, weight > 0
    generations: dict[str, Runnable]  # every loaded generation (live or shadow) with it
    shadow: Runnable | None


@dataclass(frozen=True)
class Route:
    """One service's mapping as the request path needs it (replaced, never changed)."""

    mapping: ApiMapping
    endpoints: dict[str, EndpointRoute]
    capture: CaptureSettings | None = None  # None: nothing is captured

    @classmethod
    def build(cls, mapping: ApiMapping, kinds: dict[str, dict[str, str]],
              loaded: dict[str, Runnable], capture: CaptureSettings | None = None) -> Route:
        """``kinds``: generation -> {endpoint: kind}; ``loaded``: generation -> code."""
        endpoints = {}
        for name in sorted({e for eps in kinds.values() for e in eps}):
            have = {g: loaded[g] for g, eps in kinds.items() if name in eps}
            weights = [(g, w) for g, w in sorted(mapping.generations.items())
                       if w > 0 and g in have]
            kind = next(kinds[g][name] for g in sorted(have))
            shadow = have.get(mapping.shadow) if mapping.shadow else None
            endpoints[name] = EndpointRoute(kind=kind, weights=weights, generations=have,
                                            shadow=shadow)
        return cls(mapping=mapping, endpoints=endpoints,
                   capture=capture if capture is not None and capture.on else None)


Handler = Callable[[str, bytes, "dict[str, str] | None"], Awaitable[None]]

MAX_QUEUE = 1000  # requests waiting in one worker, whatever the shedding estimate says
MAX_QUEUE_BYTES = 64 * 1024 * 1024  # and their bodies (nats-py's own per-subscription cap)
NOTICE_EVERY = 0.1  # a queued request's requester hears again this often (< retry floor)
COLD_SERVICE_TIME = 0.25  # what a request is taken to last before one has been timed
# Event loop turns between two requests: a request that arrived while user code held the
# loop goes socket -> reader task -> subscription task -> ``accept`` (its notice queued)
# -> flusher task (the notice sent), one turn each; without them it would wait a second
# request's time unannounced (and be copied).  At most once every SETTLE_EVERY: a turn
# per request cut a no-op endpoint's throughput to a third (bench ``api_nats``), and
# between requests that fast nothing waits unannounced for long anyway.
SETTLE_TURNS = 4
SETTLE_EVERY = 0.005
SOON_S = 0.02  # a request expected to start within this is not announced as queued


@dataclass(eq=False, slots=True)
class Waiting:
    """A request taken into the worker's queue (or handed over by its node)."""

    service: str
    endpoint: str
    reply: str
    data: bytes
    headers: dict[str, str] | None


@dataclass(eq=False)
class ServiceServer:
    name: str
    route: Route
    micro: Service | None = None
    micro_endpoints: dict[str, Endpoint] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)


class Serving:
    def __init__(self, nc: NATS, *, node: str, infra: str, worker: int, max_body: int,
                 queue_timeout: float, debug: bool, busy: BusyPage,
                 memory_mb: int | None = None,
                 on_memory_error: Callable[[], None] | None = None,
                 capturer: Capturer | None = None,
                 pass_on: Callable[[Waiting], None] | None = None) -> None:
        self.nc = nc
        self.node = node
        self.infra = infra
        self.worker = worker
        self.max_body = max_body
        self.queue_timeout = queue_timeout
        self.debug = debug
        self.busy = busy
        self.memory_mb = memory_mb
        self.on_memory_error = on_memory_error
        self.capturer = capturer
        self.out_of_memory = False
        self.services: dict[str, ServiceServer] = {}
        self.stats: dict[tuple[str, str, str, bool], Stat] = {}
        self.overloaded = 0
        self.shadow_mismatches = 0
        self.service_time = 0.0  # recent mean seconds per request (for shedding)
        self.pass_on = pass_on  # hands a request this worker cannot take to its node
        self.passed_on = 0
        self.queue: deque[Waiting] = deque()  # taken in, not started (first in, first run)
        self.queued_bytes = 0
        self.running = False
        self._wake = asyncio.Event()  # the queue has something
        self._empty = asyncio.Event()  # the queue is empty and nothing runs
        self._empty.set()
        self._renewed = 0.0
        self._settled = 0.0
        self._random = random.random
        self.log = get_logger(component="serving", worker=worker)

    def stat(self, service: str, endpoint: str, generation: str, shadow: bool = False) -> Stat:
        key = (service, endpoint, generation, shadow)
        s = self.stats.get(key)
        if s is None:
            s = self.stats[key] = Stat()
        return s

    def backlog(self) -> dict[tuple[str, str], int]:
        """Requests received and not started, per (service, endpoint)."""
        out = {}
        for server in self.services.values():
            for name, ep in server.micro_endpoints.items():
                sub = natscompat.endpoint_subscription(ep)
                out[(server.name, name)] = sub.pending_msgs if sub else 0
        for w in self.queue:
            key = (w.service, w.endpoint)
            out[key] = out.get(key, 0) + 1
        return out

    def expected_wait(self) -> float:
        """Seconds before a request taken in now would start, at the recent service
        time (what shedding compares with ``queue_timeout``)."""
        return self.service_time * (len(self.queue) + self.running)

    def promise(self, position: int) -> float:
        """The wait told to the requester of the request at ``position``: twice the
        expected one (service times vary; a copy of a request that waits as long as
        expected is a wasted run), plus the time to the next notice.  Before the
        first request has been timed, ``COLD_SERVICE_TIME`` a request."""
        per = self.service_time or COLD_SERVICE_TIME
        return 2 * per * (position + self.running) + NOTICE_EVERY

    # -- routes -------------------------------------------------------------------------

    async def apply(self, service: str, route: Route, description: str) -> None:
        """Serve ``route`` from now on; start the micro service or add endpoints first."""
        server = self.services.get(service)
        if server is None:
            server = self.services[service] = ServiceServer(name=service, route=route)
        server.route = route
        if server.micro is None:
            version = nodes.__version__
            server.micro = await add_service(self.nc, ServiceConfig(
                name=service, version=version if _semver(version) else "0.0.0",
                description=description or f"shipyard API service {service}",
                queue_group=subjects.api_queue_group(service),
                metadata=self._metadata(route), stats_handler=self._stats(server)))
        else:
            natscompat.set_service_metadata(server.micro, self._metadata(route))
        for name, ep in route.endpoints.items():
            if name not in server.micro_endpoints:
                server.handlers[name] = self._handler(server, name)
                await server.micro.add_endpoint(
                    name=name, subject=subjects.api_endpoint(service, name),
                    handler=_from_micro(self._accept(server, name)),
                    metadata={"kind": ep.kind})
                server.micro_endpoints[name] = natscompat.micro_endpoints(server.micro)[-1]
        await natscompat.flush(self.nc)

    def _metadata(self, route: Route) -> dict[str, str]:
        return {"node": self.node, "worker": str(self.worker), "infra": self.infra,
                "generations": route.mapping.describe()}

    def _stats(self, server: ServiceServer) -> Callable[[EndpointStats], Any]:
        def data(stats: EndpointStats) -> dict[str, Any]:
            ep = server.route.endpoints.get(stats.name)
            return {"kind": ep.kind if ep else "",
                    "generations": sorted(ep.generations) if ep else [],
                    "node": self.node, "worker": self.worker}
        return data

    async def drain(self) -> None:
        """Leave every queue group; requests already received are still answered (this
        returns once they are)."""
        for server in self.services.values():
            for ep in server.micro_endpoints.values():
                sub = natscompat.endpoint_subscription(ep)
                if sub is not None:
                    try:
                        await sub.drain()  # type: ignore[no-untyped-call]  # unannotated in nats-py
                    except Exception as exc:
                        self.log.warning("drain failed", error=str(exc) or type(exc).__name__)
        await self._empty.wait()

    # -- the queue ----------------------------------------------------------------------

    async def run(self) -> None:
        """Run the queued requests one at a time, first in first run; between two, tell
        the requesters of those still waiting that they wait (``NOTICE_EVERY``)."""
        while True:
            if not self.queue:
                self._empty.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                now = time.monotonic()
                settle = now - self._settled >= SETTLE_EVERY  # user code held the loop
                if settle:
                    self._settled = now
                    await _turns(SETTLE_TURNS)  # take in what arrived meanwhile, tell them
                await self._renew()
                w = self.queue.popleft()
                self.queued_bytes -= len(w.data)
                self.busy.set_queued(len(self.queue))
                self.running = True
                if settle:
                    await _turns(1)  # the notices leave before user code holds the loop
                server = self.services.get(w.service)
                handler = server.handlers.get(w.endpoint) if server is not None else None
                if handler is None:
                    await self._fail(None, w.reply, "not_found", f"{w.service} serves no "
                                     f"endpoint {w.endpoint!r} in this worker")
                else:
                    await handler(w.reply, w.data, w.headers)
            except Exception:  # a publish that failed: that request times out, no other
                self.log.exception("serving a queued request failed")
            finally:
                self.running = False

    def _enqueue(self, w: Waiting, *, first: bool = False) -> None:
        if first:
            self.queue.appendleft(w)
        else:
            self.queue.append(w)
        self.queued_bytes += len(w.data)
        self.busy.set_queued(len(self.queue))
        self._empty.clear()
        self._wake.set()

    async def _renew(self) -> None:
        now = time.monotonic()
        if now - self._renewed < NOTICE_EVERY or not self.queue:
            return
        self._renewed = now
        publish = self.nc.publish
        for i, w in enumerate(list(self.queue)):
            await publish(subjects.api_working(w.reply), queued_notice(self.promise(i)))

    # -- requests -----------------------------------------------------------------------

    async def serve(self, request: Serve) -> None:
        """A request that came through the node (a hedged copy, or one another worker
        of the node could not take): it goes first, since it has waited already."""
        server = self.services.get(request.service)
        if server is None or request.endpoint not in server.handlers:
            await self._fail(None, request.reply, "not_found", f"{request.service} "
                             f"serves no endpoint {request.endpoint!r} in this worker")
            return
        if len(self.queue) >= MAX_QUEUE or \
                self.queued_bytes + len(request.data) > MAX_QUEUE_BYTES:
            self.overloaded += 1
            await self._fail(server.micro_endpoints.get(request.endpoint), request.reply,
                             "overloaded", overloaded_message(self.queue_timeout))
            return
        self._enqueue(Waiting(request.service, request.endpoint, request.reply,
                              request.data, request.headers), first=True)

    def _accept(self, server: ServiceServer, name: str) -> Handler:
        """What the endpoint's queue-group subscription calls: take the request into the
        queue and tell its requester so (it is not hedged while it waits); one that would
        wait more than ``queue_timeout`` goes to the node (``pass_on``: another worker
        may be idle, or about to start) or, without one, is shed (``overloaded``)."""
        service = server.name

        async def accept(reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            if not reply:
                return None
            if len(data) > self.max_body:
                return await self._fail(server.micro_endpoints.get(name), reply,
                                        "too_large", f"request body of {len(data)} bytes "
                                        f"is over the limit of {self.max_body}")
            wait = self.expected_wait()
            w = Waiting(service, name, reply, data, headers)
            if wait > self.queue_timeout or len(self.queue) >= MAX_QUEUE or \
                    self.queued_bytes + len(data) > MAX_QUEUE_BYTES:
                if self.pass_on is not None:
                    self.passed_on += 1
                    self.pass_on(w)
                    return None
                self.overloaded += 1
                return await self._fail(server.micro_endpoints.get(name), reply,
                                        "overloaded", overloaded_message(self.queue_timeout))
            # No notice for a request that starts at once or all but (a fast endpoint
            # under load would pay one publish per request): the renewals cover it if
            # it waits after all.  Before the first timing, always one.
            soon = wait < SOON_S and (self.service_time > 0 or
                                      (not self.queue and not self.running))
            self._enqueue(w)
            if not soon:
                await self.nc.publish(subjects.api_working(reply),
                                      queued_notice(self.promise(len(self.queue) - 1)))
            return None

        return accept

    def _handler(self, server: ServiceServer, name: str) -> Handler:
        service = server.name
        publish = self.nc.publish
        page = self.busy

        async def handle(reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            micro_ep = server.micro_endpoints.get(name)
            ep = server.route.endpoints.get(name)
            if ep is None:
                return await self._fail(micro_ep, reply, "not_found", f"no generation "
                                        f"of {service} serves endpoint {name!r} here")
            if len(data) > self.max_body:
                return await self._fail(micro_ep, reply, "too_large", f"request body of "
                                        f"{len(data)} bytes is over the limit of "
                                        f"{self.max_body}")
            forced = key = None
            multi = replay = False
            if headers:
                forced = headers.get(GENERATION_HEADER)
                key = headers.get(DISPATCH_HEADER)
                multi = headers.get(OP_HEADER) == MULTI_VALUE
                replay = REPLAY_HEADER in headers
            payload: Any
            if ep.kind == "prediction":
                try:
                    if multi:
                        mb = _MULTI.decode(data)
                        payload = [bytes(i.features) for i in mb.items]
                        key, forced, op = key or mb.dispatch_key, forced or mb.generation, \
                            OP_MULTI
                    else:
                        pb = _PREDICT.decode(data)
                        payload = pb.features
                        key, forced, op = key or pb.dispatch_key, forced or pb.generation, \
                            OP_PREDICT
                except (msgspec.DecodeError, RecursionError) as exc:
                    why = NESTED_TOO_DEEPLY if isinstance(exc, RecursionError) else exc
                    return await self._fail(micro_ep, reply, "bad_request",
                                            f"malformed request: {why}; "
                                            f"{MULTI_SHAPE if multi else PREDICT_SHAPE}")
            else:
                payload, op = data, OP_RUN
            if forced:
                gen = ep.generations.get(forced)
                if gen is None:
                    return await self._fail(micro_ep, reply, "not_found", f"generation "
                                            f"{forced!r} of {service} does not serve {name!r} "
                                            f"here (serving {server.route.mapping.describe()})")
            elif ep.weights:
                gen = ep.generations[pick_generation(ep.weights, key, self._random())]
            else:
                return await self._fail(micro_ep, reply, "not_found", f"no live generation "
                                        f"of {service} serves endpoint {name!r}")
            t0 = time.perf_counter()
            page.start(time.monotonic(), reply)
            status, body = self._run(gen, name, op, payload)
            page.stop()
            if status == 0 and len(body) > self.nc.max_payload - REPLY_HEADROOM:
                message = too_large_result(len(body), self.nc.max_payload)
                status, body = http_status("bad_result"), ("bad_result", message)
            elapsed = time.perf_counter() - t0
            self.service_time += (elapsed - self.service_time) * 0.2 if self.service_time \
                else elapsed
            if not replay:  # a replay's answers are the replay's: not the service's traffic
                self.stat(service, name, gen.name).observe(elapsed, status != 0)
            extra = {LATENCY_HEADER: f"{elapsed:.6f}"} if replay else None
            if status == 0:
                await publish(reply, body, headers=extra)
            else:
                code, message = body
                await self._fail(micro_ep, reply, code, message, extra)
            capture = server.route.capture
            if capture is not None and not replay and self.capturer is not None:
                rid = self.capturer.sample(capture, headers.get(REQUEST_ID_HEADER)
                                           if headers else None)
                if rid is not None:
                    self.capturer.offer(Pending(
                        capture, rid, service, name, gen.name, op, payload,
                        status or 200, body, elapsed, time.time(),
                        len(data) + (len(body) if status == 0 else 256)))
            if ep.shadow is not None and status == 0:
                self._shadow(service, name, ep.shadow, op, payload, body)
            if self.out_of_memory and self.on_memory_error is not None:
                self.on_memory_error()
            return None

        return handle

    def _run(self, gen: Runnable, name: str, op: int, payload: Any) -> tuple[int, Any]:
        try:
            return 0, gen.call(name, op, payload)
        except Failed as exc:
            return http_status(exc.code), (exc.code, exc.message)
        except MemoryError:
            self.out_of_memory = True
            limit = f"its limit of {self.memory_mb} MB" if self.memory_mb else "memory"
            return 500, ("user_code", f"MemoryError: the request ran the worker out of "
                                      f"{limit}; the worker is replaced")
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self.debug:
                message += "\n" + user_traceback(exc)
            return http_status("user_code"), ("user_code", message)

    def _shadow(self, service: str, name: str, gen: Runnable, op: int, payload: Any,
                primary: bytes) -> None:
        t0 = time.perf_counter()
        self.busy.start(time.monotonic(), "")  # nobody waits for a shadow's reply
        status, body = self._run(gen, name, op, payload)
        self.busy.stop()
        self.stat(service, name, gen.name, shadow=True).observe(time.perf_counter() - t0,
                                                                status != 0)
        if status != 0 or not same_result(body, primary):
            self.shadow_mismatches += 1

    async def _fail(self, micro_ep: Endpoint | None, reply: str, code: str, message: str,
                    extra: dict[str, str] | None = None) -> None:
        if micro_ep is not None:  # micro counts only raised errors: count answered ones
            natscompat.count_endpoint_error(micro_ep, f"{code}: {message}")
        body, headers = micro_error(code, message)
        await self.nc.publish(reply, body, headers={**headers, **extra} if extra else headers)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


REPLY_HEADROOM = 1024  # bytes of a reply's payload limit kept for its headers


def too_large_result(size: int, max_payload: int) -> str:
    """The message of a result too large to send back over NATS (its requester would
    otherwise wait out its deadline)."""
    return (f"the result is {size} bytes, over the NATS server's largest message "
            f"({max_payload} bytes, max_payload, less {REPLY_HEADROOM} for headers): "
            "return less, or raise max_payload on the server")


def overloaded_message(queue_timeout: float) -> str:
    """The message of an ``overloaded`` answer (from a worker or its node)."""
    return ("the node is at its limit: the request would wait more than "
            f"{queue_timeout:g}s for a worker")


def _from_micro(handler: Handler) -> Callable[[MicroRequest], Awaitable[None]]:
    async def handle(request: MicroRequest) -> None:
        await handler(natscompat.request_reply(request), request.data, request.headers)
    return handle


def _semver(version: str) -> bool:
    parts = version.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)
