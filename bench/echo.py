"""Request/reply echo: the node runtime's request path against raw nats-py.

Three paths, the same bytes on the wire (an encoded request envelope with a 128-byte
payload), responders in separate processes sharing one queue group, load from this
process:

* ``raw``: ``nc.request`` to a bare nats-py callback that echoes the bytes back;
* ``node``: ``nc.request`` to Node processes (decode, dispatch, typed reply), isolating
  the responder side of the runtime;
* ``runtime``: the whole runtime path, ``Caller.call`` (encode, lean request, decode the
  typed reply) to Node processes.  This is what nodes and the CLI use.

Reported: sequential p50/p99 latency and throughput with 64 requests in flight, for 1
and 2 responder processes.  Target: runtime >= 0.85x raw throughput.
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
KINDS = ("raw", "node", "runtime")

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

    request = runtime if kind == "runtime" else raw
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
            per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
            for _ in range(rounds):
                # Interleaved, so drift on the machine hits every path alike.
                raw_argvs = [python("-m", "bench.responders", "raw", server.url,
                                    subjects.command("bench", "echo"))] * n_resp
                node_argvs = [python("-m", "bench.responders", "node", server.url,
                                     f"bench-{i}") for i in range(n_resp)]
                with processes(raw_argvs):
                    per_kind["raw"].append(_measure(server.url, "raw", n_seq, seconds))
                with processes(node_argvs):
                    for kind in ("node", "runtime"):
                        per_kind[kind].append(_measure(server.url, kind, n_seq, seconds))
            case: dict[str, Any] = {"responders": n_resp}
            for kind in KINDS:
                case[kind] = _median_case(per_kind[kind])
            base = case["raw"]["rps_64"]
            case["node_ratio"] = round(case["node"]["rps_64"] / base, 3)
            case["ratio"] = round(case["runtime"]["rps_64"] / base, 3)
            results["cases"].append(case)
    rows = []
    for c in results["cases"]:
        for kind in KINDS:
            r = c[kind]
            ratio = {"raw": "1.0", "node": c["node_ratio"], "runtime": c["ratio"]}[kind]
            rows.append((c["responders"], kind, r["p50_us"], r["p99_us"], r["rps_64"], ratio))
    print_table("echo: node runtime vs raw nats-py (same bytes, responders in other processes)",
                ["responders", "path", "seq p50 us", "seq p99 us", "req/s @64", "x raw"], rows)
    worst = min(c["ratio"] for c in results["cases"])
    results["worst_ratio"] = worst
    results["pass"] = worst >= TARGET
    print(f"target: runtime >= {TARGET}x raw throughput; worst ratio {worst} -> "
          f"{'PASS' if results['pass'] else 'FAIL'}")
    return results


def _measure(url: str, kind: str, n_seq: int, seconds: float) -> dict[str, Any]:
    return anyio.run(measure, url, kind, n_seq, seconds, backend_options={"use_uvloop": True})


def _median_case(cases: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(cases, key=lambda c: c["rps_64"])
    return ordered[len(ordered) // 2]
