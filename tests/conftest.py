"""Fixtures: a real nats-server per test (cheap: it starts in milliseconds), helpers to
run nodes under a task group inside the test, and condition waits with deadlines."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=-1,
                          log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(nats_server: EmbeddedNats) -> NatsSettings:
    return NatsSettings(servers=(nats_server.url,))


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited NATS URL, this Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["SHIPYARD_LOG_FORMAT"] = "json"
    return env
