"""API nodes: serve API service generations over NATS and HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from nodes.runtime.node import Node


class ApiNode(Node):
    role: ClassVar[str] = "api"

    def __init__(self, *, data_dir: Path | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.data_dir = (data_dir or Path(".shipyard") / "nodes" / self.name).resolve()
