"""Recipes and scenario python steps run in their code environment's interpreter: they
see that environment's packages (even a fake ``msgspec`` 0.0.1), never shipyard's, and
the run still works; without an environment they see shipyard's packages as always.
Real virtualenvs (uv, local wheels), real fork servers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import anyio.abc
import msgspec
import pytest

from nodes.flow import Flow, FlowError, Outcome, Pools, WorkerPool
from nodes.project.manifest import parse_manifest
from tests.test_flow_support import write_project
from tests.test_sandbox_support import TINY, make_env, make_wheels

PROBE = """
import importlib.util, json, sys
def run(ctx):
    found = {}
    for name in ("sy_tiny", "msgspec", "anyio", "structlog", "nodes"):
        try:
            m = __import__(name)
            found[name] = getattr(m, "VERSION", None) or getattr(m, "__version__", "?")
        except ImportError:
            found[name] = None
    found["python"] = sys.executable
    found["isolated"] = sys.flags.isolated
    (out,) = ctx.outputs.values()
    out.write_text("a,b\\n1,2\\n3,4\\n")
    ctx.log.info("probe", **{k: str(v) for k, v in found.items()})
    (ctx.data_dir / f"{ctx.name}.json").write_text(json.dumps(found))
    ctx.metric("seen", 1)
"""

SCRIPT = """
import json, sy_tiny
def run(ctx):
    (ctx.data_dir / "script.json").write_text(json.dumps({"sy_tiny": sy_tiny.VERSION}))
"""

MANIFEST = """
[code_envs.one]
requirements = ["sy-tiny==1.0", "msgspec==0.0.1"]
[code_envs.two]
requirements = ["sy-tiny==2.0"]

[datasets.a]
path = "a.csv"
[datasets.b]
path = "b.csv"
[datasets.c]
path = "c.csv"

[recipes.in_one]
code = "probe.py"
outputs = ["a"]
code_env = "one"
[recipes.in_two]
code = "probe.py"
outputs = ["b"]
code_env = "two"
[recipes.builtin]
code = "probe.py"
outputs = ["c"]

