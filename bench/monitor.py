"""The Deployer under a fleet's heartbeats, and the monitor's feed lag.

1,000 (then 5,000) simulated nodes beat at 1 Hz, spread evenly over each second, from a
few simulator processes (not one process per node); one node in ten is an API node that
also sends an ``ApiMetricsReport`` every second.  A real Deployer process ingests all of
it; a monitor feed process (``nodes.cli.monitor.Feed`` and ``MonitorModel``, asking the
Deployer every 2 s as ``shipyard monitor`` does) receives the same beats.

Reported: the Deployer process's CPU share over the measured window (psutil, % of one
core), the lag from a beat's publication (its ``ts``) to the monitor's model receiving
it, p50 and p99, and what the feed process itself costs.  Target: under 25% of one core
and p99 under 1 s at 1,000 nodes.

Run: ``python -m bench monitor`` (``--quick``: shorter windows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import anyio
import psutil

from bench.common import ROOT, nats_server, print_table, python, wait_nodes
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import LATENCY_BUCKETS_S, METRICS_REPORT, ApiMetricsReport, EndpointMetrics
from protocol.heartbeat import HEARTBEAT, Heartbeat

TARGET_CPU_PCT = 25.0
TARGET_P99_MS = 1000.0
NODES_PER_SIMULATOR = 1250
API_EVERY = 10  # one node in ten is an API node sending metrics
INFRA = "bench"


# -- simulator process: python -m bench.monitor sim URL FIRST COUNT -----------------------

async def simulate(url: str, first: int, count: int) -> None:
    nc = await connect(NatsSettings(servers=(url,)), name=f"bench-sim-{first}")
    started = time.monotonic()
    pid = os.getpid()
    names = [f"sim{i:05d}" for i in range(first, first + count)]
    api = [i % API_EVERY == 0 for i in range(first, first + count)]
    seq = [0] * count
    requests = [0] * count
    print("READY", flush=True)
    t0 = time.monotonic()
    k = 0  # beats sent so far, across all nodes: node k % count, round k // count
    while True:
        now = time.monotonic()
        due = int((now - t0) * count)  # 1 Hz per node, spread over the second
        while k < due:
            i = k % count
            k += 1
            seq[i] += 1
            role = "api" if api[i] else "automation"
            uptime = now - started
            hb = Heartbeat(node=names[i], role=role, infra=INFRA, version="bench",
                           host="sim", pid=pid, uptime_s=round(uptime, 3), interval_s=1.0,
                           seq=seq[i], ts=time.time(), instance=f"i{first}",
                           cpu_s=round(uptime * 0.02, 3), rss_bytes=60 << 20)
            await nc.publish(subjects.heartbeat(role, names[i]), HEARTBEAT.encode(hb))
            if api[i]:
                requests[i] += 50
                buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
                buckets[3] = requests[i]
                report = ApiMetricsReport(
                    node=names[i], infra=INFRA, ts=time.time(), interval_s=1.0,
                    endpoints=[EndpointMetrics(
                        service="svc", endpoint="predict", generation="v1", shadow=False,
                        requests=requests[i], errors=0, inflight=0,
                        latency_sum_s=requests[i] * 0.004, buckets=buckets)])
                await nc.publish(report.subject(), METRICS_REPORT.encode(report))
        await anyio.sleep(0.01)


# -- monitor feed process: python -m bench.monitor feed URL SECONDS ----------------------

async def feed(url: str, seconds: float) -> None:
    from nodes.cli.monitor import Feed, poll_deployer
    from nodes.cli.monitor_model import MonitorModel
    from nodes.runtime.calls import Caller

    nc = await connect(NatsSettings(servers=(url,)), name="bench-monitor")
    model = MonitorModel()
    f = Feed(nc, model)
    await f.start()
    caller = Caller(nc, sender="bench")
    print("READY", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)  # "go": the fleet is registered
    model.lags.clear()
    ingest0 = _deployer_count(model)
    beats0, me = model.beats, psutil.Process()
    cpu0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
    snapshot_ms: list[float] = []
    with anyio.move_on_after(seconds):
        while True:
            await poll_deployer(caller, model, timeout=5.0)
            s = time.perf_counter()
            model.snapshot()
            snapshot_ms.append((time.perf_counter() - s) * 1000)
            await anyio.sleep(2.0)
    elapsed = time.monotonic() - t0
    ingest1 = _deployer_count(model)
    rate = None
    if ingest0 is not None and ingest1 is not None and ingest1[1] > ingest0[1]:
        rate = round((ingest1[0] - ingest0[0]) / (ingest1[1] - ingest0[1]))
    rows = model.node_rows()
    lags = model.lag_ms(0.5, 0.99)
    print(json.dumps({
        "deployer_beats_per_s": rate,
        "deployer_lost": sum(1 for n in model.nodes.values()
                             if n.info is not None and n.info.status == "lost"),
        "monitor_online": sum(1 for r in rows if r.status == "online"),
        "lag_p50_ms": lags[0], "lag_p99_ms": lags[1],
        "beats": model.beats - beats0, "dropped": f.dropped,
        "feed_cpu_pct": round(100 * (sum(me.cpu_times()[:2]) - cpu0) / elapsed, 1),
        "snapshot_ms": round(max(snapshot_ms), 1) if snapshot_ms else None,
        "nodes_seen": len(model.nodes), "deployer": model.deployer}), flush=True)
    await nc.close()


def _deployer_count(model: Any) -> tuple[int, float] | None:
    """(heartbeats the Deployer has ingested, its uptime), from its own last beat."""
    from protocol.state import DeployerState

    node = model.nodes.get("deployer")
    hb = node.hb if node is not None else None
    if hb is None or not isinstance(hb.state, DeployerState):
        return None
    return hb.state.heartbeats, hb.uptime_s


# -- the benchmark -------------------------------------------------------------------------

async def wait_registered(url: str, n: int, timeout: float = 90.0) -> int:
    """Wait (at most ``timeout``) until the Deployer's own heartbeat says it knows ``n``
    more nodes than itself; return how many it knows.  (Not ``ListNodes``: at 5,000
    nodes its reply is past NATS's 1 MB payload limit.)"""
    from nats.aio.msg import Msg

    from protocol.state import DeployerState

    done = anyio.Event()
    known = 0

    async def on_beat(msg: Msg) -> None:
        nonlocal known
        hb = HEARTBEAT.decode(msg.data, msg.subject)
        if isinstance(hb.state, DeployerState):
            known = hb.state.nodes - 1
            if known >= n:
                done.set()

    nc = await connect(NatsSettings(servers=(url,)), name="bench-wait")
    try:
        await nc.subscribe(subjects.heartbeat("deployer", "deployer"), cb=on_beat)
        with anyio.move_on_after(timeout):
            await done.wait()
    finally:
        await nc.close()
    return known


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(python("-m", "bench.monitor", *args), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if "READY" not in line:
        raise RuntimeError(f"{p.args} did not start: {line!r}")


def measure(n: int, seconds: float, warmup: float) -> dict[str, Any]:
    with nats_server() as server:
        deployer = subprocess.Popen(
            python("-P", "-m", "nodes.cli", "node", "start", "deployer", "--name", "deployer",
                   "--nats", server.url, "--infra", "control"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        children: list[subprocess.Popen[str]] = []
        try:
            anyio.run(wait_nodes, server.url, "control", 1)
            mon = _child("feed", server.url, str(seconds))
            children.append(mon)
            _ready(mon)
            for first in range(0, n, NODES_PER_SIMULATOR):
                sim = _child("sim", server.url, str(first),
                             str(min(NODES_PER_SIMULATOR, n - first)))
                children.append(sim)
                _ready(sim)
            registered = anyio.run(wait_registered, server.url, n)
            time.sleep(warmup)  # first-seen records written, rates settled
            proc = psutil.Process(deployer.pid)
            cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
            assert mon.stdin is not None and mon.stdout is not None
            mon.stdin.write("go\n")
            mon.stdin.flush()
            line = mon.stdout.readline()
            while line and not line.startswith("{"):  # a log line (a slow consumer, say)
                line = mon.stdout.readline()
            elapsed = time.monotonic() - t0
            cpu = 100 * (sum(proc.cpu_times()[:2]) - cpu0) / elapsed
            result = json.loads(line)
            row = {"nodes": n, "seconds": round(elapsed, 1),
                    "deployer_cpu_pct": round(cpu, 1),
                    "deployer_rss_mib": round(proc.memory_info().rss / 2**20, 1),
                    "registered_before": registered,
                    "load_1m": round(os.getloadavg()[0], 2), **result}
            print(json.dumps(row), flush=True)
            return row
        finally:
            for c in children:
                c.terminate()
            deployer.terminate()
            for c in [*children, deployer]:
                try:
                    c.wait(10)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()


def run(quick: bool = False) -> dict[str, Any]:
    seconds, warmup = (8.0, 3.0) if quick else (20.0, 5.0)
    rows = [measure(n, seconds, warmup) for n in (1000, 5000)]
    print_table("Deployer ingesting 1 Hz heartbeats (+ metrics from 1 node in 10); "
                "beat -> monitor model lag",
                ["nodes", "deployer CPU %", "ingested/s", "lost", "RSS MiB", "lag p50 ms",
                 "lag p99 ms", "feed beats", "feed CPU %", "load 1m"],
                [(r["nodes"], r["deployer_cpu_pct"], r["deployer_beats_per_s"],
                  r["deployer_lost"], r["deployer_rss_mib"], r["lag_p50_ms"],
                  r["lag_p99_ms"], r["beats"], r["feed_cpu_pct"], r["load_1m"])
                 for r in rows])
    key = rows[0]
    ok = key["deployer_cpu_pct"] < TARGET_CPU_PCT and key["lag_p99_ms"] is not None \
        and key["lag_p99_ms"] < TARGET_P99_MS
    print(f"target at 1,000 nodes: Deployer < {TARGET_CPU_PCT:g}% of a core and lag p99 < "
          f"{TARGET_P99_MS:g} ms; measured {key['deployer_cpu_pct']}% and "
          f"{key['lag_p99_ms']} ms -> {'PASS' if ok else 'FAIL'}")
    return {"rows": rows, "target_cpu_pct": TARGET_CPU_PCT, "target_p99_ms": TARGET_P99_MS,
            "pass": ok}


if __name__ == "__main__":
    if sys.argv[1] == "sim":
        anyio.run(simulate, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "feed":
        anyio.run(feed, sys.argv[2], float(sys.argv[3]))
