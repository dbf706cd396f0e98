"""The Govern node: the registry of every artifact, and sign-off reviews.

``reviews`` holds the rules, pure and with an injectable clock; ``node`` serves them on
``sy.cmd.govern.<verb>`` and keeps every review in the ``sy_govern`` KV bucket.

``GovernNode`` is imported on first use, so a command that needs a submodule (the CLI
reading a setting, say) does not pay for the node's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.govern.node import GovernNode

__all__ = ["GovernNode"]


def __getattr__(name: str) -> Any:
    if name == "GovernNode":
        from nodes.govern.node import GovernNode

        return GovernNode
    raise AttributeError(f"module 'nodes.govern' has no attribute {name!r}")
