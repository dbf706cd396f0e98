"""The dashboard inside the Deployer process: its HTTP server, live feed and helpers.

``Dashboard.run`` runs beside the node's other background work, each part under
``supervised`` (a NATS timeout or a busy port is logged and retried with backoff, never
ending the Deployer): uvicorn on its own socket, the feed loop, a follower of the event
stream (the last ``EVENTS_SHOWN`` events, then live ones, each kicking the feed), and
the loader of deployed projects' Flows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS

from nodes.auth.guard import node_identity
from nodes.auth.keys import read_credentials
from nodes.deployer.dashboard.access import Logins, read_tokens
from nodes.deployer.dashboard.app import DashboardApp
from nodes.deployer.dashboard.config import DashboardConfig
from nodes.deployer.dashboard.feed import Feed
from nodes.deployer.dashboard.flow import Flows, flows_section
from nodes.deployer.dashboard.state import (
    EVENTS_SHOWN,
    RecentEvents,
    Traffic,
    api_records,
    deployment_views,
    deployments_section,
    nodes_section,
    runs_section,
)
from nodes.deployer.metrics import DeployerMetrics
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.events import read_events
from nodes.runtime.logs import get_logger
from nodes.runtime.loops import supervised
from protocol.base import Command
from protocol.errors import Forbidden, Unavailable

if TYPE_CHECKING:
    from nodes.deployer.node import DeployerNode

ACTION_TIMEOUT_S = 10.0


class Actor:
    """Sends the page's commands: signed as the dashboard's own user identity on a stack
    with auth, unsigned on the Deployer's connection on a stack without."""

    def __init__(self, node: DeployerNode, creds: Path | None) -> None:
        self.node = node
        self.creds = creds
        self.secured = node_identity(node.settings) is not None
        self._nc: NATS | None = None
        self._lock = anyio.Lock()
        self._identity = "" if creds is None else read_credentials(str(creds)).name

    @property
    def identity(self) -> str:
        """Who the commands are signed by ("" when nobody signs)."""
        return self._identity

    def can_act(self) -> tuple[bool, str]:
        if self.secured and self.creds is None:
            return False, ("this Deployer has no identity to act with: start it with "
                           "--dashboard-creds FILE (a user identity with role deployer); "
                           "the page is read-only")
        return True, ""

    async def call(self, cmd: Command[Any]) -> Any:
        can, why = self.can_act()
        if not can:
            raise Forbidden(why)
        return await (await self._caller()).call(cmd, timeout=ACTION_TIMEOUT_S)

    async def _caller(self) -> Caller:
        if self.creds is None:
            return Caller(self.node.nc, sender="dashboard")
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                # The node's servers and TLS, the dashboard identity's credentials.
                settings = dataclasses.replace(
                    self.node.settings, creds_file=str(self.creds), nkey_seed_file=None,
                    user=None, password=None, token=None)
                try:
                    self._nc = await connect(settings, name="dashboard",
                                             first_connect_timeout=5.0)
                except Exception as exc:
                    raise Unavailable(f"the dashboard cannot connect to NATS as its "
                                      f"identity: {exc}") from None
            return Caller(self._nc, sender="dashboard")

    async def close(self) -> None:
        if self._nc is not None:
            with anyio.move_on_after(2, shield=True):
                await close(self._nc)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node owns SIGINT/SIGTERM


def listen(host: str, port: int) -> socket.socket:
    """A listening socket of this process alone (no SO_REUSEPORT: a second Deployer on
    the same port must fail, not share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Dashboard:
    def __init__(self, node: DeployerNode, config: DashboardConfig) -> None:
        self.node = node
        self.config = config
        self.log = get_logger(component="dashboard")
        self.logins = Logins(read_tokens(config.token_file))
        self.actor = Actor(node, config.creds)
        self.metrics = DeployerMetrics(node)
        self.traffic = Traffic()
        self.events = RecentEvents()
        self.flows = Flows(node)
        self.feed = Feed(self.sections, idle=self.sample_traffic)
        self.flows.on_loaded.append(self.feed.kick)
        self.app = DashboardApp(self)
        self.port = config.port
        self.error = ""
        self._server: _Server | None = None
        self._last_seq = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def sections(self) -> dict[str, Any]:
        views = deployment_views(self.node)
        self.traffic.sample(views)
        return {"nodes": nodes_section(self.node),
                "deployments": deployments_section(self.node, views),
                "runs": runs_section(self.node),
                "traffic": self.traffic.section(),
                "events": self.events.section(),
                "flows": flows_section(self.node, self.flows)}

    def sample_traffic(self) -> None:
        self.traffic.sample([self.node.apis.view(e.value, e.revision)
                             for e in api_records(self.node)])

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        log = self.log
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(supervised, "dashboard feed", self.feed.run, log=log))
            tg.start_soon(partial(supervised, "dashboard events", self._follow, log=log))
            tg.start_soon(partial(supervised, "dashboard flows", self.flows.run, log=log))
            tg.start_soon(partial(supervised, "dashboard http", self._serve, log=log))
            task_status.started()

    async def _follow(self) -> None:
        async for stored in read_events(self.node.nc, last=EVENTS_SHOWN, follow=True):
            if stored.seq <= self._last_seq:
                continue  # read again after a restart of this loop
            self._last_seq = stored.seq
            self.events.add(stored.seq, stored.subject, stored.event)
            self.feed.kick()

    async def _serve(self) -> None:
        try:
            sock = listen(self.config.host, self.config.port)
        except OSError as exc:
            self.error = (f"cannot listen on {self.config.host}:{self.config.port}: "
                          f"{exc.strerror or exc}")
            self.log.error("dashboard not served; retrying", error=self.error)
            raise
        self.error = ""
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, ws="none", loop="none", lifespan="off",
                                access_log=False, log_level="warning", server_header=False,
                                proxy_headers=False, timeout_graceful_shutdown=2)
        self._server = server = _Server(config)
        self.log.info("serving the dashboard", url=self.url)
        try:
            await server.serve([sock])
        finally:
            sock.close()

    async def shutdown(self) -> None:
        """Close every live feed and stop the HTTP server (the node is stopping)."""
        self.feed.close()
        if self._server is not None:
            self._server.should_exit = True
        await self.actor.close()
