"""Code environments on real node processes, built by the real ``uv`` from tiny wheels,
with no internet: deploys, rollbacks, a shared lock, a user pin of a package shipyard
uses, a build that fails, an index nobody answers, and an API switch under load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from nodes.envs.store import MARKER
from nodes.runtime.embedded import EmbeddedNats
from tests.envstack import (
    NO_INDEX,
    Cluster,
    cluster,
    counting_uv,
    make_recipe_project,
    uv_calls,
)
from tests.helpers import wait_for, wait_until
from tests.test_cli_stack import free_port
from tests.wheels import make_wheel

pytestmark = pytest.mark.timeout(240)


def _deploy(c: Cluster, project: str, bundle: str) -> Any:
    return c.cli("deploy", "bundle", project, bundle, "--infra", "prod", "--wait",
                 timeout=120)


def _marker_stamps(c: Cluster, node: str) -> dict[str, tuple[int, int, bytes]]:
    """(inode, mtime, content) of each built environment's marker: a build writes it
    last, atomically (a new inode), so any build changes these."""
    out = {}
    for digest in c.built(node):
        marker = c.envs_dir(node) / digest / MARKER
        st = marker.stat()
        out[digest] = (st.st_ino, st.st_mtime_ns, marker.read_bytes())
    return out


def test_two_pins_deploy_and_roll_back_from_stored_wheels_and_one_lock_is_built_once(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The node reaches no package index: it installs from the wheels stored with the
    bundles.  Each bundle's recipe sees its own pin in its own interpreter; a second
    project with the same lock, and a rollback, build nothing."""
    uv, calls = counting_uv(tmp_path)
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        c.start("automation", "a1", "--infra", "prod", "--index-url", NO_INDEX,
                "--env-build-timeout", "60", env={"SHIPYARD_UV": str(uv)})
        c.registered(3)
        c.cli("infra", "create", "prod", "--kind", "automation", check=True)

        # Two projects with the same lock, deployed at once: one build, one env on disk.
        make_recipe_project(c.ws, "churn", ["tinypkg==1.0"])
        make_recipe_project(c.ws, "twin", ["tinypkg==1.0"])
        c.cli("bundle", "create", "churn", "--id", "v1", "--wheels", check=True)
        c.cli("bundle", "create", "twin", "--id", "t1", "--wheels", check=True)
        c.cli("deploy", "bundle", "twin", "t1", "--infra", "prod", check=True)
        first = _deploy(c, "churn", "v1")
        assert first.returncode == 0, first.stdout + first.stderr
        wait_until(lambda: all(d["state"] == "in_sync" for d in c.json("deployments")),
                   timeout=60, message="twin t1 in sync too")
        assert uv_calls(calls, "venv") == 1
        [env1] = c.built("a1")
        for project in ("churn", "twin"):
            assert c.look(project)["outcome"] == "SUCCESS"
            seen = c.seen("a1", project)
            assert seen["tinypkg"] == "1.0"
            assert seen["python"].startswith(str(c.envs_dir("a1") / env1))

        make_recipe_project(c.ws, "churn", ["tinypkg==2.0"])
        c.cli("bundle", "create", "churn", "--id", "v2", "--wheels", check=True)
        second = _deploy(c, "churn", "v2")
        assert second.returncode == 0, second.stderr
        assert "building env ml ..." in second.stderr
        assert uv_calls(calls, "venv") == 2
        [env2] = [d for d in c.built("a1") if d != env1]
        assert c.look("churn")["outcome"] == "SUCCESS"
        assert c.seen("a1", "churn")["tinypkg"] == "2.0"
        assert c.seen("a1", "churn")["python"].startswith(str(c.envs_dir("a1") / env2))

        stamps = _marker_stamps(c, "a1")
        back = c.cli("rollback", "churn", "--infra", "prod", "--wait", timeout=120)
        assert back.returncode == 0, back.stderr
        assert "building env" not in back.stderr
        assert uv_calls(calls, "venv") == 2  # nothing was built again
        assert _marker_stamps(c, "a1") == stamps
        assert c.look("churn")["outcome"] == "SUCCESS"
        assert c.seen("a1", "churn")["tinypkg"] == "1.0"

        envs = {e["digest"]: e for e in c.envs("a1")}
        assert sorted(envs[env1]["used_by"]) == ["bundle churn/v1", "bundle twin/t1"]
        assert envs[env2]["used_by"] == ["bundle churn/v2"]
        assert {e["status"] for e in envs.values()} == {"ready"}
        assert all(e["size"] > 0 and e["names"] == ["ml"] for e in envs.values())


