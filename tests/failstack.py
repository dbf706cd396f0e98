"""A stack for failover tests and figures: NATS servers and Deployers as real processes
(so they can be SIGKILLed), Design and API nodes in the test's task group (API workers
are real processes), an HTTP client, and a load loop that records every request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import nats.errors
from nats.aio.client import Client as NATS

from nodes.api.node import ApiNode
from nodes.design import DesignNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats, wait_jetstream
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.deploy import CreateInfra
from protocol.errors import OperationError
from protocol.leases import LEASE_VALUE, lease_key
from tests.apistack import Stack, url
from tests.helpers import fleet, wait_for

HB = 0.5


@dataclass
class Deployer:
    """One Deployer process (``shipyard node start deployer``)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_deployer(name: str, settings: NatsSettings, tmp: Path) -> Deployer:
    log = tmp / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env.update(SHIPYARD_REPLICAS=str(settings.replicas), SHIPYARD_LOG_FORMAT="json")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "nodes.cli", "node", "start", "deployer", "--name",
             name, "--nats", settings.url, "--heartbeat-interval", str(HB)],
            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            start_new_session=True)
    return Deployer(name=name, proc=proc, log=log)


async def lease_holder(nc: NATS, role: str = "deployer") -> str | None:
    """The node that holds ``role``'s lease now, or None."""
    try:
        kv = await nc.jetstream(timeout=1.0).key_value(subjects.LEASES_BUCKET)
        entry = await kv.get(lease_key(role))
    except (nats.errors.Error, TimeoutError):
        return None
    return LEASE_VALUE.decode(entry.value).node if entry.value else None


@dataclass
class Load:
    """HTTP requests in a loop; (monotonic time, ok) of each."""

    results: list[tuple[float, bool]] = field(default_factory=list)

    def first_ok_after(self, t: float) -> float | None:
        return next((when for when, ok in self.results if ok and when > t), None)

    def failed(self) -> int:
        return sum(1 for _, ok in self.results if not ok)


async def load_loop(http: httpx.AsyncClient, target: str, load: Load, *,
                    concurrency: int = 4, timeout: float = 2.0) -> None:
    """Keep ``concurrency`` requests in flight until cancelled."""
    async def one() -> None:
        while True:
            try:
                r = await http.post(target, json={"features": {"x": 1}}, timeout=timeout)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            load.results.append((time.monotonic(), ok))
            if not ok:
                await anyio.sleep(0.02)
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(one)


@dataclass
class FailStack:
    stack: Stack
    deployers: list[Deployer]
    servers: list[EmbeddedNats]

    async def holder(self) -> str | None:
        return await lease_holder(self.stack.nc)

    def deployer(self, name: str) -> Deployer:
        return next(d for d in self.deployers if d.name == name)

    def server_of(self, node: ApiNode) -> EmbeddedNats:
        """The NATS server a node's connection is on."""
        connected = node.nc.connected_url
        assert connected is not None
        port = connected.port
        return next(s for s in self.servers if s.port == port)


@asynccontextmanager
async def fail_stack(servers: list[EmbeddedNats], tmp: Path, *,
                     deployers: int = 2) -> AsyncIterator[FailStack]:
    """Deployers ``deployer-1`` (active) .. ``deployer-N`` (standbys) as processes, Design
    in-process, infra ``prod`` for API nodes."""
    replicas = min(len(servers), 3)
    settings = NatsSettings(servers=tuple(s.url for s in servers), replicas=replicas)
    procs: list[Deployer] = []
    nc = await connect(settings, name="test")
    try:
        await wait_jetstream(nc)
        procs.append(start_deployer("deployer-1", settings, tmp))
        await wait_for(lambda: lease_holder(nc), timeout=30, interval=0.1,
                       message="deployer-1 holding the lease")
        for i in range(2, deployers + 1):
            procs.append(start_deployer(f"deployer-{i}", settings, tmp))
        async with fleet() as f:
            await f.start(DesignNode(name="design", nats=settings, workspace=tmp / "ws",
                                     data_dir=tmp / "design", heartbeat_interval=HB))
            caller = Caller(nc, sender="test")

            async def infra() -> bool:
                try:
                    await caller.call(CreateInfra(name="prod", kind="api", stage="production",
                                                  exist_ok=True), timeout=5)
                except OperationError:
                    return False
                return True
            await wait_for(infra, timeout=30, interval=0.2, message="infra prod created")
            async with httpx.AsyncClient(timeout=30) as http:
                yield FailStack(stack=Stack(fleet=f, settings=settings, tmp=tmp, nc=nc,
                                            caller=caller, http=http),
                                deployers=procs, servers=servers)
    finally:
        for d in procs:
            d.stop()
        await nc.close()


__all__ = ["Deployer", "FailStack", "Load", "fail_stack", "lease_holder", "load_loop", "url"]
