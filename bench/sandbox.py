"""Code environments: what running user code in another interpreter costs.

* ``flow``: a one-recipe build (``force=True``) whose recipe runs in the node's own
  interpreter (the builtin environment), against the same recipe in a code
  environment's venv (its own warm fork server, started in isolated mode).
* ``api call``: one no-op predict through ``usercode`` in the worker's own process
  (``Generation.call``) against the same endpoint in a user-code host
  (``RemoteGeneration.call``: check the payload, one frame each way on a Unix socket,
  json in the host).  This is the hop an environment adds to every request.
* ``api nats``: the same predict sent over NATS to a real worker process, one at a
  time, builtin against environment.

    python -m bench sandbox [--quick]

Measured 2026-12-02 on the 2-core box while other test suites ran on it (load average
5-7, so the process-hop numbers are inflated by context switches; redo on a quiet
machine), p50 builtin -> env:

* flow build: 10.6-20.1 ms -> within +-2.5 ms of it (the same fork-and-run, from
  another interpreter's fork server: no measurable difference through the noise);
* api call: 1.2-1.9 us -> 44-73 us: the hop adds ~45-70 us per request;
* api nats: 333-360 us -> 444-941 us: +84 us in the calmest run, more when the
  three processes a request wakes (client, worker, host) fight for two cores.

Before/after the move to ``nodes.sandbox`` (``bench/flow.py --quick``, same box, runs
interleaved): one-recipe build p50 11.2 / 19.4 ms before, 18.3 / 19.0 ms after; the
frames cost ~35 us more per job than msgpack did (JSON spec decoded with the standard
library in the job), well inside that noise.  The worker's own predict path: 1.4-1.8 us
per no-op call before and after (``Generation.call``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bench.common import nats_server, print_table, summary_us
from nodes.api import wire
from nodes.api.hosts import Host, RemoteGeneration
from nodes.api.metrics import Metrics
from nodes.api.usercode import OP_PREDICT, Generation
from nodes.api.workers import WorkerPool as ApiWorkers
from nodes.envs.uv import uv_bin, uv_environ
from nodes.flow import Flow, Outcome, Pools
from nodes.project.manifest import parse_manifest
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import ApiMapping

MANIFEST = """
[project]
key = "bench"
[code_envs.env]
requirements = []
[datasets.a]
path = "a.txt"
[datasets.b]
path = "b.txt"
[recipes.builtin]
code = "write.py"
outputs = ["a"]
[recipes.env]
code = "write.py"
outputs = ["b"]
code_env = "env"
"""

RECIPE = """
def run(ctx):
    for p in ctx.outputs.values():
        p.write_text("hello, world\\n" * 10)
"""

MODEL = """
def predict(features):
    return 1
"""
ENDPOINTS = [wire.EndpointCode("predict", "prediction", "model.py", "predict")]


def _venv(root: Path) -> str:
    subprocess.run([uv_bin(), "venv", "--python",
                    f"{sys.version_info.major}.{sys.version_info.minor}",
                    "--python-preference", "only-system", str(root)],
                   env=uv_environ(), check=True, capture_output=True, timeout=120)
    return str(root / "bin" / "python")


async def flow(root: Path, python: str, n: int) -> dict[str, list[float]]:
    manifest = parse_manifest(MANIFEST)
    (root / "write.py").write_text(RECIPE)
    out: dict[str, list[float]] = {"builtin": [], "env": []}
    async with Pools() as pools:
        f = Flow(manifest, code_dir=root, pool=pools, envs={"env": python})
        for _ in range(10):
            for target in ("a", "b"):
                await f.build([target], force=True)
        for _ in range(n):
            for target, key in (("a", "builtin"), ("b", "env")):
                t0 = time.perf_counter()
                r = await f.build([target], force=True)
                out[key].append(time.perf_counter() - t0)
                assert r.outcome is Outcome.SUCCESS, r.message
    return out


def calls(root: Path, python: str, n: int) -> dict[str, list[float]]:
    (root / "model.py").write_text(MODEL)
    local = Generation("svc", "v1", root, ENDPOINTS)
    host = Host(python, debug=False)
    host.spawn()
    host.ready()
    remote = RemoteGeneration.load(host, "svc", "v1", str(root), ENDPOINTS)
    payload = b'{"x": 1, "y": [1, 2, 3]}'
    out: dict[str, list[float]] = {"builtin": [], "env": []}
    for gen, key in ((local, "builtin"), (remote, "env")) * 2:
        out[key] = []
        for _ in range(n):
            t0 = time.perf_counter()
            body = gen.call("predict", OP_PREDICT, payload)
            out[key].append(time.perf_counter() - t0)
        assert body == b'{"result":{"prediction":1},"generation":"v1"}', body
    host.close()
    return out


async def over_nats(root: Path, python: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"builtin": [], "env": []}
    with nats_server() as server:
        settings = NatsSettings(servers=(server.url,))
        nc = await connect(settings, name="bench")
        pool = ApiWorkers(1, nats=settings, node="bench", infra="prod", run_dir=root / "run",
                          metrics=Metrics("bench", "api"), max_body=1 << 20,
                          queue_timeout=10.0, request_timeout=10.0, kill_grace=1.0,
                          debug=False)
        pool.nc = nc
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            for service, py in (("builtin", ""), ("env", python)):
                assert await pool.load(service, "v1", root, ENDPOINTS, python=py) == ""
                mapping = msgspec.json.encode(ApiMapping(generations={"v1": 1}))
                assert await pool.route(service, mapping, {"v1": {"predict": "prediction"}},
                                        "bench") == ""
            body = b'{"features": {"x": 1, "y": [1, 2, 3]}}'
            for service in ("builtin", "env") * 2:
                subject = subjects.api_endpoint(service, "predict")
                for _ in range(200):
                    await nc.request(subject, body, timeout=5)
                out[service] = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    msg = await nc.request(subject, body, timeout=5)
                    out[service].append(time.perf_counter() - t0)
                    assert msg.data.startswith(b'{"result":'), msg.data
            tg.cancel_scope.cancel()
        await nc.close()
    return out


def run(quick: bool = False) -> dict[str, Any]:
    n_builds, n_calls, n_nats = (100, 3000, 1000) if quick else (300, 10000, 3000)
    with tempfile.TemporaryDirectory(prefix="sy-bench-sandbox-") as tmp:
        root = Path(tmp)
        python = _venv(root / "venv")
        (root / "code").mkdir()
        builds = anyio.run(flow, root / "code", python, n_builds,
                           backend_options={"use_uvloop": True})
        direct = calls(root / "code", python, n_calls)
        nats = anyio.run(over_nats, root / "code", python, n_nats,
                         backend_options={"use_uvloop": True})
    results: dict[str, Any] = {}
    rows = []
    for name, got in (("flow build", builds), ("api call", direct), ("api nats", nats)):
        b, e = summary_us(got["builtin"]), summary_us(got["env"])
        results[name.replace(" ", "_")] = {"builtin": b, "env": e,
                                           "added_p50_us": round(e["p50_us"] - b["p50_us"], 1)}
        rows.append((name, b["p50_us"], e["p50_us"], round(e["p50_us"] - b["p50_us"], 1),
                     b["p99_us"], e["p99_us"]))
    print_table("code environments: builtin vs a venv's interpreter",
                ["path", "builtin p50 us", "env p50 us", "added p50 us", "builtin p99 us",
                 "env p99 us"], rows)
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
