"""The event stream's one union: every event kind, one decoder.

A reader that meets a kind it does not know (from a newer peer) gets a ``DecodeError``
and shows the raw JSON instead (``describe_unknown``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.api import (
    ApiDeploymentFinished,
    ApiDeploymentRequested,
    ApiKeyIssued,
    ApiPackageStored,
    GenerationFailed,
    GenerationsServing,
)
from protocol.base import Codec
from protocol.deploy import (
    BundleActivated,
    BundleActivationFailed,
    BundleStored,
    DeploymentFinished,
    DeploymentRequested,
    InfraCreatedEvent,
)
from protocol.events import ApiScaled, HealthChanged, NodeForgotten, NodeLost, NodeOnline
from protocol.govern import ReviewChanged
from protocol.leases import LeaderChanged
from protocol.scenarios import RunFinished, RunProgress, RunStarted

AnyEvent = (NodeOnline | NodeLost | NodeForgotten | InfraCreatedEvent | BundleStored
            | DeploymentRequested
            | BundleActivated | BundleActivationFailed | DeploymentFinished
            | RunStarted | RunProgress | RunFinished
            | ApiPackageStored | ApiDeploymentRequested | GenerationsServing | GenerationFailed
            | ApiDeploymentFinished | ApiKeyIssued | ReviewChanged | LeaderChanged
            | HealthChanged | ApiScaled)

EVENT = Codec[AnyEvent](AnyEvent)


def describe_unknown(raw: bytes) -> dict[str, Any]:
    """Best-effort view of an event as plain JSON (for kinds this reader may not know)."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {"type": "?", "raw": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"type": "?", "value": value}
