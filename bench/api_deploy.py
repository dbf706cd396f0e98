"""Deploy propagation for API services: from the deploy command until the new generation
serves on every API node, p50 and p95, for 1 and 4 node processes (2 workers each).

Each measured deploy is of a version no node has yet: fetched, verified, unpacked,
imported and loaded in every worker, then switched.  Two clocks stop:

* ``all nodes switched``: every node has reported serving the new mapping (its workers
  have acknowledged the switch, so its next request runs the new generation);
* ``first reply``: a request sent every millisecond through the queue group is first
  answered by the new generation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.msg import Msg

from bench.api_common import SERVICE, api_node_argv, api_nodes, control_plane, package
from bench.common import nats_server, percentile, print_table
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.requests import Requester
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import GENERATION_REPORT, DeployApi
from protocol.errors import DecodeError


async def measure(url: str, versions: list[str], nodes: int) -> list[dict[str, float]]:
    nc = await connect(NatsSettings(servers=(url,)), name="bench-deploy")
    caller = Caller(nc, sender="bench")
    req = Requester(nc)
    serving: dict[str, set[str]] = {}
    done: dict[str, anyio.Event] = {}

    async def on_report(msg: Msg) -> None:
        try:
            r = GENERATION_REPORT.decode(msg.data)
        except DecodeError:
            return
        if r.stage == "serving":
            serving.setdefault(r.update_id, set()).add(r.node)
            if len(serving[r.update_id]) >= nodes:
                done.setdefault(r.update_id, anyio.Event()).set()
        elif r.stage == "failed":
            raise RuntimeError(f"{r.node}: {r.reason}")

    await nc.subscribe(subjects.reports("apigen"), cb=on_report)
    subject = subjects.api_endpoint(SERVICE, "noop")
    out = []
    for version in versions:
        t0 = anyio.current_time()
        view = await caller.call(DeployApi(service=SERVICE, infra="bench",
                                           generations={version: 100}), timeout=30)
        first = 0.0
        with anyio.fail_after(120):
            while not first:
                try:
                    msg = await req.request(subject, b'{"features":{}}', timeout=5)
                    if msgspec.json.decode(msg.data).get("generation") == version:
                        first = anyio.current_time() - t0
                except Exception:  # the very first deploy: nothing serves yet
                    pass
                await anyio.sleep(0.001)
            await done.setdefault(view.update_id, anyio.Event()).wait()
        switched = anyio.current_time() - t0
        out.append({"switched_ms": switched * 1000, "first_ms": first * 1000})
    await nc.close()
    return out


def run(quick: bool = False) -> dict[str, Any]:
    runs = 6 if quick else 15
    versions = [f"v{i}" for i in range(1, 2 * (runs + 1) + 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sy-bench-apideploy-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, versions, tmp / "ws")
            todo = iter(versions)
            for n in (1, 4):
                argvs = [api_node_argv(server.url, f"dep{n}-{i}", tmp, "--no-http",
                                       "--workers", "2") for i in range(n)]
                with api_nodes(argvs, server.url, n):
                    batch = [next(todo) for _ in range(runs + 1)]
                    times = anyio.run(measure, server.url, batch, n)[1:]  # first: warm-up
                sw = [t["switched_ms"] for t in times]
                fr = [t["first_ms"] for t in times]
                rows.append({"nodes": n, "runs": len(times),
                             "switched_p50_ms": round(percentile(sw, 50), 1),
                             "switched_p95_ms": round(percentile(sw, 95), 1),
                             "first_reply_p50_ms": round(percentile(fr, 50), 1),
                             "first_reply_p95_ms": round(percentile(fr, 95), 1)})
    print_table("API deploy: command -> new generation serving (new version each time)",
                ["nodes", "runs", "all switched p50 ms", "p95 ms", "first reply p50 ms",
                 "p95 ms"],
                [(r["nodes"], r["runs"], r["switched_p50_ms"], r["switched_p95_ms"],
                  r["first_reply_p50_ms"], r["first_reply_p95_ms"]) for r in rows])
    return {"rows": rows}
