"""API nodes: serve API service generations over NATS and HTTP."""

from __future__ import annotations

from typing import ClassVar

from nodes.runtime.node import Node


class ApiNode(Node):
    role: ClassVar[str] = "api"
