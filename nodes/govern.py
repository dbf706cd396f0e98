"""The Govern node: sign-offs and per-infrastructure deployment policies."""

from __future__ import annotations

from typing import ClassVar

from nodes.runtime.node import Node


class GovernNode(Node):
    role: ClassVar[str] = "govern"
    verifies_commands: ClassVar[bool] = True
