"""The Deployer: node registry, Project Deployer and API Deployer.

``DeployerNode`` is imported on first use, so a command that needs a submodule (the CLI
reading a setting, say) does not pay for the node's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.deployer.node import DeployerNode

__all__ = ["DeployerNode"]


def __getattr__(name: str) -> Any:
    if name == "DeployerNode":
        from nodes.deployer.node import DeployerNode

        return DeployerNode
    raise AttributeError(f"module 'nodes.deployer' has no attribute {name!r}")