[scenarios.s]
steps = [{ python = "script.py" }]
"""


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("envs")
    wheels = make_wheels(root / "wheels")
    return {"one": make_env(root / "one", wheels, [f"{TINY}==1.0", "msgspec==0.0.1"]),
            "two": make_env(root / "two", wheels, [f"{TINY}==2.0"])}


def _seen(root: Path, recipe: str) -> dict[str, object]:
    found: dict[str, object] = json.loads((root / f"{recipe}.json").read_text())
    return found


async def test_each_recipe_runs_in_its_environment_and_sees_only_its_packages(
        tmp_path: Path, envs: dict[str, str]) -> None:
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    async with Pools() as pools:
        flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs)
        result = await flow.build(["a", "b", "c"])
        assert result.outcome is Outcome.SUCCESS, result.message
        one, two, builtin = (_seen(tmp_path, r) for r in ("in_one", "in_two", "builtin"))
        # a package only the environment has, at its pinned version
        assert (one["sy_tiny"], two["sy_tiny"], builtin["sy_tiny"]) == ("1.0", "2.0", None)
        # the environment's own msgspec wins; shipyard's dependencies are not there
        assert one["msgspec"] == "0.0.1" and two["msgspec"] is None
        for seen in (one, two):
            assert seen["anyio"] is None and seen["structlog"] is None
            assert seen["nodes"] is None and seen["isolated"] == 1
        assert (one["python"], two["python"]) == (envs["one"], envs["two"])
        # the builtin environment sees the node's packages, as always
        assert builtin["msgspec"] == msgspec.__version__ and builtin["isolated"] == 0
        assert builtin["python"] == sys.executable
        # the sandboxed job still measured its output and reported its metric
        runs = {r.recipe: r for r in result.recipes}
        assert runs["in_one"].metrics["a"] == {"row_count": 2, "size_bytes": 12, "seen": 1}
        # one warm fork server per interpreter, shared
        pids = {p: pools.get(p).pid for p in (envs["one"], envs["two"], None)}
        assert len(set(pids.values())) == 3 and None not in set(pids.values())

        forced = await flow.build(["a"], force=True)
        assert forced.outcome is Outcome.SUCCESS
        assert pools.get(envs["one"]).pid == pids[envs["one"]]


async def test_a_python_step_runs_in_the_project_environment(
        tmp_path: Path, envs: dict[str, str]) -> None:
    write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    text = (tmp_path / "shipyard.toml").read_text().replace(
        'key = "demo"', 'key = "demo"\ncode_env = "two"')
    manifest = parse_manifest(text)
    async with Pools() as pools:
        flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs)
        result = await flow.run_scenario("s")
        assert result.outcome is Outcome.SUCCESS, result.message
        assert json.loads((tmp_path / "script.json").read_text()) == {"sy_tiny": "2.0"}


async def test_a_missing_package_fails_the_recipe_with_the_import_error(
        tmp_path: Path, envs: dict[str, str]) -> None:
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": "import anyio\n" + PROBE,
                                                  "script.py": SCRIPT})
    async with Pools() as pools:
        flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs)
        result = await flow.build(["a", "c"])
        runs = {r.recipe: r for r in result.recipes}
        assert runs["builtin"].outcome is Outcome.SUCCESS
        assert runs["in_one"].outcome is Outcome.FAILED
        assert runs["in_one"].reason == "ModuleNotFoundError: No module named 'anyio'"


async def test_an_environment_this_node_lacks_is_a_flow_error_naming_it(
        tmp_path: Path, envs: dict[str, str]) -> None:
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    async with Pools() as pools:
        flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs={"one": envs["one"]})
        with pytest.raises(FlowError, match="code environment 'two' is not available here "
                                            r"\(available: one\)"):
            await flow.build(["b"])
        assert (await flow.build(["a"])).outcome is Outcome.SUCCESS
    async with WorkerPool() as pool:
        flow = Flow(manifest, code_dir=tmp_path, pool=pool, envs=envs)
        with pytest.raises(FlowError, match="'one' needs its own interpreter"):
            await flow.build(["a"])


async def test_an_interpreter_that_cannot_start_fails_the_job_not_the_engine(
        tmp_path: Path, envs: dict[str, str]) -> None:
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    missing = tmp_path / "no" / "python"
    for python, why in ((missing, f"cannot start the flow worker process with {missing}: "),
                        (broken, f"the flow worker process with {broken} exited at start "
                                 "(code 3)")):
        async with Pools() as pools:
            flow = Flow(manifest, code_dir=tmp_path, pool=pools,
                        envs={**envs, "two": str(python)})
            failed = await flow.build(["b", "c"], force=True)
            runs = {r.recipe: r for r in failed.recipes}
            assert runs["builtin"].outcome is Outcome.SUCCESS
            assert runs["in_two"].outcome is Outcome.FAILED
            assert runs["in_two"].reason.startswith(why), runs["in_two"].reason


async def test_preload_modules_are_imported_by_every_interpreter_that_has_them(
        tmp_path: Path, envs: dict[str, str]) -> None:
    probe = ("import sys\n"
             "def run(ctx):\n"
             "    (out,) = ctx.outputs.values()\n"
             "    out.write_text(str('sy_tiny' in sys.modules))\n")
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": probe, "script.py": SCRIPT})
    async with Pools(preload=["sy_tiny"]) as pools:
        flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs)
        result = await flow.build(["a", "c"])
        assert result.outcome is Outcome.SUCCESS, result.message
    # warm in the environment that has it; skipped (a line on stderr) where it is missing
    assert (tmp_path / "a.csv").read_text() == "True"
    assert (tmp_path / "c.csv").read_text() == "False"


async def test_cancelling_the_pools_owner_stops_every_fork_server(
        tmp_path: Path, envs: dict[str, str]) -> None:
    """A node's shutdown cancels the task that holds its ``Pools``: every fork server,
    including one started later by a job in an environment, must exit, and the owner
    must not wait for them forever."""
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    pids: list[int] = []

    async def owner(*, task_status: anyio.abc.TaskStatus[Pools]) -> None:
        async with Pools() as pools:
            task_status.started(pools)
            await anyio.sleep_forever()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            pools = await tg.start(owner)
            flow = Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs)
            assert (await flow.build(["a"])).outcome is Outcome.SUCCESS
            pids = [p for p in (pools.get(envs["one"]).pid, pools.get().pid) if p]
            tg.cancel_scope.cancel()
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_outputs_of_another_environment_are_rebuilt_not_reused(
        tmp_path: Path, envs: dict[str, str]) -> None:
    """A new bundle (or a rollback) that changes a recipe's locked packages changes what
    the recipe computes: its outputs are rebuilt even though no input or code changed."""
    manifest = write_project(tmp_path, MANIFEST, {"probe.py": PROBE, "script.py": SCRIPT})
    async with Pools() as pools:
        first = await Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs).build(["a"])
        assert first.outcome is Outcome.SUCCESS and _seen(tmp_path, "in_one")["sy_tiny"] == "1.0"
        again = await Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs).build(["a"])
        assert [(r.outcome, r.reason) for r in again.recipes] == [
            (Outcome.SKIPPED, "up to date")]
        # "one" is now another lock: the interpreter of the environment pinning 2.0
        moved = {**envs, "one": envs["two"]}
        rebuilt = await Flow(manifest, code_dir=tmp_path, pool=pools, envs=moved).build(["a"])
        assert [r.outcome for r in rebuilt.recipes] == [Outcome.SUCCESS]
        assert _seen(tmp_path, "in_one")["sy_tiny"] == "2.0"
        back = await Flow(manifest, code_dir=tmp_path, pool=pools, envs=envs).build(["a"])
        assert [r.outcome for r in back.recipes] == [Outcome.SUCCESS]
        assert _seen(tmp_path, "in_one")["sy_tiny"] == "1.0"
