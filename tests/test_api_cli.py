"""API services through the real CLI, with every node a real process and httpx as the
HTTP client: package, versions, deploy, split, rollback, deployments, keys."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx

from nodes.runtime.embedded import EmbeddedNats
from tests.apiproject import make_api_project
from tests.helpers import Background, shipyard, shipyard_argv, wait_until
from tests.test_cli_stack import free_port


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(shipyard(*args, env=env, check=True).stdout)


def test_api_service_through_the_cli_package_deploy_split_rollback_and_keys(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = dict(cli_env, SHIPYARD_NATS_URL=nats_server.url)
    ws = tmp_path / "ws"
    make_api_project(ws, version="1")
    port = free_port()
    procs = [
        Background(shipyard_argv("node", "start", "deployer", "--name", "deployer",
                                 "--heartbeat-interval", "0.2"), env=env),
        Background(shipyard_argv("node", "start", "design", "--name", "design", "--workspace",
                                 str(ws), "--data-dir", str(tmp_path / "design"),
                                 "--heartbeat-interval", "0.2"), env=env),
        Background(shipyard_argv("node", "start", "api", "--name", "api-1", "--infra", "prod",
                                 "--data-dir", str(tmp_path / "api-1"), "--workers", "1",
                                 "--http-port", str(port), "--http-host", "127.0.0.1",
                                 "--heartbeat-interval", "0.2"), env=env),
    ]
    try:
        for p in procs:
            p.wait_line("node ready", timeout=30)
        wait_until(lambda: len(_json(env, "nodes", "--json")) == 3, timeout=30,
                   message="3 nodes registered")
        shipyard("infra", "create", "prod", "--kind", "api", env=env, check=True)
        out = shipyard("api", "package", "churn", "churn-api", "--version", "v1", env=env,
                       check=True).stdout
        assert "API package churn-api v1 created from churn: 5 files" in out
        assert "predict (prediction), score (function)" in out
        make_api_project(ws, version="2")
        out = shipyard("api", "package", "churn", "churn-api", "--version", "v2",
                       "--notes", "second", env=env, check=True).stdout
        assert "changes since v1: 0 added, 0 removed, 1 changed" in out
        versions = _json(env, "api", "versions", "churn-api", "--json")
        assert [(v["version"], v["notes"]) for v in versions] == [("v1", ""), ("v2", "second")]

        done = shipyard("deploy", "api", "churn-api", "v1", "--infra", "prod", "--wait",
                        env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "every online API node of prod serves churn-api v1" in done.stdout
        base = f"http://127.0.0.1:{port}/public/api/v1/churn-api"
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{base}/predict/predict", json={"features": {"x": 1}})
            assert (r.status_code, r.json()["generation"]) == (200, "v1")

            split = shipyard("deploy", "api", "churn-api", "--split", "v1=50,v2=50",
                             "--infra", "prod", "--wait", env=env, timeout=60)
            assert split.returncode == 0, split.stderr
            gens = {http.post(f"{base}/predict/predict", json={"features": {}}).json()[
                "generation"] for _ in range(40)}
            assert gens == {"v1", "v2"}

            back = shipyard("rollback", "api", "churn-api", "--infra", "prod", "--wait",
                            env=env, timeout=60)
            assert back.returncode == 0, back.stderr
            assert "rolling back API churn-api v1=50,v2=50 -> v1" in back.stdout
            [dep] = [d for d in _json(env, "deployments", "--json") if d["kind"] == "api"]
            assert (dep["project"], dep["desired"], dep["previous"], dep["state"]) == (
                "churn-api", "v1", "v1=50,v2=50", "in_sync")
            assert [(n["node"], n["running"]) for n in dep["nodes"]] == [("api-1", "v1")]
            table = shipyard("deployments", env=env, check=True).stdout
            assert "api" in table and "churn-api" in table and "api-1=v1" in table

            key = shipyard("api", "key", "create", "churn-api", env=env, check=True)
            secret = key.stdout.strip()
            assert secret.startswith("sy_") and "shown once" in key.stderr
            assert shipyard("deploy", "api", "churn-api", "v1", "--infra", "prod",
                            "--auth", "api-key", "--wait", env=env, timeout=60).returncode == 0

            def status(headers: dict[str, str]) -> int:
                return http.post(f"{base}/score/run", json={"a": 1},
                                 headers=headers).status_code
            wait_until(lambda: status({}) == 401, timeout=10, message="key required")
            assert status({"Authorization": f"Bearer {secret}"}) == 200

        for args, code, needle in [
            (["deploy", "api", "churn-api", "v9", "--infra", "prod"], 1, "not found"),
            (["deploy", "api", "churn-api", "--infra", "prod"], 2, "give a VERSION"),
            (["deploy", "api", "churn-api", "--split", "v1=x", "--infra", "prod"], 2,
             "invalid split"),
            (["rollback", "api", "nope", "--infra", "prod"], 1, "not deployed"),
            (["api", "package", "churn", "nope", "--version", "v3"], 1, "no API service"),
        ]:
            proc = shipyard(*args, env=env)
            assert proc.returncode == code, (args, proc.stdout, proc.stderr)
            assert needle in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
    finally:
        for p in procs:
            p.stop(signal.SIGTERM)
    for p in procs:
        assert "Traceback" not in p.output(), p.output()
