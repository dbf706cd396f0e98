"""What prediction capture costs the request path: HTTP end to end through an API node
(``api_http``'s wrk driver and no-op endpoint), the service deployed with ``--capture 0``
(off), ``--capture 1`` (every request captured) and ``--capture 1 --redact x`` (every
request captured, a feature removed: the path that decodes and encodes again), rounds
interleaved (the order rotates), a fresh API node per round (it starts with the round's
setting).

Reported: the median of each metric per setting, the ratio to off, and, for the capture
rounds, how many calls the node captured and dropped (``/metrics``: a dropped
call is one the worker's bounded queue had no room for, while the request itself was
answered as usual).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import anyio

from bench.api_common import SERVICE, api_node_argv, api_nodes, control_plane, package, served_http
from bench.api_http import API_NODE, LUA, METRICS, free_port, measure
from bench.common import load_average, nats_server, print_table, settings
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from protocol.api import DeployApi

SETTINGS: dict[str, tuple[float, list[str]]] = {
    "off": (0.0, []), "capture": (1.0, []), "redact": (1.0, ["x"])}


async def set_capture(url: str, fraction: float, redact: list[str]) -> None:
    nc = await connect(settings(url, None), name="bench-capture")
    try:
        await Caller(nc, sender="bench").call(DeployApi(
            service=SERVICE, infra="bench", generations={"v1": 100}, capture=fraction,
            redact=redact), timeout=30)
    finally:
        await nc.close()


def _counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} ([\d.e+]+)$", text, re.M))


def run(quick: bool = False) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("the capture benchmark needs wrk: apt-get install -y wrk")
    seconds, rounds = (3.0, 1) if quick else (5.0, 3)
    path = f"/public/api/v1/{SERVICE}/noop/predict"
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
    counts: list[tuple[str, float, float, float]] = []
    result: dict[str, Any] = {"load_average_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="sy-bench-capture-") as tmp_s, \
            nats_server() as server:
        tmp = Path(tmp_s)
        script = tmp / "post.lua"
        script.write_text(LUA)
        with control_plane(server.url, tmp / "ws", tmp):
            anyio.run(package, server.url, ["v1"], tmp / "ws")
            for r in range(rounds):
                order = list(SETTINGS)
                for mode in order[r % len(order):] + order[:r % len(order)]:
                    anyio.run(set_capture, server.url, *SETTINGS[mode])
                    port = free_port()
                    argv = api_node_argv(server.url, API_NODE, tmp, "--http-port", str(port),
                                         "--http-host", "127.0.0.1")
                    with api_nodes([argv], server.url, 1):
                        base = f"http://127.0.0.1:{port}"
                        served_http(base + path)
                        runs[mode].append(measure(base + path, script, seconds))
                        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
                            text = resp.read().decode()
                        if mode != "off":
                            counts.append((mode, _counter(text, "shipyard_api_requests_total"),
                                           _counter(text, "shipyard_api_captured_total"),
                                           _counter(text, "shipyard_api_capture_dropped_total")))
    med = {mode: dict(sorted(rs, key=lambda x: x["rps_32"])[len(rs) // 2])
           for mode, rs in runs.items()}
    result["cases"] = med
    result["ratio"] = {mode: {m: round(med[mode][m] / med["off"][m], 3) for m in METRICS}
                       for mode in SETTINGS if mode != "off"}
    result["captured"] = [{"mode": mode, "requests": int(a), "captured": int(b),
                           "dropped": int(c)} for mode, a, b, c in counts]
    result["load_average_end"] = load_average()
    rows = [(m, med["off"][m], med["capture"][m], result["ratio"]["capture"][m],
             med["redact"][m], result["ratio"]["redact"][m]) for m in METRICS]
    print_table("HTTP end to end (wrk) through an API node: --capture 0 vs 1",
                ["metric", "capture 0", "capture 1", "/off", "1 + redact", "/off"], rows)
    for c in result["captured"]:
        print(f"{c['mode']} round: {c['requests']} requests, {c['captured']} captured, "
              f"{c['dropped']} dropped")
    return result
