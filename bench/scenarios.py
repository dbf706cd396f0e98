"""Scenario runs through the whole stack: trigger -> first step started latency, and the
throughput of 1,000 no-op scenario runs.

Real processes: nats-server, the Deployer, the Design node and Automation nodes, each
``shipyard node start``.  A run here is everything a production run does: the firing
claimed in KV, the scenario lock taken and released by compare-and-set, a job forked
for the step, run events stored in JetStream, the log stored in the object store.

* latency: a manual trigger (``RunScenario`` to the Deployer, forwarded to a node) until
  the node's ``run.step`` STARTED event for step 1 arrives, one run at a time;
* throughput: 1,000 runs of no-op scenarios, 16 scenarios kept busy at once (a
  scenario never runs twice at once, so concurrency comes from several scenarios).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from nats.aio.msg import Msg

from bench.common import nats_server, percentile, print_table, processes, python
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.bundles import CreateBundle
from protocol.deploy import CreateInfra, DeployBundle, ListDeployments
from protocol.registry import ListNodes
from protocol.scenarios import RunFinished, RunProgress, RunScenario
from protocol.stream import EVENT

SCENARIOS = 16


def write_project(ws: Path) -> None:
    d = ws / "noop"
    (d / "scripts").mkdir(parents=True, exist_ok=True)
    (d / "scripts" / "noop.py").write_text("def run(ctx):\n    pass\n")
    lines = ['[project]\nkey = "noop"\n']
    for i in range(SCENARIOS):
        lines.append(f'[scenarios.s{i}]\nsteps = [{{ python = "scripts/noop.py" }}]\n')
    (d / "shipyard.toml").write_text("\n".join(lines))


async def prepare(url: str, nodes: int) -> None:
    nc = await connect(NatsSettings(servers=(url,)), name="bench")
    caller = Caller(nc, sender="bench")
    with anyio.fail_after(60):
        while True:
            try:
                reply = await caller.call(ListNodes(status="online"), timeout=5)
                if len(reply.nodes) >= nodes + 2:
                    break
            except Exception:  # the Deployer may still be starting
                pass
            await anyio.sleep(0.2)
    await caller.call(CreateInfra(name="bench", kind="automation", exist_ok=True))
    await caller.call(CreateBundle(project="noop", bundle_id="v1"), timeout=60)
    await caller.call(DeployBundle(project="noop", bundle_id="v1", infra="bench"))
    with anyio.fail_after(60):
        while True:
            view = (await caller.call(ListDeployments(project="noop"))).deployments[0]
            if view.state == "in_sync" and len(view.nodes) == nodes:
                break
            await anyio.sleep(0.2)
    await nc.close()


async def measure(url: str, latency_runs: int, total: int) -> dict[str, Any]:
    nc = await connect(NatsSettings(servers=(url,)), name="bench")
    caller = Caller(nc, sender="bench")
    first_step: dict[str, anyio.Event] = {}
    finished: dict[str, anyio.Event] = {}
    outcomes: dict[str, str] = {}

    async def on_event(msg: Msg) -> None:
        try:
            ev = EVENT.decode(msg.data)
        except Exception:
            return
        if isinstance(ev, RunProgress) and ev.step == 0 and ev.status == "STARTED":
            first_step.setdefault(ev.run_id, anyio.Event()).set()
        elif isinstance(ev, RunFinished):
            outcomes[ev.run.run_id] = ev.run.outcome
            finished.setdefault(ev.run.run_id, anyio.Event()).set()

    await nc.subscribe(subjects.RUN_EVENTS_ALL, cb=on_event)

    async def fire(scenario: str) -> tuple[str, float]:
        t0 = time.perf_counter()
        accepted = await caller.call(RunScenario(project="noop", scenario=scenario,
                                                 infra="bench", by="bench"), timeout=30)
        if accepted.coalesced:
            raise RuntimeError(f"unexpected coalescing: {accepted.detail}")
        return accepted.run_id, t0

    latencies = []
    for i in range(latency_runs):
        run_id, t0 = await fire(f"s{i % SCENARIOS}")
        with anyio.fail_after(30):
            await first_step.setdefault(run_id, anyio.Event()).wait()
        latencies.append(time.perf_counter() - t0)
        with anyio.fail_after(30):
            await finished.setdefault(run_id, anyio.Event()).wait()

    done = 0
    t_start = time.perf_counter()

    async def keep_busy(scenario: str, quota: int) -> None:
        nonlocal done
        for _ in range(quota):
            run_id, _t = await fire(scenario)
            with anyio.fail_after(60):
                await finished.setdefault(run_id, anyio.Event()).wait()
            done += 1

    async with anyio.create_task_group() as tg:
        for i in range(SCENARIOS):
            tg.start_soon(keep_busy, f"s{i}", total // SCENARIOS + (i < total % SCENARIOS))
    elapsed = time.perf_counter() - t_start
    await nc.close()
    failed = sum(1 for o in outcomes.values() if o != "SUCCESS")
    ms = [x * 1000 for x in latencies]
    return {"latency_runs": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1), "runs": done,
            "seconds": round(elapsed, 2), "runs_per_s": round(done / elapsed, 1),
            "failed": failed}


def run(quick: bool = False) -> dict[str, Any]:
    nodes = 2
    latency_runs, total = (30, 200) if quick else (100, 1000)
    with tempfile.TemporaryDirectory(prefix="sy-bench-scenarios-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        write_project(tmp / "ws")
        argvs = [
            python("-P", "-m", "nodes.cli", "node", "start", "deployer", "--nats", server.url,
                   "--name", "deployer"),
            python("-P", "-m", "nodes.cli", "node", "start", "design", "--nats", server.url,
                   "--name", "design", "--workspace", str(tmp / "ws"), "--data-dir",
                   str(tmp / "design")),
        ] + [python("-P", "-m", "nodes.cli", "node", "start", "automation", "--nats",
                    server.url, "--name", f"a{i}", "--infra", "bench", "--data-dir",
                    str(tmp / f"a{i}")) for i in range(nodes)]
        with processes(argvs, ready_line=None):
            anyio.run(prepare, server.url, nodes)
            result = anyio.run(measure, server.url, latency_runs, total,
                               backend_options={"use_uvloop": True})
    result["automation_nodes"] = nodes
    print_table("scenario runs through the stack (2 Automation node processes)",
                ["measure", "value"],
                [("trigger -> first step started, p50", f"{result['p50_ms']} ms"),
                 ("trigger -> first step started, p95", f"{result['p95_ms']} ms"),
                 (f"{result['runs']} no-op runs, {SCENARIOS} scenarios busy",
                  f"{result['seconds']} s = {result['runs_per_s']} runs/s"),
                 ("runs not SUCCESS", result["failed"])])
    result["pass"] = result["failed"] == 0
    return result



