"""The Deployer node: the one place that manages production.

This module holds the node registry half; project and API deployments plug in beside it.
Heartbeats and exit reports are validated before the registry sees them (a name reaches a
KV key, an interval decides liveness), and the KV writer writes each record on its own:
one record that cannot be written is dropped, never holding back the others.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.deployer.alerts import Policy
from nodes.deployer.api_deployments import ApiDeployer
from nodes.deployer.apikeys import ApiKeys
from nodes.deployer.bundle_deployments import ProjectDeployer
from nodes.deployer.health import DEFAULT_HOLD_S
from nodes.deployer.health_desk import HealthDesk
from nodes.deployer.registry import FORGET_AFTER_S, Registry
from nodes.deployer.run_history import RunDesk
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import snapshot
from nodes.runtime.loops import supervised
from nodes.runtime.node import Node, handles
from protocol import subjects
from protocol.base import Family, Request, encode
from protocol.deploy import ListDeployments
from protocol.deployer import DEPLOYER
from protocol.errors import BadName, Conflict, NotFound
from protocol.events import Event, NodeEvent, NodeLost
from protocol.events import NodeForgotten as NodeForgottenEvent
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import (
    ONLINE,
    REGISTRY_VALUE,
    ForgetNode,
    ForgottenNode,
    ListNodes,
    NodeInfo,
    NodeList,
    registry_key,
)
from protocol.reports import REPORT, AnyReport
from protocol.state import DeployerState

if TYPE_CHECKING:
    from nodes.deployer.dashboard.config import DashboardConfig
    from nodes.deployer.dashboard.server import Dashboard

EVENT_QUEUE = 10_000
# A sweep this much later than due means this process did not run (stopped, or its VM
# stalled): nodes get a fresh grace period instead of being judged on unread beats.  At
# most once per STALL_COOLDOWN_S, so a loop that lags for good still judges its nodes.
STALL_S = 2.0
STALL_COOLDOWN_S = 30.0
WRITE_RETRY_S = 0.5


def _sender(subject: str) -> str:
    """The node a heartbeat or report subject names (its last token)."""
    return subject.rsplit(".", 1)[-1]


class DeployerNode(Node):
    role: ClassVar[str] = "deployer"
    family: ClassVar[Family | None] = DEPLOYER
    verifies_commands: ClassVar[bool] = True
    leased: ClassVar[bool] = True  # one active Deployer; the others are standbys
    runs: RunDesk
    apis: ApiDeployer
    health: HealthDesk

    def __init__(self, *, sweep_interval: float | None = None,
                 forget_after: float | None = FORGET_AFTER_S,
                 dashboard: DashboardConfig | None = None,
                 health_hold_s: float = DEFAULT_HOLD_S, alert_policy: Policy | None = None,
                 **kw: Any) -> None:
        """``forget_after``: seconds a lost node is kept before it is forgotten (None:
        kept until ``shipyard node forget``); ``dashboard``: serve the web dashboard and
        ``/metrics`` (None: not served); ``health_hold_s``: how long a new health value
        must hold before it is published and alerted; ``alert_policy``: webhook retries,
        timeouts and queue bounds."""
        super().__init__(**kw)
        self.registry = Registry(forget_after=forget_after)
        # Each desk gets the node's capabilities (``DeskHost``) and, by name, what it
        # uses of a sibling; the bundle view's two come late-bound (built after it).
        self.projects = ProjectDeployer(
            self, self.registry, api_views=lambda cmd: self.apis.views(cmd),
            last_runs=lambda infra, project: self.runs.last_runs(infra, project))
        self.add_handlers(self.projects)
        self.runs = RunDesk(self, self.registry, require_infra=self.projects.require_infra,
                            on_run_finished=self.projects.kick,
                            on_run_failed=lambda run: self.health.run_failed(run))
        self.add_handlers(self.runs)
        self.apis = ApiDeployer(self, self.registry, require_infra=self.projects.require_infra)
        self.add_handlers(self.apis)
        self.api_keys = ApiKeys(self)
        self.add_handlers(self.api_keys)
        everything = ListDeployments()
        self.health = HealthDesk(
            self, self.registry, hold_s=health_hold_s, alert_policy=alert_policy,
            views=lambda: self.projects.views(everything) + self.apis.views(everything),
            get_infra=self.projects.get_infra)
        self.add_handlers(self.health)
        self.sweep_interval = sweep_interval or min(0.5, self.heartbeat_interval / 4)
        self.heartbeats_seen = 0
        self._kv: KeyValue | None = None
        self._events_send, self._events_recv = anyio.create_memory_object_stream[Event](
            EVENT_QUEUE)
        self._dirty = anyio.Event()
        # One write pass at a time: the last pass at stop waits for the writer's, whose
        # records are already taken from the registry's dirty set while it writes them.
        self._write_lock = anyio.Lock()
        self._events_done = anyio.Event()
        self.dashboard: Dashboard | None = None
        if dashboard is not None:  # imported here: every CLI command imports this module
            from nodes.deployer.dashboard.server import Dashboard

            self.dashboard = Dashboard(self, dashboard)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None
        return self._kv

    async def setup(self) -> None:
        self._kv = await ensure_kv(self.js, subjects.REGISTRY_BUCKET,
                                   replicas=self.settings.replicas,
                                   description="shipyard node registry")
        await self._load_registry()
        await self.projects.setup()
        await self.runs.setup()
        await self.apis.setup()
        await self.api_keys.setup()
        await self.health.setup()

    async def _load_registry(self) -> None:
        # A snapshot, not kv.keys(): nats-py's keys() can end before the replay does.
        infos: list[NodeInfo] = []
        for key, (_revision, value) in sorted((await snapshot(self.kv, ">")).items()):
            if value:
                try:
                    info = REGISTRY_VALUE.decode(value)
                    info.validate(key)
                except Exception as exc:
                    self.log.warning("skipping unreadable registry record", key=key,
                                     error=str(exc))
                    continue
                infos.append(info)
        self.registry.load(infos)
        self.log.info("registry loaded", nodes=len(infos))

    async def started(self, tg: TaskGroup) -> None:
        await self.subscribe_decoded(subjects.HEARTBEATS_ALL, HEARTBEAT, self._on_heartbeat,
                                     validate=Heartbeat.validate, kind="heartbeat",
                                     sender=_sender, pending_msgs_limit=100_000)
        await self.subscribe_decoded(subjects.reports("exit"), REPORT, self._on_exit_report,
                                     validate=AnyReport.validate, kind="exit report",
                                     sender=_sender)
        tg.start_soon(partial(supervised, "registry sweep", self._sweeper, log=self.log))
        tg.start_soon(self._event_publisher)  # publish_event never raises
        tg.start_soon(partial(supervised, "registry writer", self._registry_writer,
                              log=self.log))
        await self.runs.started(tg)
        await self.projects.started(tg)
        await self.apis.started(tg)
        await self.health.started(tg)
        if self.dashboard is not None:  # every part supervised: NATS errors never end it
            await tg.start(self.dashboard.run)

    def state(self) -> DeployerState:
        return DeployerState(nodes=len(self.registry.nodes), heartbeats=self.heartbeats_seen,
                             lease=self.lease_state)

    @property
    def heartbeats_bad(self) -> int:
        """Heartbeats dropped as malformed (bad JSON, names, numbers or subject)."""
        return self.drops.count("heartbeat")

    # -- heartbeats --------------------------------------------------------------------

    async def _on_heartbeat(self, hb: Heartbeat) -> None:
        if not self.registry.admits(hb.node):
            self.drops.drop("heartbeat", hb.node, subjects.heartbeat(hb.role, hb.node),
                            f"the registry is full ({self.registry.max_nodes} nodes): "
                            "forget lost nodes with 'shipyard node forget'")
            return
        self.heartbeats_seen += 1
        event = self.registry.on_heartbeat(hb)
        if event is not None:
            self.log.info("node online", peer=hb.node, peer_role=hb.role, reason=event.reason)
            await self._queue_event(event)
        if self.registry.nodes[hb.node].dirty:
            self._dirty.set()
            self.projects.kick()
            self.runs.kick()

    async def _on_exit_report(self, report: AnyReport) -> None:
        event = self.registry.on_exit(report.node, report.pid, report.reason, report.instance)
        if event is not None:
            self.log.info("node exited", peer=report.node, reason=report.reason)
            if isinstance(event, NodeLost):
                self.health.node_lost(event)
            await self._queue_event(event)
            self._dirty.set()
            self.projects.kick()
            self.runs.kick()

    async def _sweeper(self) -> None:
        last = self.registry.clock()
        graced = -STALL_COOLDOWN_S
        while not self.stopping_requested:
            await anyio.sleep(self.sweep_interval)
            now = self.registry.clock()
            late, last = now - last - self.sweep_interval, now
            if late > STALL_S and now - graced >= STALL_COOLDOWN_S:
                graced = now
                # This process was stopped (SIGSTOP, a stalled VM): beats sent meanwhile
                # may be unread in the connection, so silence proves nothing yet.
                self.log.warning("deployer stalled; judging nodes afresh", stalled_s=late)
                self.registry.grace()
                continue
            for event in self.registry.sweep():
                await self._changed(event)

    async def _changed(self, event: NodeEvent) -> None:
        if isinstance(event, NodeForgottenEvent):
            self.log.info("node forgotten", peer=event.node, reason=event.reason,
                          by=event.by or None)
            self.apis.forget(event.node)
        else:
            self.log.warning("node lost", peer=event.node)
        if isinstance(event, NodeLost):
            self.health.node_lost(event)
        await self._queue_event(event)
        self._dirty.set()
        self.projects.kick()
        self.runs.kick()

    async def _queue_event(self, event: Event) -> None:
        try:
            await self._events_send.send(event)
        except anyio.ClosedResourceError:
            self.log.warning("event after shutdown not stored", type=type(event).__name__)

    async def _event_publisher(self) -> None:
        try:
            async with self._events_recv:
                async for event in self._events_recv:
                    await self.emit(event)
            self._events_done.set()
        finally:  # also when cancelled (a lost lease): later events are refused
            self._events_send.close()

    async def stopping(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.shutdown()
        # Store every queued event and registry change before the connection drains.
        self._events_send.close()
        await self._events_done.wait()
        await self._write_pass(retry=False)

    async def _registry_writer(self) -> None:
        """Write changed records to KV, coalescing bursts into one pass."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            if not await self._write_pass(retry=True):
                await anyio.sleep(WRITE_RETRY_S)
                self._dirty.set()

    async def _write_pass(self, *, retry: bool) -> bool:
        """Delete forgotten records and write changed ones, each on its own.

        A record whose name cannot be a key is dropped (logged); one whose write failed
        (a NATS timeout, say) is kept dirty for the next pass when ``retry``.  Returns
        False if anything is left for a retry.  Never raises.
        """
        async with self._write_lock:
            return await self._write_changes(retry=retry)

    async def _write_changes(self, *, retry: bool) -> bool:
        ok = True
        for name in self.registry.take_removed():
            try:
                await self.kv.delete(registry_key(name))
            except BadName:
                pass  # never stored
            except Exception as exc:
                ok = False
                if retry and name not in self.registry.nodes:
                    self.registry.removed.add(name)
                self.log.warning("registry delete failed", peer=name, error=str(exc))
        for info in self.registry.take_dirty():
            if info.name not in self.registry.nodes:
                continue  # forgotten meanwhile
            try:
                key = registry_key(info.name)
            except BadName as exc:
                self.log.error("registry record dropped: its name cannot be a key",
                               error=str(exc))
                continue
            try:
                await self.kv.put(key, encode(info))
            except Exception as exc:
                ok = False
                if retry:
                    self.registry.mark_dirty(info.name)
                self.log.warning("registry write failed", peer=info.name,
                                 error=str(exc) or type(exc).__name__)
        return ok

    # -- queries -----------------------------------------------------------------------

    @handles(ListNodes)
    async def list_nodes(self, cmd: ListNodes, req: Request[Any]) -> NodeList:
        return NodeList(nodes=self.registry.query(role=cmd.role, infra=cmd.infra,
                                                 status=cmd.status))

    @handles(ForgetNode)
    async def forget_node(self, cmd: ForgetNode, req: Request[Any]) -> ForgottenNode:
        subjects.token(cmd.name, "node name")
        info = self.registry.get(cmd.name)
        if info is None:
            raise NotFound(f"unknown node {cmd.name!r} (see: shipyard nodes)")
        if info.status == ONLINE and not cmd.force:
            raise Conflict(f"node {cmd.name} is online (it would come back with its next "
                           "heartbeat): stop it first, or forget it anyway with --force")
        by = cmd.by or req.sender
        event = self.registry.forget(cmd.name, reason=f"forgotten while {info.status}",
                                     by=by)
        await self._changed(event)
        return ForgottenNode(node=info)
