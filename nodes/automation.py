"""Automation nodes: activate bundles atomically and run scenarios."""

from __future__ import annotations

from typing import ClassVar

from nodes.runtime.node import Node


class AutomationNode(Node):
    role: ClassVar[str] = "automation"
