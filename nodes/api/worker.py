"""An API worker process: ``python -P -m nodes.api.worker FD`` (started by its node).

User code runs here, never in the node: a predict that raises becomes an error reply;
a generation of a code environment runs in this worker's user-code host of that
environment's interpreter (``hosts``; ``wire.Load.python``), which lives and dies with
the worker.
one that kills the process (a segfault, ``os._exit``) takes down only this worker, which
the node replaces.  The worker has its own NATS connection and serves the node's
services in their queue groups (``serving``), one request at a time from its own bounded
queue, so a node with N workers uses N cores; a request it cannot take within the queue
timeout goes back to its node (``PassOn``); it loads generations in a thread, so
serving goes on meanwhile.

Configuration comes in ``SHIPYARD_API_WORKER`` (JSON).  The worker reports its counters
every second, writes its busy-since clock and the reply subject of the request it runs to
a shared page (``wire.BusyPage``), exits when the node closes the socket, and (Linux) when
the node dies.  With ``memory_mb`` its address space is capped (``RLIMIT_AS``, hard limit
too: the flow engine's recipe limit): an allocation past it raises ``MemoryError`` in
user code, which fails that request, and the worker then retires so that a fresh process
replaces it.  It leads its own process group: processes that user code starts are killed
with it by the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec

from nodes.api import wire
from nodes.api.capture import Capturer
from nodes.api.hosts import Host, HostError, RemoteGeneration
from nodes.api.serving import Route, Serving, Waiting
from nodes.api.usercode import Generation, Runnable
from nodes.orphans import die_with_parent
from nodes.runtime import natscompat
from nodes.runtime.connection import connect
from nodes.runtime.framing import FrameError, frame, read_frame
from nodes.runtime.logs import configure_logging, get_logger
from nodes.runtime.settings import NatsSettings
from nodes.sandbox.child import set_memory_limit
from nodes.sandbox.tracebacks import user_traceback
from protocol.api import ApiMapping
from protocol.capture import CaptureSettings

CONFIG_ENV = "SHIPYARD_API_WORKER"
STATS_INTERVAL = 1.0
_MAPPING = msgspec.json.Decoder(ApiMapping)
_CAPTURE = msgspec.json.Decoder(CaptureSettings)


class Worker:
    def __init__(self, config: dict[str, Any], sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.index = int(config["index"])
        self.generations: dict[tuple[str, str], Runnable] = {}
        self.hosts: dict[str, Host] = {}  # python -> its user-code host
        self._host_lock = anyio.Lock()
        self.serving: Serving | None = None
        self.capturer: Capturer | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.log = get_logger(component="api-worker", node=config["node"], worker=self.index)
        with open(config["busy_path"], "r+b") as f:
            self.page = wire.BusyPage(mmap.mmap(f.fileno(), wire.PAGE_SIZE))
        self.memory_mb: int | None = config.get("memory_mb") or None
        self.retiring = anyio.Event()

    def send(self, msg: wire.FromWorker) -> None:
        assert self.writer is not None
        if not self.writer.is_closing():  # closed: the node retired or replaced us
            self.writer.write(frame(msg))

    def memory_error(self) -> None:
        """User code ran out of memory: stop taking requests, then exit (replaced)."""
        if not self.retiring.is_set():
            self.log.error("out of memory in user code; retiring", limit_mb=self.memory_mb)
            self.send(wire.Retiring(reason=f"MemoryError (limit {self.memory_mb} MB)"))
            self.retiring.set()

    def pass_on(self, w: Waiting) -> None:
        """A request that would wait here past the queue timeout: the node gives it to
        another worker, holds it while workers start, or answers ``overloaded``."""
        self.send(wire.PassOn(service=w.service, endpoint=w.endpoint, reply=w.reply,
                              data=w.data, headers=w.headers))

    async def run(self) -> None:
        c = self.config
        settings = NatsSettings(**c["nats"])
        nc = await connect(settings, name=f"api-worker:{c['node']}:{self.index}")
        self.capturer = capturer = Capturer(
            partial(connect, settings, name=f"api-worker-capture:{c['node']}:{self.index}"),
            node=c["node"], worker=self.index)
        self.serving = Serving(nc, node=c["node"], infra=c["infra"], worker=self.index,
                               max_body=int(c["max_body"]),
                               queue_timeout=float(c["queue_timeout"]),
                               debug=bool(c["debug"]), busy=self.page,
                               memory_mb=self.memory_mb, on_memory_error=self.memory_error,
                               capturer=capturer, pass_on=self.pass_on)
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stats_loop)
                tg.start_soon(self.serving.run)
                tg.start_soon(capturer.run)
                tg.start_soon(self._retire)
                await self._control(reader, tg)
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
                await nc.drain()

    async def _retire(self) -> None:
        await self.retiring.wait()
        assert self.serving is not None
        await self.serving.drain()  # answer what this worker had received, then go
        with anyio.move_on_after(2), contextlib.suppress(Exception):
            await natscompat.flush(self.serving.nc)
        os._exit(0)  # the node sees the exit and starts a fresh worker

    async def _control(self, reader: asyncio.StreamReader, tg: Any) -> None:
        while True:
            try:
                msg = wire.decode_to_worker(await read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the node closed the socket: exit
            except (FrameError, msgspec.DecodeError) as exc:
                self.log.error("unreadable frame from the node; exiting", error=str(exc))
                return
            if isinstance(msg, wire.Serve):
                assert self.serving is not None
                await self.serving.serve(msg)
            elif isinstance(msg, wire.Load):
                tg.start_soon(self._load, msg)
            elif isinstance(msg, wire.Route):
                await self._route(msg)
            else:
                assert self.serving is not None
                await self.serving.drain()
                self.send(wire.Drained())

    async def _load(self, msg: wire.Load) -> None:
        t0 = time.perf_counter()
        error = ""
        try:
            gen: Runnable
            if msg.python:
                gen = await anyio.to_thread.run_sync(
                    RemoteGeneration.load, await self._host(msg.python), msg.service,
                    msg.generation, msg.directory, msg.endpoints)
            else:
                gen = await anyio.to_thread.run_sync(Generation, msg.service, msg.generation,
                                                     Path(msg.directory), msg.endpoints)
            self.generations[(msg.service, msg.generation)] = gen
        except HostError as exc:  # said by the host, as the worker would have said it
            error = str(exc)
        except Exception as exc:  # user code: report anything
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self.config.get("debug"):
                error += "\n" + user_traceback(exc)
        self.send(wire.Loaded(service=msg.service, generation=msg.generation, error=error,
                              seconds=time.perf_counter() - t0))

    async def _host(self, python: str) -> Host:
        """The user-code host of interpreter ``python``, started on first need."""
        async with self._host_lock:
            host = self.hosts.get(python)
            if host is None:
                host = Host(python, debug=bool(self.config.get("debug")))
                host.spawn()  # on this thread: see Host.spawn
                await anyio.to_thread.run_sync(host.ready)
                self.hosts[python] = host
            return host

    async def _route(self, msg: wire.Route) -> None:
        service, kinds = msg.service, msg.kinds
        assert self.serving is not None
        error = ""
        try:
            mapping = _MAPPING.decode(msg.mapping)
            capture = _CAPTURE.decode(msg.capture) if msg.capture else None
            loaded = {g: self.generations[(service, g)] for g in kinds}
            await self.serving.apply(service, Route.build(mapping, kinds, loaded, capture),
                                     msg.description)
            for key in [k for k in self.generations if k[0] == service and k[1] not in kinds]:
                gone = self.generations.pop(key)  # left the route; nothing runs it now
                if isinstance(gone, RemoteGeneration):
                    gone.close()
        except KeyError as exc:
            error = f"generation {exc} is not loaded in this worker"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.send(wire.Routed(service=service, error=error))

    async def _stats_loop(self) -> None:
        assert self.serving is not None and self.capturer is not None
        s, capturer = self.serving, self.capturer
        while True:
            await anyio.sleep(STATS_INTERVAL)
            rows = [wire.StatRow(k[0], k[1], k[2], k[3], st.requests, st.errors,
                                 st.latency_sum, list(st.buckets))
                    for k, st in s.stats.items()]
            backlog = [wire.Backlog(k[0], k[1], n) for k, n in s.backlog().items()]
            self.send(wire.Stats(rows=rows, backlog=backlog, overloaded=s.overloaded,
                                 shadow_mismatches=s.shadow_mismatches,
                                 captured=capturer.captured,
                                 capture_dropped=capturer.dropped))



def main() -> None:
    fd = int(sys.argv[1])
    die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # the node died before we could ask to follow it
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.dup2(2, 1)  # user code's prints go to the node's log
    config = json.loads(os.environ.pop(CONFIG_ENV))
    configure_logging(config.get("log_level"))
    set_memory_limit(config.get("memory_mb"))
    sock = socket.socket(fileno=fd)
    worker = Worker(config, sock)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        anyio.run(worker.run, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
