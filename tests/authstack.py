"""A real nats-server running with the auth config ``shipyard auth init`` writes, and
connections as each identity that record what the server refused."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from nats.aio.client import Client as NATS

from nodes.auth.registry import publish_identities
from nodes.auth.store import AuthStore
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from tests.helpers import Fleet, fleet, wait_for


@dataclass
class Conn:
    """A connection as one identity, with every error the server sent it."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]

    async def denied(self, what: str, timeout: float = 5.0) -> str:
        """Wait for the server's permissions violation naming ``what``."""
        found: str = await wait_for(
            lambda: next((e for e in self.violations() if what.lower() in e.lower()), None),
            timeout=timeout, message=f"a permissions violation for {what!r}")
        return found


class AuthStack:
    def __init__(self, root: Path) -> None:
        self.store = AuthStore(root / "auth")
        self.store.init()
        self.server = EmbeddedNats(root / "nats", port=-1, monitor_port=None,
                                   log_file=root / "nats.log",
                                   server_name="shipyard",
                                   config_file=self.store.server_config)

    def settings(self, name: str) -> NatsSettings:
        return NatsSettings(servers=(self.server.url,),
                            creds_file=str(self.store.creds_path(name)))

    @asynccontextmanager
    async def connect(self, name: str) -> AsyncIterator[Conn]:
        nc = NATS()
        conn = Conn(nc)

        async def on_error(exc: Exception) -> None:
            conn.errors.append(str(exc))

        try:
            await nc.connect(servers=[self.server.url], error_cb=on_error, connect_timeout=3,
                             max_reconnect_attempts=0, allow_reconnect=False,
                             **self.settings(name).connect_options())
        except BaseException:
            with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
                await nc.close()  # a refused connect leaves its socket open otherwise
            raise
        try:
            yield conn
        finally:
            with anyio.move_on_after(2, shield=True):
                await close(nc)

    def add(self, name: str, role: str, *, kind: str = "user", infra: str | None = None,
            ) -> Path:
        _, path = self.store.add(name, kind=kind, role=role, infra=infra)
        return path

    def server_log(self) -> str:
        log = self.server.log_file
        return log.read_text() if log is not None and log.exists() else ""


@contextmanager
def auth_stack(root: Path, *identities: tuple[str, str, str, str | None],
               ) -> Iterator[AuthStack]:
    """A started server that knows ``identities`` (name, kind, role, infra) beside the
    ones ``auth init`` creates."""
    stack = AuthStack(root)
    for name, kind, role, infra in identities:
        stack.add(name, role, kind=kind, infra=infra)
    stack.server.start()
    try:
        yield stack
    finally:
        stack.server.stop()


async def start_control_plane(f: Fleet, stack: AuthStack, root: Path,
                              heartbeat_interval: float) -> None:
    """The Deployer and a Design node (workspace ``root/ws``), each as its own
    identity."""
    from nodes.deployer import DeployerNode
    from nodes.design import DesignNode

    await f.start(DeployerNode(name="deployer", nats=stack.settings("deployer"),
                               heartbeat_interval=heartbeat_interval))
    await f.start(DesignNode(name="design", nats=stack.settings("design"),
                             workspace=root / "ws", data_dir=root / "design",
                             heartbeat_interval=heartbeat_interval))


@asynccontextmanager
async def control_plane(stack: AuthStack, root: Path, heartbeat_interval: float,
                        ) -> AsyncIterator[tuple[Caller, Fleet]]:
    """As ``shipyard up`` starts a stack with auth: the identities published, the
    Deployer and a Design node running (workspace ``root/ws``).  Yields the admin's
    ``Caller`` and the fleet, for more nodes."""
    nc = await connect(stack.settings("admin"), name="admin")
    try:
        await publish_identities(nc, stack.store.identities())
        async with fleet() as f:
            await start_control_plane(f, stack, root, heartbeat_interval)
            yield Caller(nc), f
    finally:
        await close(nc)
