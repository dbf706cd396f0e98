"""Builds with real job processes: order, incremental skips, parallelism, atomic outputs,
params and logs, seeding."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodes.flow import FlowError, Limits, Outcome, RecipeFinished, RecipeSkipped, RecipeStarted
from tests.helpers import gather
from tests.test_flow_support import (
    COPY,
    PIPELINE,
    Events,
    open_flow,
    read,
    set_mtime,
    write,
    write_project,
)

RAW = "id,value\n1,a\n2,b\n3,c\n"


def pipeline(tmp_path: Path) -> None:
    write(tmp_path / "data/raw.csv", RAW)
    write(tmp_path / "recipes/clean.py", COPY)
    write(tmp_path / "recipes/report.py", COPY)


async def test_build_runs_needed_recipes_upstream_first(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE)
    pipeline(tmp_path)
    events = Events()
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["report"], progress=events)
    assert result.outcome is Outcome.SUCCESS, result.message
    assert [r.recipe for r in result.recipes] == ["clean", "report"]
    assert read(tmp_path / "out/report.csv") == RAW
    assert events.kinds() == ["RecipeStarted", "RecipeFinished"] * 2
    started = [e for e in events.events if isinstance(e, RecipeStarted)]
    assert [e.recipe for e in started] == ["clean", "report"]
    assert all(e.pid for e in started)


async def test_second_build_skips_up_to_date_recipes_and_force_reruns_them(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE)
    pipeline(tmp_path)
    async with open_flow(tmp_path, manifest) as flow:
        first = await flow.build(["report"])
        events = Events()
        again = await flow.build(["report"], progress=events)
        forced = await flow.build(["report"], force=True)
    assert [r.outcome for r in first.recipes] == [Outcome.SUCCESS] * 2
    assert [(r.outcome, r.reason) for r in again.recipes] == [(Outcome.SKIPPED, "up to date")] * 2
    assert again.outcome is Outcome.SUCCESS
    assert all(isinstance(e, RecipeSkipped) for e in events.events)
    assert again.metrics["report"]["row_count"] == 3  # from the persisted metrics
    assert [r.outcome for r in forced.recipes] == [Outcome.SUCCESS] * 2


async def test_changed_input_reruns_its_recipe_and_everything_downstream(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE)
    pipeline(tmp_path)
    async with open_flow(tmp_path, manifest) as flow:
        await flow.build(["report"])
        for rel in ("data/raw.csv", "recipes/clean.py", "recipes/report.py",
                    "data/clean.csv", "out/report.csv"):
            set_mtime(tmp_path / rel, 1_000_000)
        set_mtime(tmp_path / "data/raw.csv", 2_000_000)  # newer than clean.csv
        result = await flow.build(["report"])
        assert [r.outcome for r in result.recipes] == [Outcome.SUCCESS] * 2
        set_mtime(tmp_path / "recipes/report.py", time.time() + 100)  # code changed
        result = await flow.build(["report"])
    assert [r.outcome for r in result.recipes] == [Outcome.SKIPPED, Outcome.SUCCESS]


async def test_source_target_only_needs_to_exist(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE, {"recipes/clean.py": COPY,
                                                  "recipes/report.py": COPY})
    async with open_flow(tmp_path, manifest) as flow:
        missing = await flow.build(["raw"])
        missing_input = await flow.build(["clean"])
        write(tmp_path / "data/raw.csv", RAW)
        present = await flow.build(["raw"])
    assert missing.outcome is Outcome.FAILED
    assert "source dataset 'raw' not found at data/raw.csv" in missing.message
    assert missing_input.outcome is Outcome.FAILED
    assert missing_input.recipes[0].reason == "input dataset not found: 'raw' (data/raw.csv)"
    assert present.outcome is Outcome.SUCCESS and present.recipes == []
    assert present.metrics["raw"] == {"size_bytes": len(RAW), "row_count": 3}


SLEEPER = """
import time

def run(ctx):
    start = time.time()
    time.sleep(0.6)
    (out,) = ctx.outputs.values()
    out.write_text(f"{start} {time.time()}")
