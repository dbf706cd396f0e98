"""Shared benchmark plumbing: a NATS server, responder processes, stats, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from nodes.auth.registry import publish_identities
from nodes.auth.store import ADMIN, AuthStore
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings, split_servers
from protocol.registry import ListNodes

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def nats_server() -> Iterator[EmbeddedNats]:
    with tempfile.TemporaryDirectory(prefix="sy-bench-") as tmp:
        server = EmbeddedNats(Path(tmp) / "js", port=-1, monitor_port=None)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@dataclass(frozen=True)
class AuthServer:
    """A nats-server with auth on and the directory of its identities."""

    server: EmbeddedNats
    store: AuthStore

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def admin(self) -> str:
        return str(self.store.creds_path(ADMIN))

    def creds(self, name: str) -> str:
        return str(self.store.creds_path(name))


@contextmanager
def auth_server(nodes: Sequence[tuple[str, str, str | None]] = ()) -> Iterator[AuthServer]:
    """A nats-server configured as ``shipyard up`` configures it: the identities of
    ``shipyard auth init`` plus a node identity per ``(name, role, infra)`` in ``nodes``,
    every one its own NATS user with its role's permissions, and the identities published
    for verifiers.  Load generators connect with ``.admin``, node processes with
    ``.creds(name)``."""
    with tempfile.TemporaryDirectory(prefix="sy-bench-auth-") as tmp:
        store = AuthStore(Path(tmp) / "auth")
        store.init()
        for name, role, infra in nodes:
            store.add(name, kind="node", role=role, infra=infra)
        server = EmbeddedNats(Path(tmp) / "js", port=-1, monitor_port=None,
                              config_file=store.server_config)
        server.start()
        try:
            auth = AuthServer(server, store)
            anyio.run(_publish_identities, auth)
            yield auth
        finally:
            server.stop()


async def _publish_identities(auth: AuthServer) -> None:
    nc = await connect(settings(auth.url, auth.admin), name="bench-admin")
    try:
        await publish_identities(nc, auth.store.identities())
    finally:
        await close(nc)


def settings(url: str, creds: str | None = None) -> NatsSettings:
    """Connection settings for ``url`` (one server, or a cluster's comma-separated list),
    as the identity of ``creds`` when given."""
    return NatsSettings(servers=split_servers(url), creds_file=creds)


@contextmanager
def processes(argvs: Sequence[Sequence[str]], ready_line: str | None = "READY",
              timeout: float = 30.0) -> Iterator[list[subprocess.Popen[str]]]:
    """Start helper processes and wait until each prints ``ready_line`` (``None``: don't
    wait; the caller checks readiness its own way)."""
    out = subprocess.PIPE if ready_line is not None else subprocess.DEVNULL
    procs = [subprocess.Popen(list(a), stdout=out, stderr=subprocess.DEVNULL,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for a in argvs]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            if ready_line is None:
                continue
            assert p.stdout is not None
            line = p.stdout.readline()
            if ready_line not in line or time.monotonic() > deadline:
                raise RuntimeError(f"helper {p.args} did not start: {line!r}")
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_us(latencies_s: Sequence[float]) -> dict[str, float]:
    us = [x * 1e6 for x in latencies_s]
    return {"p50_us": round(percentile(us, 50), 1), "p99_us": round(percentile(us, 99), 1),
            "mean_us": round(statistics.fmean(us), 1) if us else float("nan")}


def median_each(runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """The median of each metric over ``runs`` (each metric on its own)."""
    return {m: round(statistics.median(r[m] for r in runs), 3) for m in metrics}


def within(metric: str, ratio: float, tolerance: float) -> bool:
    """Whether ratio on/off of ``metric`` costs at most ``tolerance``: throughput
    (``rps*``) no lower, the others (latency, CPU) no higher."""
    return ratio >= 1 - tolerance if metric.startswith("rps") else ratio <= 1 + tolerance


def auth_comparison(off: Sequence[dict[str, Any]], on: Sequence[dict[str, Any]],
                    metrics: Sequence[str], tolerance: float) -> dict[str, Any]:
    """Auth off against auth on: the median of each metric, the ratio on/off, and
    whether auth costs at most ``tolerance`` (``rps*``: throughput, no lower; the
    others: latency, no higher).  ``off[i]`` and ``on[i]`` are one round.  The runs
    themselves are kept, to show the spread."""
    a, b = median_each(off, metrics), median_each(on, metrics)
    ratio = {m: round(b[m] / a[m], 3) for m in metrics}
    # Runs i of each mode ran back to back: the median of their ratios is less exposed to
    # load that drifts between rounds than the ratio of medians (reported, not judged).
    paired = {m: round(statistics.median(y[m] / x[m] for x, y in zip(off, on, strict=True)), 3)
              for m in metrics}
    ok = {m: within(m, ratio[m], tolerance) for m in metrics}
    return {"off": a, "on": b, "ratio": ratio, "paired_ratio": paired, "within": ok,
            "runs": {"off": list(off), "on": list(on)}}


def pid_of(server: EmbeddedNats) -> int | None:
    """The pid of an embedded nats-server process (None when it is not running)."""
    return server.proc.pid if server.proc is not None else None


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (0.0 when ``pid`` is None or
    the process is gone), read from ``/proc/PID/stat``."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int | None, cpus: set[int]) -> None:
    """Run every thread of process ``pid`` on ``cpus`` only (the threads it starts later
    inherit it).  No-op for None or a process that is gone."""
    if pid is None:
        return
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for task in tasks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib,
            "python": platform.python_version(), "os": platform.platform()}


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))


def write_json(name: str, result: dict[str, Any]) -> Path:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


async def wait_nodes(url: str, infra: str | None, n: int, creds: str | None = None) -> None:
    """Wait (at most 2 min) until the Deployer lists ``n`` online nodes in ``infra``
    (``None``: in all infras); it may still be starting, so errors mean "not yet"."""
    nc = await connect(settings(url, creds), name="bench-wait")
    caller = Caller(nc, sender="bench")
    try:
        with anyio.fail_after(120):
            while True:
                try:
                    reply = await caller.call(ListNodes(infra=infra, status="online"), timeout=5)
                    if len(reply.nodes) >= n:
                        return
                except Exception:
                    pass
                await anyio.sleep(0.1)
    finally:
        await nc.close()
