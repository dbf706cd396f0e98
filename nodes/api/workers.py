"""The API node's worker processes: started, told what to load and serve, watched.

Every worker serves the node's services in their queue groups by itself (``worker``);
the pool keeps what every worker must have (loaded generations, routes) and replays it
to a replacement.  Services are independent: each has its own lock, generations load in
every worker at once, each in a thread beside serving, so a deploy costs no request and
a slow ``load()`` of one service holds back no other (a replacement worker serves each
service as soon as that service is replayed); the route switch comes after every worker
has loaded.

The pool watches each worker's busy page (``wire.BusyPage``), readable while the
worker's event loop is stuck in user code:

* while a worker runs a request, the node tells the requester so (``<reply>.working``,
  every ``NOTICE_EVERY``), and the requester's hedged retry waits: a request that is
  being worked on is not sent again.  A stopped worker (SIGSTOP) gets no notices, so its
  requests are hedged;
* when a worker dies running a request (``os._exit``, a segfault, its memory limit), the
  node answers that request at once with a ``user_code`` error saying so; the request is
  not retried (it may be what killed the worker) and no other worker runs it;
* a worker whose request runs ``kill_grace`` past the request timeout is killed.

Hedged copies (``sy.api.v1.<service>.<endpoint>.hedge``) reach the node, not a worker:
it hands each to a worker that is neither stopped nor busy when it has one, so a retry
does not land in the queue of the worker that stalled.  A dead worker is replaced with
backoff; its process group (whatever user code started) is killed with it.

A request a worker cannot start within the queue timeout comes back to the node
(``wire.PassOn``): an idle worker gets it (first in its queue); while workers are
starting, or the autoscaler may still add some (``size < max_size``), the node holds it
(bounded, ``MAX_HELD``) up to the queue timeout, says "queued" to its requester meanwhile,
and hands held requests to workers as they are idle (a few each per watch); otherwise,
and for a node at its most workers at once, it answers ``overloaded``.  So a node that is
scaling up does not shed what its new workers will run within the queue timeout.

The pool keeps ``size`` workers (``_keep_size``): the autoscaler moves ``size`` between
the node's minimum and maximum (``scale_to``).  A worker added takes traffic only once
every service is replayed to it (``_spawn``), like a replacement; a worker retired
leaves the queue groups, answers what it had received and then exits (``_retire``), so
scaling down fails no request.  A crashed worker is one fewer than ``size``: replaced by
the same loop, with backoff when spawning fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from nodes.api import wire
from nodes.api.metrics import Metrics
from nodes.api.serving import overloaded_message
from nodes.api.worker import CONFIG_ENV
from nodes.runtime.framing import FrameError, frame, read_frame
from nodes.runtime.logs import get_logger
from nodes.runtime.loops import Backoff
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import micro_error, queued_notice

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
WATCH_EVERY = 0.05  # the busy pages are read this often
NOTICE_EVERY = 0.1  # a running request's requester hears so this often (< retry floor)
MAX_HELD = 1000  # requests the node holds for workers that start
MAX_HELD_BYTES = 64 * 1024 * 1024  # and their bodies
HAND_AT_ONCE = 4  # held requests given to one idle worker per watch
NATS_FIELDS = ("servers", "creds_file", "nkey_seed_file", "user", "password", "token",
               "tls_ca_file", "tls_cert_file", "tls_key_file", "inbox_prefix",
               "connect_timeout")


class Worker:
    def __init__(self, index: int, busy_path: Path) -> None:
        self.index = index
        self.busy_path = busy_path
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.page: wire.BusyPage | None = None
        self.ready = False  # every service replayed
        self.synced: set[str] = set()  # services this worker has (loads and route)
        self.retiring = False
        self.out_of_memory = ""
        self.noticed = 0.0  # when the running request's requester last heard of it
        self.dead = ""  # why, once its stream has ended: nothing more will be answered
        self.waiters: dict[tuple[str, ...], asyncio.Future[str]] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, msg: wire.ToWorker) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(frame(msg))

    def busy_since(self) -> float:
        return self.page.since() if self.page is not None else 0.0

    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP, a debugger): it runs nothing, whatever its page
        says."""
        if self.pid is None or not sys.platform.startswith("linux"):
            return False
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state in (b"T", b"t")

    def expect(self, *key: str) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.dead:
            fut.set_result(self.dead)
        else:
            self.waiters[key] = fut
        return fut


