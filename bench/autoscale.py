"""Autoscaling: a step load (10x within one second) on one API node with elastic workers.

One API node process, ``--min-workers 1 --max-workers 4 --scale-down-after 5``, serves a
latency-bound endpoint (``time.sleep(0.02)``: 50 req/s per worker).  From this process,
an open-loop load (requests are sent on a schedule, whatever the replies do, so queueing
shows in the latencies): 10 req/s, then a ramp to 100 req/s within one second (twice
what one worker can do), held, then back to 10 req/s.  Through the node's HTTP gateway
(what users call: a request is copied to another worker only when nobody announces it
as running or queued for 0.25 s past the wait it was promised, an ``overloaded`` one is
retried once), the same with ``--queue-timeout 5``, and straight to the service's NATS
queue group (no copies; what a worker cannot take within the queue timeout waits at the
node for a new worker, as over HTTP).  Workers
over time come from the node's ``api.scaled`` events; every reply is counted (an error
or a timeout is a failure).  Reported: p50/p99 before, during and after the step, per
second too, and how long after the step began the p99 of every later second of the step
stayed under the target (100 ms, five times the service time).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import msgspec
from nats.aio.msg import Msg

from bench.api_common import (
    SERVICE,
    api_node_argv,
    api_nodes,
    control_plane,
    deploy,
    package,
    served_http,
    served_nats,
)
from bench.api_http import free_port
from bench.common import nats_server, percentile, print_table, settings
from nodes.runtime.connection import connect
from nodes.runtime.requests import Requester
from protocol import subjects
from protocol.events import ApiScaled

BODY = b'{"features":{"x":1}}'
BASE_RPS = 10.0
STEP = 10.0
TARGET_P99_S = 0.1
NODE = "elastic-1"
MIN_WORKERS, MAX_WORKERS = 1, 4


class HttpClient:
    """A lean HTTP/1.1 client on kept-alive connections (a connection per request in
    flight, reused): httpx spends ~1.5 ms of CPU a request, which on this shared
    machine made the load generator, not the node, the bottleneck at 100 req/s."""

    def __init__(self, url: str) -> None:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        self.host, _, port = hostport.partition(":")
        self.port = int(port)
        self.request = (f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\n"
                        "Content-Type: application/json\r\n"
                        f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self) -> int:
        """One request; its status (0: the connection failed).  A kept-alive connection
        the server closed meanwhile is replaced by a new one, as HTTP clients do."""
        while self.idle:
            status = await self._exchange(*self.idle.pop())
            if status:
                return status
        return await self._exchange(*await asyncio.open_connection(self.host, self.port))

    async def _exchange(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> int:
        try:
            writer.write(self.request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return 0
        self.idle.append((reader, writer))
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


def rate_at(t: float, before: float, during: float) -> float:
    """Requests per second at ``t``: the base, a one-second ramp to 10x, the base."""
    if t < before:
        return BASE_RPS
    if t < before + 1.0:
        return BASE_RPS * (1 + (STEP - 1) * (t - before))
    if t < before + during:
        return BASE_RPS * STEP
    return BASE_RPS


async def measure(url: str, http_url: str | None, before: float, during: float,
                  after: float) -> dict[str, Any]:
    """The step load, over HTTP to ``http_url`` or (None) over NATS."""
    nc = await connect(settings(url), name="bench-autoscale")
    req = Requester(nc)
    subject = subjects.api_endpoint(SERVICE, "sleep")
    client = HttpClient(http_url) if http_url else None
    events: list[tuple[float, ApiScaled]] = []
    decoder = msgspec.json.Decoder(ApiScaled)
    start = time.monotonic()
    at_min = anyio.Event()  # scaled back down to the minimum

    async def on_event(msg: Msg) -> None:
        event = decoder.decode(msg.data)
        events.append((time.monotonic() - start, event))
        if event.to_workers == MIN_WORKERS:
            at_min.set()

    sub = await nc.subscribe(subjects.event("api", "bench", NODE, "scaled"), cb=on_event)
    sent: list[tuple[float, float, bool]] = []  # sent at, latency, answered without error
    failures: dict[str, int] = {}  # what failed requests got

    async def one(at: float) -> None:
        t0 = time.monotonic()
        try:
            if client is None:
                msg = await req.request(subject, BODY, timeout=10)
                what = (msg.headers or {}).get("Nats-Service-Error", "")[:40]
            else:
                with anyio.fail_after(10):
                    status = await client.post()
                what = "" if status == 200 else f"HTTP {status}"
        except Exception as exc:
            what = type(exc).__name__
        ok = not what
        if what:
            failures[what] = failures.get(what, 0) + 1
        sent.append((at, time.monotonic() - t0, ok))

    total = before + during + after
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        t = 0.0
        while t < total:
            tg.start_soon(one, t)
            t += 1.0 / rate_at(t, before, during)
            await anyio.sleep(max(0.0, start + t - time.monotonic()))
    with anyio.move_on_after(60):
        await at_min.wait()
    end = time.monotonic() - start
    await sub.unsubscribe()
    await nc.close()
    if client is not None:
        client.close()
    return {"sent": sent, "events": events, "end": end, "failures": failures}


COUNTERS = {"shipyard_api_overloaded": "shed overloaded",
            "shipyard_http_retries": "gateway copies and retries"}


def node_counters(port: int) -> dict[str, float]:
    """The node's shed and copy counters, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].removesuffix("_total")
        if name in COUNTERS and not line.startswith("#"):
            out[COUNTERS[name]] = out.get(COUNTERS[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def workers_at(t: float, events: list[tuple[float, ApiScaled]]) -> int:
    n = MIN_WORKERS
    for at, e in events:
        if at <= t:
            n = e.to_workers
    return n


def phase(rows: list[tuple[float, float, bool]]) -> dict[str, Any]:
    ok = [lat for _, lat, good in rows if good]
    return {"requests": len(rows), "failed": len(rows) - len(ok),
            "p50_ms": round(percentile(ok, 50) * 1000, 1) if ok else None,
            "p99_ms": round(percentile(ok, 99) * 1000, 1) if ok else None}


def one_run(transport: str, before: float, during: float, after: float,
            queue_timeout: float | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sy-bench-autoscale-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        port = free_port()
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            argv = api_node_argv(server.url, NODE, tmp, "--http-port", str(port),
                                 "--http-host", "127.0.0.1",
                                 "--min-workers", str(MIN_WORKERS),
                                 "--max-workers", str(MAX_WORKERS),
                                 "--scale-down-after", "5",
                                 *(["--queue-timeout", str(queue_timeout)]
                                   if queue_timeout else []))
            with api_nodes([argv], server.url, 1):
                anyio.run(deploy, server.url, {"v1": 100}, 1)
                served_nats(server.url, subjects.api_endpoint(SERVICE, "sleep"))
                http_url = f"http://127.0.0.1:{port}/public/api/v1/{SERVICE}/sleep/predict"
                served_http(http_url)
                time.sleep(3)  # the probes' bursts are not part of the baseline
                counts0 = node_counters(port)
                r = anyio.run(measure, server.url, http_url if transport == "http" else None,
                              before, during, after, backend_options={"use_uvloop": True})
                counts = {k: v - counts0.get(k, 0) for k, v in node_counters(port).items()}
    sent, events = r["sent"], r["events"]
    seconds = []
    for s in range(int(before + during + after)):
        rows = [x for x in sent if s <= x[0] < s + 1]
        seconds.append({"t": s, "rate": round(rate_at(s + 0.5, before, during)),
                        "workers": workers_at(s + 1, events), **phase(rows)})
    phases = {"before": phase([x for x in sent if x[0] < before]),
              "during": phase([x for x in sent if before <= x[0] < before + during]),
              "after": phase([x for x in sent if x[0] >= before + during])}
    step = [s for s in seconds if before <= s["t"] < before + during]
    late = [s for s in step if s["p99_ms"] is None or s["p99_ms"] > TARGET_P99_S * 1000]
    recovered = (late[-1]["t"] + 1 - before) if late else 0.0
    first_ok = next((s["t"] - before for s in step[1:]  # after the ramp
                     if s["p99_ms"] is not None and s["p99_ms"] <= TARGET_P99_S * 1000), None)
    print_table(f"autoscaling over {transport}: sleep(20 ms) endpoint, workers "
                f"{MIN_WORKERS}..{MAX_WORKERS}, {BASE_RPS:g} -> {BASE_RPS * STEP:g} req/s "
                "within 1 s, open loop",
                ["t (s)", "req/s", "workers", "sent", "failed", "p50 ms", "p99 ms"],
                [(s["t"], s["rate"], s["workers"], s["requests"], s["failed"], s["p50_ms"],
                  s["p99_ms"]) for s in seconds])
    print_table(f"per phase ({transport})", ["phase", "requests", "failed", "p50 ms", "p99 ms"],
                [(k, v["requests"], v["failed"], v["p50_ms"], v["p99_ms"])
                 for k, v in phases.items()])
    timeline = [{"t": round(at, 2), "from": e.from_workers, "to": e.to_workers,
                 "reason": e.reason} for at, e in events]
    for ev in timeline:
        print(f"  t={ev['t']:6.2f}s  workers {ev['from']} -> {ev['to']}: {ev['reason']}")
    back_to_min = bool(events) and events[-1][1].to_workers == MIN_WORKERS
    result = {"seconds": seconds, "phases": phases, "scaling": timeline,
              "p99_under_target_after_step_s": recovered if late != step else None,
              "p99_first_under_target_after_step_s": first_ok,
              "step_seconds_over_target": len(late),
              "back_to_min_at_s": round(events[-1][0], 2) if back_to_min else None,
              "scaled_up": max(s["workers"] for s in seconds) > MIN_WORKERS,
              "failed": sum(v["failed"] for v in phases.values()),
              "failures": r["failures"]}
    result["node"] = counts
    print(f"node counters during the load: {counts}")
    print(f"{transport}: p99 under {TARGET_P99_S * 1000:g} ms {first_ok}s after the step "
          f"began, for good after {result['p99_under_target_after_step_s']}s; failed "
          f"requests: {result['failed']} {r['failures'] or ''}; back to {MIN_WORKERS} worker at "
          f"{result['back_to_min_at_s']}s")
    return result


def run(quick: bool = False) -> dict[str, Any]:
    before, during, after = (4.0, 12.0, 12.0) if quick else (5.0, 20.0, 15.0)
    runs = {"http": one_run("http", before, during, after),
            "http, --queue-timeout 5": one_run("http", before, during, after, 5.0),
            "nats": one_run("nats", before, during, after)}
    summary = [(name, r["failed"], r["p99_first_under_target_after_step_s"],
                r["p99_under_target_after_step_s"], r["back_to_min_at_s"],
                r["phases"]["before"]["p99_ms"], r["phases"]["during"]["p99_ms"],
                r["phases"]["after"]["p99_ms"], r["node"].get("shed overloaded"),
                r["node"].get("gateway copies and retries")) for name, r in runs.items()]
    print_table("autoscaling, summary", ["run", "failed", "p99 ok at (s)",
                                         "p99 ok for good at (s)", "at min at (s)",
                                         "p99 before", "p99 during", "p99 after", "shed",
                                         "copies"], summary)
    ok = all(r["scaled_up"] and r["back_to_min_at_s"] is not None
             and r["p99_first_under_target_after_step_s"] is not None
             for name, r in runs.items() if name != "http, --queue-timeout 5") \
        and runs["http"]["failed"] == 0
    print(f"target: with the default options, scale up, get p99 back under "
          f"{TARGET_P99_S * 1000:g} ms during the step and return to the minimum; over HTTP "
          f"no failed request -> {'PASS' if ok else 'FAIL'}")
    return {"p99_target_ms": TARGET_P99_S * 1000, "runs": runs, "pass": ok}
