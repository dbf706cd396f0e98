"""An API worker process: ``python -P -m nodes.api.worker FD`` (started by its node).

User code runs here, never in the node: a predict that raises becomes an error reply;
one that kills the process (a segfault, ``os._exit``) takes down only this worker, which
the node replaces.  The worker has its own NATS connection and serves the node's
services in their queue groups (``serving``), one request at a time, so a node with N
workers uses N cores; it loads generations in a thread, so serving goes on meanwhile.

Configuration comes in ``SHIPYARD_API_WORKER`` (JSON).  The worker reports its counters
every second, writes its busy-since clock to a shared page (the node kills a worker stuck
far past the request timeout), exits when the node closes the socket, and (Linux) when
the node dies.
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
import traceback
from pathlib import Path
from typing import Any

import anyio
import msgspec

from nodes.api import wire
from nodes.api.serving import Route, Serving
from nodes.api.usercode import Generation
from nodes.orphans import die_with_parent
from nodes.runtime.connection import connect
from nodes.runtime.logs import configure_logging, get_logger
from nodes.runtime.settings import NatsSettings
from protocol.api import ApiMapping

CONFIG_ENV = "SHIPYARD_API_WORKER"
STATS_INTERVAL = 1.0
_MAPPING = msgspec.json.Decoder(ApiMapping)


class Worker:
    def __init__(self, config: dict[str, Any], sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.index = int(config["index"])
        self.generations: dict[tuple[str, str], Generation] = {}
        self.serving: Serving | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.log = get_logger(component="api-worker", node=config["node"], worker=self.index)
        with open(config["busy_path"], "r+b") as f:
            self.busy_page = mmap.mmap(f.fileno(), wire.BUSY.size)

    def busy(self, since: float) -> None:
        wire.BUSY.pack_into(self.busy_page, 0, since)

    def send(self, items: list[Any]) -> None:
        assert self.writer is not None
        self.writer.write(wire.frame(items))

    async def run(self) -> None:
        c = self.config
        settings = NatsSettings(**c["nats"])
        nc = await connect(settings, name=f"api-worker:{c['node']}:{self.index}")
        self.serving = Serving(nc, node=c["node"], infra=c["infra"], worker=self.index,
                               max_body=int(c["max_body"]),
                               queue_timeout=float(c["queue_timeout"]),
                               debug=bool(c["debug"]), busy=self.busy)
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stats_loop)
                await self._control(reader, tg)
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
                await nc.drain()

    async def _control(self, reader: asyncio.StreamReader, tg: Any) -> None:
        while True:
            try:
                (n,) = wire.HEADER.unpack(await reader.readexactly(4))
                items = wire.decode(await reader.readexactly(n))
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the node closed the socket: exit
            for item in items:
                kind = item[0]
                if kind == wire.LOAD:
                    tg.start_soon(self._load, item)
                elif kind == wire.ROUTE:
                    await self._route(item)
                elif kind == wire.DRAIN:
                    assert self.serving is not None
                    await self.serving.drain()
                    self.send([[wire.DRAINED]])

    async def _load(self, item: list[Any]) -> None:
        _, service, name, directory, endpoints = item
        t0 = time.perf_counter()
        error = ""
        try:
            gen = await anyio.to_thread.run_sync(Generation, service, name, Path(directory),
                                                 endpoints)
            self.generations[(service, name)] = gen
        except Exception as exc:  # user code: report anything
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self.config.get("debug"):
                error += "\n" + traceback.format_exc()
        self.send([[wire.LOADED, service, name, error, time.perf_counter() - t0]])

    async def _route(self, item: list[Any]) -> None:
        _, service, mapping_json, kinds, description = item
        assert self.serving is not None
        error = ""
        try:
            mapping = _MAPPING.decode(mapping_json)
            loaded = {g: self.generations[(service, g)] for g in kinds}
            await self.serving.apply(service, Route.build(mapping, kinds, loaded), description)
            for key in [k for k in self.generations if k[0] == service and k[1] not in kinds]:
                del self.generations[key]  # left the route; nothing runs it (one at a time)
        except KeyError as exc:
            error = f"generation {exc} is not loaded in this worker"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.send([[wire.ROUTED, service, error]])

    async def _stats_loop(self) -> None:
        assert self.serving is not None
        s = self.serving
        while True:
            await anyio.sleep(STATS_INTERVAL)
            backlog = s.backlog()
            rows = [[k[0], k[1], k[2], k[3], st.requests, st.errors, st.latency_sum,
                     list(st.buckets)] for k, st in s.stats.items()]
            self.send([[wire.STATS, rows, [[k[0], k[1], n] for k, n in backlog.items()],
                        s.overloaded, s.shadow_mismatches]])


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
    sock = socket.socket(fileno=fd)
    worker = Worker(config, sock)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        anyio.run(worker.run, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
