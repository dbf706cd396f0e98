"""What nats-server's permission checks cost on the API data plane, apart from anything
shipyard's own code does.

A plain nats-py requester and plain nats-py responders (``bench.responders raw``: a
callback that echoes the bytes) on an API endpoint subject (``sy.api.v1.svc.predict``),
the responders in one queue group in other processes, exactly as API traffic flows:

* **off**: a nats-server without auth;
* **on**: a nats-server with the auth config ``shipyard auth init`` writes, the
  requester connected as the ``gateway`` identity and each responder as an API node
  identity (``api-N``), so every request passes the gateway's publish permissions and
  every reply the API node's (``allow_responses``: the server tracks each reply subject
  it may answer), with the permission lists ``shipyard up`` generates.

Each with two requesters: nats-py's ``request`` (a new reply subject per request) and
shipyard's requester as ``Caller`` sends commands (``reuse``: one reply subject per
request in flight, used again; ``nodes.runtime.requests``).  nats-server caches its
subscription matches and a publisher's permission checks by subject, so the second
shows what the server's checks cost when its caches can work.

Reported per round (alternating, the order flipped each round): throughput at 64 in
flight, sequential p50, and the CPU nats-server used per request.  The last is the
number that says what the checks cost: it is read from the server's own counters, so
other work on the machine moves it far less than it moves throughput.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio

from bench.common import (
    AuthServer,
    auth_server,
    load_average,
    nats_server,
    pid_of,
    print_table,
    process_cpu_s,
    processes,
    python,
    settings,
    summary_us,
)
from bench.echo import sequential, throughput
from nodes.runtime.connection import close, connect
from nodes.runtime.requests import requester
from protocol import subjects

SUBJECT = subjects.api_endpoint("svc", "predict")
PAYLOAD = b'{"features": {"x": 1}}' + b" " * 100
RESPONDERS = (1, 2)
METRICS = ("rps_64", "p50_us", "server_cpu_us")
REQUESTERS = ("nats-py", "reuse")


async def measure(url: str, creds: str | None, server_pid: int | None, n_seq: int,
                  seconds: float, reuse: bool = False) -> dict[str, Any]:
    nc = await connect(settings(url, creds), name="bench-natsperm")
    lean = requester(nc)
    try:
        async def request() -> Any:
            if reuse:
                return await lean.request(SUBJECT, PAYLOAD, timeout=5, accept=_any_reply)
            return await nc.request(SUBJECT, PAYLOAD, timeout=5)

        await sequential(request, 200)  # warm up
        lat = await sequential(request, n_seq)
        await throughput(request, 64, 0.5)  # warm up
        cpu0, t0 = process_cpu_s(server_pid), time.perf_counter()
        rps = await throughput(request, 64, seconds)
        cpu, elapsed = process_cpu_s(server_pid) - cpu0, time.perf_counter() - t0
    finally:
        await close(nc)
    served = max(1.0, rps * elapsed)
    return {"p50_us": summary_us(lat)["p50_us"], "rps_64": round(rps),
            "server_cpu_us": round(cpu / served * 1e6, 2)}


def _any_reply(msg: Any) -> bool:
    return True  # one request per reply subject at a time, and only the echo answers


def _round(url: str, auth: AuthServer | None, server_pid: int | None, n_resp: int,
           n_seq: int, seconds: float) -> dict[str, dict[str, Any]]:
    """Both requesters, one after the other, against the same responders."""
    argvs = [python("-m", "bench.responders", "raw", url, SUBJECT,
                    *([auth.creds(f"api-{i + 1}")] if auth else []))
             for i in range(n_resp)]
    creds = auth.creds("gateway") if auth else None
    with processes(argvs):
        return {requester_kind: anyio.run(measure, url, creds, server_pid, n_seq, seconds,
                                          requester_kind == "reuse",
                                          backend_options={"use_uvloop": True})
                for requester_kind in REQUESTERS}


def run(quick: bool = False) -> dict[str, Any]:
    n_seq, seconds, rounds = (500, 1.5, 2) if quick else (2000, 3.0, 6)
    identities = [(f"api-{i}", "api", "api") for i in range(2, max(RESPONDERS) + 1)]
    results: dict[str, Any] = {"load_average_start": load_average(), "cases": []}
    with nats_server() as plain, auth_server(identities) as secured:
        for n_resp in RESPONDERS:
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {
                kind: {"off": [], "on": []} for kind in REQUESTERS}
            for r in range(rounds):
                for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                    if mode == "on":
                        got = _round(secured.url, secured, pid_of(secured.server), n_resp,
                                     n_seq, seconds)
                    else:
                        got = _round(plain.url, None, pid_of(plain), n_resp, n_seq, seconds)
                    for kind in REQUESTERS:
                        runs[kind][mode].append(got[kind])
            for kind in REQUESTERS:
                case: dict[str, Any] = {"responders": n_resp, "requester": kind,
                                        "runs": runs[kind]}
                for mode in ("off", "on"):
                    case[mode] = {m: statistics.median(x[m] for x in runs[kind][mode])
                                  for m in METRICS}
                case["ratio"] = {m: round(case["on"][m] / case["off"][m], 3)
                                 for m in METRICS}
                results["cases"].append(case)
    results["load_average_end"] = load_average()
    rows = [(c["responders"], c["requester"],
             *(f"{c['off'][m]:g} -> {c['on'][m]:g} ({c['ratio'][m]}x)" for m in METRICS))
            for c in results["cases"]]
    print_table("nats-server's permission checks on API request/reply: auth off -> on "
                "(medians of alternating rounds; requester: nats-py's request, or one "
                "re-using its reply subjects)",
                ["responders", "requester", "req/s @64", "seq p50 us", "server CPU us/req"],
                rows)
    return results
