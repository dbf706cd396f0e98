"""Dataset metrics (built-in and custom, persisted with the data) and check outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.flow import CheckStatus, Outcome, measure
from nodes.flow.metrics import count_rows, evaluate
from nodes.project.manifest import Check
from tests.test_flow_support import open_flow, write, write_project

MODEL = """
[datasets.raw]
path = "raw.csv"
checks = [{ metric = "row_count", min = 1, soft_min = 100 }]

[datasets.scored]
path = "scored.csv"
checks = [
    { metric = "row_count", min = 1 },
    { metric = "auc", min = 0.5, soft_min = 0.8 },
    { metric = "size_bytes", max = 10 },
    { metric = "never_recorded", min = 0 },
]

[datasets.summary]
path = "summary.json"

[datasets.absent]
path = "absent.csv"
checks = [{ metric = "row_count", min = 1 }]

[recipes.score]
code = "score.py"
inputs = ["raw"]
outputs = ["scored", "summary"]
"""

SCORE = """
def run(ctx):
    rows = ctx.inputs["raw"].read_text().splitlines()[1:]
    ctx.outputs["scored"].write_text("id,score\\n" + "".join(f"{r},0.9\\n" for r in rows))
    ctx.outputs["summary"].write_text("{}")
    ctx.metric("auc", 0.75, dataset="scored")
    ctx.metric("rows_seen", len(rows), dataset="summary")
"""


async def test_build_records_row_count_size_and_custom_metrics(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, MODEL, {"score.py": SCORE})
    write(tmp_path / "raw.csv", "id\n1\n2\n3\n")
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["scored"])
    assert result.outcome is Outcome.SUCCESS, result.message
    size = (tmp_path / "scored.csv").stat().st_size
    assert result.metrics["scored"] == {"row_count": 3, "size_bytes": size, "auc": 0.75}
    assert result.metrics["summary"] == {"size_bytes": 2, "rows_seen": 3}
    assert result.recipe("score").metrics["scored"]["auc"] == 0.75


async def test_metrics_persist_so_a_later_check_reads_them_without_rebuilding(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, MODEL, {"score.py": SCORE})
    write(tmp_path / "raw.csv", "id\n1\n2\n3\n")
    async with open_flow(tmp_path, manifest) as flow:
        await flow.build(["scored"])
    assert (tmp_path / ".shipyard/metrics/scored.json").is_file()
    async with open_flow(tmp_path, manifest) as fresh:  # a new engine, nothing rebuilt
        checks = await fresh.check(["raw", "scored", "absent"])
    by = {(c.dataset, c.metric): c for c in checks}
    assert by["raw", "row_count"].status is CheckStatus.WARNING
    assert by["raw", "row_count"].message == "raw.row_count = 3 < soft_min 100"
    assert by["scored", "row_count"].status is CheckStatus.OK
    assert by["scored", "row_count"].message == "scored.row_count = 3 in [1, inf]"
    assert by["scored", "auc"].status is CheckStatus.WARNING
    assert by["scored", "auc"].value == 0.75
    assert by["scored", "size_bytes"].status is CheckStatus.ERROR
    assert by["scored", "size_bytes"].message.endswith("> max 10")
    assert by["scored", "never_recorded"].status is CheckStatus.EMPTY
    assert by["scored", "never_recorded"].message == \
        "scored.never_recorded has no value (metric never recorded)"
    assert by["absent", "row_count"].status is CheckStatus.EMPTY
    assert by["absent", "row_count"].message == \
        "absent.row_count has no value (dataset not found)"


async def test_a_dataset_changed_by_hand_gets_fresh_builtin_metrics(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, MODEL, {"score.py": SCORE})
    write(tmp_path / "raw.csv", "id\n1\n2\n3\n")
    async with open_flow(tmp_path, manifest) as flow:
        await flow.build(["scored"])
        write(tmp_path / "scored.csv", "id,score\n1,0.1\n")
        metrics = await flow.metrics(["scored"])
    assert metrics["scored"] == {"size_bytes": 15, "row_count": 1}  # auc described old data


def test_check_outcomes_cover_ok_warning_error_and_empty() -> None:
    check = Check(metric="row_count", min=10, max=1000, soft_min=100, soft_max=500)
    outcomes = {v: evaluate("d", check, {"row_count": v} if v is not None else {}).status
                for v in (5, 50, 200, 700, 5000, None)}
    assert outcomes == {5: CheckStatus.ERROR, 50: CheckStatus.WARNING, 200: CheckStatus.OK,
                        700: CheckStatus.WARNING, 5000: CheckStatus.ERROR,
                        None: CheckStatus.EMPTY}


@pytest.mark.parametrize(("text", "rows"), [
    ("", 0),
    ("a,b\n", 0),
    ("a,b\n1,2\n3,4", 2),
    ("a,b\n1,2\n\n3,4\n\n", 2),
    ('a,b\n1,"multi\nline"\n2,"x"\n', 2),
    ("a,b\r\n1,2\r\n", 1),
])
def test_row_count_counts_records_without_header(tmp_path: Path, text: str,
                                                 rows: int) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(text.encode())
    assert count_rows(path) == rows
    assert measure(path)["size_bytes"] == len(text.encode())


def test_directory_dataset_measures_total_size_and_files(tmp_path: Path) -> None:
    write(tmp_path / "model/a.bin", "1234")
    write(tmp_path / "model/sub/b.bin", "56")
    assert measure(tmp_path / "model") == {"size_bytes": 6, "file_count": 2}
    assert measure(tmp_path / "missing.csv") == {}
