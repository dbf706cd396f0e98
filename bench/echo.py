"""Request/reply echo: the node runtime's request path against raw nats-py.

Three paths, the same bytes on the wire (an encoded request envelope with a 128-byte
payload), responders in separate processes sharing one queue group, load from this
process:

* ``raw``: ``nc.request`` to a bare nats-py callback that echoes the bytes back;
* ``node``: ``nc.request`` to Node processes (decode, dispatch, typed reply), isolating
  the responder side of the runtime;
* ``runtime``: the whole runtime path, ``Caller.call`` (encode, lean request, decode the
  typed reply) to Node processes.  This is what nodes and the CLI use.

Reported: sequential p50/p99 latency and throughput with 64 requests in flight, for 1
and 2 responder processes.  Target: runtime >= 0.85x raw throughput.

``--auth`` (``python -m bench echo --auth``) runs every path twice in one run: on a
server without auth, and on a server with auth on as ``shipyard up`` configures it.
There each responder process connects as its own node identity (role ``deployer``: the
bench role's subjects are not in any other role's permissions) and the load generator
as the admin.  The two servers are measured from one load generator, alternating
request by request and in quarter-second throughput slices (``measure_pair``): this
host's load drifts within seconds, more than the 5% to be told apart.  Every ratio is
printed with its 95% interval.  ``raw`` and ``node`` are also sent as shipyard's requester
sends commands, each request in flight on a reply subject it re-uses
(``raw-lean``, ``node-lean``; ``nodes.runtime.requests``).  Two targets, for two kinds
of traffic:

* unsigned request/reply, what runs per node-to-node call, sent the way shipyard sends
  commands (``raw-lean``, ``node-lean``, and ``direct``: ``Caller``
  sending the node-direct ``Echo``, which is never signed, on a connection opened with
  credentials, so with its publish-denial watch): auth on within 5% of auth off, every
  metric.  ``raw`` and ``node`` (nats-py's ``request``, a new reply subject per request,
  which nats-server checks in full every time) are reported beside them;
* the signed command round trip (``runtime``: ``Caller`` signs the role command ``echo``
  as the CLI signs an admin command; the responders do not verify, ``bench.auth``
  measures verification): added p50 under 1 ms.  Its throughput ratio is reported, not
  judged: an Ed25519 signature costs the client ~20 µs of CPU, as much as the whole
  unsigned call, and no faster implementation is at hand (PyNaCl/libsodium signs in
  20 µs here, ``cryptography``/OpenSSL in 33 µs).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from bench.common import (
    AuthServer,
    auth_server,
    load_average,
    nats_server,
    percentile,
    pid_of,
    pin,
    print_table,
    process_cpu_s,
    processes,
    python,
    settings,
    summary_us,
    within,
)
from bench.responders import BenchEcho
from nodes.auth.signing import signer_of
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect, denials_of
from nodes.runtime.requests import requester
from protocol import subjects
from protocol.base import make_request
from protocol.system import Echo

PAYLOAD = "x" * 128
TARGET = 0.85
KINDS = ("raw", "node", "runtime")
# With --auth, "raw" and "node" are sent twice: with nats-py's request (a new reply
# subject per request) and as shipyard's requester sends commands (one re-used reply
# subject per request in flight: "-lean").
AUTH_KINDS = ("raw", "node", "raw-lean", "node-lean", "direct", "runtime")
UNSIGNED = ("raw", "node", "raw-lean", "node-lean", "direct")
# Held to AUTH_TOLERANCE: the unsigned paths with shipyard's requester.  nats-py's request
# ("raw", "node") is reported: the server's permission check of each new reply subject
# is its cost, not shipyard's.  "runtime" (signed) has its own target.
JUDGED = ("raw-lean", "node-lean", "direct")
AUTH_TOLERANCE = 0.05
TARGET_ADDED_P50_US = 1000.0  # the signed command round trip (bench.auth's target too)
# throughput: higher is better; latency and the client's CPU per request: lower
METRICS = ("rps_64", "p50_us", "p99_us", "cpu_us")
# Reported beside them, not judged: the CPU nats-server spends per request, where the
# permission checks of auth are paid, and the whole stack's (client, server, responders).
REPORTED = ("server_cpu_us", "stack_cpu_us")
RESPONDERS = (1, 2)

Request = Callable[[], Awaitable[Any]]


async def sequential(request: Request, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await request()
        out.append(time.perf_counter() - t0)
    return out


async def throughput(request: Request, inflight: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await request()
            done += 1

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(inflight):
            tg.start_soon(worker)
    return done / (time.perf_counter() - t0)


def _request(nc: Any, kind: str, responders: int) -> Request:
    """One request of path ``kind`` on ``nc``."""
    subject = subjects.command("bench", "echo")
    data = make_request(BenchEcho(payload=PAYLOAD), sender="bench")
    caller = Caller(nc, sender="bench")
    cmd = BenchEcho(payload=PAYLOAD)
    echo = Echo(payload=PAYLOAD)
    targets = itertools.cycle([f"bench-{i}" for i in range(responders)])

    async def raw() -> Any:
        return await nc.request(subject, data, timeout=5)

    lean = requester(nc)

    async def raw_lean() -> Any:
        return await lean.request(subject, data, timeout=5, accept=_any_reply)

    async def runtime() -> Any:
        return await caller.call(cmd, timeout=5)

    async def direct() -> Any:
        return await caller.call(echo, timeout=5, node=next(targets))

    return {"runtime": runtime, "direct": direct, "raw-lean": raw_lean,
            "node-lean": raw_lean}.get(kind, raw)


class Side:
    """One server of a pair: where to connect, as whom, and whose CPU to count."""

    def __init__(self, url: str, creds: str | None, server_pid: int | None,
                 responder_pids: tuple[int, ...]) -> None:
        self.url, self.creds = url, creds
        self.server_pid, self.responder_pids = server_pid, responder_pids


# One throughput slice: requests served, seconds, and the CPU seconds of the load
# generator, the nats-server and the responders meanwhile.
Slice = tuple[float, float, float, float, float]


@dataclass
class Samples:
    """What one side of a pair gathered: the latency of each sequential request and each
    throughput slice.  The i-th of one side ran next to the i-th of the other: ``lat``
    one request after the other, ``slices`` one slice after the other."""

    lat: list[float] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)

    @classmethod
    def pool(cls, runs: Sequence[Samples]) -> Samples:
        return cls([x for r in runs for x in r.lat], [x for r in runs for x in r.slices])

    def figures(self) -> dict[str, float]:
        """Latency percentiles of every request; throughput and CPU per request over
        every slice (totals divided, so a slice weighs what it served)."""
        served = max(1.0, sum(x[0] for x in self.slices))
        elapsed, cpu, server, resp = (sum(x[i] for x in self.slices) for i in range(1, 5))
        # Sorted first: summary_us sorts again per percentile, which is then linear (the
        # bootstrap calls this 600 times a path).
        return {**summary_us(sorted(self.lat)),
                "rps_64": round(served / max(elapsed, 1e-9)),
                "cpu_us": round(cpu / served * 1e6, 2),
                "server_cpu_us": round(server / served * 1e6, 2),
                "stack_cpu_us": round((cpu + server + resp) / served * 1e6, 2)}


# Where the processes of an --auth run are: two cores, the load generator on one, the
# servers and responders on the other.  Left to the scheduler, three busy processes on
# two cores land differently from one process start to the next, and the p50 of two
# identical servers differed by up to 24% (the A/A run in bench/RESULTS.md).
PINNED = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
SERVER_CPUS, CLIENT_CPUS = {0}, {1}
# Throughput at 64 in flight settles into a pattern of batches for as long as a slice
# lasts: slices of one mode vary by ~10% (SD) whether they last 0.25 or 2 s, so many
# short slices measure it best (two identical servers: ±1-2.5% with 20-30 s a side).
SLICE_S = 0.25
LAT_BLOCK = 100  # request pairs resampled together for the latency interval
RESAMPLES = 300  # bootstrap resamples of the 95% interval of each ratio


async def measure_pair(kind: str, n_seq: int, seconds: float, sides: dict[str, Side],
                       responders: int, flip: int) -> dict[str, Samples]:
    """Path ``kind`` on both servers, alternating: one sequential request on one, then
    one on the other; then ``SLICE_S`` of throughput on one, then the other (the first
    mode alternating too).  Each mode gets ``n_seq`` requests and ``seconds`` in all.
    The host's hiccups last milliseconds and its load drifts over seconds, and both
    fall on the two sides alike: the p99 of two identical servers then moves by a few
    percent, where chunks of 100 requests left it ±15% (bench/RESULTS.md)."""
    modes = list(sides)
    ncs: dict[str, Any] = {}
    for mode, side in sides.items():
        # As the CLI connects, with the same options with and without auth; with
        # credentials the connection signs what Caller sends.
        nc = ncs[mode] = await connect(settings(side.url, side.creds), name="bench")
        if side.creds and signer_of(nc) is None:
            raise RuntimeError(f"{side.creds} is not a shipyard identity: the runtime "
                               "path would not sign")
        if side.creds and denials_of(nc) is None:
            raise RuntimeError("a connection with credentials has no publish-denial watch")
    requests = {mode: _request(ncs[mode], kind, responders) for mode in modes}

    def order(i: int) -> list[str]:
        return modes if (i + flip) % 2 == 0 else modes[::-1]

    for mode in modes:  # warm up
        await sequential(requests[mode], 200)
        await throughput(requests[mode], 64, 0.5)
    out = {m: Samples() for m in modes}
    for i in range(n_seq):
        for mode in order(i):
            t0 = time.perf_counter()
            await requests[mode]()
            out[mode].lat.append(time.perf_counter() - t0)
    for i in range(max(1, round(seconds / SLICE_S))):
        for mode in order(i):
            side = sides[mode]
            server0 = process_cpu_s(side.server_pid)
            resp0 = sum(process_cpu_s(p) for p in side.responder_pids)
            cpu0, t0 = time.process_time(), time.perf_counter()
            rps = await throughput(requests[mode], 64, SLICE_S)
            elapsed = time.perf_counter() - t0
            out[mode].slices.append(
                (rps * elapsed, elapsed, time.process_time() - cpu0,
                 process_cpu_s(side.server_pid) - server0,
                 sum(process_cpu_s(p) for p in side.responder_pids) - resp0))
    for nc in ncs.values():
        await nc.close()
    return out


def pooled_comparison(off_runs: Sequence[Samples], on_runs: Sequence[Samples],
                      metrics: Sequence[str], tolerance: float) -> dict[str, Any]:
    """Auth off against auth on over every round pooled: each side's figures, the ratio
    on/off, its 95% interval (a paired bootstrap: blocks of ``LAT_BLOCK`` request pairs,
    slice pairs), and whether auth costs at most ``tolerance``.  Each round's own
    figures are kept, to show the spread."""
    off, on = Samples.pool(off_runs), Samples.pool(on_runs)
    a, b = off.figures(), on.figures()
    ratio = {m: round(b[m] / a[m], 3) for m in metrics}
    rng = random.Random(0)  # the same interval for the same samples
    starts = range(0, len(off.lat), LAT_BLOCK)
    boot: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(RESAMPLES):
        lat = [i for s in rng.choices(starts, k=len(starts))
               for i in range(s, min(s + LAT_BLOCK, len(off.lat)))]
        sl = rng.choices(range(len(off.slices)), k=len(off.slices))
        x = Samples([off.lat[i] for i in lat], [off.slices[j] for j in sl]).figures()
        y = Samples([on.lat[i] for i in lat], [on.slices[j] for j in sl]).figures()
        for m in metrics:
            boot[m].append(y[m] / x[m])
    interval = {m: [round(percentile(boot[m], 2.5), 3), round(percentile(boot[m], 97.5), 3)]
                for m in metrics}
    return {"off": a, "on": b, "ratio": ratio, "interval_95": interval,
            "within": {m: within(m, ratio[m], tolerance) for m in metrics},
            "runs": {"off": [r.figures() for r in off_runs],
                     "on": [r.figures() for r in on_runs]}}


async def measure(url: str, kind: str, n_seq: int, seconds: float,
                  responders: int = 1) -> dict[str, Any]:
    """Path ``kind`` on one server: sequential latency, then throughput at 64 in flight."""
    nc = await connect(settings(url), name="bench")
    request = _request(nc, kind, responders)
    await sequential(request, 200)  # warm up
    lat = await sequential(request, n_seq)
    await throughput(request, 64, 0.5)  # warm up
    rps = await throughput(request, 64, seconds)
    await nc.close()
    return {**summary_us(lat), "rps_64": round(rps)}


def _round(url: str, n_resp: int, n_seq: int, seconds: float,
           out: dict[str, list[dict[str, Any]]]) -> None:
    """One measurement of every path with ``n_resp`` responders, appended to ``out``."""
    subject = subjects.command("bench", "echo")
    raw_argvs = [python("-m", "bench.responders", "raw", url, subject) for _ in range(n_resp)]
    node_argvs = [python("-m", "bench.responders", "node", url, f"bench-{i}")
                  for i in range(n_resp)]
    with processes(raw_argvs):
        out["raw"].append(_measure(url, "raw", n_seq, seconds))
    with processes(node_argvs):
        for kind in KINDS:
            if kind != "raw":
                out[kind].append(_measure(url, kind, n_seq, seconds, n_resp))


Server = tuple[str, AuthServer | None, int | None]  # url, its identities (auth on), pid


def _paired_round(off_server: Server, on_server: Server, n_resp: int, n_seq: int,
                  seconds: float, per: dict[str, dict[str, list[Samples]]],
                  flip: int) -> None:
    """One measurement of every path on each server, the two of a path interleaved
    request by request and slice by slice (``measure_pair``): this machine's load drifts
    over seconds to minutes, so both sides of a pair see the same load and their ratio
    cancels it.  The responders of both servers stay up meanwhile (idle ones cost
    nothing)."""
    subject = subjects.command("bench", "echo")
    servers = {"off": off_server, "on": on_server}

    def argvs(group: str, mode: str) -> list[list[str]]:
        url, auth, _ = servers[mode]
        out = []
        for i in range(n_resp):
            name = f"{group}-{i}"
            target = subject if group == "raw" else name
            kind = "raw" if group == "raw" else "node"
            out.append(python("-m", "bench.responders", kind, url, target,
                              *([auth.creds(name)] if auth else [])))
        return out

    n = 0
    for group, kinds in (("raw", [k for k in AUTH_KINDS if k.startswith("raw")]),
                         ("bench", [k for k in AUTH_KINDS if not k.startswith("raw")])):
        with processes(argvs(group, "off")) as off, processes(argvs(group, "on")) as on:
            pids = {"off": tuple(p.pid for p in off), "on": tuple(p.pid for p in on)}
            for pid in (*pids["off"], *pids["on"]) if PINNED else ():
                pin(pid, SERVER_CPUS)
            sides = {mode: Side(url, auth.admin if auth else None, server_pid, pids[mode])
                     for mode, (url, auth, server_pid) in servers.items()}
            for kind in kinds:
                n += 1
                pair = anyio.run(measure_pair, kind, n_seq, seconds, sides,
                                 1 if group == "raw" else n_resp, (n + flip) % 2,
                                 backend_options={"use_uvloop": True})
                for mode, result in pair.items():
                    per[mode][kind].append(result)


def run(quick: bool = False, auth: bool = False, control: bool = False) -> dict[str, Any]:
    if auth:
        return run_auth(quick, control)
    n_seq, seconds, rounds = (1000, 1.5, 1) if quick else (3000, 3.0, 3)
    results: dict[str, Any] = {"target_ratio": TARGET, "payload_bytes": len(PAYLOAD), "cases": []}
    with nats_server() as server:
        for n_resp in RESPONDERS:
            per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
            for _ in range(rounds):
                # Interleaved, so drift on the machine hits every path alike.
                _round(server.url, n_resp, n_seq, seconds, per_kind)
            case: dict[str, Any] = {"responders": n_resp}
            for kind in KINDS:
                case[kind] = _median_case(per_kind[kind])
            base = case["raw"]["rps_64"]
            case["node_ratio"] = round(case["node"]["rps_64"] / base, 3)
            case["ratio"] = round(case["runtime"]["rps_64"] / base, 3)
            results["cases"].append(case)
    rows = []
    for c in results["cases"]:
        for kind in KINDS:
            r = c[kind]
            ratio = {"raw": "1.0", "node": c["node_ratio"], "runtime": c["ratio"]}[kind]
            rows.append((c["responders"], kind, r["p50_us"], r["p99_us"], r["rps_64"], ratio))
    print_table("echo: node runtime vs raw nats-py (same bytes, responders in other processes)",
                ["responders", "path", "seq p50 us", "seq p99 us", "req/s @64", "x raw"], rows)
    worst = min(c["ratio"] for c in results["cases"])
    results["worst_ratio"] = worst
    results["pass"] = worst >= TARGET
    print(f"target: runtime >= {TARGET}x raw throughput; worst ratio {worst} -> "
          f"{'PASS' if results['pass'] else 'FAIL'}")
    return results


def run_auth(quick: bool = False, control: bool = False) -> dict[str, Any]:
    """Every path without auth and with auth on, on the same machine, the two
    measurements of a path interleaved in each round (``_paired_round``); each metric
    over every round pooled, and the ratio auth/no-auth with its 95% interval.
    Unsigned paths are held to 5%, the signed one to added p50 < 1 ms.

    ``control``: the "on" side is a second server without auth (an A/A run).  Its
    ratios differ from 1 only by the measurement's own noise: what a difference between
    auth off and on must exceed to mean anything on this machine."""
    # 40,000 requests a side: a p99 (400 requests above it) to ~±4%; 15,000 left ±7%.
    n_seq, seconds, rounds = (1000, 1.5, 1) if quick else (8000, 4.0, 5)
    identities = [(f"{p}-{i}", "deployer", "control") for p in ("raw", "bench")
                  for i in range(max(RESPONDERS))]
    results: dict[str, Any] = {"tolerance": AUTH_TOLERANCE, "payload_bytes": len(PAYLOAD),
                               "target_added_p50_us": TARGET_ADDED_P50_US,
                               "load_average_start": load_average(), "cases": []}
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(nats_server())
        if control:
            twin = stack.enter_context(nats_server())
            on_server: Server = (twin.url, None, pid_of(twin))
        else:
            secured = stack.enter_context(auth_server(identities))
            on_server = (secured.url, secured, pid_of(secured.server))
        off_server: Server = (plain.url, None, pid_of(plain))
        results["control"] = control
        if PINNED:  # the same placement on both sides, every round
            pin(off_server[2], SERVER_CPUS)
            pin(on_server[2], SERVER_CPUS)
            own_cpus = os.sched_getaffinity(0)
            pin(os.getpid(), CLIENT_CPUS)
            stack.callback(pin, os.getpid(), own_cpus)  # the next benchmark runs unpinned
        results["placement"] = (f"servers and responders on CPU {min(SERVER_CPUS)}, the load "
                                f"generator on CPU {min(CLIENT_CPUS)}") if PINNED else "any"
        for n_resp in RESPONDERS:
            per: dict[str, dict[str, list[Samples]]] = {
                mode: {k: [] for k in AUTH_KINDS} for mode in ("off", "on")}
            for r in range(rounds):
                _paired_round(off_server, on_server, n_resp, n_seq, seconds, per,
                              flip=r % 2)
            for kind in AUTH_KINDS:
                case = {"responders": n_resp, "path": kind, "signed": kind not in UNSIGNED,
                        **pooled_comparison(per["off"][kind], per["on"][kind],
                                            (*METRICS, *REPORTED), AUTH_TOLERANCE)}
                case["added_p50_us"] = round(case["on"]["p50_us"] - case["off"]["p50_us"], 1)
                results["cases"].append(case)
    unsigned = [c for c in results["cases"] if not c["signed"]]
    judged = [c for c in unsigned if c["path"] in JUDGED]
    signed = [c for c in results["cases"] if c["signed"]]

    def cell(c: dict[str, Any], m: str) -> str:
        lo, hi = c["interval_95"][m]
        out = "" if m in REPORTED or c["within"][m] else ", OUT"
        return f"{c['off'][m]} -> {c['on'][m]} ({c['ratio'][m]}x {lo}-{hi}{out})"

    rows = [(c["responders"], c["path"] + ("" if c["path"] in JUDGED else " (reported)"),
             *(cell(c, m) for m in (*METRICS, *REPORTED))) for c in unsigned]
    sides = "two servers without auth (A/A control)" if control else "auth off -> auth on"
    print_table(f"echo, unsigned request/reply: {sides} (ratio on/off and its 95% "
                "interval; OUT: beyond 5%)",
                ["responders", "path", "req/s @64", "seq p50 us", "seq p99 us",
                 "client CPU us/req", "server CPU us/req (reported)",
                 "stack CPU us/req (reported)"], rows)
    rows = [(c["responders"], c["path"], f"{c['off']['p50_us']} -> {c['on']['p50_us']}",
             c["added_p50_us"], f"{c['off']['rps_64']} -> {c['on']['rps_64']} "
             f"({c['ratio']['rps_64']}x)", f"{c['off']['cpu_us']} -> {c['on']['cpu_us']}")
            for c in signed]
    print_table(f"echo, signed command round trip (runtime): {sides}",
                ["responders", "path", "seq p50 us", "added p50 us", "req/s @64",
                 "client CPU us/req"], rows)
    results["load_average_end"] = load_average()
    results["unsigned_pass"] = all(c["within"][m] for c in judged for m in METRICS)
    results["signed_pass"] = all(c["added_p50_us"] < TARGET_ADDED_P50_US for c in signed)
    results["pass"] = results["unsigned_pass"] and results["signed_pass"]
    print(f"target, unsigned ({', '.join(JUDGED)}): every metric within "
          f"{AUTH_TOLERANCE:.0%} of no auth -> "
          f"{'PASS' if results['unsigned_pass'] else 'FAIL'}")
    print(f"target, signed: added p50 < {TARGET_ADDED_P50_US:g} us -> "
          f"{'PASS' if results['signed_pass'] else 'FAIL'}")
    return results


def _any_reply(msg: Any) -> bool:
    return True  # one request per reply subject at a time, and nothing else answers


def _measure(url: str, kind: str, n_seq: int, seconds: float,
             responders: int = 1) -> dict[str, Any]:
    return anyio.run(measure, url, kind, n_seq, seconds, responders,
                     backend_options={"use_uvloop": True})


def _median_case(cases: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(cases, key=lambda c: c["rps_64"])
    return ordered[len(ordered) // 2]
