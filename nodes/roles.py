"""Which class runs which role.

``ROLE_NAMES`` is static, so the CLI can offer and check role names without importing
every node (``shipyard --help`` imported them all: 0.8 s of its 1 s); ``role_class``
imports one role's class when a node of it starts.  ``ROLES`` (every class, by role) is
built on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.runtime.node import Node

# role -> (module, class)
_CLASSES = {
    "deployer": ("nodes.deployer.node", "DeployerNode"),
    "design": ("nodes.design.node", "DesignNode"),
    "automation": ("nodes.automation.node", "AutomationNode"),
    "api": ("nodes.api.node", "ApiNode"),
    "govern": ("nodes.govern.node", "GovernNode"),
    "gateway": ("nodes.api.gateway", "GatewayNode"),
}
ROLE_NAMES: tuple[str, ...] = tuple(_CLASSES)


def role_class(role: str) -> type[Node]:
    """The class that runs ``role`` (one of ``ROLE_NAMES``)."""
    module, name = _CLASSES[role]
    cls: type[Node] = getattr(importlib.import_module(module), name)
    return cls


def __getattr__(name: str) -> Any:
    if name == "ROLES":
        return {role: role_class(role) for role in ROLE_NAMES}
    raise AttributeError(f"module 'nodes.roles' has no attribute {name!r}")
