"""A no-op endpoint over NATS: through an API node vs a raw nats-py echo responder.

The same request bytes (``{"features": {"x": 1}}``) go to:

* ``raw``: one process with a bare nats-py callback that echoes them (``msg.respond``);
* ``api``: one API node process (nats.micro endpoint, generation pick, the worker
  pool, user code in a worker process, the reply built there).

Load comes from this process with the lean requester: sequential latency, and
throughput with 64 requests in flight; interleaved rounds, median.  The API node runs
with 1 and 2 workers and with the default (one per core but one).  Target: the default
>= 0.8x raw throughput.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import nats

from bench.api_common import (
    SERVICE,
    api_node_argv,
    api_nodes,
    control_plane,
    deploy,
    package,
    served_nats,
)
from bench.common import nats_server, print_table, processes, python, summary_us
from bench.echo import sequential, throughput
from nodes.api.node import default_workers
from nodes.runtime.requests import Requester
from protocol import subjects

TARGET = 0.8
INFLIGHT = int(__import__("os").environ.get("SY_INFLIGHT", "64"))
BODY = b'{"features":{"x":1}}'
RAW_SUBJECT = "bench.raw.echo"


async def measure(url: str, subject: str, n_seq: int, seconds: float) -> dict[str, Any]:
    nc = await nats.connect(url)
    req = Requester(nc)

    async def one() -> Any:
        msg = await req.request(subject, BODY, timeout=5)
        if msg.headers:
            raise RuntimeError(f"error reply: {msg.headers} {msg.data!r}")
        return msg

    await sequential(one, 300)
    lat = await sequential(one, n_seq)
    await throughput(one, INFLIGHT, 0.5)
    rps = await throughput(one, INFLIGHT, seconds)
    await nc.close()
    return {**summary_us(lat), "rps_64": round(rps)}


def _measure(url: str, subject: str, n_seq: int, seconds: float) -> dict[str, Any]:
    return anyio.run(measure, url, subject, n_seq, seconds,
                     backend_options={"use_uvloop": True})


def run(quick: bool = False) -> dict[str, Any]:
    n_seq, seconds, rounds = (1000, 1.5, 1) if quick else (3000, 3.0, 3)
    worker_counts = sorted({1, 2, default_workers()})
    cases: dict[str, list[dict[str, Any]]] = {"raw": [], **{f"api-{w}w": []
                                                            for w in worker_counts}}
    api_subject = subjects.api_endpoint(SERVICE, "noop")
    with tempfile.TemporaryDirectory(prefix="sy-bench-api-") as tmp_s, nats_server() as server:
        tmp = Path(tmp_s)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            for _ in range(rounds):
                with processes([python("-m", "bench.responders", "raw", server.url,
                                       RAW_SUBJECT)]):
                    served_nats(server.url, RAW_SUBJECT)
                    cases["raw"].append(_measure(server.url, RAW_SUBJECT, n_seq, seconds))
                for w in worker_counts:
                    argv = api_node_argv(server.url, f"api-{w}w", tmp, "--no-http",
                                         "--workers", str(w))
                    with api_nodes([argv], server.url, 1):
                        anyio.run(deploy, server.url, {"v1": 100}, 1)
                        served_nats(server.url, api_subject)
                        cases[f"api-{w}w"].append(_measure(server.url, api_subject, n_seq,
                                                           seconds))
    result: dict[str, Any] = {"target_ratio": TARGET, "cases": {}}
    base = _median(cases["raw"])["rps_64"]
    rows = []
    for name, runs in cases.items():
        m = _median(runs)
        m["ratio"] = round(m["rps_64"] / base, 3)
        result["cases"][name] = m
        rows.append((name, m["p50_us"], m["p99_us"], m["rps_64"], m["ratio"]))
    print_table("api over NATS: no-op endpoint through an API node vs a raw nats-py echo",
                ["path", "seq p50 us", "seq p99 us", "req/s @64", "x raw"], rows)
    best = max(result["cases"][f"api-{w}w"]["ratio"] for w in worker_counts)
    default = result["cases"][f"api-{default_workers()}w"]["ratio"]
    result["ratio_default_workers"] = default
    result["best_ratio"] = best
    result["pass"] = default >= TARGET
    print(f"target: api >= {TARGET}x raw throughput; default workers {default}x "
          f"(best {best}x) -> {'PASS' if result['pass'] else 'FAIL'}")
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(sorted(runs, key=lambda r: r["rps_64"])[len(runs) // 2])
