"""The CLI and ``shipyard up`` as a user runs them: real subprocesses, real signals."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

from tests.helpers import Background, pid_alive, shipyard, shipyard_argv, wait_until

ROLES = {"deployer", "design", "govern", "automation", "api"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_fails_fast_with_one_line_when_nats_is_unreachable(cli_env: dict[str, str],
                                                                tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    for args in (["nodes", "--nats", url], ["--nats", url, "events"], ["nodes", "--json"],
                 ["node", "start", "design", "--nats", url]):
        env = dict(cli_env, SHIPYARD_NATS_URL=url)
        t0 = time.monotonic()
        proc = shipyard(*args, env=env, cwd=tmp_path)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 2, proc.stderr
        assert elapsed < 5.0
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"shipyard: cannot reach NATS at {url} (connection refused)"]
        assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_usage_errors_exit_2_and_help_works(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert shipyard("--help", env=cli_env, cwd=tmp_path).returncode == 0
    for sub in ("up", "nodes", "events", "node"):
        proc = shipyard(sub, "--help", env=cli_env, cwd=tmp_path)
        assert proc.returncode == 0 and "Usage:" in proc.stdout
    proc = shipyard("events", "--since", "yesterday", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "expected e.g. 30s" in proc.stderr
    proc = shipyard("node", "start", "chef", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "chef" in proc.stderr
    proc = shipyard("node", "start", "api", "--name", "a.b", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "invalid node name 'a.b'" in proc.stderr


def _nodes(cli_env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    proc = shipyard("nodes", "--json", env=cli_env, cwd=cwd, check=True)
    return list(json.loads(proc.stdout))


def test_up_starts_every_role_restarts_a_killed_node_and_stops_cleanly(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    up = Background(shipyard_argv("up", "--nats-port", "-1", "--monitor-port", "-1",
                                  "--http-port", str(free_port()),
                                  "--heartbeat-interval", "0.5"), env=cli_env, cwd=tmp_path)
    stack: dict[str, Any] = {}
    pids: set[int] = set()
    try:
        up.wait_line("ready:", timeout=60)
        stack = json.loads((tmp_path / ".shipyard" / "stack.json").read_text())
        assert stack["nats_url"].startswith("nats://127.0.0.1:")

        # From "another shell" in the same folder: stack.json tells the CLI where NATS is.
        nodes = wait_until(lambda: _all_online(cli_env, tmp_path), timeout=20,
                           message="every role online")
        assert {n["role"] for n in nodes} == ROLES
        for n in nodes:
            assert set(n) >= {"name", "role", "infra", "status", "last_seen_s", "version",
                              "host", "pid"}
        pids = {n["pid"] for n in nodes}
        infras = json.loads(shipyard("infra", "list", "--json", env=cli_env, cwd=tmp_path,
                                     check=True).stdout)
        assert {(i["name"], i["kind"]) for i in infras} == {("automation", "automation"),
                                                            ("api", "api")}
        assert {n["infra"] for n in nodes if n["role"] == "automation"} == {"automation"}
        victim = next(n for n in nodes if n["name"] == "automation-1")

        # kill -9 one node: the registry judges it lost within 3 heartbeat intervals and
        # the sweep's slack, then it is online again (new pid: up restarted it).  The
        # lost state may last less than one CLI call (the restart comes back at once),
        # so the judgement is read from the event it leaves, with its time.
        killed_at = time.time()
        import os
        os.kill(victim["pid"], signal.SIGKILL)
        back = wait_until(lambda: _back_online(cli_env, tmp_path, victim["pid"]), timeout=20,
                          message="automation-1 restarted and online")
        pids.add(back["pid"])
        events = [e for e in map(json.loads, shipyard(
            "events", "--json", env=cli_env, cwd=tmp_path, check=True).stdout.splitlines())]
        kinds = [(e["type"], e.get("node")) for e in events]
        lost = [e for e in events if (e["type"], e.get("node")) == ("node.lost",
                                                                     "automation-1")]
        assert len(lost) == 1 and 0 <= lost[0]["ts"] - killed_at < 3 * 0.5 + 2, lost
        assert kinds.count(("node.online", "automation-1")) == 2
        assert kinds.index(("node.lost", "automation-1")) < len(kinds) - 1 - kinds[::-1].index(
            ("node.online", "automation-1"))  # lost, then online again
    finally:
        code = up.stop(signal.SIGINT, timeout=40)
    assert code == 0, up.output()
    assert "stopped" in up.output()
    assert "Traceback" not in up.output()
    # No process left behind: every node process and the NATS server are gone.
    if stack.get("nats_pid"):
        pids.add(stack["nats_pid"])
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10,
               message=f"no orphan processes among {sorted(pids)}")
    assert not (tmp_path / ".shipyard" / "stack.json").exists()


def _all_online(env: dict[str, str], cwd: Path) -> list[dict[str, Any]] | None:
    nodes = _nodes(env, cwd)
    if {n["role"] for n in nodes if n["status"] == "online"} == ROLES:
        return nodes
    return None


def _status(env: dict[str, str], cwd: Path, name: str) -> str | None:
    return next((n["status"] for n in _nodes(env, cwd) if n["name"] == name), None)


def _back_online(env: dict[str, str], cwd: Path, old_pid: int) -> dict[str, Any] | None:
    for n in _nodes(env, cwd):
        if n["name"] == "automation-1" and n["status"] == "online" and n["pid"] != old_pid:
            return n
    return None


def test_up_refuses_a_second_stack_in_the_same_home(cli_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    home = tmp_path / ".shipyard"
    home.mkdir()
    # A live process (this test) owns the stack file.
    import os
    (home / "stack.json").write_text(json.dumps({"pid": os.getpid(), "nats_url": "nats://x:1"}))
    proc = shipyard("up", "--nats-port", "-1", "--monitor-port", "-1", env=cli_env, cwd=tmp_path)
    assert proc.returncode == 1
    assert "a stack is already running" in proc.stderr


async def test_node_worker_process_stops_gracefully_on_sigterm(cli_env: dict[str, str],
                                                               settings: Any,
                                                               tmp_path: Path) -> None:
    """``shipyard node start`` as a real process: serves, then SIGTERM -> exit 0; off a
    terminal its logs are JSON lines carrying the node and role."""
    import anyio

    from nodes.runtime.calls import Caller
    from nodes.runtime.connection import connect
    from protocol.system import Ping

    env = {k: v for k, v in cli_env.items() if k != "SHIPYARD_LOG_FORMAT"}
    worker = Background(shipyard_argv("node", "start", "design", "--name", "d-term",
                                      "--nats", settings.url, "--data-dir",
                                      str(tmp_path / "d-term")), env=env)
    nc = await connect(settings, name="t")
    try:
        async def pong() -> Any:
            try:
                return await Caller(nc).call(Ping(), node="d-term", timeout=0.5)
            except Exception:
                return None

        from tests.helpers import wait_for
        reply = await wait_for(pong, timeout=20, message="worker answering ping")
        assert reply.role == "design"
    finally:
        code = await anyio.to_thread.run_sync(worker.stop, signal.SIGTERM)
        await nc.close()
    assert code == 0, worker.output()
    logs = [json.loads(line) for line in worker.lines if line.startswith("{")]
    assert logs and len(logs) == len(worker.lines)  # every line is a JSON object
    stopped = [entry for entry in logs if entry["msg"] == "node stopped"]
    assert stopped and stopped[0]["node"] == "d-term" and stopped[0]["role"] == "design"
    assert {"level", "timestamp"} <= set(stopped[0])
