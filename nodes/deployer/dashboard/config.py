"""The dashboard's settings: light to import (the CLI reads them on every command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8081
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class DashboardConfig:
    """Where the dashboard listens, who may log in, and as whom it acts."""

    token_file: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    creds: Path | None = None  # a user identity's credentials (stacks with auth)
