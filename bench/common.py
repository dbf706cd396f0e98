"""Shared benchmark plumbing: a NATS server, responder processes, stats, output."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import anyio

from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
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


async def wait_nodes(url: str, infra: str | None, n: int) -> None:
    """Wait (at most 2 min) until the Deployer lists ``n`` online nodes in ``infra``
    (``None``: in all infras); it may still be starting, so errors mean "not yet"."""
    nc = await connect(NatsSettings(servers=(url,)), name="bench-wait")
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
