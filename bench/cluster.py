"""A 3-server JetStream cluster against one server, and failover times.

* **API over NATS**: the no-op endpoint of one API node process (``bench.api_nats``'s
  load: sequential latency, throughput with 64 in flight), on one server and on the
  cluster (streams at R3; the load's client on server 1, the API node wherever its
  server list put it).  The ratio says what the cluster costs the hot path.
* **Deploy propagation**: a 100 KB bundle to 16 Automation node processes
  (``bench.deploy``'s measure: deploy command -> every node reports it active), one
  server against the cluster (R3 desired state and object store).
* **Failover**, on the cluster with two Deployer processes (one active), an API node
  and a client that keeps requesting:
  - SIGKILL of a NATS server (alternately the one leading the lease stream and another
    one, restarted and caught up before the next run): time to the first successful API
    request and to the first deploy command the control plane accepts (desired state
    written, R3);
  - SIGKILL of the active Deployer (restarted after each run): time to the first
    accepted deploy command;
  - both at once, the lease stream's leader and the active Deployer (a quarter as many
    runs): time to the first accepted deploy command.
  p50 (and max) over the runs.  Every node's and server's log is kept (by default in
  ``bench/out/cluster-failover/``), and each NATS kill's timeline is read back from them
  (elections, the Deployer stepping down, taking the lease, ready).
  ``python -m bench.cluster --failover [--runs N]`` runs this part alone.

Every node is a real ``shipyard node start`` process.  Measured on a shared, loaded
2-core host: absolute numbers are noisy; the ratios and failover times are the point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors

from bench import api_nats
from bench.api_common import (
    SERVICE,
    api_node_argv,
    api_nodes,
    control_plane,
    deploy,
    package,
    served_nats,
)
from bench.common import (
    ROOT,
    load_average,
    machine,
    percentile,
    print_table,
    processes,
    python,
    wait_nodes,
    write_json,
)
from bench.deploy import create_infra, measure, node_argv, setup, write_project
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedCluster, EmbeddedNats, wait_jetstream
from nodes.runtime.requests import Requester
from nodes.runtime.settings import NatsSettings, split_servers
from protocol import subjects
from protocol.api import DeployApi
from protocol.errors import OperationError
from protocol.leases import LEASE_VALUE, lease_key

KB = 1024
BODY = b'{"features":{"x":1}}'


@contextmanager
def servers(size: int, log_dir: Path | None = None) -> Iterator[list[EmbeddedNats]]:
    """One server, or a cluster of ``size``; nodes started meanwhile use R3 on a cluster.
    With ``log_dir``, each server's log is kept there."""
    with tempfile.TemporaryDirectory(prefix="sy-bench-cluster-") as tmp:
        before = os.environ.get("SHIPYARD_REPLICAS")
        os.environ["SHIPYARD_REPLICAS"] = str(min(size, 3))
        try:
            if size == 1:
                server = EmbeddedNats(Path(tmp) / "js", port=-1, monitor_port=None)
                with server:
                    yield [server]
            else:
                with EmbeddedCluster(Path(tmp) / "js", size=size, monitor_ports=[None] * size,
                                     log_dir=log_dir) as cluster:
                    anyio.run(_js_ready, cluster.url)
                    yield cluster.servers
        finally:
            if before is None:
                os.environ.pop("SHIPYARD_REPLICAS", None)
            else:
                os.environ["SHIPYARD_REPLICAS"] = before


async def _js_ready(url: str) -> None:
    nc = await nats.connect(list(split_servers(url)))
    try:
        await wait_jetstream(nc)
    finally:
        await nc.close()


def _url(ss: list[EmbeddedNats]) -> str:
    return ",".join(s.url for s in ss)


# -- API throughput and latency ---------------------------------------------------------------

