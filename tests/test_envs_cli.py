"""``shipyard envs``, the nodes' environment options, and collection of environments no
kept bundle uses, through the real CLI and real node processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nodes.runtime.embedded import EmbeddedNats
from tests.envstack import cluster, make_recipe_project
from tests.helpers import shipyard, wait_until
from tests.test_cli_stack import free_port

pytestmark = pytest.mark.timeout(240)


def test_envs_lists_each_env_with_its_users_and_an_unused_one_is_removed_after_the_grace(
        nats_server: EmbeddedNats, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Three bundles on a node that keeps two: the first one's bundle is pruned, so its
    environment has no user left and is removed once the (1 s) grace has passed; the
    listing shows each environment with the bundles that use it."""
    with cluster(nats_server.url, tmp_path, cli_env) as c:
        c.start("automation", "a1", "--infra", "prod", "--keep-bundles", "2",
                "--env-grace", "1", wheels=True)
        c.registered(3)
        c.cli("infra", "create", "prod", "--kind", "automation", check=True)
        for bundle, pin in (("v1", "tinypkg==1.0"), ("v2", "tinypkg==2.0")):
            make_recipe_project(c.ws, "churn", [pin])
            c.cli("bundle", "create", "churn", "--id", bundle, check=True)
            deployed = c.cli("deploy", "bundle", "churn", bundle, "--infra", "prod",
                             "--wait", timeout=120)
            assert deployed.returncode == 0, deployed.stderr
            assert c.look("churn")["outcome"] == "SUCCESS"  # warms its env's fork server
        env1, env2 = (next(e["digest"] for e in c.envs("a1") if e["used_by"] == [user])
                      for user in ("bundle churn/v1", "bundle churn/v2"))
        [node] = [n for n in c.json("envs") if n["node"] == "a1"]
        assert (node["role"], node["infra"], node["status"]) == ("automation", "prod",
                                                                  "online")
        for e in node["envs"]:
            assert (e["names"], e["status"], e["python"]) == (
                ["ml"], "ready", f"{sys.version_info.major}.{sys.version_info.minor}")
            assert e["packages"] == 1 and e["size"] > 0 and e["unused_since"] == 0
        text = c.cli("envs", check=True).stdout
        assert "a1" in text and env1[:12] in text and "bundle churn/v1" in text
        assert "ready" in text
        assert sorted(c.built("a1")) == sorted([env1, env2])

        # A third bundle without an environment: v1 is pruned (v3 active, v2 previous).
        make_recipe_project(c.ws, "churn", None, looks_at=["json"])
        c.cli("bundle", "create", "churn", "--id", "v3", check=True)
        assert c.cli("deploy", "bundle", "churn", "v3", "--infra", "prod", "--wait",
                     timeout=120).returncode == 0
        wait_until(lambda: c.built("a1") == [env2], timeout=20,
                   message="the env only v1 used removed from disk")
        assert _running_in(c.envs_dir("a1") / env2)
        wait_until(lambda: not _running_in(c.envs_dir("a1") / env1), timeout=10,
                   message="the removed env's fork server stopped")
        wait_until(lambda: [e["digest"] for e in c.envs("a1")] == [env2], timeout=10,
                   message="a1 reports only the env v2 uses")
        # v3 runs in the node's own interpreter, which lacks tinypkg (the dataset the
        # recipe reads persists across bundles and still names it).
        v3 = c.cli("scenario", "run", "churn", "look", "--infra", "prod", "--wait")
        assert v3.returncode == 1 and "No module named 'tinypkg'" in v3.stdout, v3.stdout
        assert "Traceback" not in c.procs["a1"].output()

        only = c.json("envs", "--infra", "nowhere")
        assert only == []
        assert "no code environments" in c.cli("envs", "--infra", "nowhere",
                                               check=True).stdout
        bad = c.cli("envs", "--infra", "no*pe")
        assert bad.returncode == 1 and "Traceback" not in bad.stderr


def _running_in(env: Path) -> list[int]:
    """Pids of processes started from ``env``'s interpreter."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode(errors="replace").startswith(str(env)):
            pids.append(int(proc.name))
    return pids


def test_env_options_are_refused_on_roles_that_build_no_env(cli_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = shipyard("node", "start", "deployer", "--nats", url, "--find-links",
                    str(tmp_path), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--find-links is for automation, api and design nodes" in proc.stderr
    proc = shipyard("node", "start", "automation", "--nats", url, "--env-grace", "-1",
                    env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "--env-grace" in proc.stderr
    for args in (["node", "start", "--help"], ["up", "--help"]):
        text = shipyard(*args, env=cli_env, check=True).stdout
        for flag in ("--index-url", "--find-links", "--no-index", "--env-build-timeout",
                     "--env-grace"):
            assert flag in text, (args, flag)


def test_envs_exits_2_when_nats_is_unreachable(cli_env: dict[str, str],
                                               tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    proc = shipyard("envs", "--nats", url, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_up_passes_env_options_to_the_nodes_it_starts(tmp_path: Path) -> None:
    from nodes.cli.stack import _children

    children = _children(tmp_path, "nats://x", automation=1, api=1, heartbeat_interval=1.0,
                         workspace=tmp_path, env_argv=["--find-links", "/w", "--no-index"])
    by_role = {c.role: c.argv for c in children}
    for role in ("automation", "api", "design"):
        assert by_role[role][-3:] == ["--find-links", "/w", "--no-index"], by_role[role]
    for role in ("deployer", "govern"):
        assert "--find-links" not in by_role[role]


def test_a_build_only_nats_failed_is_retried_and_any_other_failure_refuses() -> None:
    """Pure logic: which failed builds refuse the update and which are retried."""
    import nats.errors

    from nodes.envs.options import interrupted
    from nodes.envs.store import EnvBuildFailed
    from nodes.runtime.transfer import CorruptObject, TransferStalled

    def failed(cause: BaseException | None) -> EnvBuildFailed:
        try:
            try:
                if cause is not None:
                    raise cause
                raise EnvBuildFailed("building env ml: installing 1 package failed")
            except BaseException as exc:
                if isinstance(exc, EnvBuildFailed):
                    raise
                raise EnvBuildFailed("building env ml: fetching 1 wheel failed") from exc
        except EnvBuildFailed as exc:
            return exc
        raise AssertionError("unreachable")

    assert interrupted(failed(nats.errors.TimeoutError()))
    assert interrupted(failed(nats.errors.ConnectionClosedError()))
    assert interrupted(failed(TransferStalled("sy_wheels", "w", "no ack for 30 s")))
    assert not interrupted(failed(None))  # uv failed: the lock's fault
    assert not interrupted(failed(CorruptObject("sy_wheels", "w", "sha256 mismatch")))
    assert not interrupted(failed(ValueError("bad wheel name")))
