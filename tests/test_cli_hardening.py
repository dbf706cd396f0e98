"""The CLI against hostile input and a careless workspace, every node a real process:
malformed names, links out of a project, duplicate project keys, and output that is
plain off a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import subprocess
from pathlib import Path

import click
import pytest

from nodes.cli import cli, main
from tests.apiproject import make_api_project
from tests.helpers import shipyard, shipyard_argv, wait_until
from tests.projects import make_project

BAD = "he*"

# Every command that takes a name, with a malformed one in each name position.
NAMED: list[list[str]] = [
    ["nodes", "--role", BAD], ["nodes", "--infra", BAD], ["envs", "--infra", BAD],
    ["bundle", "create", BAD, "--id", "v1"], ["bundle", "create", "churn", "--id", BAD],
    ["bundle", "list", BAD],
    ["infra", "create", BAD, "--kind", "automation"],
    ["deploy", "bundle", BAD, "v1", "--infra", "prod"],
    ["deploy", "bundle", "churn", BAD, "--infra", "prod"],
    ["deploy", "bundle", "churn", "v1", "--infra", BAD],
    ["deploy", "api", BAD, "v1", "--infra", "api"], ["deploy", "api", "s", BAD, "--infra", "api"],
    ["deploy", "api", "s", "v1", "--infra", BAD],
    ["deploy", "api", "s", "--split", f"{BAD}=50,v2=50", "--infra", "api"],
    ["deploy", "api", "s", "v1", "--shadow", BAD, "--infra", "api"],
    ["rollback", BAD, "--infra", "prod"], ["rollback", "churn", "--infra", BAD],
    ["rollback", "churn", "--infra", "prod", "--to", BAD],
    ["rollback", "api", BAD, "--infra", "api"], ["rollback", "api", "s", "--infra", BAD],
    ["deployments", "--project", BAD], ["deployments", "--infra", BAD],
    ["history", BAD, "--infra", "prod"], ["history", "churn", "--infra", BAD],
    ["scenario", "run", BAD, "s", "--infra", "prod"],
    ["scenario", "run", "churn", BAD, "--infra", "prod"],
    ["scenario", "run", "churn", "s", "--infra", BAD],
    ["runs", BAD], ["runs", "churn", "--infra", BAD], ["runs", "churn", "--scenario", BAD],
    ["run", "logs", BAD], ["run", "cancel", BAD],
    ["build", BAD, "raw"], ["build", "churn", BAD],
    ["api", "package", BAD, "s", "--version", "v1"],
    ["api", "package", "churn", BAD, "--version", "v1"],
    ["api", "package", "churn", "s", "--version", BAD],
    ["api", "versions", BAD], ["api", "key", "create", BAD], ["api", "key", "list", BAD],
    ["api", "key", "revoke", BAD, "k1"], ["api", "key", "revoke", "s", BAD],
    ["auth", "user", "add", BAD, "--role", "viewer"], ["auth", "user", "revoke", BAD],
    ["auth", "node", "add", BAD, "--role", "automation"],
    ["auth", "node", "add", "n1", "--role", "automation", "--infra", BAD],
    ["auth", "node", "revoke", BAD], ["node", "health", "--name", BAD, "govern"],
    ["infra", "set", BAD, "--govern", "warn"], ["govern", "list", "--name", BAD],
    ["status", "--infra", BAD], ["alerts", "test", BAD],
    ["govern", "request", BAD, "v1"], ["govern", "request", "churn", BAD],
    ["govern", "request", "api", BAD, "v1"], ["govern", "request", "api", "s", BAD],
    ["govern", "review", BAD, "v1", "--approve"], ["govern", "review", "churn", BAD, "--reject"],
    ["govern", "status", BAD, "v1"], ["govern", "status", "api", "s", BAD],
    ["audit", "--who", BAD], ["audit", "at", "--infra", BAD, "10m"],
    ["api", "queries", BAD], ["api", "queries", "s", "--generation", BAD],
    ["api", "replay", BAD, "--version", "v1"], ["api", "replay", "s", "--version", BAD],
    ["monitor", "--filter", f"infra={BAD}"], ["monitor", "--filter", f"role={BAD}"],
]
# Commands without a name to get wrong (or that check theirs as usage errors).
UNNAMED = {"up", "node start", "events", "projects", "infra list", "auth init",
           "auth user list", "auth node list", "auth publish"}


@pytest.fixture
def unreachable() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{s.getsockname()[1]}"


def _leaves(group: click.Group, prefix: str = "") -> set[str]:
    found: set[str] = set()
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found |= _leaves(command, path + " ")
        if not isinstance(command, click.Group) or path == "deploy":
            found.add(path)
    return found


def test_the_malformed_name_cases_cover_every_command() -> None:
    """A new command must be added to NAMED (or UNNAMED): this list is the walk."""
    covered = {" ".join(a for a in args[:3] if BAD not in a and not a.startswith("-")
                        and a not in ("churn", "s", "v1", "raw", "k1"))
               for args in NAMED} | UNNAMED
    leaves = _leaves(cli) - {"deploy"}
    missing = sorted(leaf for leaf in leaves if leaf not in covered
                     and leaf != "node forget")  # node forget: walked below if present
    assert not missing, f"commands without a malformed-name case: {missing}"


def _cases() -> list[list[str]]:
    cases = list(NAMED)
    if "forget" in getattr(cli.commands.get("node"), "commands", {}):
        cases.append(["node", "forget", BAD])
    return [*cases, ["bundle", "list", "x" * 300], ["api", "versions", "a.b"],
            ["run", "logs", ""]]


def test_every_command_refuses_a_malformed_name_before_sending_it(
        capsys: pytest.CaptureFixture[str], unreachable: str) -> None:
    """Run in this process against an address where nothing listens: a command that
    tried to send would exit 2 ("cannot reach NATS"); each must exit 1 with the rule."""
    for args in _cases():
        with pytest.raises(SystemExit) as done:
            main(["--nats", unreachable, *args])
        captured = capsys.readouterr()
        assert done.value.code == 1, (args, captured.err)
        assert captured.err.startswith("shipyard: invalid "), (args, captured.err)
        assert "expected" in captured.err and len(captured.err.splitlines()) == 1, (
            args, captured.err)


def _params(group: click.Group, prefix: str = "") -> list[tuple[str, click.Parameter]]:
    found: list[tuple[str, click.Parameter]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _params(command, f"{prefix}{name} ")
        found += [(f"{prefix}{name}", p) for p in command.params]
    return found


def test_every_number_option_refuses_nan_as_a_usage_error() -> None:
    """``nan`` passes every comparison, so a plain range let it through to crash later
    (``api replay --rate nan`` was a traceback); every float option refuses it."""
    floats = [(path, p) for path, p in _params(cli) if isinstance(p.type, click.FloatRange)]
    assert any(p.name == "rate" for _, p in floats)
    for _, param in floats:
        with pytest.raises(click.BadParameter, match="is not a number"):
            param.type.convert("nan", param, None)


def test_nan_for_a_rate_or_a_timeout_is_exit_2_without_a_traceback(unreachable: str) -> None:
    for args in (["api", "replay", "s", "--version", "v1", "--rate", "nan"],
                 ["api", "queries", "s", "--timeout", "NaN"]):
        proc = shipyard("--nats", unreachable, *args, env=dict(os.environ))
        assert proc.returncode == 2, (args, proc.stderr)
        assert "is not a number" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_malformed_name_is_a_bad_request_exit_1_from_the_real_cli(
        cluster: dict[str, str], tmp_path: Path) -> None:
    """Real processes: one line, no traceback, and the nodes keep serving.  An API key for
    a service that was never packaged is not_found (exit 1, no key printed)."""
    env = cluster
    for args in (["bundle", "list", BAD], ["nodes", "--role", BAD], ["run", "logs", BAD],
                 ["api", "key", "create", "a.b"]):
        proc = shipyard(*args, env=env, cwd=tmp_path)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("shipyard: invalid "), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    proc = shipyard("api", "key", "create", "nosuch", env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "shipyard: unknown API service 'nosuch': it has no packaged version "
        "(see: shipyard api package PROJECT nosuch --version V)")
    make_api_project(tmp_path / "ws")
    shipyard("api", "package", "churn", "churn-api", "--version", "v1", env=env, check=True)
    key = shipyard("api", "key", "create", "churn-api", env=env, cwd=tmp_path, check=True)
    assert key.stdout.startswith("sy_")
    assert json.loads(shipyard("nodes", "--json", env=env, cwd=tmp_path, check=True).stdout)


def test_links_out_of_a_project_refuse_bundle_and_package_naming_them(
        cluster: dict[str, str], tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    project = make_project(ws, "churn")
    outside = tmp_path / "outside.csv"
    outside.write_text("id\n1\n")
    (project / "data" / "raw.csv").unlink()
    (project / "data" / "raw.csv").symlink_to(outside)  # a shipped dataset
    proc = shipyard("bundle", "create", "churn", "--id", "v1", env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert f"data/raw.csv -> {outside}" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(shipyard("bundle", "list", "churn", "--json", env=env,
                               check=True).stdout) == []

    api = make_api_project(ws, "scoring", "scoring-api")
    secret = tmp_path / "secret.json"
    secret.write_text('{"weight": 5}')
    (api / "models" / "extra.json").symlink_to(secret)
    proc = shipyard("api", "package", "scoring", "scoring-api", "--version", "v1", env=env)
    assert proc.returncode == 1, proc.stdout
    assert f"models/extra.json -> {secret}" in proc.stderr
    versions = shipyard("api", "versions", "scoring-api", "--json", env=env, check=True)
    assert json.loads(versions.stdout) == []


def test_two_folders_with_one_project_key_are_refused_naming_both(
        cluster: dict[str, str], tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    first = make_project(ws, "churn")
    second = ws / "churn-copy"
    subprocess.run(["cp", "-r", str(first), str(second)], check=True)
    listed = json.loads(shipyard("projects", "--json", env=env, check=True).stdout)
    assert sorted((p["key"], p["path"], p["ok"]) for p in listed) == [
        ("churn", str(first), False), ("churn", str(second), False)]
    assert all(str(first) in p["error"] and str(second) in p["error"] for p in listed)
    table = shipyard("projects", env=env, check=True).stdout
    assert "claimed by 2 folders" in table
    for args in (["bundle", "create", "churn", "--id", "v1"], ["build", "churn", "clean"]):
        proc = shipyard(*args, env=env)
        assert proc.returncode == 1, (args, proc.stdout)
        assert str(first) in proc.stderr and str(second) in proc.stderr, proc.stderr
    subprocess.run(["rm", "-r", str(second)], check=True)
    shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True)


def _on_a_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run the CLI with stdout and stderr on a pseudo-terminal; return what it wrote."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(shipyard_argv(*args), stdout=follower, stderr=follower,
                            env=dict(env, TERM="xterm-256color"))
    os.close(follower)
    data = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        data += chunk
    os.close(leader)
    assert proc.wait(timeout=30) == 0, data
    return data


def test_output_is_plain_off_a_terminal_and_styled_on_one(cluster: dict[str, str],
                                                         tmp_path: Path) -> None:
    env = {k: v for k, v in cluster.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    wait_until(lambda: "online" in shipyard("nodes", env=env).stdout, timeout=10,
               message="nodes online")
    make_project(tmp_path / "ws", "churn")
    for args in (["nodes"], ["bundle", "create", "churn", "--id", "v1"], ["projects"],
                 ["bundle", "list", "churn"], ["infra", "list"]):
        proc = shipyard(*args, env=env, check=True)
        text = proc.stdout + proc.stderr
        assert "[/" not in text and "[green]" not in text and "[bold]" not in text, text
        assert "\x1b[" not in text, (args, text)
    assert " online " in shipyard("nodes", env=env).stdout
    styled = _on_a_terminal(["nodes"], env)
    assert b"\x1b[32monline\x1b[0m" in styled, styled
    assert b"[green]" not in styled and b"[/" not in styled


def test_bundle_create_shows_the_design_nodes_stages_and_bytes_on_a_terminal_only(
        cluster: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in cluster.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    project = make_project(tmp_path / "ws", "churn")
    (project / "data" / "big.bin").write_bytes(os.urandom(3 << 20))
    piped = shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True)
    assert "\x1b[" not in piped.stdout + piped.stderr and "\r" not in piped.stderr
    assert "storing" not in piped.stdout + piped.stderr and piped.stderr == ""
    assert "bundle churn v1 created" in piped.stdout

    drawn = _on_a_terminal(["bundle", "create", "churn", "--id", "v2"], env)
    assert b" created: 5 files" in drawn, drawn
    # The last notice is the end of the storing stage: the archive's size, sent in full.
    shown = re.search(rb"bundle churn v2: storing\S*\s.*?(\d+\.\d)/(\d+\.\d) MB", drawn)
    assert shown is not None, drawn
    assert shown.group(1) == shown.group(2) and float(shown.group(2)) >= 3.1