@contextmanager
def api_stack(size: int, tmp: Path) -> Iterator[str]:
    """A control plane and one API node serving the no-op endpoint; yields the URL of
    the server the load's client uses (the first)."""
    with servers(size) as ss:
        url = _url(ss)
        with control_plane(url, tmp / "ws", tmp):
            anyio.run(package, url, ["v1"], tmp / "ws")
            argv = api_node_argv(url, "api-1", tmp, "--no-http")
            with api_nodes([argv], url, 1):
                anyio.run(deploy, url, {"v1": 100}, 1)
                served_nats(url, subjects.api_endpoint(SERVICE, "noop"))
                yield ss[0].url


def api_cases(n_seq: int, seconds: float, rounds: int) -> dict[str, dict[str, Any]]:
    """Both stacks up at once, measured in alternating rounds (the load on this shared
    host changes by the minute); the median round of each by throughput."""
    subject = subjects.api_endpoint(SERVICE, "noop")
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
    with tempfile.TemporaryDirectory(prefix="sy-bench-capi-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        urls = {"single": stack.enter_context(api_stack(1, tmp / "single")),
                "cluster": stack.enter_context(api_stack(3, tmp / "cluster"))}
        for r in range(rounds):
            for name in (["single", "cluster"] if r % 2 == 0 else ["cluster", "single"]):
                runs[name].append(api_nats._measure(urls[name], subject, n_seq, seconds))
    return {name: dict(sorted(rs, key=lambda m: m["rps_64"])[len(rs) // 2])
            for name, rs in runs.items()}


# -- deploy propagation ---------------------------------------------------------------------

def deploy_case(size: int, n_nodes: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sy-bench-cdeploy-") as tmp_s, \
            servers(size) as ss:
        tmp, url = Path(tmp_s), _url(ss)
        ws = tmp / "ws"
        write_project(ws, "p100k", 100 * KB)
        control = [python("-P", "-m", "nodes.cli", "node", "start", "deployer", "--name",
                          "deployer", "--nats", url, "--heartbeat-interval", "1.0"),
                   python("-P", "-m", "nodes.cli", "node", "start", "design", "--name",
                          "design", "--nats", url, "--workspace", str(ws))]
        with processes(control, ready_line=None):
            anyio.run(wait_nodes, url, "control", 2)
            anyio.run(setup, ss[0].url, {"p100k": 100 * KB}, {100 * KB: repeats})
            anyio.run(create_infra, ss[0].url, "bench")
            argvs = [node_argv(url, f"bench-a{i}", "bench", tmp / "nodes")
                     for i in range(n_nodes)]
            with processes(argvs, ready_line=None):
                anyio.run(wait_nodes, url, "bench", n_nodes)
                bundles = [f"b{i}" for i in range(repeats + 1)]
                times = anyio.run(measure, ss[0].url, "bench", "p100k", bundles, n_nodes)
    ms = [t * 1000 for t in times[1:]]  # the first one warms up
    return {"runs": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1)}


# -- failover -------------------------------------------------------------------------------

LEASES_STREAM = f"KV_{subjects.LEASES_BUCKET}"


def deployer_argv(url: str, name: str) -> list[str]:
    return python("-P", "-m", "nodes.cli", "node", "start", "deployer", "--name", name,
                  "--nats", url, "--heartbeat-interval", "0.5")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A node process whose JSON log (info and up) is appended to ``log``: a restarted
    Deployer appends to its predecessor's file, so one file tells a name's whole story."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHIPYARD_LOG_FORMAT": "json",
           "SHIPYARD_LOG_LEVEL": "info"}
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                cwd=ROOT, env=env, start_new_session=True)


