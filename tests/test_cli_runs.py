"""Flows through the CLI, every node a real process: test-build on Design, deploy, run a
scenario with parameters, read the outputs and the history, break a recipe, cancel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import shipyard, wait_until
from tests.projects import make_flow_project


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(shipyard(*args, env=env, check=True).stdout)


def test_build_deploy_run_break_and_cancel_through_the_cli(cluster: dict[str, str],
                                                           tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    project = make_flow_project(ws)

    # Test-build on the Design node, in the workspace, then again: incremental.
    built = shipyard("build", "flows", "clean", "--wait", env=env, timeout=60)
    assert built.returncode == 0, built.stderr
    assert "SUCCESS" in built.stdout and "clean" in built.stdout
    assert (project / "data" / "clean.csv").read_text().startswith("id,value")
    again = _json(env, "build", "flows", "clean", "--wait", "--json")
    assert [s["outcome"] for s in again["steps"]] == ["SKIPPED"]
    forced = _json(env, "build", "flows", "clean", "--force", "--wait", "--json")
    assert [s["outcome"] for s in forced["steps"]] == ["SUCCESS"]
    unknown = shipyard("build", "flows", "nope", env=env)
    assert unknown.returncode == 1 and "unknown dataset" in unknown.stderr

    shipyard("infra", "create", "prod", "--kind", "automation", env=env, check=True)
    shipyard("bundle", "create", "flows", "--id", "v1", env=env, check=True)
    assert shipyard("deploy", "bundle", "flows", "v1", "--infra", "prod", "--wait",
                    env=env, timeout=60).returncode == 0

    ran = shipyard("scenario", "run", "flows", "nightly", "--infra", "prod", "--param",
                   "suffix=-x", "--wait", env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "WARNING" in ran.stdout  # a soft check bound: recorded, the run succeeds
    runs = _json(env, "runs", "flows", "--scenario", "nightly", "--json")
    [nightly] = runs
    assert nightly["params"] == {"suffix": "-x"} and nightly["trigger"] == "manual"
    node_out = (tmp_path / "nodes" / nightly["node"] / "projects" / "flows" / "datasets"
                / "data" / "clean.csv")
    assert node_out.read_text().splitlines()[1] == "1,a-x"
    logs = shipyard("run", "logs", nightly["run_id"], env=env, check=True)
    assert "keeping 3 rows, suffix '-x'" in logs.stdout

    # A broken recipe in a new bundle: the failure and its reason, the node stays up.
    (project / "recipes" / "clean.py").write_text(
        "def run(ctx):\n    raise RuntimeError('column value is missing')\n")
    shipyard("bundle", "create", "flows", "--id", "v2", env=env, check=True)
    assert shipyard("deploy", "bundle", "flows", "v2", "--infra", "prod", "--wait",
                    env=env, timeout=60).returncode == 0
    failed = shipyard("scenario", "run", "flows", "nightly", "--infra", "prod", "--wait",
                      env=env, timeout=60)
    assert failed.returncode == 1
    assert "RuntimeError: column value is missing" in failed.stdout
    [dep] = _json(env, "deployments", "--json")
    assert dep["health"] == "ERROR"
    assert any("column value is missing" in r for r in dep["reasons"])
    nodes = _json(env, "nodes", "--json")
    assert all(n["status"] == "online" for n in nodes)

    # Cancel a long run.
    started = _json(env, "scenario", "run", "flows", "slow", "--infra", "prod",
                    "--param", "seconds=120", "--json")
    run_id = started["run_id"]
    wait_until(lambda: _outcome(env, run_id) == "RUNNING", timeout=20, message="running")
    cancel = shipyard("run", "cancel", run_id, env=env, check=True)
    assert "cancelling" in cancel.stdout
    wait_until(lambda: _outcome(env, run_id) == "CANCELLED", timeout=10, message="cancelled")


def _outcome(env: dict[str, str], run_id: str) -> str | None:
    runs = _json(env, "runs", "flows", "--json")
    return next((r["outcome"] for r in runs if r["run_id"] == run_id), None)


def test_params_are_parsed_as_json_when_they_can_be() -> None:
    code = ("from nodes.cli.scenarios import parse_params\n"
            "print(parse_params(('n=3', 'f=0.5', 'ok=true', 's=abc', 'l=[1,2]', 'e=')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "{'n': 3, 'f': 0.5, 'ok': True, 's': 'abc', 'l': [1, 2], 'e': ''}"
