"""A stack with auth, a Deployer and a Govern node in-process, signed callers for each
identity, and published bundles and API versions (their records, as the Design node
writes them)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from nodes.auth.registry import publish_identities
from nodes.deployer import DeployerNode
from nodes.govern import GovernNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.jetstream import ensure_kv
from protocol import subjects
from protocol.api import ApiPackageInfo, EndpointSpec, package_key
from protocol.base import encode
from protocol.bundles import BundleInfo, bundle_key
from tests.authstack import AuthStack
from tests.helpers import Fleet

# name -> role of the humans every test stack knows (beside the admin).
PEOPLE = {"dora": "deployer", "dan": "deployer", "rita": "reviewer", "rob": "reviewer",
          "vera": "viewer"}


@dataclass
class GovStack:
    auth: AuthStack
    fleet: Fleet
    deployer: DeployerNode
    govern: GovernNode | None = None
    conns: dict[str, NATS] = field(default_factory=dict)

    def as_(self, name: str) -> Caller:
        return Caller(self.conns[name])

    async def start_govern(self, approvals: int = 1) -> GovernNode:
        self.govern = GovernNode(name="govern", nats=self.auth.settings("govern"),
                                 heartbeat_interval=0.5, approvals=approvals)
        await self.fleet.start(self.govern)
        return self.govern

    async def publish_bundle(self, project: str, bundle: str) -> None:
        kv = await ensure_kv(self.conns["admin"].jetstream(), subjects.BUNDLE_BUCKET)
        await kv.put(bundle_key(project, bundle), encode(BundleInfo(
            id=bundle, project=project, created_at=time.time(), created_by="design")))

    async def publish_api(self, service: str, version: str) -> None:
        kv = await ensure_kv(self.conns["admin"].jetstream(), subjects.API_PACKAGE_BUCKET)
        spec = EndpointSpec(kind="prediction", code="model", function="predict")
        await kv.put(package_key(service, version), encode(ApiPackageInfo(
            service=service, version=version, project=service, created_at=time.time(),
            created_by="design", endpoints={"predict": spec})))


@asynccontextmanager
async def gov_stack(auth: AuthStack, fleet: Fleet, *, approvals: int = 1,
                    ) -> AsyncIterator[GovStack]:
    conns: dict[str, NATS] = {}
    try:
        conns["admin"] = await connect(auth.settings("admin"), name="admin")
        await publish_identities(conns["admin"], auth.store.identities())
        for name in PEOPLE:
            conns[name] = await connect(auth.settings(name), name=name)
        deployer = DeployerNode(name="deployer", nats=auth.settings("deployer"),
                                heartbeat_interval=0.5)
        await fleet.start(deployer)
        stack = GovStack(auth=auth, fleet=fleet, deployer=deployer, conns=conns)
        await stack.start_govern(approvals)
        yield stack
    finally:
        for nc in conns.values():
            await close(nc)


def people() -> tuple[tuple[str, str, str, Any], ...]:
    return tuple((name, "user", role, None) for name, role in PEOPLE.items())