class Probe:
    """A client that requests the API service, and tries deploys, until told to stop."""

    def __init__(self, url: str) -> None:
        self.settings = NatsSettings(servers=split_servers(url))
        self.ok_requests: list[float] = []

    async def first_ok_request_after(self, t: float, timeout: float = 60.0) -> float:
        with anyio.fail_after(timeout):
            while True:
                found = next((x for x in self.ok_requests if x > t), None)
                if found is not None:
                    return found - t
                await anyio.sleep(0.01)

    async def requests(self, nc: Any) -> None:
        req = Requester(nc)
        subject = subjects.api_endpoint(SERVICE, "noop")
        while True:
            try:
                msg = await req.request(subject, BODY, timeout=1)
                if not msg.headers:
                    self.ok_requests.append(time.monotonic())
                    if len(self.ok_requests) > 10_000:
                        del self.ok_requests[:5000]
                    await anyio.sleep(0.005)
                    continue
            except (nats.errors.Error, TimeoutError):
                pass
            await anyio.sleep(0.02)

    @staticmethod
    async def first_deploy_after(caller: Caller, t: float, version: str,
                                 refusals: dict[str, int], timeout: float = 60.0) -> float:
        """Seconds from ``t`` to the first deploy the control plane accepts; each refusal
        on the way is counted by its error code in ``refusals``."""
        with anyio.fail_after(timeout):
            while True:
                try:
                    await caller.call(DeployApi(service=SERVICE, infra="bench",
                                                generations={version: 100}), timeout=2)
                    return time.monotonic() - t
                except OperationError as exc:
                    refusals[exc.code] = refusals.get(exc.code, 0) + 1
                    await anyio.sleep(0.05)


async def _holder(nc: Any) -> str | None:
    try:
        kv = await nc.jetstream(timeout=1.0).key_value(subjects.LEASES_BUCKET)
        entry = await kv.get(lease_key("deployer"))
    except (nats.errors.Error, TimeoutError):
        return None
    return LEASE_VALUE.decode(entry.value).node if entry.value else None


async def _leaders(nc: Any) -> dict[str, str]:
    """Each stream's leader (server name), once every stream has one."""
    js = nc.jetstream(timeout=2.0)
    with anyio.fail_after(30):
        while True:
            try:
                infos = await js.streams_info()
                found = {i.config.name: i.cluster.leader for i in infos
                         if i.config.name and i.cluster is not None and i.cluster.leader}
                if len(found) == len(infos):
                    return found
            except (nats.errors.Error, TimeoutError):
                pass
            await anyio.sleep(0.2)


async def _caught_up(nc: Any, timeout: float = 60.0) -> None:
    """Every replica of every stream current again (a restarted server caught up)."""
    js = nc.jetstream(timeout=2.0)
    with anyio.fail_after(timeout):
        while True:
            try:
                infos = await js.streams_info()
                if all(i.cluster is not None and len(i.cluster.replicas or []) == 2
                       and all(r.current and not r.offline for r in i.cluster.replicas or [])
                       for i in infos):
                    return
            except (nats.errors.Error, TimeoutError):
                pass
            await anyio.sleep(0.2)


