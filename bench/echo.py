"""Request/reply echo: the node runtime's handler path against raw nats-py.

Both sides get the same bytes (an encoded request envelope with a 128-byte payload);
responders run in separate processes, in one queue group; the load comes from this
process.  Reported: sequential p50/p99 latency, and throughput with 64 requests in
flight, for 1 and 2 responder processes.  Target: runtime >= 0.85x raw throughput.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats

from bench.common import nats_server, print_table, processes, python, summary_us
from bench.responders import BenchEcho
from nodes.runtime.calls import Caller
from protocol import subjects
from protocol.base import make_request

PAYLOAD = "x" * 128
TARGET = 0.85

Request = Callable[[], Awaitable[Any]]


async def sequential(request: Request, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await request()
        out.append(time.perf_counter() - t0)
    return out


async def throughput(request: Request, inflight: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await request()
            done += 1

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(inflight):
            tg.start_soon(worker)
    return done / (time.perf_counter() - t0)


async def measure(url: str, kind: str, n_seq: int, seconds: float) -> dict[str, Any]:
    nc = await nats.connect(url)
    subject = subjects.command("bench", "echo")
    data = make_request(BenchEcho(payload=PAYLOAD), sender="bench")
    caller = Caller(nc, sender="bench")
    cmd = BenchEcho(payload=PAYLOAD)

    async def raw() -> Any:
        return await nc.request(subject, data, timeout=5)

    async def runtime() -> Any:
        return await caller.call(cmd, timeout=5)

    request = raw if kind == "raw" else runtime
    await sequential(request, 200)  # warm up
    lat = await sequential(request, n_seq)
    await throughput(request, 64, 0.5)  # warm up
    rps = await throughput(request, 64, seconds)
    await nc.close()
    return {**summary_us(lat), "rps_64": round(rps)}


def run(quick: bool = False) -> dict[str, Any]:
    n_seq, seconds, rounds = (1000, 1.5, 1) if quick else (3000, 3.0, 3)
    results: dict[str, Any] = {"target_ratio": TARGET, "payload_bytes": len(PAYLOAD), "cases": []}
    with nats_server() as server:
        for n_resp in (1, 2):
            per_kind: dict[str, list[dict[str, Any]]] = {"raw": [], "runtime": []}
            for _ in range(rounds):
                for kind in ("raw", "runtime"):  # interleaved, so drift hits both
                    if kind == "raw":
                        argvs = [python("-m", "bench.responders", "raw", server.url,
                                        subjects.command("bench", "echo"))] * n_resp
                    else:
                        argvs = [python("-m", "bench.responders", "node", server.url,
                                        f"bench-{i}") for i in range(n_resp)]
                    with processes(argvs):
                        per_kind[kind].append(anyio.run(
                            measure, server.url, kind, n_seq, seconds,
                            backend_options={"use_uvloop": True}))
            raw_best = _median_case(per_kind["raw"])
            rt_best = _median_case(per_kind["runtime"])
            results["cases"].append({
                "responders": n_resp, "raw": raw_best, "runtime": rt_best,
                "ratio": round(rt_best["rps_64"] / raw_best["rps_64"], 3)})
    rows = []
    for c in results["cases"]:
        for kind in ("raw", "runtime"):
            r = c[kind]
            rows.append((c["responders"], kind, r["p50_us"], r["p99_us"], r["rps_64"],
                         c["ratio"] if kind == "runtime" else ""))
    print_table("echo: node runtime vs raw nats-py (same bytes, responders in other processes)",
                ["responders", "path", "seq p50 us", "seq p99 us", "req/s @64", "ratio"], rows)
    worst = min(c["ratio"] for c in results["cases"])
    results["worst_ratio"] = worst
    results["pass"] = worst >= TARGET
    print(f"target: runtime >= {TARGET}x raw throughput; worst ratio {worst} -> "
          f"{'PASS' if results['pass'] else 'FAIL'}")
    return results


def _median_case(cases: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(cases, key=lambda c: c["rps_64"])
    return ordered[len(ordered) // 2]