"""

BRANCHES = """
[datasets.left]
path = "left.txt"
[datasets.right]
path = "right.txt"
[recipes.left]
code = "sleep.py"
outputs = ["left"]
[recipes.right]
code = "sleep.py"
outputs = ["right"]
"""


def spans(tmp_path: Path) -> list[tuple[float, float]]:
    out = []
    for name in ("left", "right"):
        start, end = read(tmp_path / f"{name}.txt").split()
        out.append((float(start), float(end)))
    return out


async def test_independent_branches_run_in_parallel(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, BRANCHES, {"sleep.py": SLEEPER})
    async with open_flow(tmp_path, manifest) as flow:
        t0 = time.monotonic()
        result = await flow.build(["left", "right"])
        elapsed = time.monotonic() - t0
    assert result.outcome is Outcome.SUCCESS, result.message
    (s1, e1), (s2, e2) = spans(tmp_path)
    assert max(s1, s2) < min(e1, e2), "the two recipes did not overlap"
    assert elapsed < 1.1


async def test_parallelism_limit_of_one_serialises_branches(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, BRANCHES, {"sleep.py": SLEEPER})
    async with open_flow(tmp_path, manifest, limits=Limits(jobs=1)) as flow:
        result = await flow.build(["left", "right"])
    assert result.outcome is Outcome.SUCCESS, result.message
    (_, first_end), (second_start, _) = sorted(spans(tmp_path))
    assert first_end <= second_start


PARTIAL = """
def run(ctx):
    ctx.outputs["clean"].write_text("half a fi")
    raise RuntimeError("disk on fire")
"""


async def test_failing_recipe_leaves_previous_output_intact_and_no_temp_files(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE)
    pipeline(tmp_path)
    async with open_flow(tmp_path, manifest) as flow:
        good = await flow.build(["report"])
        write(tmp_path / "recipes/clean.py", PARTIAL)
        bad = await flow.build(["report"], force=True)
    assert good.outcome is Outcome.SUCCESS
    assert bad.outcome is Outcome.FAILED
    assert bad.recipe("clean").reason == "RuntimeError: disk on fire"
    assert bad.recipe("report").outcome is Outcome.SKIPPED
    assert bad.recipe("report").reason == "upstream failed: clean"
    assert read(tmp_path / "data/clean.csv") == RAW
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["clean.csv", "raw.csv"]


PARAMS_AND_LOG = """
import sys

def run(ctx):
    ctx.log.info("threshold is %s", ctx.params["threshold"], mode=ctx.params["mode"])
    print("plain print")
    print("to stderr", file=sys.stderr)
    ctx.outputs["clean"].write_text(str(ctx.params))
