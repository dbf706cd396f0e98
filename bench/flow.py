"""Flow engine: what running user code in isolated job processes costs.

* ``build``: a one-recipe build (``force=True``, the recipe's ``run(ctx)`` writes a
  small file) against calling the same ``run(ctx)`` directly in this process.  The
  difference is the engine's per-recipe overhead: fork a job process from the warm fork
  server, load the recipe, report, commit the output atomically, persist its metrics.
* ``fresh python``: for reference, starting a new interpreter that imports the job
  runner, which is what one ``python -m ...`` per recipe would cost at least.
* ``scenarios``: 1,000 runs of a one-step scenario (a no-op python step, each run
  with its own run log file) through ``Flow.run_scenario``, one at a time and 8 at a
  time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import ROOT, percentile, print_table
from nodes.flow import Flow, Outcome, WorkerPool
from nodes.flow.context import RecipeContext
from nodes.project.manifest import parse_manifest
from nodes.sandbox.child import load

MANIFEST = """
[project]
key = "bench"

[datasets.out]
path = "data/out.txt"

[recipes.write]
code = "recipes/write.py"
outputs = ["out"]

[scenarios.noop]
steps = [{ python = "scripts/noop.py" }]
"""

RECIPE = """
def run(ctx):
    ctx.outputs["out"].write_text("hello, world\\n" * 10)
"""

NOOP = """
def run(ctx):
    pass
"""


def _project(root: Path) -> None:
    for rel, text in {"shipyard.toml": MANIFEST, "recipes/write.py": RECIPE,
                      "scripts/noop.py": NOOP}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "data").mkdir()


def _ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def direct(root: Path, n: int) -> list[float]:
    """The recipe's run(ctx) called in this process, writing the same file."""
    run = load(root / "recipes/write.py", "bench_direct_write").run
    ctx = RecipeContext(inputs={}, outputs={"out": root / "data/direct.txt"}, name="write",
                        params={}, data_dir=root, code_dir=root)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(ctx)
        out.append(time.perf_counter() - t0)
    return out


def fresh_python(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import nodes.sandbox.child"], cwd=ROOT, check=True)
        out.append(time.perf_counter() - t0)
    return out


async def measure(root: Path, n_builds: int, n_runs: int) -> dict[str, Any]:
    manifest = parse_manifest(MANIFEST)
    logs = root / "logs"
    async with WorkerPool() as pool:
        flow = Flow(manifest, code_dir=root, pool=pool)
        for _ in range(20):  # warm up
            await flow.build(["out"], force=True)
        builds = []
        for _ in range(n_builds):
            t0 = time.perf_counter()
            result = await flow.build(["out"], force=True)
            builds.append(time.perf_counter() - t0)
            assert result.outcome is Outcome.SUCCESS, result.message

        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            r = await flow.run_scenario("noop", log_path=logs / f"{i}.log")
            failures += r.outcome is not Outcome.SUCCESS

        async def limited(i: int, limiter: anyio.CapacityLimiter) -> None:
            async with limiter:
                await one(i)

        rates = {}
        for inflight in (1, 8):
            t0 = time.perf_counter()
            limiter = anyio.CapacityLimiter(inflight)
            async with anyio.create_task_group() as tg:
                for i in range(n_runs):
                    tg.start_soon(limited, i, limiter)
            rates[inflight] = n_runs / (time.perf_counter() - t0)
    return {"builds": builds, "rates": rates, "failures": failures}


def run(quick: bool = False) -> dict[str, Any]:
    n_builds, n_runs, n_fresh = (100, 200, 10) if quick else (300, 1000, 30)
    with tempfile.TemporaryDirectory(prefix="sy-bench-flow-") as tmp:
        root = Path(tmp)
        _project(root)
        direct_s = direct(root, 2000)
        fresh_s = fresh_python(n_fresh)
        got = anyio.run(measure, root, n_builds, n_runs, backend_options={"use_uvloop": True})
    build, base, fresh = _ms(got["builds"]), _ms(direct_s), _ms(fresh_s)
    overhead = round(build["p50_ms"] - base["p50_ms"], 3)
    results: dict[str, Any] = {
        "build_one_recipe": build,
        "direct_call": base,
        "fresh_python_process": fresh,
        "build_overhead_ms_p50": overhead,
        "build_vs_direct_ratio_p50": round(build["p50_ms"] / base["p50_ms"], 1),
        "scenario_runs": n_runs,
        "scenario_runs_per_s_seq": round(got["rates"][1], 1),
        "scenario_runs_per_s_8": round(got["rates"][8], 1),
        "scenario_failures": got["failures"],
    }
    print_table("flow: one-recipe build vs the same run(ctx) called directly",
                ["path", "p50 ms", "p99 ms", "mean ms"],
                [("direct run(ctx)", base["p50_ms"], base["p99_ms"], base["mean_ms"]),
                 ("flow.build (forked job)", build["p50_ms"], build["p99_ms"],
                  build["mean_ms"]),
                 ("fresh python per job (ref)", fresh["p50_ms"], fresh["p99_ms"],
                  fresh["mean_ms"])])
    print_table(f"flow: {n_runs} one-step scenario runs (python no-op, run log each)",
                ["in flight", "runs/s"],
                [(1, results["scenario_runs_per_s_seq"]),
                 (8, results["scenario_runs_per_s_8"])])
    print(f"build overhead p50: {overhead} ms per recipe "
          f"({results['build_vs_direct_ratio_p50']}x a direct call); "
          f"failures: {got['failures']}")
    results["pass"] = got["failures"] == 0
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
