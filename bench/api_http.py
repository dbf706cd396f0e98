"""HTTP end to end through an API node vs a no-op endpoint served in-process by the same
HTTP server library, driven by ``wrk`` (``apt-get install -y wrk``).

* ``inproc``: uvicorn + the no-op endpoint in one process (bare ASGI, and Starlette);
* ``prototype``: the reference design the targets were set against (uvicorn + Starlette
  + nats-py: HTTP -> NATS -> a bare echo responder), ``bench.api_prototype``;
* ``api``: an API node process: its HTTP server, a NATS request to the service's queue
  group, a worker process running the no-op ``predict``, and back.

Latency: wrk with one connection (one request in flight), p50 added by the API path;
target <= 0.5 ms.  Throughput: 32 connections; target api >= 0.4x in-process.  The
target's own reference (the prototype at ~0.49x the in-process throughput) reproduces
against the Starlette in-process endpoint, so that is the baseline the pass is judged
on; the ratios against bare ASGI and against the prototype are reported beside it.

``--auth`` (``python -m bench api_http --auth``) measures the ``api`` path twice in one
run, rounds interleaved: on a stack without auth, and on a stack with auth on as
``shipyard up`` runs it (the Deployer, the Design node and the API node each connect
with their node identity's credentials, setup commands are signed by the admin).  HTTP
requests carry no signature; what auth can add is the server's permission checks on the
node's NATS traffic.  Reported: the ratio auth/no-auth of each metric, and the CPU the
stack's processes spend per request at 32 connections (``cpu_us_32``); target: every
one within 5%.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio

from bench.api_common import (
    SERVICE,
    api_node_argv,
    api_nodes,
    control_plane,
    deploy,
    package,
    served_http,
)
from bench.common import (
    auth_comparison,
    auth_server,
    load_average,
    nats_server,
    print_table,
    processes,
    python,
)

LATENCY_TARGET_MS = 0.5
THROUGHPUT_TARGET = 0.4
AUTH_TOLERANCE = 0.05
METRICS = ("rps_1", "p50_ms_1", "p99_ms_1", "rps_32", "p50_ms_32")
# --auth: also the CPU the whole stack spends per request at 32 connections.
AUTH_METRICS = (*METRICS, "cpu_us_32")
API_NODE = "api-http"
LUA = """wrk.method = "POST"
wrk.body = '{"features":{"x":1}}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    dist = out[out.index("Latency Distribution"):]
    p50 = _ms(re.search(r"50%\s+(\S+)", dist).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", dist).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses from {url}")
    return {"rps": round(rps), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}


def measure(url: str, script: Path, seconds: float, cpu: bool = False) -> dict[str, Any]:
    wrk(url, 1, 1.0, script)  # warm up
    one = wrk(url, 1, seconds, script)
    before = _stack_cpu() if cpu else 0.0
    many = wrk(url, 32, seconds, script)
    out = {"p50_ms_1": one["p50_ms"], "p99_ms_1": one["p99_ms"], "rps_1": one["rps"],
           "rps_32": many["rps"], "p50_ms_32": many["p50_ms"]}
    if cpu:
        out["cpu_us_32"] = round((_stack_cpu() - before) / (many["rps"] * seconds) * 1e6, 1)
    return out


