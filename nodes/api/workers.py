"""The API node's worker processes: started, told what to load and serve, watched.

Every worker serves the node's services in their queue groups by itself (``worker``);
the pool keeps what every worker must have (loaded generations, routes) and replays it
to a replacement before counting it ready.  Generations load in every worker at once,
each in a thread beside serving, so a deploy costs no request; the route switch comes
after every worker has loaded.  A worker that dies is replaced with backoff; one whose
request runs ``kill_grace`` past the request timeout is killed (its busy-since clock is
in a shared page, readable while its event loop is stuck in user code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from nodes.api import wire
from nodes.api.metrics import Metrics
from nodes.api.worker import CONFIG_ENV
from nodes.runtime.logs import get_logger
from nodes.runtime.settings import NatsSettings

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
NATS_FIELDS = ("servers", "creds_file", "nkey_seed_file", "user", "password", "token",
               "tls_ca_file", "tls_cert_file", "tls_key_file", "inbox_prefix",
               "connect_timeout")


class Worker:
    def __init__(self, index: int, busy_path: Path) -> None:
        self.index = index
        self.busy_path = busy_path
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.page: mmap.mmap | None = None
        self.ready = False
        self.retiring = False
        self.waiters: dict[tuple[Any, ...], asyncio.Future[str]] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, items: list[Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.frame(items))

    def busy_since(self) -> float:
        return wire.BUSY.unpack_from(self.page)[0] if self.page is not None else 0.0

    def expect(self, *key: Any) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters[key] = fut
        return fut


class WorkerPool:
    def __init__(self, size: int, *, nats: NatsSettings, node: str, infra: str,
                 run_dir: Path, metrics: Metrics, max_body: int, queue_timeout: float,
                 request_timeout: float, kill_grace: float, debug: bool) -> None:
        self.size = size
        self.run_dir = run_dir
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.kill_grace = kill_grace
        self.config = {
            "nats": {k: (list(v) if k == "servers" else v)
                     for k, v in asdict(nats).items() if k in NATS_FIELDS},
            "node": node, "infra": infra, "max_body": max_body,
            "queue_timeout": queue_timeout, "debug": debug}
        self.log = get_logger(component="workers")
        self.workers: list[Worker] = []
        self.generations: dict[tuple[str, str], list[Any]] = {}  # LOAD items, replayed
        self.routes: dict[str, list[Any]] = {}  # ROUTE items, replayed
        self.crashes = 0
        self._next = 0
        self._tg: Any = None
        self._lock = anyio.Lock()

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
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    for w in list(self.workers):
                        await self._close(w)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid]

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.busy_since())

    async def _spawn(self) -> Worker:
        index = self._next
        self._next += 1
        busy = self.run_dir / f"worker-{index}.busy"
        await anyio.Path(busy).write_bytes(wire.BUSY.pack(0.0))
        w = Worker(index, busy)
        config = dict(self.config, index=index, busy_path=str(busy))
        parent, child = socket.socketpair()
        try:
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", "nodes.api.worker", str(child.fileno()),
                    pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                    cwd=str(ROOT), start_new_session=True,
                    env={**os.environ, CONFIG_ENV: json.dumps(config)})
            finally:
                child.close()
            w.page = await anyio.to_thread.run_sync(_map, busy)
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
            for load in list(self.generations.values()):
                error = await self._ask(w, load, (wire.LOADED, load[1], load[2]))
                if error:
                    raise RuntimeError(f"could not load {load[1]} {load[2]}: {error}")
            for route in list(self.routes.values()):
                error = await self._ask(w, route, (wire.ROUTED, route[1]))
                if error:
                    raise RuntimeError(f"could not serve {route[1]}: {error}")
        except BaseException:
            await self._close(w)
            raise
        w.ready = True
        self.metrics.workers = len(self.workers)
        return w

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
        if w in self.workers:
            self.workers.remove(w)
        self.metrics.retire_worker(w.index)
        with contextlib.suppress(OSError):
            w.busy_path.unlink()

    async def drain(self, timeout: float) -> None:
        """Every worker leaves the queue groups and answers what it had received."""
        futures = []
        for w in self.workers:
            futures.append(w.expect(wire.DRAINED))
            w.send([[wire.DRAIN]])
        with anyio.move_on_after(timeout):
            for fut in futures:
                await fut

    # -- control ------------------------------------------------------------------------

    async def _ask(self, w: Worker, item: list[Any], key: tuple[Any, ...]) -> str:
        fut = w.expect(*key)
        w.send([item])
        return await fut

    async def _read(self, w: Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = wire.HEADER.unpack(await reader.readexactly(4))
                for item in wire.decode(await reader.readexactly(n)):
                    kind = item[0]
                    if kind == wire.STATS:
                        self.metrics.worker_stats(w.index, item[1], item[2], item[3], item[4])
                        continue
                    key: tuple[Any, ...] = ((kind, item[1], item[2]) if kind == wire.LOADED
                                            else (kind, item[1]) if kind == wire.ROUTED
                                            else (kind,))
                    fut = w.waiters.pop(key, None)
                    if fut is not None and not fut.done():
                        fut.set_result(item[3] if kind == wire.LOADED else
                                       item[2] if kind == wire.ROUTED else "")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:
            self.log.exception("worker stream failed", worker=w.index)
        await self._died(w)

    async def _died(self, w: Worker) -> None:
        code = None
        if w.proc is not None:
            with anyio.move_on_after(5):
                code = await w.proc.wait()
        for fut in w.waiters.values():
            if not fut.done():
                fut.set_result(f"the worker process died (exit code {code})")
        if w.retiring:
            return
        was_ready = w.ready
        await self._close(w)
        self.crashes += 1
        self.log.error("worker process died; replacing it", worker=w.index, pid=w.pid,
                       exit_code=code)
        if was_ready:
            self._tg.start_soon(self._replace)

    async def _replace(self) -> None:
        delay = 0.05
        while True:
            await anyio.sleep(delay)
            try:
                async with self._lock:
                    with anyio.fail_after(START_TIMEOUT + 60):
                        await self._spawn()
                return
            except Exception as exc:
                self.log.error("worker replacement failed; retrying", error=str(exc))
                delay = min(delay * 2, 5.0)

    async def _watchdog(self) -> None:
        while True:
            await anyio.sleep(0.1)
            now = time.monotonic()
            for w in list(self.workers):
                since = w.busy_since()
                if since and now - since > self.request_timeout + self.kill_grace:
                    self.log.error("killing a worker stuck in user code", worker=w.index,
                                   pid=w.pid, seconds=round(now - since, 1))
                    if w.page is not None:
                        wire.BUSY.pack_into(w.page, 0, 0.0)
                    with contextlib.suppress(ProcessLookupError):
                        if w.proc is not None:
                            w.proc.kill()

    # -- generations and routes ---------------------------------------------------------

    async def load(self, service: str, generation: str, directory: Path,
                   endpoints: list[list[str]], timeout: float = 300.0) -> str:
        """Load a generation in every worker (beside serving); "" or the first error."""
        item = [wire.LOAD, service, generation, str(directory), endpoints]
        async with self._lock:
            error = await self._broadcast(item, (wire.LOADED, service, generation), timeout,
                                          "loading")
            if not error:
                self.generations[(service, generation)] = item
            return error

    async def route(self, service: str, mapping_json: bytes, kinds: dict[str, dict[str, str]],
                    description: str, timeout: float = 30.0) -> str:
        """Switch every worker to the mapping; "" or the first error."""
        item = [wire.ROUTE, service, mapping_json, kinds, description]
        async with self._lock:
            error = await self._broadcast(item, (wire.ROUTED, service), timeout, "switching")
            self.routes[service] = item
            for key in [k for k in self.generations if k[0] == service and k[1] not in kinds]:
                del self.generations[key]
            return error

    async def _broadcast(self, item: list[Any], reply: tuple[Any, ...], timeout: float,
                         doing: str) -> str:
        """Send ``item`` to every ready worker and wait (bounded) for each one's ``reply``;
        "" or the first error.  The caller holds ``_lock``."""
        workers = [w for w in self.workers if w.ready]
        futures = [w.expect(*reply) for w in workers]
        for w in workers:
            w.send([item])
        errors = []
        with anyio.move_on_after(timeout) as scope:
            for fut in futures:
                errors.append(await fut)
        if scope.cancelled_caught:
            errors.append(f"{doing} did not finish within {timeout:g}s")
        return next((e for e in errors if e), "")


def _map(path: Path) -> mmap.mmap:
    with path.open("r+b") as f:
        return mmap.mmap(f.fileno(), wire.BUSY.size)

