"""``shipyard up`` against its own failures: a killed NATS server, and port options that
cannot work.  Real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from nodes.cli.ports import FREE, check_ports
from tests.helpers import Background, pid_alive, shipyard, shipyard_argv, wait_until
from tests.projects import make_project

ROLES = {"deployer", "design", "govern", "automation", "api"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_bad_port_options_are_usage_errors_before_anything_starts(
        cli_env: dict[str, str], tmp_path: Path, held_port: int) -> None:
    p = free_port()
    cases = [
        (["--nats-port", "0"], "'--nats-port': 0 is not a port: expected 1-65535 (or -1"),
        (["--nats-port", "70000"], "70000 is not a port"),
        (["--monitor-port", "http"], "'http' is not a port number"),
        (["--http-port", "-1"], "'--http-port': -1 is not a port: expected 1-65535"),
        (["--nats-port", str(p), "--http-port", str(p)],
         f"--http-port: {p} is also --nats-port: each needs its own port"),
        (["--nats-port", str(p), "--monitor-port", str(p), "--http-port", str(free_port())],
         f"--monitor-port: {p} is also --nats-port"),
        (["--nats-port", str(held_port), "--http-port", str(free_port())],
         f"port {held_port} is already in use on 127.0.0.1"),
        (["--nats-port", "-1", "--monitor-port", str(held_port), "--http-port",
          str(free_port())], f"--monitor-port: port {held_port} is already in use"),
    ]
    for args, needle in cases:
        proc = shipyard("up", *args, env=cli_env, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / ".shipyard" / "stack.json").exists()
        assert not (tmp_path / ".shipyard" / "nats").exists()  # no server was started


def test_the_monitor_port_defaults_to_8222_only_when_nothing_else_takes_it(
        held_port: int) -> None:
    common: dict[str, Any] = {"nats_host": "127.0.0.1", "http_host": "0.0.0.0",
                              "http_port": free_port()}
    spare = free_port()
    assert check_ports(nats_port=-1, monitor_port=None, default_monitor=spare,
                       **common) == spare
    # --nats-port moved onto the default monitor port: monitoring moves, no clash.
    assert check_ports(nats_port=spare, monitor_port=None, default_monitor=spare,
                       **common) == FREE
    # Another process (another stack) holds the default: any free port instead.
    assert check_ports(nats_port=-1, monitor_port=None, default_monitor=held_port,
                       **common) == FREE
    assert check_ports(nats_port=-1, monitor_port=-1, **common) == FREE
    with pytest.raises(click.BadParameter, match="already in use"):
        check_ports(nats_port=-1, monitor_port=held_port, **common)


def _nodes(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    proc = shipyard("nodes", "--json", env=env, cwd=cwd, check=True)
    return list(json.loads(proc.stdout))


def _online(env: dict[str, str], cwd: Path, pids: set[int] | None = None,
            ) -> list[dict[str, Any]] | None:
    """Every role online (and, if given, with exactly these pids: the same processes)."""
    try:
        nodes = _nodes(env, cwd)
    except AssertionError:  # the CLI could not reach NATS or the Deployer yet
        return None
    if {n["role"] for n in nodes if n["status"] == "online"} != ROLES:
        return None
    if pids is not None and {n["pid"] for n in nodes if n["status"] == "online"} != pids:
        return None
    return nodes


def test_up_restarts_a_killed_nats_server_and_every_node_reconnects_with_state_kept(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 of the embedded nats-server: it comes back on the same port and store, the
    same node processes reconnect, and a deployed bundle's records are still there."""
    make_project(tmp_path / "projects", "churn")
    up = Background(shipyard_argv("up", "--nats-port", "-1", "--monitor-port", "-1",
                                  "--http-port", str(free_port()),
                                  "--heartbeat-interval", "0.5"), env=cli_env, cwd=tmp_path)
    stack_file = tmp_path / ".shipyard" / "stack.json"
    pids: set[int] = set()
    try:
        up.wait_line("ready:", timeout=60)
        before = json.loads(stack_file.read_text())
        nodes = wait_until(lambda: _online(cli_env, tmp_path), timeout=20,
                           message="every role online")
        node_pids = {n["pid"] for n in nodes}
        pids |= node_pids | {before["nats_pid"]}
        shipyard("bundle", "create", "churn", "--id", "v1", env=cli_env, cwd=tmp_path,
                 check=True)
        shipyard("deploy", "bundle", "churn", "v1", "--infra", "automation", "--wait",
                 env=cli_env, cwd=tmp_path, timeout=60, check=True)

        os.kill(before["nats_pid"], signal.SIGKILL)
        up.wait_line("NATS        server killed by SIGKILL; restarting", timeout=10)
        up.wait_line("NATS        restarted", timeout=30)
        after = json.loads(stack_file.read_text())
        assert after["nats_url"] == before["nats_url"]  # same port
        assert after["monitor_url"] == before["monitor_url"]
        assert after["nats_pid"] != before["nats_pid"] and pid_alive(after["nats_pid"])
        assert not pid_alive(before["nats_pid"])
        pids.add(after["nats_pid"])

        wait_until(lambda: _online(cli_env, tmp_path, node_pids), timeout=30,
                   message="the same node processes online again")
        [dep] = json.loads(shipyard("deployments", "--json", env=cli_env, cwd=tmp_path,
                                    check=True).stdout)
        assert (dep["project"], dep["desired"], dep["state"]) == ("churn", "v1", "in_sync")
        bundles = json.loads(shipyard("bundle", "list", "churn", "--json", env=cli_env,
                                      cwd=tmp_path, check=True).stdout)
        assert [b["id"] for b in bundles] == ["v1"]
        # JetStream takes writes again.
        shipyard("bundle", "create", "churn", "--id", "v2", env=cli_env, cwd=tmp_path,
                 check=True)
        text = shipyard("nodes", env=cli_env, cwd=tmp_path, check=True).stdout
        assert text.count(" online ") == len(ROLES)
    finally:
        code = up.stop(signal.SIGINT, timeout=40)
    assert code == 0, up.output()
    assert "Traceback" not in up.output()
    assert '"msg": "nats-server restarted"' in up.output()  # the log line, as JSON
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10,
               message=f"no orphan processes among {sorted(pids)}")
