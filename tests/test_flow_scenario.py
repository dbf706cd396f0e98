"""Scenario runs: ordered build/check/python steps, one structured result, progress
events and a run log."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from nodes.flow import (
    CheckStatus,
    FlowError,
    Outcome,
    ScenarioResult,
    StepFinished,
    StepStarted,
)
from nodes.project.manifest import load_manifest
from tests.helpers import wait_for
from tests.test_flow_support import COPY, Events, open_flow, read, write_project

PROJECT = """
[datasets.raw]
path = "data/raw.csv"
ship = true

[datasets.clean]
path = "data/clean.csv"
checks = [{{ metric = "row_count", min = {min_rows}, soft_max = 2 }}]

[recipes.clean]
code = "recipes/clean.py"
inputs = ["raw"]
outputs = ["clean"]

[scenarios.nightly]
params = {{ greeting = "hello", who = "scenario" }}
steps = [
    {{ build = ["clean"] }},
    {{ check = ["clean"] }},
    {{ python = "scripts/report.py", name = "report" }},
]
"""

REPORT = """
def run(ctx):
    rows = ctx.datasets["clean"].read_text().splitlines()
    ctx.log.info("%s %s", ctx.params["greeting"], ctx.params["who"])
    ctx.metric("lines", len(rows))
"""


def project(tmp_path: Path, *, min_rows: int = 1) -> None:
    write_project(tmp_path, PROJECT.format(min_rows=min_rows),
                  {"recipes/clean.py": COPY, "scripts/report.py": REPORT,
                   "data/raw.csv": "id\n1\n2\n3\n"})


async def test_scenario_runs_build_check_and_python_steps_in_order(tmp_path: Path) -> None:
    project(tmp_path)
    manifest = load_manifest(tmp_path)
    events = Events()
    log_path = tmp_path / "runs/1.log"
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.run_scenario("nightly", params={"who": "caller"},
                                         log_path=log_path, progress=events)
    assert [(s.kind, s.outcome) for s in result.steps] == [
        ("build", Outcome.SUCCESS), ("check", Outcome.WARNING), ("python", Outcome.SUCCESS)]
    assert result.outcome is Outcome.WARNING  # the soft_max warning is recorded
    assert "clean.row_count = 3 > soft_max 2" in result.message
    build, check, python = result.steps
    assert build.recipes[0].recipe == "clean" and build.metrics["clean"]["row_count"] == 3
    assert [c.status for c in check.checks] == [CheckStatus.WARNING]
    assert python.name == "report" and python.metrics == {"report": {"lines": 4}}
    assert all(s.duration_s >= 0 for s in result.steps)
    log = read(log_path)
    assert "[python scripts/report.py] INFO hello caller" in log  # caller params win
    assert "scenario nightly WARNING" in log
    assert result.log_path == str(log_path) and result.log_tail[-1] in log
    assert events.kinds() == ["StepStarted", "RecipeStarted", "RecipeFinished",
                              "StepFinished", "StepStarted", "StepFinished",
                              "StepStarted", "StepFinished"]
    recipe_started = events.events[1]
    assert getattr(recipe_started, "step", None) == 0  # recipe events carry the step
    finished = [e for e in events.events if isinstance(e, StepFinished)]
    assert [e.outcome for e in finished] == [s.outcome for s in result.steps]
    # Results go on the wire as they are.
    wire = msgspec.json.decode(msgspec.json.encode(result), type=ScenarioResult)
    assert wire == result


async def test_error_check_fails_the_scenario_and_skips_later_steps(tmp_path: Path) -> None:
    project(tmp_path, min_rows=10)
    async with open_flow(tmp_path, load_manifest(tmp_path)) as flow:
        result = await flow.run_scenario("nightly")
    assert result.outcome is Outcome.FAILED
    assert [s.outcome for s in result.steps] == [Outcome.SUCCESS, Outcome.FAILED,
                                                Outcome.SKIPPED]
    assert result.steps[1].checks[0].status is CheckStatus.ERROR
    assert result.message.startswith("step 2 (check clean) failed: ERROR clean.row_count = 3 "
                                     "< min 10")
    assert result.steps[2].message == "not run: step 2 (check clean) failed"


async def test_failing_python_step_fails_the_scenario_with_its_reason(tmp_path: Path) -> None:
    project(tmp_path)
    (tmp_path / "scripts/report.py").write_text("def run(ctx):\n    1 / 0\n")
    async with open_flow(tmp_path, load_manifest(tmp_path)) as flow:
        result = await flow.run_scenario("nightly")
    assert result.outcome is Outcome.FAILED
    assert result.steps[2].message == "ZeroDivisionError: division by zero"
    assert any("ZeroDivisionError" in line for line in result.log_tail)


async def test_cancelled_scenario_reports_cancelled_steps(tmp_path: Path) -> None:
    project(tmp_path)
    (tmp_path / "recipes/clean.py").write_text("import time\ndef run(ctx):\n    time.sleep(60)\n")
    cancel = anyio.Event()
    events = Events()
    async with open_flow(tmp_path, load_manifest(tmp_path)) as flow, \
            anyio.create_task_group() as tg:
        async def cancel_when_running() -> None:
            await wait_for(lambda: "RecipeStarted" in events.kinds(), message="recipe start")
            cancel.set()

        tg.start_soon(cancel_when_running)
        result = await flow.run_scenario("nightly", cancel=cancel, progress=events)
    assert result.outcome is Outcome.CANCELLED
    assert [s.outcome for s in result.steps] == [Outcome.CANCELLED, Outcome.SKIPPED,
                                                Outcome.SKIPPED]
    assert isinstance(events.events[0], StepStarted)


async def test_unknown_scenario_is_refused(tmp_path: Path) -> None:
    project(tmp_path)
    async with open_flow(tmp_path, load_manifest(tmp_path)) as flow:
        with pytest.raises(FlowError, match=r"unknown scenario 'weekly' \(known: nightly\)"):
            await flow.run_scenario("weekly")


async def test_scenario_timeout_stops_the_running_step_and_skips_the_rest(
        tmp_path: Path) -> None:
    project(tmp_path)
    (tmp_path / "recipes/clean.py").write_text("import time\ndef run(ctx):\n    time.sleep(60)\n")
    manifest = load_manifest(tmp_path)
    scenario = msgspec.structs.replace(manifest.scenarios["nightly"], timeout_s=0.5)
    manifest = msgspec.structs.replace(manifest, scenarios={"nightly": scenario})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.run_scenario("nightly")
    assert result.outcome is Outcome.FAILED
    assert [s.outcome for s in result.steps] == [Outcome.FAILED, Outcome.SKIPPED,
                                                Outcome.SKIPPED]
    assert result.steps[0].recipes[0].reason == "killed: run timeout after 0.5s"
    assert result.duration_s < 3
