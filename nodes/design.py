"""The Design node: hosts projects, test-builds them, makes bundles and API packages."""

from __future__ import annotations

from typing import ClassVar

from nodes.runtime.node import Node


class DesignNode(Node):
    role: ClassVar[str] = "design"
