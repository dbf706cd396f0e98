"""``shipyard auth`` and ``shipyard up`` with auth on: the CLI as a user sees it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Background, shipyard, shipyard_argv, wait_until
from tests.test_cli_stack import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def test_auth_init_writes_identities_credentials_and_server_config(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    d = tmp_path / "auth"
    made = json.loads(shipyard("auth", "init", "--dir", str(d), "--json", env=cli_env,
                               cwd=tmp_path, check=True).stdout)
    roles = {(i["name"], i["kind"], i["role"]) for i in made["identities"]}
    assert ("admin", "user", "admin") in roles
    assert {r for _, kind, r in roles if kind == "node"} == {
        "deployer", "design", "govern", "gateway", "automation", "api"}
    for i in made["identities"]:
        creds = Path(i["credentials"])
        assert creds.stat().st_mode & 0o077 == 0  # private
        assert f"# name: {i['name']}" in creds.read_text()
    assert "authorization" in Path(made["server_config"]).read_text()
    again = shipyard("auth", "init", "--dir", str(d), env=cli_env, cwd=tmp_path)
    assert again.returncode == 1 and "already holds identities" in again.stderr

    added = json.loads(shipyard("auth", "user", "add", "vera", "--role", "viewer", "--dir",
                                str(d), "--out", str(tmp_path / "vera.creds"), "--json",
                                env=cli_env, cwd=tmp_path, check=True).stdout)
    assert added == {"name": "vera", "role": "viewer",
                     "credentials": str(tmp_path / "vera.creds")}
    dup = shipyard("auth", "user", "add", "vera", "--role", "viewer", "--dir", str(d),
                   env=cli_env, cwd=tmp_path)
    assert dup.returncode == 1 and "exists already" in dup.stderr
    bad = shipyard("auth", "user", "add", "no.dots", "--role", "viewer", "--dir", str(d),
                   env=cli_env, cwd=tmp_path)
    assert bad.returncode == 1 and "invalid identity name" in bad.stderr
    role = shipyard("auth", "user", "add", "x", "--role", "root", "--dir", str(d),
                    env=cli_env, cwd=tmp_path)
    assert role.returncode == 2 and "Traceback" not in role.stderr
    node = json.loads(shipyard("auth", "node", "add", "automation-7", "--role", "automation",
                               "--dir", str(d), "--json", env=cli_env, cwd=tmp_path,
                               check=True).stdout)
    assert node["role"] == "automation"
    shipyard("auth", "user", "revoke", "vera", "--dir", str(d), env=cli_env, cwd=tmp_path,
             check=True)
    users = json.loads(shipyard("auth", "user", "list", "--dir", str(d), "--json",
                                env=cli_env, cwd=tmp_path, check=True).stdout)
    assert [(u["name"], u["revoked_at"] is not None) for u in users] == [
        ("admin", False), ("vera", True)]
    conf = (d / "nats-auth.conf").read_text()
    assert conf.count('"nkey"') == 1 + 6 + 1  # admin, init's nodes, automation-7


@pytest.fixture
def stack(cli_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    up = Background(shipyard_argv("up", "--nats-port", "-1", "--monitor-port", "-1",
                                  "--http-port", str(free_port()),
                                  "--heartbeat-interval", "0.5"), env=cli_env, cwd=tmp_path)
    try:
        up.wait_line("ready:", timeout=60)
        yield {"up": up, **json.loads((tmp_path / ".shipyard" / "stack.json").read_text())}
    finally:
        code = up.stop(signal.SIGINT, timeout=40)
        assert code == 0, up.output()


def test_up_turns_auth_on_and_each_identity_may_do_only_its_role(
        stack: dict[str, Any], cli_env: dict[str, str], tmp_path: Path) -> None:
    up: Background = stack["up"]
    assert "auth        on" in up.output()
    admin = Path(stack["credentials"])
    assert admin.is_file() and Path(stack["auth_dir"]).is_dir()
    # The quick start, unchanged: the CLI here acts as the stack's admin.
    shipyard("infra", "create", "stage", "--kind", "automation", env=cli_env, cwd=tmp_path,
             check=True)

    vera = json.loads(shipyard("auth", "user", "add", "vera", "--role", "viewer", "--json",
                               env=cli_env, cwd=tmp_path, check=True).stdout)["credentials"]
    as_vera = ("--identity", vera)

    def vera_lists() -> bool:
        return shipyard(*as_vera, "nodes", "--json", env=cli_env, cwd=tmp_path).returncode == 0

    wait_until(vera_lists, timeout=10, message="the new viewer can list nodes")
    denied = shipyard(*as_vera, "infra", "create", "mine", "--kind", "automation",
                      env=cli_env, cwd=tmp_path)
    assert denied.returncode == 1, denied.stderr
    assert "may send" in denied.stderr or "forbidden" in denied.stderr.lower() \
        or "does not let" in denied.stderr
    infras = json.loads(shipyard("infra", "list", "--json", env=cli_env, cwd=tmp_path,
                                 check=True).stdout)
    assert "mine" not in {i["name"] for i in infras}

    shipyard("auth", "user", "revoke", "vera", env=cli_env, cwd=tmp_path, check=True)
    gone = shipyard(*as_vera, "nodes", env=cli_env, cwd=tmp_path)
    # The server's refusal reaches the client as an authorization violation or as a
    # reset of the new connection, depending on timing: one message either way.
    assert gone.returncode == 2, gone.stderr
    assert f"NATS refused the credentials in {vera}:" in " ".join(gone.stderr.split())
    assert "Traceback" not in gone.stderr + denied.stderr

    # The README's first project, word for word but for the CLI path and the HTTP port.
    script = _quick_start().replace(".venv/bin/shipyard", " ".join(shipyard_argv()))
    script = script.replace("localhost:8080", stack["http_url"].replace("http://", ""))
    done = subprocess.run(["bash", "-e", "-c", script], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith('{"result":{"prediction":42},"generation":"v1"}')
    log = (tmp_path / ".shipyard" / "logs" / "nats.log").read_text()
    # The only refusals: the viewer's infra create, and its connects after the revoke.
    assert [line for line in log.splitlines() if "Violation" in line
            and "Authorization Violation" not in line and "infra.create" not in line] == []


def _quick_start() -> str:
    """The shell block of the README's quick start that builds and serves a project."""
    text = README.read_text()
    start = text.index("A first project, from that second shell")
    block = text[text.index("```sh\n", start) + len("```sh\n"):]
    return block[:block.index("```")]


