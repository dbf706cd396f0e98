"""The Design node: the workspace of projects, test builds, and API packages.

``node`` is the node itself (projects, bundles, test builds); ``api_packages`` packs one
API service of a project as an immutable version and stores it for the Deployer.

``DesignNode`` is imported on first use, so a command that needs a submodule (the CLI
reading a setting, say) does not pay for the node's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.design.node import DesignNode

__all__ = ["DesignNode"]


def __getattr__(name: str) -> Any:
    if name == "DesignNode":
        from nodes.design.node import DesignNode

        return DesignNode
    raise AttributeError(f"module 'nodes.design' has no attribute {name!r}")
