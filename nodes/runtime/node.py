"""The Node base class every role builds on.

A node connects to NATS, serves its role's commands (``sy.cmd.<role>.>``, shared by
the role's instances in queue group ``<role>``) and its own node-direct commands
(``sy.node.<name>.>``), publishes heartbeats, and shuts down gracefully.

One place decides what happens to a request (``_handle``): decode, dispatch to the
handler registered for the body's type, encode the reply; a decode error or an
exception becomes a typed error reply and the node keeps serving.  One place decides
what happens to a message on a plain subscription (``subscribe_decoded``): decode,
validate, hand it on; a malformed one is dropped, counted and logged once per sender.

If the connection is closed for good (nats-py closes it when the server sends an error
while connected, such as "maximum control line exceeded"), ``serve`` raises
``ConnectionClosed`` and the process exits non-zero, so its supervisor restarts it; a
node that stayed up unable to talk would look alive to its supervisor and be lost to
everyone else.

Lifecycle (``serve``)::

    connect -> setup() -> subscribe -> started(tg) -> task_status.started()
            -> ... stop() ...
            -> stop intake -> stopping() -> wait for in-flight requests -> drain -> close

A role with one active instance (``leased``: Deployer, Govern) first waits as a standby
(heartbeats only) until it holds its role's lease (``nodes.runtime.lease``), then runs
``setup()`` and ``started(tg)`` before it subscribes to its commands, so it answers only
with its state loaded; a graceful stop releases the lease after ``stopping()``.  If the
lease is lost, everything is cancelled at once, the connection is closed undrained and
``serve`` raises ``LeaseLost``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import anyio
import msgspec
import nats.errors
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

import nodes
from nodes.auth.guard import verify_command
from nodes.runtime import natscompat
from nodes.runtime.audit import AuditRecorder
from nodes.runtime.calls import Caller
from nodes.runtime.connection import ConnectionClosed, ConnectionStats, close, connect
from nodes.runtime.inbound import Drops
from nodes.runtime.jetstream import ensure_events_stream, publish_event
from nodes.runtime.lease import POLL_S, Lease, LeaseLost, leases_js, open_lease_bucket
from nodes.runtime.logs import current_request, get_logger
from nodes.runtime.progress import ProgressNotices
from nodes.runtime.settings import NatsSettings
from nodes.runtime.workqueue import WorkQueue
from protocol import subjects
from protocol.audit import ERROR, NO_ARGS, OK, AuditEntry
from protocol.base import (
    Codec,
    Command,
    ErrorInfo,
    Family,
    Reply,
    Request,
    RequestId,
    encode,
    new_id,
    tag_of,
)
from protocol.errors import (
    BadRequest,
    DecodeError,
    Internal,
    InvalidMessage,
    OperationError,
    TooLarge,
)
from protocol.events import Event
from protocol.heartbeat import HEARTBEAT, MAX_INTERVAL_S, MIN_INTERVAL_S, Heartbeat
from protocol.leases import ACTIVE, STANDBY, LeaderChanged
from protocol.reports import REPORT, NodeExit
from protocol.state import NoState, RoleState
from protocol.system import SYSTEM, Echo, Echoed, Ping, Pong

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used: one ``times`` call, ~1 µs."""
    t = os.times()
    return round(t.user + t.system, 3)


