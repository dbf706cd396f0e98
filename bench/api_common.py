"""Shared plumbing for the API benchmarks: a control plane in processes, a service with
a no-op or sleeping endpoint, API node processes, deploys that wait until served, and
probes that wait until what a benchmark measures answers (``served_nats``,
``served_http``): a node of a later round keeps the name of the previous round's, so the
Deployer may list it as serving before the new process does."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from bench.common import processes, python, settings, wait_nodes
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.requests import Requester
from protocol.api import CreateApiPackage, DeployApi
from protocol.deploy import CreateInfra, ListDeployments

SERVICE = "bench"

MANIFEST = """\
[project]
key = "benchapi"

[api_services.bench.endpoints.noop]
kind = "prediction"
code = "api/noop.py"

[api_services.bench.endpoints.sleep]
kind = "prediction"
code = "api/sleep.py"

[api_services.bench.endpoints.crash]
kind = "prediction"
code = "api/crash.py"
"""

NOOP = """\
RESULT = {"prediction": 1}


def predict(features):
    return RESULT
"""

SLEEP = """\
import time


def predict(features):
    time.sleep(0.02)
    return {"prediction": 1}
"""


CRASH = """\
import os
import time


def predict(features):
    time.sleep(features.get("after", 0))
    os._exit(3)
"""


def write_project(ws: Path, version: str = "1") -> None:
    d = ws / "benchapi"
    (d / "api").mkdir(parents=True, exist_ok=True)
    (d / "shipyard.toml").write_text(MANIFEST)
    (d / "api" / "noop.py").write_text(NOOP + f"\nVERSION = {version!r}\n")
    (d / "api" / "sleep.py").write_text(SLEEP + f"\nVERSION = {version!r}\n")
    (d / "api" / "crash.py").write_text(CRASH + f"\nVERSION = {version!r}\n")


def shipyard(*args: str) -> list[str]:
    return python("-P", "-m", "nodes.cli", *args)


def _creds(creds: str | None) -> list[str]:
    return ["--creds", creds] if creds else []


@contextmanager
def control_plane(url: str, ws: Path, data: Path, *, admin: str | None = None,
                  deployer: str | None = None, design: str | None = None) -> Iterator[None]:
    """A Deployer and a Design node; on an auth server each runs as its node identity
    (``deployer``, ``design``: credentials files) and ``admin`` watches them come up."""
    argvs = [shipyard("node", "start", "deployer", "--name", "deployer", "--nats", url,
                      "--heartbeat-interval", "0.5", *_creds(deployer)),
             shipyard("node", "start", "design", "--name", "design", "--nats", url,
                      "--workspace", str(ws), "--data-dir", str(data / "design"),
                      "--heartbeat-interval", "0.5", *_creds(design))]
    with processes(argvs, ready_line=None):
        anyio.run(wait_nodes, url, None, 2, admin)
        yield


def api_node_argv(url: str, name: str, data: Path, *extra: str, infra: str = "bench",
                  creds: str | None = None) -> list[str]:
    return shipyard("node", "start", "api", "--name", name, "--infra", infra, "--nats", url,
                    "--data-dir", str(data / name), "--heartbeat-interval", "0.5",
                    *_creds(creds), *extra)


@contextmanager
def api_nodes(argvs: Sequence[Sequence[str]], url: str, n: int,
              infra: str = "bench", admin: str | None = None) -> Iterator[list[Any]]:
    env = {**os.environ, "SHIPYARD_LOG_LEVEL": "warning"}
    os.environ.update(env)
    with processes(argvs, ready_line=None) as procs:
        anyio.run(wait_nodes, url, infra, n, admin)
        yield procs


async def package(url: str, versions: Sequence[str], ws: Path,
                  admin: str | None = None) -> None:
    nc = await connect(settings(url, admin), name="bench-setup")
    caller = Caller(nc, sender="bench")
    await caller.call(CreateInfra(name="bench", kind="api", exist_ok=True), timeout=10)
    for v in versions:
        write_project(ws, v)
        await caller.call(CreateApiPackage(project="benchapi", service=SERVICE, version=v),
                          timeout=60)
    await nc.close()


async def deploy(url: str, generations: dict[str, int], nodes: int,
                 timeout: float = 120.0, admin: str | None = None) -> float:
    """Deploy and wait until every node serves it; seconds taken."""
    nc = await connect(settings(url, admin), name="bench-deploy")
    caller = Caller(nc, sender="bench")
    t0 = time.perf_counter()
    view = await caller.call(DeployApi(service=SERVICE, infra="bench",
                                       generations=generations), timeout=30)
    with anyio.fail_after(timeout):
        while True:
            reply = await caller.call(ListDeployments(project=SERVICE), timeout=10)
            v = next(x for x in reply.deployments if x.kind == "api")
            serving = [n for n in v.nodes if n.status == "online" and n.running == view.desired]
            if v.update_id == view.update_id and len(serving) >= nodes:
                break
            if v.state == "failed":
                raise RuntimeError(f"deploy failed: {v.reasons}")
            await anyio.sleep(0.02)
    await nc.close()
    return time.perf_counter() - t0


PROBE_BODY = b'{"features":{"x":1}}'
PROBE_STREAK = 20  # answers in a row: every worker of the node serves by then


async def _served_nats(url: str, subject: str, timeout: float, creds: str | None) -> None:
    nc = await connect(settings(url, creds), name="bench-probe")
    req = Requester(nc)
    streak = 0
    try:
        with anyio.fail_after(timeout):
            while streak < PROBE_STREAK:
                try:
                    msg = await req.request(subject, PROBE_BODY, timeout=2)
                    ok = not msg.headers
                except Exception:
                    ok = False
                streak = streak + 1 if ok else 0
                if not ok:
                    await anyio.sleep(0.05)
    finally:
        await nc.close()


def served_nats(url: str, subject: str, timeout: float = 60.0,
                creds: str | None = None) -> None:
    """Wait until ``subject`` answers the probe body without an error, many times in a
    row."""
    anyio.run(_served_nats, url, subject, timeout, creds)


def served_http(url: str, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers POSTs of the probe body with 200, many times in a row."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < PROBE_STREAK:
        request = urllib.request.Request(url, data=PROBE_BODY, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                ok = response.status == 200
        except (urllib.error.URLError, OSError):
            ok = False
        streak = streak + 1 if ok else 0
        if not ok:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s")
            time.sleep(0.05)