def test_a_user_pin_of_a_package_shipyard_uses_wins_and_the_node_keeps_working(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The project pins msgspec 0.0.1 (a fake; shipyard runs on the real one): its
    recipe imports that one, and the node keeps beating and deploying."""
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        c.start("automation", "a1", "--infra", "prod", wheels=True)
        c.registered(3)
        c.cli("infra", "create", "prod", "--kind", "automation", check=True)
        make_recipe_project(c.ws, "pins", ["msgspec==0.0.1", "tinypkg==1.0"],
                            looks_at=["msgspec", "tinypkg"])
        c.cli("bundle", "create", "pins", "--id", "v1", check=True)
        deployed = _deploy(c, "pins", "v1")
        assert deployed.returncode == 0, deployed.stderr
        assert c.look("pins")["outcome"] == "SUCCESS"
        seen = c.seen("a1", "pins")
        assert (seen["msgspec"], seen["tinypkg"]) == ("0.0.1", "1.0")

        def beating() -> bool:
            [a1] = [n for n in c.json("nodes") if n["name"] == "a1"]
            return bool(a1["status"] == "online" and a1["last_seen_s"] < 1.0)
        wait_until(beating, timeout=10, message="a1 online with a fresh heartbeat")
        make_recipe_project(c.ws, "pins", ["msgspec==0.0.1", "tinypkg==2.0"],
                            looks_at=["msgspec", "tinypkg"])
        c.cli("bundle", "create", "pins", "--id", "v2", check=True)
        assert _deploy(c, "pins", "v2").returncode == 0
        assert c.look("pins")["outcome"] == "SUCCESS"
        seen = c.seen("a1", "pins")
        assert (seen["msgspec"], seen["tinypkg"]) == ("0.0.1", "2.0")
        assert "Traceback" not in c.procs["a1"].output()


def test_an_env_that_cannot_be_built_refuses_the_bundle_and_the_previous_keeps_running(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A bundle made without --wheels, on a node that reaches no package index: the
    build fails, the deploy is ``failed`` with uv's last lines, v1 stays active and
    runs; a bundle with its wheels stored then deploys."""
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        # uv's own setting: refused connections fail at once instead of after ~9 s of
        # retries, which is all this test would spend its time on.
        c.start("automation", "a1", "--infra", "prod", "--index-url", NO_INDEX,
                "--env-build-timeout", "60", env={"UV_HTTP_RETRIES": "0"})
        c.registered(3)
        c.cli("infra", "create", "prod", "--kind", "automation", check=True)
        make_recipe_project(c.ws, "churn", ["tinypkg==1.0"])
        c.cli("bundle", "create", "churn", "--id", "v1", "--wheels", check=True)
        assert _deploy(c, "churn", "v1").returncode == 0

        make_recipe_project(c.ws, "churn", ["tinypkg==2.0"])
        c.cli("bundle", "create", "churn", "--id", "v2", check=True)
        failed = _deploy(c, "churn", "v2")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "building env ml ..." in failed.stderr
        assert "building env ml: installing 1 package failed" in failed.stderr
        assert "127.0.0.1:9" in failed.stderr or "tinypkg" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        [dep] = c.json("deployments")
        assert (dep["desired"], dep["state"]) == ("v2", "failed")
        assert [(n["node"], n["running"]) for n in dep["nodes"]] == [("a1", "v1")]
        assert any("building env ml: installing 1 package failed" in r
                   for r in dep["reasons"]), dep["reasons"]
        project = c.data_dir("a1") / "projects" / "churn"
        assert (project / "current").resolve() == (project / "bundles" / "v1").resolve()
        assert c.look("churn")["outcome"] == "SUCCESS"  # v1 still runs
        assert c.seen("a1", "churn")["tinypkg"] == "1.0"

        c.cli("bundle", "create", "churn", "--id", "v3", "--wheels", check=True)
        assert _deploy(c, "churn", "v3").returncode == 0
        assert c.look("churn")["outcome"] == "SUCCESS"
        assert c.seen("a1", "churn")["tinypkg"] == "2.0"


API_MANIFEST = """\
[project]
key = "{key}"
code_env = "ml"

[code_envs.ml]
requirements = ["tinypkg=={version}"]

[api_services.churn-api.endpoints.predict]
kind = "prediction"
code = "api/predict.py"
"""

PREDICT = """\
import os
import sys

import tinypkg


def load(artifacts):
    return {"loaded_with": tinypkg.VERSION}


def predict(features, model):
    return {"tinypkg": tinypkg.VERSION, "loaded_with": model["loaded_with"],
            "python": sys.executable, "pid": os.getpid()}
"""


def _api_project(ws: Path, version: str) -> None:
    d = ws / "churn"
    (d / "api").mkdir(parents=True, exist_ok=True)
    (d / "shipyard.toml").write_text(API_MANIFEST.format(key="churn", version=version))
    (d / "api" / "predict.py").write_text(PREDICT)


async def test_an_endpoint_runs_in_its_env_and_a_switch_between_envs_fails_no_request(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """An endpoint imports a package shipyard's interpreter lacks; switching it from the
    env of tinypkg 1.0 to the env of 2.0 under a steady request stream fails none; the
    old env is removed once no generation uses it and the grace has passed."""
    port = free_port()
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        await anyio.to_thread.run_sync(lambda: c.start(
            "api", "api-1", "--infra", "prod", "--workers", "2", "--http-port", str(port),
            "--http-host", "127.0.0.1", "--env-grace", "1", wheels=True))
        cli = c.cli

        async def run(*args: str, timeout: float = 120.0) -> Any:
            return await anyio.to_thread.run_sync(lambda: cli(*args, timeout=timeout))

        await anyio.to_thread.run_sync(c.registered, 3)
        await run("infra", "create", "prod", "--kind", "api")
        _api_project(c.ws, "1.0")
        assert (await run("api", "package", "churn", "churn-api", "--version", "v1")) \
            .returncode == 0
        _api_project(c.ws, "2.0")
        assert (await run("api", "package", "churn", "churn-api", "--version", "v2")) \
            .returncode == 0
        first = await run("deploy", "api", "churn-api", "v1", "--infra", "prod", "--wait")
        assert first.returncode == 0, first.stdout + first.stderr
        # per-node progress, the environment's build included
        assert "api-1" in first.stderr and "building env ml ..." in first.stderr, first.stderr
        [env1] = c.built("api-1")

        endpoint = f"http://127.0.0.1:{port}/public/api/v1/churn-api/predict/predict"
        failures: list[str] = []
        versions: dict[str, int] = {}
        stop = anyio.Event()
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(endpoint, json={"features": {}})
            assert r.status_code == 200, r.text
            result = r.json()["result"]
            assert (result["tinypkg"], result["loaded_with"]) == ("1.0", "1.0")
            assert result["python"].startswith(str(c.envs_dir("api-1") / env1))

            async def client() -> None:
                while not stop.is_set():
                    r = await http.post(endpoint, json={"features": {}})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                        continue
                    v = r.json()["result"]["tinypkg"]
                    versions[v] = versions.get(v, 0) + 1

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(client)
                await wait_for(lambda: versions.get("1.0", 0) > 50, timeout=30,
                               message="requests served by v1")
                second = await run("deploy", "api", "churn-api", "v2", "--infra", "prod",
                                   "--wait")
                assert second.returncode == 0, second.stdout + second.stderr
                seen_v2 = versions.get("2.0", 0)
                await wait_for(lambda: versions.get("2.0", 0) > seen_v2 + 50, timeout=30,
                               message="requests served by v2 after the switch")
                stop.set()
        assert failures == []
        assert versions["1.0"] > 50 and versions["2.0"] > 50
        env2 = next(d for d in c.built("api-1") if d != env1)

        async def users() -> dict[str, list[str]]:
            envs = await anyio.to_thread.run_sync(c.envs, "api-1")
            return {e["digest"]: e["used_by"] for e in envs}
        # v1 left the mapping: its env is unused, and removed after the 1 s grace.
        await wait_for(lambda: c.built("api-1") == [env2], timeout=20,
                       message="the unused env of v1 removed")
        await wait_for(lambda: _eq(users(), {env2: ["api churn-api/v2"]}), timeout=10,
                       message="api-1 reports one env, used by v2")
    assert "Traceback" not in c.procs["api-1"].output()


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def test_a_test_build_on_design_runs_in_the_env_a_bundle_would_lock(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``shipyard build`` locks and builds the project's environment on the Design node
    and runs the recipe in it; changing the pin changes what the next build sees."""
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        c.registered(2)
        for pin, version in (("tinypkg==1.0", "1.0"), ("tinypkg==2.0", "2.0")):
            make_recipe_project(c.ws, "churn", [pin])
            built = c.cli("build", "churn", "seen", "--force", "--wait", timeout=120)
            assert built.returncode == 0, built.stdout + built.stderr
            seen = json.loads((c.ws / "churn" / "data" / "seen.json").read_text())
            assert seen["tinypkg"] == version
            assert seen["python"].startswith(str(c.envs_dir("design")))
        envs = c.envs("design")  # in use only while a build runs in them
        assert sorted(e["digest"] for e in envs) == c.built("design")
        assert len(envs) == 2 and {e["status"] for e in envs} == {"ready"}


async def test_an_api_env_that_cannot_be_built_fails_the_switch_and_the_old_one_serves(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The API node's wheel folder lacks tinypkg 2.0 (the Design node locked it from its
    own): the switch to v2 fails with uv's reason and v1 keeps serving."""
    port = free_port()
    node_wheels = tmp_path / "node-wheels"
    make_wheel(node_wheels, "tinypkg", "1.0")
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        await anyio.to_thread.run_sync(lambda: c.start(
            "api", "api-1", "--infra", "prod", "--workers", "1", "--http-port", str(port),
            "--http-host", "127.0.0.1", "--find-links", str(node_wheels), "--no-index"))
        cli = c.cli

        async def run(*args: str) -> Any:
            return await anyio.to_thread.run_sync(lambda: cli(*args, timeout=120.0))

        await anyio.to_thread.run_sync(c.registered, 3)
        await run("infra", "create", "prod", "--kind", "api")
        for version, pin in (("v1", "1.0"), ("v2", "2.0")):
            _api_project(c.ws, pin)
            assert (await run("api", "package", "churn", "churn-api", "--version",
                              version)).returncode == 0
        assert (await run("deploy", "api", "churn-api", "v1", "--infra", "prod",
                          "--wait")).returncode == 0
        failed = await run("deploy", "api", "churn-api", "v2", "--infra", "prod", "--wait")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "building env ml: installing 1 package failed" in failed.stderr
        assert "tinypkg" in failed.stderr and "Traceback" not in failed.stderr

        endpoint = f"http://127.0.0.1:{port}/public/api/v1/churn-api/predict/predict"
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(endpoint, json={"features": {}})
        assert r.status_code == 200 and r.json()["result"]["tinypkg"] == "1.0", r.text
        envs = await anyio.to_thread.run_sync(c.envs, "api-1")
        assert sorted(e["status"] for e in envs) == ["failed", "ready"]
        [bad] = [e for e in envs if e["status"] == "failed"]
        assert "tinypkg" in bad["reason"]
