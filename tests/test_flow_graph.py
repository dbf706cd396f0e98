"""DAG validation and build plans: every refusal names its culprits."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.flow import Flow, FlowError, Graph, WorkerPool
from protocol.errors import BadRequest
from tests.test_flow_support import COPY, PIPELINE, resolved, write_project


def graph(tmp_path: Path, manifest: str) -> Graph:
    return Graph.of(write_project(tmp_path, manifest))


def test_unknown_dataset_in_a_recipe_is_refused_naming_recipe_and_dataset(
        tmp_path: Path) -> None:
    with pytest.raises(FlowError) as err:
        graph(tmp_path, """
            [datasets.raw]
            path = "raw.csv"
            [recipes.clean]
            code = "clean.py"
            inputs = ["raww"]
            outputs = ["cleaned"]
        """)
    assert isinstance(err.value, BadRequest)
    message = str(err.value)
    assert "recipe 'clean' reads unknown dataset 'raww'" in message
    assert "recipe 'clean' writes unknown dataset 'cleaned'" in message
    assert err.value.problems and len(err.value.problems) == 2


def test_unknown_build_target_is_refused_naming_it(tmp_path: Path) -> None:
    g = graph(tmp_path, PIPELINE)
    with pytest.raises(FlowError, match=r"unknown dataset 'nope'.*known: clean, raw, report"):
        g.check_targets(["clean", "nope"])


def test_unknown_dataset_in_a_scenario_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FlowError, match=r"scenario 'nightly' step 2 \(check\) names unknown "
                                        r"dataset 'ghost'"):
        graph(tmp_path, PIPELINE + """
            [scenarios.nightly]
            steps = [{ build = ["report"] }, { check = ["ghost"] }]
        """)


def test_cycle_is_refused_naming_its_recipes_and_datasets(tmp_path: Path) -> None:
    with pytest.raises(FlowError) as err:
        graph(tmp_path, """
            [datasets.a]
            path = "a.csv"
            [datasets.b]
            path = "b.csv"
            [datasets.c]
            path = "c.csv"
            [recipes.make_b]
            code = "make_b.py"
            inputs = ["a"]
            outputs = ["b"]
            [recipes.make_c]
            code = "make_c.py"
            inputs = ["b"]
            outputs = ["c"]
            [recipes.make_a]
            code = "make_a.py"
            inputs = ["c"]
            outputs = ["a"]
        """)
    message = str(err.value)
    assert message.startswith("dependency cycle: ")
    for name in ("recipe 'make_a'", "recipe 'make_b'", "recipe 'make_c'",
                 "dataset 'a'", "dataset 'b'", "dataset 'c'"):
        assert name in message
    # The data flow reads in order: make_b writes b, which make_c reads.
    assert "recipe 'make_b' -> dataset 'b' -> recipe 'make_c'" in message


def test_recipe_reading_its_own_output_is_a_cycle(tmp_path: Path) -> None:
    with pytest.raises(FlowError, match="dependency cycle: recipe 'loop' -> dataset 'x' -> "
                                        "recipe 'loop'"):
        graph(tmp_path, """
            [datasets.x]
            path = "x.csv"
            [recipes.loop]
            code = "loop.py"
            inputs = ["x"]
            outputs = ["x"]
        """)


def test_two_recipes_writing_one_dataset_are_refused_naming_both(tmp_path: Path) -> None:
    with pytest.raises(FlowError, match="dataset 'out' is written by two recipes: "
                                        "'first' and 'second'"):
        graph(tmp_path, """
            [datasets.out]
            path = "out.csv"
            [recipes.first]
            code = "first.py"
            outputs = ["out"]
            [recipes.second]
            code = "second.py"
            outputs = ["out"]
        """)


async def test_missing_code_file_is_refused_naming_recipe_and_file(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, PIPELINE + """
        [scenarios.nightly]
        steps = [{ python = "scripts/gone.py" }]
    """, {"recipes/clean.py": COPY})
    flow = Flow(manifest, code_dir=tmp_path, pool=WorkerPool())
    root = resolved(tmp_path)
    with pytest.raises(FlowError) as err:
        await flow.validate()
    assert err.value.problems == [
        f"recipe 'report': code file 'recipes/report.py' not found in {root}",
        f"scenario 'nightly' step 1: script 'scripts/gone.py' not found in "
        f"{root}",
    ]
    # A build checks the code it needs: building "report" needs report.py.
    with pytest.raises(FlowError, match=r"recipe 'report': code file 'recipes/report\.py'"):
        await flow.build(["report"])
    await flow.validate(targets=["clean"])  # clean alone does not


def test_plan_runs_upstream_first_and_only_what_targets_need(tmp_path: Path) -> None:
    g = graph(tmp_path, PIPELINE + """
        [datasets.other]
        path = "other.csv"
        [recipes.other]
        code = "other.py"
        inputs = ["raw"]
        outputs = ["other"]
    """)
    assert g.needed(["report"]) == ["clean", "report"]
    assert g.needed(["clean"]) == ["clean"]
    assert g.needed(["raw"]) == []
    assert g.sources(["report"]) == ["raw"]
    assert g.upstream("report") == ["clean"]