def test_up_insecure_runs_without_auth(cli_env: dict[str, str], tmp_path: Path) -> None:
    up = Background(shipyard_argv("up", "--insecure", "--nats-port", "-1", "--monitor-port",
                                  "-1", "--http-port", str(free_port()),
                                  "--heartbeat-interval", "0.5"), env=cli_env, cwd=tmp_path)
    try:
        up.wait_line("ready:", timeout=60)
        stack = json.loads((tmp_path / ".shipyard" / "stack.json").read_text())
        assert "credentials" not in stack
        assert not (tmp_path / ".shipyard" / "auth").exists()
        assert "auth        off (--insecure)" in up.output()
        shipyard("infra", "create", "stage", "--kind", "automation", env=cli_env,
                 cwd=tmp_path, check=True)
    finally:
        assert up.stop(signal.SIGINT, timeout=40) == 0, up.output()


def test_node_start_refuses_credentials_of_another_node_or_role(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    d = tmp_path / "auth"
    shipyard("auth", "init", "--dir", str(d), env=cli_env, cwd=tmp_path, check=True)
    api = str(d / "creds" / "api-1.creds")
    wrong_role = shipyard("node", "start", "automation", "--creds", api, env=cli_env,
                          cwd=tmp_path)
    assert wrong_role.returncode == 2 and "cannot run as role automation" in wrong_role.stderr
    wrong_name = shipyard("node", "start", "api", "--name", "api-9", "--creds", api,
                          env=cli_env, cwd=tmp_path)
    assert wrong_name.returncode == 2 and "publish only as itself" in wrong_name.stderr
    missing = shipyard("node", "start", "api", "--creds", str(tmp_path / "nope.creds"),
                       env=cli_env, cwd=tmp_path)
    assert missing.returncode == 2 and "not found" in missing.stderr
    for proc in (wrong_role, wrong_name, missing):
        assert "Traceback" not in proc.stderr


def test_up_passes_its_approvals_to_the_govern_node_it_starts(tmp_path: Path) -> None:
    from nodes.cli.stack import _children, node_start, up

    children = _children(tmp_path, "nats://127.0.0.1:4222", automation=1, api=1,
                         heartbeat_interval=2.0, workspace=tmp_path, approvals=3)
    govern = next(c for c in children if c.role == "govern")
    args = govern.argv[govern.argv.index("start") + 1:]
    ctx = node_start.make_context("start", args)  # the real parser of `node start`
    assert (ctx.params["role"], ctx.params["approvals"]) == ("govern", 3)
    assert all("--approvals" not in c.argv for c in children if c.role != "govern")
    assert up.make_context("up", ["--approvals", "2"]).params["approvals"] == 2
    with pytest.raises(Exception, match="x>=1"):
        up.make_context("up", ["--approvals", "0"])


def test_credentials_the_server_resets_at_connect_are_reported_as_refused(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    """How a refusal sometimes reaches the client: the server sends INFO, reads CONNECT
    and resets the connection before the client reads its error."""
    import socket
    import struct
    import threading

    d = tmp_path / "auth"
    shipyard("auth", "init", "--dir", str(d), env=cli_env, cwd=tmp_path, check=True)
    creds = str(d / "creds" / "admin.creds")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(20)

    def serve() -> None:
        for _ in range(3):  # the CLI gives up at the first reset; spare accepts
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b'INFO {"server_id":"x","version":"2.15.1","proto":1,'
                         b'"max_payload":1048576,"nonce":"abc","auth_required":true}\r\n')
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(4096)  # CONNECT (signed nonce) and PING
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: a reset, not a FIN

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = shipyard("--identity", creds, "nodes", "--nats", f"nats://127.0.0.1:{port}",
                        env=cli_env, cwd=tmp_path)
    finally:
        listener.close()
    assert proc.returncode == 2, proc.stderr
    assert f"NATS refused the credentials in {creds}:" in proc.stderr
    assert "Traceback" not in proc.stderr and "reset by peer" not in proc.stderr