def rss_bytes() -> int:
    """This process's resident memory now, from ``/proc/self/statm`` (~10 µs; procfs
    never blocks), else its peak (``getrusage``) where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
M = TypeVar("M")
Handler = Callable[[Any, Request[Any]], Awaitable[Any]]
Routes = dict[str, tuple[Family, type[Any], Handler | None]]

# Pending limits for command subscriptions: bounded, so a flood is dropped (and counted
# by the error callback) instead of growing memory without limit.
PENDING_MSGS = 20_000
PENDING_BYTES = 64 * 1024 * 1024
# Time budgets of the first attempts to load a new active instance's state (``_load``).
LOAD_BUDGETS_S = (1.0, 1.0, 1.0, 2.0)


def handles(command: type[Command[Any]]) -> Callable[[F], F]:
    """Mark a node method as the handler of ``command``.

    The method is called as ``await method(body, request)`` and returns the reply body;
    it raises an ``OperationError`` subclass to refuse.
    """

    def mark(fn: F) -> F:
        fn._sy_handles = command  # type: ignore[attr-defined]
        return fn

    return mark


_REQUEST_ID: Codec[RequestId] = Codec(RequestId)


def _request_id(request: Request[Any] | None, data: bytes) -> str | None:
    """The request id an error reply names: the decoded request's, else the id its bytes
    carry when only the rest was malformed, else None."""
    if request is not None:
        return request.id
    try:
        return _REQUEST_ID.decode(data).id
    except DecodeError:
        return None


class Node:
    """Base class of every role.  Subclasses set ``role`` (and ``family``) and add
    ``@handles`` methods; they may override ``setup``, ``started``, ``stopping`` and
    ``state``."""

    role: ClassVar[str] = "node"
    family: ClassVar[Family | None] = None
    direct_families: ClassVar[tuple[Family, ...]] = ()  # beside SYSTEM, on sy.node.<name>.>
    verifies_commands: ClassVar[bool] = False  # role commands must be signed (nodes.auth)
    # One active instance per role (``nodes.runtime.lease``): the others wait as standbys,
    # heartbeating but serving nothing, until the active one's lease is theirs.
    leased: ClassVar[bool] = False

    def __init__(
        self,
        *,
        name: str,
        nats: NatsSettings,
        infra: str = "default",
        heartbeat_interval: float = 2.0,
        max_concurrency: int = 256,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.name = subjects.token(name, "node name")
        self.infra = subjects.token(infra, "infra name")
        if not MIN_INTERVAL_S <= heartbeat_interval <= MAX_INTERVAL_S:
            raise ValueError(f"heartbeat interval {heartbeat_interval:g}s out of bounds: "
                             f"expected {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds")
        self.settings = nats
        self.heartbeat_interval = heartbeat_interval
        self.max_concurrency = max_concurrency
        self.shutdown_timeout = shutdown_timeout
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.instance = new_id()
        self.log = get_logger(node=self.name, role=self.role)
        self.conn_stats = ConnectionStats()
        self.requests_handled = 0
        self.requests_failed = 0
        self.drops = Drops(self.log)
        self.closed_reason: str | None = None
        self._t0 = time.monotonic()
        self._seq = 0
        self._handlers: dict[type[Any], Handler] = {}
        self._subs: list[Subscription] = []
        self._stop = anyio.Event()
        self._stopping = False
        self.stop_asked = False  # stop() was called (a lease lost stops it too, unasked)
        # Requests wait here (bounded) for one of ``max_concurrency`` worker tasks.
        self._queue: WorkQueue[tuple[Routes, int, Msg]] = WorkQueue(max_concurrency)
        self._busy = 0
        self._idle = anyio.Event()
        self._nc: NATS | None = None
        self._tg: TaskGroup | None = None
        self.ready = anyio.Event()
        self.lease: Lease | None = None
        self.lease_state = STANDBY if self.leased else ""  # "active" once it holds the lease
        self.lease_lost: str | None = None
        # Roles that verify commands record each one's fate in the audit ledger.
        self.audit = AuditRecorder(self.name, self.role, self.log) if (
            self.verifies_commands) else None
        self._direct_prefix = subjects.node_commands(self.name)[:-1]
        self.add_handlers(self)

    # -- properties subclasses use ------------------------------------------------------

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("node is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    @property
    def tg(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError("node is not serving")
        return self._tg

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._t0

    @property
    def inflight(self) -> int:
        """Requests being handled or waiting for a worker."""
        return self._busy + self._queue.qsize()

    @property
    def stopping_requested(self) -> bool:
        return self._stop.is_set()

    def caller(self) -> Caller:
        return Caller(self.nc, sender=self.name)

    def progress(self, req: Request[Any]) -> ProgressNotices:
        """The progress notices of ``req``, the request this handler is serving: they
        reach its requester on ``<reply>.progress`` (none when it has no reply subject)."""
        handling = current_request.get()
        reply = handling[2] if handling is not None and handling[1] == req.id else ""
        return ProgressNotices(self.nc, reply, self.log)

    def add_handlers(self, component: object) -> None:
        """Register the ``@handles`` methods of a component (call before ``serve``)."""
        for klass in reversed(type(component).__mro__):
            for attr, fn in vars(klass).items():
                command = getattr(fn, "_sy_handles", None)
                if command is not None:
                    self._handlers[command] = getattr(component, attr)

    # -- hooks for roles ---------------------------------------------------------------

    async def setup(self) -> None:
        """Create or open JetStream resources and load state.  Runs before subscribing."""

    async def started(self, tg: TaskGroup) -> None:
        """Start background work in ``tg``.  Runs after subscriptions exist."""

    async def stopping(self) -> None:
        """Intake has stopped: finish or hand off background work before the drain."""

    def disconnected(self) -> None:
        """The connection dropped (nats-py is reconnecting): fail fast what waits on it.

        Synchronous and quick: it runs inside nats-py's disconnect callback."""

    async def reconnected(self) -> None:
        """The connection came back: re-read state that a watch might have missed."""

    def state(self) -> RoleState:
        """Role-specific state carried in every heartbeat."""
        return NoState()

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the node to shut down gracefully (safe from signal handlers and tasks)."""
        self.stop_asked = True
        self._stopping = True
        self._stop.set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the node until ``stop()``; signal readiness once subscriptions exist."""
        structlog.contextvars.bind_contextvars(node=self.name, role=self.role)
        self._nc = await connect(self.settings, name=f"{self.role}:{self.name}",
                                 on_reconnect=self._on_reconnect, on_closed=self._on_closed,
                                 on_disconnect=self._on_disconnect,
                                 stats=self.conn_stats)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.leased:  # a standby heartbeats, and serves nothing
                    tg.start_soon(self._heartbeat_loop)
                    await self._await_lease()
                if self._stop.is_set():  # stopped while standby
                    if self.closed_reason is None:
                        await self._say_goodbye()
                    tg.cancel_scope.cancel()
                else:
                    await self._serve_active(tg, task_status)
        finally:
            self._stopping = True  # the close below is ours, not a connection loss
            if self.audit is not None:
                if self.audit.backlog and self.lease_lost is None:
                    self.log.warning("audit entries not appended before stopping",
                                     backlog=self.audit.backlog)
                self.audit.close()
            if self.lease_lost is not None:
                with anyio.move_on_after(1, shield=True):
                    # No drain: nothing more may leave this term.  Interest is withdrawn
                    # first, so the server stops routing commands here before the socket
                    # closes (a request in that gap would wait for its timeout).
                    await self._withdraw()
                    await self.nc.close()
            await close(self.nc)
            self.log.info("node stopped")
        if self.lease_lost is not None:
            raise LeaseLost(self.role, self.lease_lost)
        if self.closed_reason is not None:
            raise ConnectionClosed(self.settings.url, self.closed_reason)

    async def _serve_active(self, tg: TaskGroup, task_status: TaskStatus[None]) -> None:
        if self.audit is not None:
            self.audit.start(tg, self.js, self.settings.replicas)
        await self._load()
        for _ in range(self.max_concurrency):
            tg.start_soon(self._worker)
        if self.lease is None:
            await self._subscribe()
            await self.started(tg)
        else:  # a new active instance answers only once its state is loaded
            await self.started(tg)
            await self._subscribe()
        # Readiness means the server has every subscription, the role's too.
        await natscompat.flush(self.nc)
        if self.lease is None:
            tg.start_soon(self._heartbeat_loop)
        else:
            await self._announce_leader()
        self.log.info("node ready", infra=self.infra, nats=self.settings.url)
        self.ready.set()
        task_status.started()
        await self._stop.wait()
        if self.closed_reason is None and self.lease_lost is None:
            await self._shutdown(tg)
        else:  # nothing can be handed off or reported without a connection (or a lease)
            tg.cancel_scope.cancel()

    async def _load(self) -> None:
        """The event stream and ``setup()``.  A node that just took its role's lease
        retries them while JetStream cannot answer (the fault that moved the lease often
        moved a stream's leader too: an election takes seconds); its lease is renewed
        meanwhile, and losing it cancels this.  Other nodes fail, and are restarted.

        Each attempt has a budget (``LOAD_BUDGETS_S``, then doubling): one call waiting
        on a stream still in election would otherwise hold the attempt for the JetStream
        timeout (5 s; a snapshot's watch 10 s) even after the stream has a leader again.
        After a NATS server's SIGKILL the streams it led got new leaders 3-9.5 s later,
        one after another, and a Deployer that took the lease as soon as the lease
        stream had one lost 5.3-5.5 s in such a wait after 6 kills out of 7, before its
        second attempt loaded everything in 0.1-0.2 s.  A load with no fault takes
        0.1-0.3 s here.
        """
        delay, budgets, budget = 0.1, list(LOAD_BUDGETS_S), 0.0
        while True:
            budget = budgets.pop(0) if budgets else min(budget * 2, 60.0)
            try:
                if self.lease is None:
                    await self._load_once()
                    return
                with anyio.fail_after(budget):
                    await self._load_once()
                return
            except (nats.errors.Error, TimeoutError) as exc:
                if self.lease is None:
                    raise
                self.log.warning("state not loaded yet (JetStream not answering); retrying",
                                 error=str(exc) or type(exc).__name__, budget_s=budget)
            await anyio.sleep(delay)

    async def _load_once(self) -> None:
        await ensure_events_stream(self.js, self.settings.replicas)
        await self.setup()

    # -- the lease (roles with one active instance) -----------------------------------

    async def _await_lease(self) -> None:
        """Wait as a standby until this instance holds the role's lease (or a stop)."""
        async with anyio.create_task_group() as race:
            async def acquire() -> None:
                self.lease = await self._open_lease()
                await self.lease.acquire()
                race.cancel_scope.cancel()

            async def stopped() -> None:
                await self._stop.wait()
                race.cancel_scope.cancel()

            race.start_soon(acquire)
            race.start_soon(stopped)
        if self.lease is not None and self.lease.revision is not None \
                and not self._stop.is_set():
            self.lease_state = ACTIVE
            self.tg.start_soon(self.lease.hold, self._on_lease_lost)

    async def _open_lease(self) -> Lease:
        """The role's lease, once JetStream answers (a new cluster elects its leaders
        first; retried every poll until it does: a holder starting over after an
        election must be back before a standby has watched the key for a TTL)."""
        while True:
            try:
                kv, ttl = await open_lease_bucket(self.nc, replicas=self.settings.replicas)
                return Lease(kv, js=leases_js(self.nc), role=self.role, node=self.name,
                             instance=self.instance, ttl=ttl)
            except (nats.errors.Error, TimeoutError) as exc:
                self.log.warning("lease bucket not available yet; retrying",
                                 error=str(exc) or type(exc).__name__)
            await anyio.sleep(POLL_S)

    def _on_lease_lost(self, reason: str) -> None:
        """Stop acting now: cancel every handler and loop of this term; ``serve`` then
        raises ``LeaseLost`` (``run_node`` exits, or starts a standby over)."""
        self.lease_lost = reason
        self.lease_state = STANDBY
        self._stop.set()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _announce_leader(self) -> None:
        assert self.lease is not None and self.lease.revision is not None
        await self.beat_now()  # the registry shows this instance active at once
        if self.lease.reclaimed:  # the role never left this instance: no leader change
            return
        await self.emit(LeaderChanged(role=self.role, node=self.name, instance=self.instance,
                                      term=self.lease.revision, previous=self.lease.previous))

    async def _on_closed(self) -> None:
        """nats-py closed the connection: for good, unless we are stopping."""
        if self._stopping:
            return
        reason = str(self.nc.last_error or "") or "closed by the client library"
        self.log.error("NATS connection closed for good: exiting so a supervisor restarts "
                       "this node", error=reason)
        self.closed_reason = reason
        self._stop.set()

    async def _withdraw(self) -> None:
        """Unsubscribe every command subscription and flush, so the server has dropped
        this node's interest when this returns (best effort: the connection may be gone).
        Messages already delivered to a callback are still handled."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                self.log.debug("unsubscribe failed", error=str(exc))
        self._subs.clear()
        if self.nc.is_connected:
            try:
                await natscompat.flush(self.nc, timeout=1)
            except Exception as exc:
                self.log.debug("flush after unsubscribe failed", error=str(exc))

    async def _shutdown(self, tg: TaskGroup) -> None:
        self.log.info("shutting down", inflight=self.inflight)
        await self._withdraw()  # stop intake
        with anyio.move_on_after(self.shutdown_timeout) as scope:
            await self.stopping()
            if self.inflight:
                await self._idle.wait()
        if scope.cancelled_caught:
            self.log.warning("shutdown timeout: abandoning in-flight work", inflight=self.inflight)
        if self.audit is not None:  # every answered command's entry, in the ledger (bounded)
            await self.audit.flush()
        await self._say_goodbye()
        if self.lease is not None:
            await self.lease.release()
        tg.cancel_scope.cancel()

    async def _on_disconnect(self) -> None:
        try:
            self.disconnected()
        except Exception:
            self.log.exception("disconnect hook failed")

    async def _on_reconnect(self) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._run_reconnected)

    async def _run_reconnected(self) -> None:
        try:
            await self.reconnected()
        except Exception:
            self.log.exception("reconnect hook failed")

    # -- plain subscriptions -------------------------------------------------------------

    async def subscribe_decoded(
        self,
        subject: str,
        codec: Codec[M],
        handler: Callable[[M], Awaitable[None]],
        *,
        validate: Callable[[M, str], None] | None = None,
        kind: str = "message",
        sender: Callable[[str], str] | None = None,
        queue: str = "",
        pending_msgs_limit: int = PENDING_MSGS,
        pending_bytes_limit: int = PENDING_BYTES,
    ) -> Subscription:
        """Subscribe to ``subject`` and call ``await handler(message)`` with each message
        that decodes with ``codec`` and passes ``validate(message, msg.subject)`` (which
        raises ``InvalidMessage`` or ``ValueError`` to refuse).

        A message that fails either is dropped, counted under ``kind`` in ``self.drops``
        (and in the heartbeat's ``dropped``) and logged once per sender (``sender`` maps
        a subject to one; the default is the subject itself).  Nothing the handler raises
        escapes the callback.  The subscription's pending buffer is bounded by the
        limits, and it is unsubscribed when the node stops.
        """
        who = sender or (lambda s: s)

        async def on_msg(msg: Msg) -> None:
            try:
                value = codec.decode(msg.data, msg.subject)
                if validate is not None:
                    validate(value, msg.subject)
            except (DecodeError, InvalidMessage) as exc:
                self.drops.drop(kind, who(msg.subject), msg.subject, exc.reason)
                return
            except ValueError as exc:
                self.drops.drop(kind, who(msg.subject), msg.subject, str(exc))
                return
            try:
                await handler(value)
            except Exception as exc:
                self.drops.drop(f"{kind} (handler failed)", who(msg.subject), msg.subject,
                                f"{type(exc).__name__}: {exc}")

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_msg,
                                      pending_msgs_limit=pending_msgs_limit,
                                      pending_bytes_limit=pending_bytes_limit)
        self.add_subscription(sub)
        return sub

    def add_subscription(self, sub: Subscription) -> None:
        """Have ``sub`` unsubscribed when the node stops taking work."""
        self._subs.append(sub)

    # -- requests ----------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """Role commands (shared in queue group ``<role>``) and node-direct commands."""
        groups: list[tuple[str, str, tuple[Family, ...]]] = [
            (subjects.node_commands(self.name), "", (SYSTEM, *self.direct_families))]
        if self.family is not None:
            groups.append((subjects.role_commands(self.family.role), self.family.role,
                           (self.family,)))
        for subject, queue, families in groups:
            callback = self._make_callback(families, len(subject) - 1)
            sub = await self.nc.subscribe(subject, queue=queue, cb=callback,
                                          pending_msgs_limit=PENDING_MSGS,
                                          pending_bytes_limit=PENDING_BYTES)
            self.add_subscription(sub)

    def _make_callback(self, families: tuple[Family, ...],
                       prefix_len: int) -> Callable[[Msg], Awaitable[None]]:
        """The subscription callback: hand the message to the worker pool.

        Routes (verb -> family, body type, handler) are resolved once, here, not per
        message.  When the queue is full the callback waits, and further messages wait
        in the subscription's own bounded pending buffer.  The fast path does not yield,
        so a burst is queued in one go and the replies leave in few writes.
        """
        routes: Routes = {verb: (family, cls, self._handlers.get(cls))
                          for family in families for verb, cls in family.verbs.items()}
        queue = self._queue

        async def on_msg(msg: Msg) -> None:
            item = (routes, prefix_len, msg)
            if not queue.put_nowait(item):
                await queue.put(item)

        return on_msg

    async def _worker(self) -> None:
        """One of ``max_concurrency`` long-lived request workers (in the node's task
        group).  A pool costs less per request than a task per request."""
        get = self._queue.get
        while True:
            routes, prefix_len, msg = await get()
            self._busy += 1
            try:
                await self._handle(routes, prefix_len, msg)
            finally:
                self._busy -= 1
                if self._stopping and not self._busy and self._queue.empty():
                    self._idle.set()

    async def _handle(self, routes: Routes, prefix_len: int, msg: Msg) -> None:
        """The one place that decides what happens to a request: decode, dispatch, reply.

        A role that sets ``verifies_commands`` (Deployer, Govern) refuses here, before any
        handler, a role command that is not signed by an identity that may send it
        (``nodes.auth.guard``: a ``forbidden`` error), and records every role command's
        fate, accepted or refused, in the audit ledger (``nodes.runtime.audit``: never
        waits).  Every failure becomes a typed error reply; nothing here can stop the node.
        """
        verb = msg.subject[prefix_len:]
        current_request.set((msg.subject, "", msg.reply))
        request: Request[Any] | None = None
        signer: str | None = None
        error: ErrorInfo | None = None
        try:
            route = routes.get(verb)
            if route is None:
                raise BadRequest(f"{self.role} node {self.name} has no command {verb!r} "
                                 f"(known: {', '.join(sorted(routes))})")
            family, expected, handler = route
            try:
                request = family.requests.decode(msg.data, msg.subject)
                current_request.set((msg.subject, request.id, msg.reply))
            except DecodeError as exc:
                raise BadRequest(
                    f"malformed {verb!r} request: {exc.reason}; expected a JSON request "
                    f"envelope {{\"id\", \"ts\", \"body\": {{\"type\": {verb!r}, ...}}}}"
                ) from exc
            body = request.body
            if type(body) is not expected:
                raise BadRequest(f"body type {tag_of(type(body))!r} sent to verb {verb!r}")
            if handler is None:
                raise BadRequest(f"{self.role} node {self.name} does not handle {verb!r}")
            if self.verifies_commands and not family.direct:
                verified = await verify_command(self, msg.subject, msg.data, expected)
                signer = verified.name if verified is not None else None
            result = await handler(body, request)
            data = encode(Reply(ok=result, re=request.id))
            limit = self.nc.max_payload
            if len(data) > limit:  # publishing it would fail: the caller would only time out
                raise TooLarge(f"the reply to {verb!r} is {len(data)} bytes, over the NATS "
                               f"server's max_payload of {limit} bytes: ask for less (for "
                               "example with filters)")
            self.requests_handled += 1
        except OperationError as exc:
            self.requests_failed += 1
            if exc.code == "internal":
                self.log.error("request failed", subject=msg.subject, error=exc.message)
            error = ErrorInfo(code=exc.code, message=exc.message, details=exc.details)
            data = encode(Reply(error=error, re=_request_id(request, msg.data)))
        except Exception as exc:
            self.requests_failed += 1
            self.log.exception("handler raised", subject=msg.subject)
            err = Internal(f"{type(exc).__name__}: {exc}")
            error = ErrorInfo(code=err.code, message=err.message)
            data = encode(Reply(error=error, re=_request_id(request, msg.data)))
        if self.audit is not None and not msg.subject.startswith(self._direct_prefix):
            self._record(msg.subject, verb, request, signer, error)
        try:
            if msg.reply:
                await self.nc.publish(msg.reply, data)
        except Exception as exc:  # the requester is gone, or we are offline
            self.log.warning("reply not sent", subject=msg.subject, error=str(exc))

    def _record(self, subject: str, verb: str, request: Request[Any] | None,
                signer: str | None, error: ErrorInfo | None) -> None:
        """Hand one command's fate to the audit ledger (never waits, never raises)."""
        assert self.audit is not None
        try:
            reason = error.details.get("reason") if error and error.details else None
            self.audit.record(AuditEntry(
                id=new_id(), ts=time.time(), node=self.name, role=self.role,
                subject=subject, command=verb,
                request_id=request.id if request is not None else None,
                identity=signer or (request.identity if request is not None else None),
                verified=signer is not None,
                args=msgspec.Raw(encode(request.body)) if request is not None else NO_ARGS,
                outcome=OK if error is None else ERROR,
                error_code=error.code if error else None,
                error=error.message if error else None,
                reason=reason if isinstance(reason, str) else None))
        except Exception:
            self.log.exception("audit entry not recorded", subject=subject)

    @handles(Ping)
    async def _ping(self, cmd: Ping, req: Request[Any]) -> Pong:
        return Pong(node=self.name, role=self.role, version=nodes.__version__,
                    uptime_s=self.uptime)

    @handles(Echo)
    async def _echo(self, cmd: Echo, req: Request[Any]) -> Echoed:
        return Echoed(payload=cmd.payload)

    # -- heartbeats and events ---------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        self._seq += 1
        return Heartbeat(
            node=self.name, role=self.role, infra=self.infra, version=nodes.__version__,
            host=self.host, pid=self.pid, uptime_s=round(self.uptime, 3),
            interval_s=self.heartbeat_interval, seq=self._seq, ts=time.time(),
            state=self.state(), instance=self.instance,
            dropped=self.drops.total + (self.audit.dropped if self.audit else 0),
            cpu_s=cpu_seconds(), rss_bytes=rss_bytes(),
        )

    async def _beat(self) -> None:
        try:
            await self.nc.publish(subjects.heartbeat(self.role, self.name),
                                  HEARTBEAT.encode(self.heartbeat()))
        except Exception as exc:
            self.log.warning("heartbeat not sent", error=str(exc) or type(exc).__name__)

    async def beat_now(self) -> None:
        """Send a heartbeat at once (after a state change the registry should see now)."""
        await self._beat()

    async def _say_goodbye(self) -> None:
        """Tell the registry this process ended on purpose, so it need not wait 3 beats."""
        report = NodeExit(node=self.name, role=self.role, infra=self.infra, pid=self.pid,
                          reason="stopped", instance=self.instance)
        try:
            await self.nc.publish(report.subject(), REPORT.encode(report))
        except Exception as exc:
            self.log.debug("exit report not sent", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        # Scheduled on a fixed grid, so beats don't drift later under load.
        start = time.monotonic()
        n = 0
        while True:
            await self._beat()
            n += 1
            delay = start + n * self.heartbeat_interval - time.monotonic()
            if delay < 0:  # fell behind (a blocked loop would show here): re-anchor
                start, n = time.monotonic(), 0
                delay = self.heartbeat_interval
            await anyio.sleep(delay)

    async def emit(self, event: Event) -> None:
        """Store an event in the event stream (retried, deduplicated by its id)."""
        await publish_event(self.js, event)
