"""Fixtures: a real nats-server per test (cheap: it starts in milliseconds), helpers to
run nodes under a task group inside the test, and condition waits with deadlines."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from tests.helpers import Background, shipyard, shipyard_argv, wait_until

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
def cluster(nats_server: EmbeddedNats, tmp_path: Path,
            cli_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Deployer, Design and two Automation nodes as separate processes."""
    env = dict(cli_env, SHIPYARD_NATS_URL=nats_server.url)
    ws = tmp_path / "ws"
    ws.mkdir()
    procs = [
        Background(shipyard_argv("node", "start", "deployer", "--name", "deployer",
                                 "--heartbeat-interval", "0.2"), env=env),
        Background(shipyard_argv("node", "start", "design", "--name", "design",
                                 "--workspace", str(ws), "--data-dir",
                                 str(tmp_path / "nodes" / "design"),
                                 "--heartbeat-interval", "0.2"), env=env),
    ]
    procs += [Background(shipyard_argv("node", "start", "automation", "--name", name,
                                       "--infra", "prod", "--data-dir",
                                       str(tmp_path / "nodes" / name),
                                       "--heartbeat-interval", "0.2"), env=env)
              for name in ("a1", "a2")]
    try:
        for p in procs:
            p.wait_line("node ready", timeout=30)
        wait_until(lambda: _registered(env, tmp_path) == 4, timeout=20,
                   message="4 nodes registered")
        yield env
    finally:
        for p in procs:
            p.stop(signal.SIGTERM)


def _registered(env: dict[str, str], cwd: Path) -> int:
    proc = shipyard("nodes", "--json", env=env, cwd=cwd, check=True)
    return len(json.loads(proc.stdout))


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited NATS URL, this Python first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["SHIPYARD_LOG_FORMAT"] = "json"
    return env
