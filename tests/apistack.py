"""A control plane and API nodes for tests: Deployer and Design in the test's task group,
API nodes likewise (their workers are real processes), plus an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client as NATS

from nodes.api.node import ApiNode
from nodes.deployer import DeployerNode
from nodes.design import DesignNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol.api import CreateApiPackage, DeployApi
from protocol.deploy import CreateInfra, DeploymentView, ListDeployments
from tests.helpers import Fleet, fleet, wait_for

HB = 0.2
SERVICE = "churn-api"


@dataclass
class Stack:
    fleet: Fleet
    settings: NatsSettings
    tmp: Path
    nc: NATS
    caller: Caller
    http: httpx.AsyncClient

    async def api_node(self, name: str, infra: str = "prod", **kw: Any) -> ApiNode:
        kw.setdefault("workers", 1)
        node = ApiNode(name=name, nats=self.settings, infra=infra,
                       data_dir=self.tmp / "nodes" / name, http_port=0,
                       http_host="127.0.0.1", heartbeat_interval=HB, resync_interval=1.0,
                       metrics_interval=0.5, **kw)
        await self.fleet.start(node)
        return node

    async def package(self, version: str, project: str = "churn") -> Any:
        return await self.caller.call(CreateApiPackage(project=project, service=SERVICE,
                                                       version=version))

    async def deploy(self, generations: dict[str, int], *, infra: str = "prod",
                     shadow: str | None = None, auth: str | None = None,
                     wait: bool = True) -> DeploymentView:
        view = await self.caller.call(DeployApi(service=SERVICE, infra=infra,
                                                generations=generations, shadow=shadow,
                                                auth=auth))
        if wait:
            return await self.settled(view.update_id)
        return view

    async def view(self, infra: str = "prod") -> DeploymentView:
        reply = await self.caller.call(ListDeployments(project=SERVICE, infra=infra))
        return next(v for v in reply.deployments if v.kind == "api")

    async def settled(self, update_id: str, state: str = "in_sync") -> DeploymentView:
        async def done() -> DeploymentView | None:
            v = await self.view()
            return v if v.update_id == update_id and v.state == state else None
        result: DeploymentView = await wait_for(done, timeout=30,
                                                message=f"deployment {state}")
        return result


@asynccontextmanager
async def api_stack(settings: NatsSettings, tmp: Path) -> AsyncIterator[Stack]:
    async with fleet() as f:
        await f.start(DeployerNode(name="deployer", nats=settings, heartbeat_interval=HB))
        await f.start(DesignNode(name="design", nats=settings, workspace=tmp / "ws",
                                 data_dir=tmp / "design", heartbeat_interval=HB))
        nc = await connect(settings, name="test")
        caller = Caller(nc, sender="test")
        await caller.call(CreateInfra(name="prod", kind="api", stage="production"))
        async with httpx.AsyncClient(timeout=30) as http:
            try:
                yield Stack(fleet=f, settings=settings, tmp=tmp, nc=nc, caller=caller,
                            http=http)
            finally:
                await nc.close()


def url(node: ApiNode, endpoint: str = "predict", action: str = "predict",
        service: str = SERVICE) -> str:
    assert node.http is not None and node.http.url is not None
    return f"{node.http.url}/public/api/v1/{service}/{endpoint}/{action}"