def _victim(ss: list[EmbeddedNats], leaders: dict[str, str], run: int) -> EmbeddedNats:
    """Even runs kill the server that leads the lease stream (the hard case for the
    Deployer); odd runs kill one that does not, taking the others in turn."""
    lead = leaders.get(LEASES_STREAM)
    if run % 2 == 0:
        return next(s for s in ss if s.server_name == lead)
    others = [s for s in ss if s.server_name != lead]
    return others[(run // 2) % len(others)]


async def failover_runs(ss: list[EmbeddedNats], url: str, deployers: dict[str, Any],
                        runs: int, logs: Path) -> dict[str, Any]:
    """Seconds from each SIGKILL to the first success, each run's details (what the
    killed server led, the deploy refusals met on the way, which Deployer held the lease
    before and after), and every Deployer exit (wall-clock time, exit code)."""
    probe = Probe(url)
    nc = await connect(probe.settings, name="bench-failover")
    caller = Caller(nc, sender="bench")
    out: dict[str, list[float]] = {"nats_lease_leader_request": [],
                                   "nats_lease_leader_deploy": [],
                                   "nats_other_request": [], "nats_other_deploy": [],
                                   "deployer_deploy": [], "deployer_request": [],
                                   "lease_leader_and_deployer_deploy": []}
    details: list[dict[str, Any]] = []
    exits: list[dict[str, Any]] = []
    version = 0

    async def supervise() -> None:
        """Restart a Deployer that exits, as ``shipyard up``'s supervisor does (one that
        lost its lease exits; a SIGKILLed one is restarted too)."""
        while True:
            for name, proc in list(deployers.items()):
                if proc.poll() is not None:
                    exits.append({"node": name, "code": proc.returncode, "at": time.time()})
                    await anyio.sleep(1.0)
                    deployers[name] = spawn(deployer_argv(url, name), logs / f"{name}.log")
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(supervise)
        tg.start_soon(probe.requests, nc)
        await probe.first_ok_request_after(0)
        for i in range(runs):
            leaders = await _leaders(nc)
            victim = _victim(ss, leaders, i)
            kind = "nats_lease_leader" if i % 2 == 0 else "nats_other"
            assert victim.proc is not None
            holder = await _holder(nc)
            refusals: dict[str, int] = {}
            at, t = time.time(), time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            version += 1
            request_s = await probe.first_ok_request_after(t)
            deploy_s = await probe.first_deploy_after(caller, t, f"v{1 + version % 2}",
                                                      refusals)
            out[f"{kind}_request"].append(request_s)
            out[f"{kind}_deploy"].append(deploy_s)
            details.append({"fault": kind, "victim": victim.server_name, "killed_at": at,
                            "led": sorted(k for k, v in leaders.items()
                                          if v == victim.server_name),
                            "holder_before": holder, "holder_after": await _holder(nc),
                            "request_s": round(request_s, 3), "deploy_s": round(deploy_s, 3),
                            "refusals": refusals})
            print(f"run {i}: {details[-1]}", flush=True)
            await anyio.to_thread.run_sync(victim.proc.wait)
            victim.respawn()
            await anyio.to_thread.run_sync(victim.wait_ready, 20.0)
            await _caught_up(nc)
        for _ in range(runs):
            with anyio.fail_after(30):
                while True:
                    active = await _holder(nc)
                    if active is not None:
                        break
                    await anyio.sleep(0.05)
            refusals = {}
            at, t = time.time(), time.monotonic()
            deployers[active].send_signal(signal.SIGKILL)
            version += 1
            request_s = await probe.first_ok_request_after(t)
            deploy_s = await probe.first_deploy_after(caller, t, f"v{1 + version % 2}",
                                                      refusals)
            out["deployer_request"].append(request_s)
            out["deployer_deploy"].append(deploy_s)
            details.append({"fault": "deployer", "victim": active, "killed_at": at,
                            "holder_after": await _holder(nc), "request_s": round(request_s, 3),
                            "deploy_s": round(deploy_s, 3), "refusals": refusals})
            print(f"deployer run: {details[-1]}", flush=True)
            with anyio.fail_after(30):  # restarted: one Deployer active, one standby
                while True:
                    try:
                        seen = await active_and_standby(caller)
                    except OperationError:
                        seen = False
                    if seen:
                        break
                    await anyio.sleep(0.1)
        for _ in range(max(1, runs // 4)):  # both at once: the lease leader and the holder
            leaders = await _leaders(nc)
            victim = _victim(ss, leaders, 0)
            active = await _wait_holder(nc)
            assert victim.proc is not None
            refusals = {}
            at, t = time.time(), time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            deployers[active].send_signal(signal.SIGKILL)
            version += 1
            deploy_s = await probe.first_deploy_after(caller, t, f"v{1 + version % 2}",
                                                      refusals)
            out["lease_leader_and_deployer_deploy"].append(deploy_s)
            details.append({"fault": "lease_leader_and_deployer", "victim": active,
                            "server": victim.server_name, "killed_at": at,
                            "led": sorted(k for k, v in leaders.items()
                                          if v == victim.server_name),
                            "holder_after": await _holder(nc), "deploy_s": round(deploy_s, 3),
                            "refusals": refusals})
            print(f"both: {details[-1]}", flush=True)
            await anyio.to_thread.run_sync(victim.proc.wait)
            victim.respawn()
            await anyio.to_thread.run_sync(victim.wait_ready, 20.0)
            await _caught_up(nc)
            with anyio.fail_after(30):
                while True:
                    if await _safe(active_and_standby(caller)):
                        break
                    await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    await nc.close()
    return {"times": out, "runs": details, "deployer_exits": exits}


async def _wait_holder(nc: Any) -> str:
    with anyio.fail_after(30):
        while True:
            active = await _holder(nc)
            if active is not None:
                return active
            await anyio.sleep(0.05)


async def _safe(check: Any) -> bool:
    try:
        return bool(await check)
    except OperationError:
        return False


async def active_and_standby(caller: Caller) -> bool:
    """Both Deployers online, one active and one standby (the restarted one may have
    become the active one: whoever polls first after the key's TTL takes it)."""
    from protocol.registry import ListNodes
    from protocol.state import DeployerState
    reply = await caller.call(ListNodes(role="deployer"), timeout=2)
    states = sorted(n.state.lease for n in reply.nodes
                    if n.status == "online" and isinstance(n.state, DeployerState))
    return states == ["active", "standby"]


def failover_case(runs: int, logs: Path | None = None) -> dict[str, Any]:
    """``runs`` NATS server kills (half of them the lease stream's leader), ``runs``
    kills of the active Deployer and ``runs // 4`` (at least one) of both at once.
    Every node's and server's log is kept in ``logs`` (default
    ``bench/out/cluster-failover/``, emptied first)."""
    logs = logs or ROOT / "bench" / "out" / "cluster-failover"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="sy-bench-cfail-") as tmp_s, \
            servers(3, log_dir=logs) as ss:
        tmp, url = Path(tmp_s), _url(ss)
        deployers = {"deployer-1": spawn(deployer_argv(url, "deployer-1"),
                                         logs / "deployer-1.log")}
        try:
            anyio.run(wait_nodes, url, "control", 1)
            deployers["deployer-2"] = spawn(deployer_argv(url, "deployer-2"),
                                            logs / "deployer-2.log")
            design = python("-P", "-m", "nodes.cli", "node", "start", "design", "--name",
                            "design", "--nats", url, "--workspace", str(tmp / "ws"),
                            "--data-dir", str(tmp / "design"), "--heartbeat-interval", "0.5")
            with processes([design], ready_line=None):
                anyio.run(wait_nodes, url, "control", 3)
                anyio.run(package, url, ["v1", "v2"], tmp / "ws")
                with api_nodes([api_node_argv(url, "api-1", tmp, "--no-http")], url, 1):
                    anyio.run(deploy, url, {"v1": 100}, 1)
                    served_nats(url, subjects.api_endpoint(SERVICE, "noop"))
                    found = anyio.run(failover_runs, ss, url, deployers, runs, logs)
        finally:
            for p in deployers.values():
                p.terminate()
            for p in deployers.values():
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    result: dict[str, Any] = {k: {"runs": len(v), "p50_s": round(percentile(v, 50), 2),
                                  "max_s": round(max(v), 2)}
                              for k, v in found["times"].items() if v}
    result["deployer_exits_during_nats_kills"] = sum(
        1 for e in found["deployer_exits"]
        if e["at"] < min((r["killed_at"] for r in found["runs"] if r["fault"] == "deployer"),
                         default=float("inf")))
    timelines(found["runs"], logs)
    result["runs_detail"] = found["runs"]
    result["deployer_exits"] = found["deployer_exits"]
    result["load_average"] = load_average()
    result["logs"] = str(logs)
    return result


_NATS_LINE = re.compile(r"^\[\d+\] (\S+ \S+) \[INF\] JetStream cluster new stream leader "
                        r"for '\$G > (\S+)'")


def _elections(logs: Path) -> list[tuple[float, str]]:
    """(wall-clock time, stream) of every stream leader elected, from the servers' logs
    (local time, as the servers write it)."""
    out = []
    for f in sorted(logs.glob("nats-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            m = _NATS_LINE.match(line)
            if m:
                when = datetime.strptime(m.group(1), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                out.append((when, m.group(2)))
    return sorted(out)


def _deployer_events(logs: Path) -> list[tuple[float, str, str]]:
    """(wall-clock time, node, message) of the Deployers' lease and readiness lines."""
    keep = ("lease lost: stepping down", "lease acquired: active", "node ready",
            "lease taken back: active again")
    out = []
    for f in sorted(logs.glob("deployer-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("msg") in keep:
                when = datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00"))
                out.append((when.timestamp(), f.stem, d["msg"]))
    return sorted(out)


def timelines(runs: list[dict[str, Any]], logs: Path) -> None:
    """Add to each NATS-kill run, in seconds after the kill, from the logs: when the
    lease stream and the deploy bucket's stream had a new leader (when the killed server
    led them), and when a Deployer stepped down, took the lease and was ready again."""
    elected, lines = _elections(logs), _deployer_events(logs)
    for i, r in enumerate(runs):
        if "led" not in r:
            continue
        t0 = r["killed_at"]
        t1 = runs[i + 1]["killed_at"] if i + 1 < len(runs) else t0 + 60

        def first(pred: Any, t0: float = t0, t1: float = t1) -> float | None:
            return next((round(t - t0, 2) for t, *rest in pred if t0 < t < t1), None)
        for stream in (LEASES_STREAM, f"KV_{subjects.DEPLOY_BUCKET}"):
            if stream in r["led"]:
                r[f"{stream}_elected_s"] = first((t, s) for t, s in elected if s == stream)
        for msg in ("lease lost: stepping down", "lease taken back: active again",
                    "lease acquired: active", "node ready"):
            found = [(t, n) for t, n, m in lines if m == msg]
            at = first(found)
            if at is not None:
                r[msg] = (at, next(n for t, n in found if round(t - t0, 2) == at))


def print_failover(fail: dict[str, Any]) -> None:
    print_table("failover on the cluster: seconds from SIGKILL to the first success",
                ["fault -> first success", "runs", "p50 s", "max s"],
                [(k, v["runs"], v["p50_s"], v["max_s"]) for k, v in fail.items()
                 if isinstance(v, dict)])
    print("Deployers that exited (lost the lease) during the NATS kills: "
          f"{fail['deployer_exits_during_nats_kills']}; logs in {fail['logs']}")


def run(quick: bool = False) -> dict[str, Any]:
    n_seq, seconds = (1000, 1.5) if quick else (3000, 3.0)
    n_nodes, repeats = (4, 6) if quick else (16, 12)
    runs = 3 if quick else 6
    api = api_cases(n_seq, seconds, rounds=3 if quick else 5)
    ratio = round(api["cluster"]["rps_64"] / api["single"]["rps_64"], 3)
    print_table("API no-op endpoint over NATS: one server vs a 3-server cluster (R3)",
                ["servers", "seq p50 us", "seq p99 us", "req/s @64"],
                [(k, v["p50_us"], v["p99_us"], v["rps_64"]) for k, v in api.items()])
    print(f"cluster/single throughput ratio: {ratio}")
    dep = {name: deploy_case(size, n_nodes, repeats) for name, size in (("single", 1),
                                                                        ("cluster", 3))}
    print_table(f"deploy propagation, 100 KB to {n_nodes} nodes",
                ["servers", "runs", "p50 ms", "p95 ms"],
                [(k, v["runs"], v["p50_ms"], v["p95_ms"]) for k, v in dep.items()])
    fail = failover_case(runs)
    print_failover(fail)
    return {"api": {**api, "throughput_ratio": ratio}, "deploy_100kb": {
        **dep, "nodes": n_nodes}, "failover": fail}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.cluster --failover [--runs N]``: the failover part alone."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--failover", action="store_true", required=True,
                        help="run only the failover part")
    parser.add_argument("--runs", type=int, default=6,
                        help="NATS kills and Deployer kills, each (default 6)")
    args = parser.parse_args(argv)
    fail = failover_case(args.runs)
    print_failover(fail)
    write_json("cluster_failover", {"machine": machine(), "when": time.strftime(
        "%Y-%m-%d %H:%M:%S"), **fail})
    print(json.dumps(fail, indent=2))
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