@dataclass(eq=False, slots=True)
class Held:
    """A request a worker passed on, waiting at the node for a worker to start."""

    request: wire.PassOn
    until: float  # answered ``overloaded`` if no worker took it by then
    noticed: float  # when its requester last heard of it


class WorkerPool:
    def __init__(self, size: int, *, nats: NatsSettings, node: str, infra: str,
                 run_dir: Path, metrics: Metrics, max_body: int, queue_timeout: float,
                 request_timeout: float, kill_grace: float, debug: bool,
                 memory_mb: int | None = None, max_size: int | None = None) -> None:
        self.size = size  # the workers kept: ready or starting (``scale_to`` moves it)
        self.max_size = max(size, max_size or size)  # what the autoscaler may go up to
        self.queue_timeout = queue_timeout
        self.run_dir = run_dir
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.kill_grace = kill_grace
        self.memory_mb = memory_mb
        self.config = {
            "nats": {k: (list(v) if k == "servers" else v)
                     for k, v in asdict(nats).items() if k in NATS_FIELDS},
            "node": node, "infra": infra, "max_body": max_body,
            "queue_timeout": queue_timeout, "debug": debug, "memory_mb": memory_mb}
        self.log = get_logger(component="workers")
        self.nc: NATS | None = None  # set by the node before ``run``
        self.workers: list[Worker] = []
        self.generations: dict[tuple[str, str], wire.Load] = {}  # replayed
        self.routes: dict[str, wire.Route] = {}  # replayed
        self.crashes = 0
        self.hedged = 0  # hedged copies handed to a worker
        self.died_running = 0  # requests answered for a worker that died running them
        self.passed_on = 0  # requests a worker could not take, given to another one
        self.held: deque[Held] = deque()  # passed on, waiting for a worker to start
        self.held_bytes = 0
        self._locks: dict[str, anyio.Lock] = {}
        self._hedge_subs: dict[str, Any] = {}
        self._next = 0
        self._tg: Any = None
        self._starting = 0  # spawns under way
        self._resized = anyio.Event()  # size changed, or a worker came or went
        self._spawn_backoff = Backoff(initial=0.05, cap=5.0)
        self._spawn_failed = False
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                with anyio.fail_after(START_TIMEOUT):
                    for _ in range(self.size):
                        await self._spawn()
                tg.start_soon(self._watchdog)
                tg.start_soon(self._keep_size)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    for w in list(self.workers):
                        await self._close(w)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid]

    @property
    def serving(self) -> list[Worker]:
        """Workers that take traffic: ready and not retiring."""
        return [w for w in self.workers if w.ready and not w.retiring]

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.busy_since())

    @property
    def queued(self) -> int:
        """Requests waiting: in the queues of the workers that serve (read from their
        pages now) and held here for a worker."""
        return sum(w.page.queued() for w in self.serving if w.page is not None) + \
            len(self.held)

    def _lock(self, service: str) -> anyio.Lock:
        lock = self._locks.get(service)
        if lock is None:
            lock = self._locks[service] = anyio.Lock()
        return lock

    async def _spawn(self) -> Worker:
        index = self._next
        self._next += 1
        busy = self.run_dir / f"worker-{index}.busy"
        await anyio.Path(busy).write_bytes(wire.BusyPage.blank())
        w = Worker(index, busy)
        config = dict(self.config, index=index, busy_path=str(busy))
        env = {**os.environ, CONFIG_ENV: json.dumps(config)}
        if self.memory_mb:  # per-thread malloc arenas reserve address space
            env.setdefault("MALLOC_ARENA_MAX", "2")
        parent, child = socket.socketpair()
        try:
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", "nodes.api.worker", str(child.fileno()),
                    pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                    cwd=str(ROOT), start_new_session=True, env=env)
            finally:
                child.close()
            w.page = wire.BusyPage(await anyio.to_thread.run_sync(_map, busy))
            reader, w.writer = await asyncio.open_unix_connection(sock=parent)
        except BaseException:
            parent.close()  # the transport did not take it over
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
                with anyio.CancelScope(shield=True):
                    await w.proc.wait()
            raise
        self.workers.append(w)
        self._tg.start_soon(self._read, w, reader)
        try:
            while True:  # a service deployed meanwhile is replayed too
                missing = sorted(({s for s, _ in self.generations} | set(self.routes))
                                 - w.synced)
                if not missing:
                    break
                errors: list[str] = []
                async with anyio.create_task_group() as tg:
                    for service in missing:
                        tg.start_soon(self._replay, w, service, errors)
                if errors:
                    raise RuntimeError(errors[0])
            if w.dead:
                raise RuntimeError(w.dead)
        except BaseException:
            await self._close(w)
            raise
        w.ready = True
        self.metrics.workers = len(self.workers)
        await self._hand_held()
        return w

    async def _replay(self, w: Worker, service: str, errors: list[str]) -> None:
        """Give ``w`` one service's loaded generations and route (under its lock, so no
        deploy of it passes ``w`` by meanwhile)."""
        async with self._lock(service):
            for (s, gen), load in list(self.generations.items()):
                if s == service:
                    error = await self._ask(w, load, ("loaded", service, gen))
                    if error:
                        errors.append(f"could not load {service} {gen}: {error}")
                        return
            route = self.routes.get(service)
            if route is not None:
                error = await self._ask(w, route, ("routed", service))
                if error:
                    errors.append(f"could not serve {service}: {error}")
                    return
            w.synced.add(service)

    async def _close(self, w: Worker) -> None:
        w.ready = False
        w.retiring = True
        if w.writer is not None:
            with contextlib.suppress(Exception):
                w.writer.close()
        if w.proc is not None and w.proc.returncode is None:
            with anyio.move_on_after(5):
                await w.proc.wait()
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        _kill_group(w)
        if w in self.workers:
            self.workers.remove(w)
        self.metrics.retire_worker(w.index)
        with contextlib.suppress(OSError):
            w.busy_path.unlink()

    async def drain(self, timeout: float) -> None:
        """Every worker leaves the queue groups and answers what it had received."""
        self._stopping = True
        self._resized.set()
        for sub in list(self._hedge_subs.values()):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._hedge_subs.clear()
        while self.held:
            h = self.held.popleft()
            self.held_bytes -= len(h.request.data)
            await self._shed(h.request)
        futures = []
        for w in self.workers:
            futures.append(w.expect("drained"))
            w.send(wire.Drain())
        with anyio.move_on_after(timeout):
            for fut in futures:
                await fut

    # -- control ------------------------------------------------------------------------

    async def _ask(self, w: Worker, msg: wire.ToWorker, key: tuple[str, ...]) -> str:
        fut = w.expect(*key)
        w.send(msg)
        return await fut

    async def _read(self, w: Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = wire.decode_from_worker(await read_frame(reader))
                if isinstance(msg, wire.Stats):
                    if w not in self.workers:  # closed: its counters are retired already
                        continue
                    self.metrics.worker_stats(
                        w.index, [list(msgspec.structs.astuple(r)) for r in msg.rows],
                        [[b.service, b.endpoint, b.waiting] for b in msg.backlog],
                        msg.overloaded, msg.shadow_mismatches)
                    self.metrics.capture_stats(w.index, msg.captured, msg.capture_dropped)
                    continue
                if isinstance(msg, wire.PassOn):
                    await self._passed_on(w, msg)
                    continue
                if isinstance(msg, wire.Retiring):
                    w.out_of_memory = msg.reason
                    continue
                key: tuple[str, ...]
                if isinstance(msg, wire.Loaded):
                    key, result = ("loaded", msg.service, msg.generation), msg.error
                elif isinstance(msg, wire.Routed):
                    key, result = ("routed", msg.service), msg.error
                else:
                    key, result = ("drained",), ""
                fut = w.waiters.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except (FrameError, msgspec.DecodeError) as exc:
            self.log.error("unreadable frame from a worker; replacing it", worker=w.index,
                           error=str(exc))
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
        except Exception:
            self.log.exception("worker stream failed", worker=w.index)
        await self._died(w)

    async def _died(self, w: Worker) -> None:
        code = None
        since, reply = w.page.read() if w.page is not None else (0.0, "")
        if w.proc is not None:
            with anyio.move_on_after(5):
                code = await w.proc.wait()
        _kill_group(w)
        w.dead = f"the worker process died ({_how(code)})"
        for fut in w.waiters.values():
            if not fut.done():
                fut.set_result(w.dead)
        if w.retiring:
            return
        if since and reply:
            await self._answer_for_dead(reply, code)
        was_ready = w.ready
        await self._close(w)
        self.crashes += 1
        if w.out_of_memory:
            self.log.warning("worker retired after running out of memory; replacing it",
                             worker=w.index, pid=w.pid, reason=w.out_of_memory)
        else:
            self.log.error("worker process died; replacing it", worker=w.index, pid=w.pid,
                           exit_code=code, running_request=bool(since))
        if was_ready:
            self._resized.set()  # one fewer than ``size``: replaced by ``_keep_size``

    async def _answer_for_dead(self, reply: str, code: int | None) -> None:
        """The worker died running the request with reply subject ``reply``: say so to
        whoever waits for it, now, instead of letting it time out and be retried."""
        self.died_running += 1
        message = (f"the worker process running this request died ({_how(code)}); the "
                   "request is not retried, since it may be what killed the worker")
        if self.nc is None:
            return
        try:
            body, headers = micro_error("user_code", message)
            await self.nc.publish(reply, body, headers=headers)
        except Exception as exc:  # the requester times out instead
            self.log.warning("could not answer for a dead worker", error=str(exc))

    # -- size ---------------------------------------------------------------------------

    def scale_to(self, size: int) -> None:
        """Keep ``size`` workers from now on: start or retire the difference."""
        if size < 1:
            raise ValueError(f"a pool of {size} workers: expected at least 1")
        self.size = size
        self._resized.set()

    async def _keep_size(self) -> None:
        """Start or retire workers until ``size`` of them serve or are starting."""
        while not self._stopping:
            await self._resized.wait()
            self._resized = anyio.Event()
            if self._stopping:
                return
            have = self._starting + len(self.serving)
            for _ in range(self.size - have):
                self._starting += 1
                self._tg.start_soon(self._grow)
            # Retire only what serves beyond ``size``, whatever is starting: a worker
            # still starting does not serve yet (and may fail), so retiring for it would
            # leave the queue groups short; once it serves, the surplus is retired.
            serving = self.serving
            surplus = len(serving) - self.size
            if surplus > 0:
                # Idle workers first, then the newest: they have the least warm caches.
                spare = sorted(serving, key=lambda w: (bool(w.busy_since()), -w.index))
                for w in spare[:surplus]:
                    w.retiring = True  # no hedged copy, no broadcast, no replacement
                    self._tg.start_soon(self._retire, w)

    async def _grow(self) -> None:
        """Start one worker for ``size`` (``_starting`` counts it already)."""
        try:
            if self._spawn_failed:
                await anyio.sleep(self._spawn_backoff.delay())
            with anyio.fail_after(START_TIMEOUT + 60):
                await self._spawn()
            self._spawn_failed = False
            self._spawn_backoff.reset()
        except Exception as exc:
            self._spawn_failed = True
            self.log.error("starting a worker failed; retrying", error=str(exc))
        finally:
            self._starting -= 1
            self._resized.set()

    async def _retire(self, w: Worker) -> None:
        """Take ``w`` out of service without failing a request: it leaves the queue
        groups, answers what it had received, then exits."""
        self.log.info("retiring a worker", worker=w.index, pid=w.pid)
        drained = w.expect("drained")
        w.send(wire.Drain())
        with anyio.move_on_after(self.request_timeout + self.kill_grace):
            await drained
        await self._close(w)
        self.metrics.workers = len(self.workers)
        self._resized.set()

    async def _watchdog(self) -> None:
        while True:
            await anyio.sleep(WATCH_EVERY)
            if self.held:
                await self._hand_held()
            now = time.monotonic()
            for w in list(self.workers):
                if w.page is None:
                    continue
                since, reply = w.page.read()
                if not since:
                    continue
                if now - since > self.request_timeout + self.kill_grace:
                    self.log.error("killing a worker stuck in user code", worker=w.index,
                                   pid=w.pid, seconds=round(now - since, 1))
                    w.page.stop()
                    with contextlib.suppress(ProcessLookupError):
                        if w.proc is not None:
                            w.proc.kill()
                elif (reply and now - max(since, w.noticed) >= NOTICE_EVERY
                      and self.nc is not None and not w.stopped()):
                    w.noticed = now
                    try:
                        await self.nc.publish(subjects.api_working(reply), b"")
                    except Exception as exc:
                        self.log.debug("working notice not sent", error=str(exc))

    # -- requests a worker passed on ----------------------------------------------------

    @property
    def growing(self) -> bool:
        """Whether workers are starting, or the autoscaler may still add some."""
        return self._starting > 0 or self.size < self.max_size

    def _idle(self, service: str, but: Worker | None = None) -> list[Worker]:
        """Workers that serve ``service`` and run nothing right now (nor are stopped)."""
        return [w for w in self.workers
                if w is not but and w.ready and not w.retiring and service in w.synced
                and w.page is not None and not w.page.since() and not w.page.queued()
                and not w.stopped()]

    async def _passed_on(self, w: Worker, msg: wire.PassOn) -> None:
        """``w`` cannot start ``msg`` within the queue timeout: an idle worker runs it;
        while workers start (or may be added) it waits here, at most the queue timeout,
        for one to be idle; else it is shed.  A node at its most workers sheds at once."""
        idle = self._idle(msg.service, but=w)
        if idle:
            self._hand(random.choice(idle), msg)
        elif self.growing and len(self.held) < MAX_HELD and \
                self.held_bytes + len(msg.data) <= MAX_HELD_BYTES:
            now = time.monotonic()
            self.held.append(Held(msg, now + self.queue_timeout, now))
            self.held_bytes += len(msg.data)
            await self._notice(msg.reply, self.queue_timeout)
        else:
            await self._shed(msg)

    def _hand(self, w: Worker, msg: wire.PassOn) -> None:
        self.passed_on += 1
        w.send(wire.Serve(service=msg.service, endpoint=msg.endpoint, reply=msg.reply,
                          data=msg.data, headers=msg.headers))

    async def _hand_held(self) -> None:
        """Give held requests to idle workers (a few each: they run them first), shed
        those that waited the queue timeout, and tell the others' requesters they
        still wait."""
        now = time.monotonic()
        while self.held and self.held[0].until <= now:
            h = self.held.popleft()
            self.held_bytes -= len(h.request.data)
            await self._shed(h.request)
        given: dict[Worker, int] = {}
        keep: deque[Held] = deque()
        idle: dict[str, list[Worker]] = {}
        waiting: list[Held] = []
        for h in self.held:  # no await in this loop: ``held`` may grow meanwhile
            service = h.request.service
            if service not in idle:
                idle[service] = self._idle(service)
            ws = [w for w in idle[service] if given.get(w, 0) < HAND_AT_ONCE]
            if ws:
                w = min(ws, key=lambda x: given.get(x, 0))
                given[w] = given.get(w, 0) + 1
                self.held_bytes -= len(h.request.data)
                self._hand(w, h.request)
                continue
            keep.append(h)
            if now - h.noticed >= NOTICE_EVERY:
                h.noticed = now
                waiting.append(h)
        self.held = keep
        for h in waiting:
            await self._notice(h.request.reply, h.until - now)

    async def _notice(self, reply: str, wait: float) -> None:
        if self.nc is not None:
            try:
                await self.nc.publish(subjects.api_working(reply), queued_notice(wait))
            except Exception as exc:
                self.log.debug("queued notice not sent", error=str(exc))

    async def _shed(self, msg: wire.PassOn) -> None:
        """Answer ``overloaded`` for a request no worker can take in time."""
        self.metrics.overloaded_at_node += 1
        if self.nc is None:
            return
        try:
            body, headers = micro_error("overloaded", overloaded_message(self.queue_timeout))
            await self.nc.publish(msg.reply, body, headers=headers)
        except Exception as exc:  # the requester times out instead
            self.log.warning("could not answer overloaded", error=str(exc))

    # -- hedged copies ------------------------------------------------------------------

    async def _hedge(self, msg: Msg) -> None:
        """A hedged copy: to a worker that is running, idle if one is, never stopped."""
        parts = msg.subject.split(".")
        if not msg.reply or len(parts) != 6:
            return
        service, endpoint = parts[3], parts[4]
        candidates = [w for w in self.workers
                      if service in w.synced and not w.retiring and not w.stopped()]
        if not candidates:
            return  # the requester's next copy goes to the queue group
        idle = [w for w in candidates if not w.busy_since()]
        w = random.choice(idle or candidates)
        self.hedged += 1
        w.send(wire.Serve(service=service, endpoint=endpoint, reply=msg.reply,
                          data=msg.data, headers=dict(msg.headers) if msg.headers else None))

    async def _serve_hedges(self, service: str) -> None:
        if self.nc is None or service in self._hedge_subs:
            return
        self._hedge_subs[service] = await self.nc.subscribe(
            subjects.api_hedges(service), queue=subjects.api_queue_group(service),
            cb=self._hedge, pending_msgs_limit=10_000)

    # -- generations and routes ---------------------------------------------------------

    async def load(self, service: str, generation: str, directory: Path,
                   endpoints: list[wire.EndpointCode], timeout: float = 300.0,
                   python: str = "") -> str:
        """Load a generation in every worker (beside serving); "" or the first error.
        ``python``: the interpreter of the generation's code environment (its user code
        runs in a host process of it, in each worker); "" runs it in the worker itself.
        A replacement worker is given the same ``Load``, so the same interpreter."""
        msg = wire.Load(service=service, generation=generation, directory=str(directory),
                        endpoints=endpoints, python=python)
        async with self._lock(service):
            error = await self._broadcast(service, msg, ("loaded", service, generation),
                                          timeout, "loading")
            if not error:
                self.generations[(service, generation)] = msg
            return error

    async def route(self, service: str, mapping_json: bytes, kinds: dict[str, dict[str, str]],
                    description: str, timeout: float = 30.0, capture: bytes = b"") -> str:
        """Switch every worker to the mapping (and ``capture``, CaptureSettings JSON);
        "" or the first error."""
        msg = wire.Route(service=service, mapping=mapping_json, kinds=kinds,
                         description=description, capture=capture)
        async with self._lock(service):
            error = await self._broadcast(service, msg, ("routed", service), timeout,
                                          "switching")
            self.routes[service] = msg
            for key in [k for k in self.generations if k[0] == service and k[1] not in kinds]:
                del self.generations[key]
            for w in self.workers:
                if w.ready:
                    w.synced.add(service)
        if not error:
            await self._serve_hedges(service)
        return error

    async def _broadcast(self, service: str, msg: wire.ToWorker, reply: tuple[str, ...],
                         timeout: float, doing: str) -> str:
        """Send ``msg`` to every worker that has ``service`` (or every service) and wait
        (bounded) for each one's ``reply``; "" or the first error.  The caller holds the
        service's lock."""
        workers = [w for w in self.workers
                   if (w.ready or service in w.synced) and not w.retiring]
        futures = [w.expect(*reply) for w in workers]
        for w in workers:
            w.send(msg)
        errors = []
        with anyio.move_on_after(timeout) as scope:
            for w, fut in zip(workers, futures, strict=True):
                error = await fut
                if not w.retiring:  # retired meanwhile: what it says no longer matters
                    errors.append(error)
        if scope.cancelled_caught:
            errors.append(f"{doing} did not finish within {timeout:g}s")
        return next((e for e in errors if e), "")


def _map(path: Path) -> mmap.mmap:
    with path.open("r+b") as f:
        return mmap.mmap(f.fileno(), wire.PAGE_SIZE)


def _kill_group(w: Worker) -> None:
    """Kill what user code started: the worker leads its own process group."""
    if w.pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.pid, signal.SIGKILL)


def _how(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