def _stack_cpu() -> float:
    """CPU seconds used so far by every process this one started that still runs: the
    NATS servers, the control planes, the API node and its worker (wrk, which runs and
    exits in between two readings, is not counted).  CPU per request is far less
    exposed than throughput to other work on a shared machine."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def run(quick: bool = False, auth: bool = False) -> dict[str, Any]:
    if auth:
        return run_auth(quick)
    if shutil.which("wrk") is None:
        raise SystemExit("the HTTP benchmark needs wrk: apt-get install -y wrk")
    seconds, rounds = (3.0, 1) if quick else (5.0, 3)
    path = f"/public/api/v1/{SERVICE}/noop/predict"
    cases: dict[str, list[dict[str, Any]]] = {"inproc-asgi": [], "inproc-starlette": [],
                                              "prototype": [], "api": []}
    with tempfile.TemporaryDirectory(prefix="sy-bench-http-") as tmp_s, nats_server() as server:
        tmp = Path(tmp_s)
        script = tmp / "post.lua"
        script.write_text(LUA)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            for _ in range(rounds):
                for kind in ("asgi", "starlette"):
                    port = free_port()
                    with processes([python("-m", "bench.api_inproc", str(port), kind)]):
                        served_http(f"http://127.0.0.1:{port}{path}")
                        cases[f"inproc-{kind}"].append(
                            measure(f"http://127.0.0.1:{port}{path}", script, seconds))
                port = free_port()
                with processes([python("-m", "bench.api_prototype", server.url, "echo")]), \
                        processes([python("-m", "bench.api_prototype", server.url, str(port))]):
                    served_http(f"http://127.0.0.1:{port}{path}")
                    cases["prototype"].append(measure(f"http://127.0.0.1:{port}{path}", script,
                                                      seconds))
                port = free_port()
                argv = api_node_argv(server.url, API_NODE, tmp, "--http-port", str(port),
                                     "--http-host", "127.0.0.1")
                with api_nodes([argv], server.url, 1):
                    anyio.run(deploy, server.url, {"v1": 100}, 1)
                    served_http(f"http://127.0.0.1:{port}{path}")
                    cases["api"].append(measure(f"http://127.0.0.1:{port}{path}", script,
                                                seconds))
    med = {k: _median(v) for k, v in cases.items()}
    result: dict[str, Any] = {"latency_target_ms": LATENCY_TARGET_MS,
                              "throughput_target": THROUGHPUT_TARGET, "cases": med}
    rows = [(k, m["p50_ms_1"], m["p99_ms_1"], m["rps_1"], m["rps_32"]) for k, m in med.items()]
    print_table("HTTP end to end (wrk): API node vs an in-process no-op on uvicorn",
                ["path", "p50 ms @1", "p99 ms @1", "req/s @1", "req/s @32"], rows)
    for base in ("inproc-asgi", "inproc-starlette", "prototype"):
        added = round(med["api"]["p50_ms_1"] - med[base]["p50_ms_1"], 3)
        ratio = round(med["api"]["rps_32"] / med[base]["rps_32"], 3)
        result[f"added_p50_ms_vs_{base}"] = added
        result[f"throughput_ratio_vs_{base}"] = ratio
        print(f"vs {base}: +{added} ms p50 at 1 in flight (target <= {LATENCY_TARGET_MS}), "
              f"{ratio}x throughput at 32 (target >= {THROUGHPUT_TARGET})")
    proto = round(
        med["prototype"]["rps_32"] / med["inproc-starlette"]["rps_32"], 3)
    result["prototype_ratio_vs_inproc-starlette"] = proto
    print(f"the reference prototype: {proto}x the Starlette in-process throughput "
          "(the target's reference figure is ~0.49x)")
    base = "inproc-starlette"
    result["pass"] = (result["added_p50_ms_vs_inproc-asgi"] <= LATENCY_TARGET_MS
                      and result[f"throughput_ratio_vs_{base}"] >= THROUGHPUT_TARGET)
    print(f"latency vs bare ASGI, throughput vs the Starlette in-process endpoint -> "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    return result


def run_auth(quick: bool = False) -> dict[str, Any]:
    """The API path without auth and with auth on, rounds interleaved (the order flips
    each round); the median of each metric and the ratio auth/no-auth."""
    if shutil.which("wrk") is None:
        raise SystemExit("the HTTP benchmark needs wrk: apt-get install -y wrk")
    seconds, rounds = (3.0, 2) if quick else (5.0, 6)
    path = f"/public/api/v1/{SERVICE}/noop/predict"
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    result: dict[str, Any] = {"tolerance": AUTH_TOLERANCE, "load_average_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="sy-bench-http-") as tmp_s, \
            nats_server() as plain, auth_server([(API_NODE, "api", "bench")]) as secured:
        tmp = Path(tmp_s)
        script = tmp / "post.lua"
        script.write_text(LUA)
        stacks = {"off": (plain.url, None, None), "on": (secured.url, secured.admin,
                                                         secured.creds(API_NODE))}
        with control_plane(plain.url, tmp / "off" / "ws", tmp / "off"), \
                control_plane(secured.url, tmp / "on" / "ws", tmp / "on", admin=secured.admin,
                              deployer=secured.creds("deployer"),
                              design=secured.creds("design")):
            for mode, (url, admin, _) in stacks.items():
                anyio.run(package, url, ["v1"], tmp / mode / "ws", admin)
            for r in range(rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    url, admin, creds = stacks[mode]
                    port = free_port()
                    argv = api_node_argv(url, API_NODE, tmp / mode, "--http-port", str(port),
                                         "--http-host", "127.0.0.1", creds=creds)
                    with api_nodes([argv], url, 1, admin=admin):
                        anyio.run(deploy, url, {"v1": 100}, 1, 120.0, admin)
                        served_http(f"http://127.0.0.1:{port}{path}")
                        runs[mode].append(measure(f"http://127.0.0.1:{port}{path}", script,
                                                  seconds, cpu=True))
    result.update(auth_comparison(runs["off"], runs["on"], AUTH_METRICS, AUTH_TOLERANCE))
    result["load_average_end"] = load_average()
    rows = [(m, result["off"][m], result["on"][m], result["ratio"][m],
             result["paired_ratio"][m], "yes" if result["within"][m] else "NO")
            for m in AUTH_METRICS]
    print_table("HTTP end to end (wrk) through an API node: auth off -> auth on",
                ["metric", "auth off", "auth on", "on/off", "paired", "within 5%"], rows)
    result["pass"] = all(result["within"].values())
    print(f"target: every metric within {AUTH_TOLERANCE:.0%} of no auth -> "
          f"{'PASS' if result['pass'] else 'FAIL'}")
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(sorted(runs, key=lambda r: r["rps_32"])[len(runs) // 2])
