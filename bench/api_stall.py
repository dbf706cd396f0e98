"""Workers that stall or die under load, as a client of the HTTP gateway sees them.

An API node with 2 workers serves the no-op endpoint to 16 concurrent HTTP clients
(httpx) for 6 s; after 1 s one worker is stopped (SIGSTOP) for 4 s.  Reported: how many
requests waited more than 0.5 s and 1 s, p50/p99/max, and errors.  NATS hands about half
of the requests to the stopped worker; the gateway's hedged copies must get them
answered by the other one, and on time.

Then requests whose user code kills its worker (``os._exit`` after 0.5 s, past the
0.25 s hedge): the status, the time to the answer, and how many workers died for each
(one is the target: such a request must not be run again elsewhere).
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.api_common import (
    SERVICE,
    api_node_argv,
    api_nodes,
    control_plane,
    deploy,
    package,
    served_http,
)
from bench.api_http import free_port
from bench.common import nats_server, print_table

CLIENTS = 16
BODY = {"features": {"x": 1}}


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


async def _load(url: str, seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=40) as http:

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                r = await http.post(url, json=BODY)
                latencies.append(time.monotonic() - t0)
                errors += r.status_code != 200

        async with anyio.create_task_group() as tg:
            for _ in range(CLIENTS):
                tg.start_soon(client)
    return latencies, errors


async def _replaced(node_pid: int, before: set[int]) -> None:
    """Wait until the node runs two workers again, not the same two as ``before``."""
    with anyio.fail_after(60):
        while True:
            now = _children(node_pid)
            if len(now) >= 2 and now != before:
                return
            await anyio.sleep(0.05)


async def _crashes(url: str, n: int, node_pid: int) -> list[dict[str, Any]]:
    out = []
    async with httpx.AsyncClient(timeout=40) as http:
        for _ in range(n):
            before = _children(node_pid)
            t0 = time.monotonic()
            r = await http.post(url, json={"features": {"after": 0.5}})
            elapsed = time.monotonic() - t0
            await _replaced(node_pid, before)
            await anyio.sleep(1.0)  # a second victim would have died by now
            await _replaced(node_pid, before)
            died = len(before - _children(node_pid))
            out.append({"status": r.status_code, "seconds": round(elapsed, 3),
                        "workers_died": died})
    return out


def run(quick: bool = False) -> dict[str, Any]:
    seconds, stop_at, stop_for = 6.0, 1.0, 4.0
    with tempfile.TemporaryDirectory(prefix="sy-bench-stall-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            port = free_port()
            argv = api_node_argv(server.url, "api-stall", tmp, "--http-port", str(port),
                                 "--http-host", "127.0.0.1", "--workers", "2")
            base = f"http://127.0.0.1:{port}/public/api/v1/{SERVICE}"
            with api_nodes([argv], server.url, 1) as procs:
                anyio.run(deploy, server.url, {"v1": 100}, 1)
                served_http(f"{base}/noop/predict")
                node_pid = procs[0].pid
                victim = min(_children(node_pid))

                def stall() -> None:
                    time.sleep(stop_at)
                    os.kill(victim, signal.SIGSTOP)
                    time.sleep(stop_for)
                    os.kill(victim, signal.SIGCONT)

                stopper = threading.Thread(target=stall)
                stopper.start()
                latencies, errors = anyio.run(_load, f"{base}/noop/predict", seconds)
                stopper.join()
                crashes = anyio.run(_crashes, f"{base}/crash/predict", 2 if quick else 3,
                                    node_pid)
    lat = sorted(latencies)
    stall_row = {
        "requests": len(lat), "errors": errors,
        "over_0_5s": sum(x > 0.5 for x in lat), "over_1s": sum(x > 1.0 for x in lat),
        "share_over_1s": round(sum(x > 1.0 for x in lat) / len(lat), 4),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1),
        "max_ms": round(lat[-1] * 1000, 1)}
    print_table(f"one of two workers stopped for {stop_for:g} s, {CLIENTS} HTTP clients",
                ["requests", "errors", "> 0.5 s", "> 1 s", "p50 ms", "p99 ms", "max ms"],
                [(stall_row["requests"], errors, stall_row["over_0_5s"],
                  stall_row["over_1s"], stall_row["p50_ms"], stall_row["p99_ms"],
                  stall_row["max_ms"])])
    print_table("a predict that exits its worker after 0.5 s",
                ["status", "seconds to the answer", "workers died"],
                [(c["status"], c["seconds"], c["workers_died"]) for c in crashes])
    return {"stall": stall_row, "crashes": crashes,
            "pass": errors == 0 and all(c["workers_died"] == 1 for c in crashes)}