"""


async def test_params_reach_the_recipe_and_its_log_lines_reach_the_run_log(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE, {"recipes/clean.py": PARAMS_AND_LOG})
    write(tmp_path / "data/raw.csv", RAW)
    log_path = tmp_path / "logs/build.log"
    events = Events()
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["clean"], params={"threshold": 0.5, "mode": "fast"},
                                  log=log_path, progress=events)
    assert result.outcome is Outcome.SUCCESS, result.message
    assert read(tmp_path / "data/clean.csv") == "{'threshold': 0.5, 'mode': 'fast'}"
    log = read(log_path)
    assert "[recipe clean] INFO threshold is 0.5 mode='fast'" in log
    assert "[recipe clean] plain print" in log
    assert "[recipe clean] to stderr" in log
    assert "[engine] build SUCCESS" in log
    assert log.splitlines()[0][:4].isdigit()  # each line starts with a timestamp
    finished = [e for e in events.events if isinstance(e, RecipeFinished)]
    assert finished[0].outcome is Outcome.SUCCESS


async def _failed_clean(tmp_path: Path, files: dict[str, str]) -> tuple[str, list[str]]:
    """Build ``clean`` from ``files``, which must fail: its message and the recipe's
    log lines (without their timestamp and tag)."""
    manifest = write_project(tmp_path, PIPELINE, files)
    write(tmp_path / "data/raw.csv", RAW)
    log_path = tmp_path / "logs/build.log"
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["clean"], log=log_path)
    assert result.outcome is Outcome.FAILED
    return result.message or "", [line.split("[recipe clean] ", 1)[1]
                                  for line in read(log_path).splitlines()
                                  if "[recipe clean] " in line]


def _files_in(lines: list[str]) -> list[str]:
    """The file of each frame of a printed traceback."""
    return [line.split('"')[1] for line in lines if line.lstrip().startswith("File ")]


async def test_a_failing_recipes_traceback_starts_at_the_users_code(tmp_path: Path) -> None:
    _, lines = await _failed_clean(tmp_path, {
        # An import-time failure, through a helper module beside the recipe.
        "recipes/clean.py": "from helper import boom\nboom()\n",
        "recipes/helper.py": "def boom():\n    raise ValueError('deep in the helper')\n",
    })
    start = lines.index("Traceback (most recent call last):")
    # Not the job runner's frames nor the import machinery's: the user's, in order.
    assert [Path(f).name for f in _files_in(lines[start:])] == ["clean.py", "helper.py"], lines
    assert "ValueError: deep in the helper" in lines


async def test_a_syntax_error_is_shown_at_the_users_line_without_the_loaders_frames(
        tmp_path: Path) -> None:
    message, lines = await _failed_clean(tmp_path, {
        "recipes/clean.py": "def run(ctx):\n    return (\n"})
    assert "SyntaxError" in message
    assert [Path(f).name for f in _files_in(lines)] == ["clean.py"], lines
    assert "Traceback (most recent call last):" not in lines
    assert any(line.startswith("SyntaxError: ") for line in lines), lines


async def test_a_traceback_through_shipyards_api_keeps_the_frames_after_the_users(
        tmp_path: Path) -> None:
    _, lines = await _failed_clean(tmp_path, {
        "recipes/clean.py": "def run(ctx):\n    ctx.metric('rows', 1, dataset='nope')\n"})
    files = _files_in(lines[lines.index("Traceback (most recent call last):"):])
    assert Path(files[0]).name == "clean.py" and len(files) >= 2, files
    assert "nodes" in Path(files[-1]).parts  # where ctx.metric refused the dataset


SHIPPED = """
[datasets.raw]
path = "data/raw.csv"
ship = true
[datasets.lookup]
path = "data/lookup.csv"
ship = true
[datasets.local]
path = "data/local.csv"
"""


async def test_shipped_datasets_are_seeded_only_when_absent(tmp_path: Path) -> None:
    bundle, data = tmp_path / "bundle", tmp_path / "data_dir"
    manifest = write_project(bundle, SHIPPED)
    write(bundle / "data/raw.csv", "id\n1\n")
    write(bundle / "data/lookup.csv", "k\nshipped\n")
    write(bundle / "data/local.csv", "not shipped\n")
    write(data / "data/lookup.csv", "k\nlocal edit\n")
    async with open_flow(bundle, manifest, data_dir=data, seed_dir=bundle) as flow:
        seeded = await flow.seed()
        again = await flow.seed()
    assert seeded == ["raw"]
    assert again == []
    assert read(data / "data/raw.csv") == "id\n1\n"
    assert read(data / "data/lookup.csv") == "k\nlocal edit\n"
    assert not (data / "data/local.csv").exists()


async def test_build_seeds_then_reads_from_the_data_dir(tmp_path: Path) -> None:
    bundle, data = tmp_path / "bundle", tmp_path / "data_dir"
    manifest = write_project(bundle, PIPELINE.replace('path = "data/raw.csv"',
                                                      'path = "data/raw.csv"\nship = true'))
    pipeline(bundle)
    async with open_flow(bundle, manifest, data_dir=data, seed_dir=bundle) as flow:
        result = await flow.build(["report"])
    assert result.outcome is Outcome.SUCCESS, result.message
    assert read(data / "out/report.csv") == RAW
    assert not (bundle / "out").exists()


async def test_concurrent_builds_of_one_target_run_its_recipe_once(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, BRANCHES, {"sleep.py": SLEEPER})
    async with open_flow(tmp_path, manifest) as flow:
        results = await gather(flow.build(["left"]), flow.build(["left"]))
    outcomes = sorted(r.recipe("left").outcome for r in results)
    assert outcomes == [Outcome.SKIPPED, Outcome.SUCCESS]


async def test_params_that_are_not_plain_data_are_refused(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE)
    pipeline(tmp_path)
    async with open_flow(tmp_path, manifest) as flow:
        with pytest.raises(FlowError, match="run parameters must be plain data"):
            await flow.build(["clean"], params={"when": object()})
