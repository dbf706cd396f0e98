"""Automation nodes: activate bundles atomically and run scenarios.

``AutomationNode`` is imported on first use, so a command that needs a submodule (the CLI
reading a setting, say) does not pay for the node's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.automation.node import AutomationNode

__all__ = ["AutomationNode"]


def __getattr__(name: str) -> Any:
    if name == "AutomationNode":
        from nodes.automation.node import AutomationNode

        return AutomationNode
    raise AttributeError(f"module 'nodes.automation' has no attribute {name!r}")
