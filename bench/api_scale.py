"""Scale-out: a latency-bound endpoint (``time.sleep(0.02)``) on 1, 2 and 4 API node
processes with 8 workers each (per-node concurrency 8: ideal 400 req/s per node).

Load from this process over NATS, 16 requests in flight per node (twice the capacity, so
a random queue-group pick rarely leaves a worker idle).  Efficiency at N nodes =
throughput(N) / (N x throughput(1)); target >= 0.9 at each step.
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
from bench.common import nats_server, print_table
from bench.echo import throughput
from nodes.runtime.requests import Requester
from protocol import subjects

TARGET = 0.9
WORKERS = 8
BODY = b'{"features":{"x":1}}'


async def measure(url: str, inflight: int, seconds: float) -> dict[str, Any]:
    nc = await nats.connect(url)
    req = Requester(nc)
    subject = subjects.api_endpoint(SERVICE, "sleep")
    errors = 0

    async def one() -> None:
        nonlocal errors
        msg = await req.request(subject, BODY, timeout=10)
        if msg.headers:
            errors += 1

    await throughput(one, inflight, 1.0)
    rps = await throughput(one, inflight, seconds)
    await nc.close()
    return {"rps": round(rps, 1), "errors": errors}


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 3.0 if quick else 6.0
    counts = [1, 2, 4]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sy-bench-scale-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            for n in counts:
                argvs = [api_node_argv(server.url, f"scale{n}-{i}", tmp, "--no-http",
                                       "--workers", str(WORKERS), infra="bench")
                         for i in range(n)]
                with api_nodes(argvs, server.url, n):
                    anyio.run(deploy, server.url, {"v1": 100}, n)
                    served_nats(server.url, subjects.api_endpoint(SERVICE, "sleep"))
                    r = anyio.run(measure, server.url, 16 * n, seconds,
                                  backend_options={"use_uvloop": True})
                rows.append({"nodes": n, **r})
    base = rows[0]["rps"]
    for r in rows:
        r["ideal_rps"] = round(r["nodes"] * WORKERS / 0.02)
        r["efficiency"] = round(r["rps"] / (r["nodes"] * base), 3)
    print_table("scale-out: sleep(20 ms) endpoint, 8 workers per node, 16 in flight per node",
                ["nodes", "req/s", "ideal req/s", "errors", "efficiency vs 1 node"],
                [(r["nodes"], r["rps"], r["ideal_rps"], r["errors"], r["efficiency"])
                 for r in rows])
    worst = min(r["efficiency"] for r in rows)
    result = {"rows": rows, "target_efficiency": TARGET, "worst_efficiency": worst,
              "pass": worst >= TARGET and all(r["errors"] == 0 for r in rows)}
    print(f"target: efficiency >= {TARGET} at each step; worst {worst} -> "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    return result
