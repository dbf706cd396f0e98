"""The Deployer node: the one place that manages production.

This module holds the node registry half; project and API deployments plug in beside it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import anyio
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from nodes.deployer.apikeys import ApiKeys
from nodes.deployer.apis import ApiDeployer
from nodes.deployer.projects import ProjectDeployer
from nodes.deployer.registry import Registry
from nodes.deployer.runs import RunDesk
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.node import Node, handles
from protocol import subjects
from protocol.base import Family, Request, encode
from protocol.deployer import DEPLOYER
from protocol.errors import DecodeError
from protocol.events import Event
from protocol.heartbeat import HEARTBEAT
from protocol.registry import REGISTRY_VALUE, ListNodes, NodeInfo, NodeList, registry_key
from protocol.reports import REPORT

EVENT_QUEUE = 10_000


class DeployerNode(Node):
    role: ClassVar[str] = "deployer"
    family: ClassVar[Family | None] = DEPLOYER

    def __init__(self, *, sweep_interval: float | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.registry = Registry()
        self.projects = ProjectDeployer(self)
        self.add_handlers(self.projects)
        self.runs = RunDesk(self)
        self.add_handlers(self.runs)
        self.apis = ApiDeployer(self)
        self.add_handlers(self.apis)
        self.api_keys = ApiKeys(self)
        self.add_handlers(self.api_keys)
        self.sweep_interval = sweep_interval or min(0.5, self.heartbeat_interval / 4)
        self.heartbeats_seen = 0
        self.heartbeats_bad = 0
        self._kv: KeyValue | None = None
        self._events_send, self._events_recv = anyio.create_memory_object_stream[Event](
            EVENT_QUEUE)
        self._dirty = anyio.Event()
        self._events_done = anyio.Event()

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

    async def _load_registry(self) -> None:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return
        infos: list[NodeInfo] = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                try:
                    infos.append(REGISTRY_VALUE.decode(entry.value))
                except Exception:
                    self.log.warning("skipping unreadable registry record", key=key)
        self.registry.load(infos)
        self.log.info("registry loaded", nodes=len(infos))

    async def started(self, tg: TaskGroup) -> None:
        sub = await self.nc.subscribe(subjects.HEARTBEATS_ALL, cb=self._on_heartbeat,
                                      pending_msgs_limit=100_000)
        self._subs.append(sub)
        sub = await self.nc.subscribe(subjects.reports("exit"), cb=self._on_exit_report)
        self._subs.append(sub)
        tg.start_soon(self._sweeper)
        tg.start_soon(self._event_publisher)
        tg.start_soon(self._registry_writer)
        await self.runs.started(tg)
        await self.projects.started(tg)
        await self.apis.started(tg)

    def state(self) -> dict[str, Any]:
        return {"nodes": len(self.registry.nodes), "heartbeats": self.heartbeats_seen}

    # -- heartbeats --------------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = HEARTBEAT.decode(msg.data, msg.subject)
        except DecodeError as exc:
            self.heartbeats_bad += 1
            self.log.warning("bad heartbeat ignored", subject=msg.subject, error=exc.reason)
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

    async def _on_exit_report(self, msg: Msg) -> None:
        try:
            report = REPORT.decode(msg.data, msg.subject)
        except DecodeError as exc:
            self.log.warning("bad report ignored", subject=msg.subject, error=exc.reason)
            return
        event = self.registry.on_exit(report.node, report.pid, report.reason, report.instance)
        if event is not None:
            self.log.info("node exited", peer=report.node, reason=report.reason)
            await self._queue_event(event)
            self._dirty.set()
            self.projects.kick()
            self.runs.kick()

    async def _sweeper(self) -> None:
        while not self.stopping_requested:
            await anyio.sleep(self.sweep_interval)
            for event in self.registry.sweep():
                self.log.warning("node lost", peer=event.node)
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
        async with self._events_recv:
            async for event in self._events_recv:
                await self.emit(event)
        self._events_done.set()

    async def stopping(self) -> None:
        # Store every queued event and registry change before the connection drains.
        self._events_send.close()
        await self._events_done.wait()
        for info in self.registry.take_dirty():
            try:
                await self.kv.put(registry_key(info.name), encode(info))
            except Exception as exc:
                self.log.warning("registry write failed at shutdown", peer=info.name,
                                 error=str(exc))

    async def _registry_writer(self) -> None:
        """Write changed records to KV, coalescing bursts into one pass."""
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            for info in self.registry.take_dirty():
                try:
                    await self.kv.put(registry_key(info.name), encode(info))
                except Exception as exc:
                    self.registry.mark_dirty(info.name)
                    self.log.warning("registry write failed", peer=info.name, error=str(exc))
                    await anyio.sleep(0.5)
                    self._dirty.set()
                    break

    # -- queries -----------------------------------------------------------------------

    @handles(ListNodes)
    async def list_nodes(self, cmd: ListNodes, req: Request[Any]) -> NodeList:
        return NodeList(nodes=self.registry.query(role=cmd.role, infra=cmd.infra,
                                                 status=cmd.status))
