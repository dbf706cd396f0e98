"""What the Deployer's desks (bundle and API deployments, run history, API keys) use of
their node, typed, so none of them reaches a sibling through the node: each sibling
capability a desk uses is handed to it in ``DeployerNode.__init__``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from nodes.runtime.calls import Caller
from nodes.runtime.hosts import Logs, SubscribesDecoded
from nodes.runtime.inbound import Drops
from nodes.runtime.settings import NatsSettings
from protocol.deploy import Infra
from protocol.events import Event

# ``require_infra(name, kind)``: the infra, or ``NotFound``/``Conflict`` saying why not.
RequireInfra = Callable[[str, str], Awaitable[Infra]]


class DeskHost(SubscribesDecoded, Logs, Protocol):
    @property
    def name(self) -> str: ...

    @property
    def nc(self) -> NATS: ...

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def settings(self) -> NatsSettings: ...

    @property
    def drops(self) -> Drops: ...

    @property
    def stopping_requested(self) -> bool: ...

    def caller(self) -> Caller: ...

    async def emit(self, event: Event) -> None: ...
