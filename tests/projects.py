"""Test projects written to disk: a manifest, recipes, data."""

from __future__ import annotations

import textwrap
from pathlib import Path

MANIFEST = """\
[project]
key = "{key}"
name = "Test project {key}"

[datasets.raw]
path = "data/raw.csv"
ship = true

[datasets.clean]
path = "data/clean.csv"

[recipes.clean]
code = "recipes/clean.py"
inputs = ["raw"]
outputs = ["clean"]

[scenarios.nightly]
steps = [{{ build = ["clean"] }}]
triggers = [{{ cron = "0 2 * * *" }}]
"""

RECIPE = """\
def run(ctx):
    rows = ctx.inputs["raw"].read_text().splitlines()
    ctx.outputs["clean"].write_text("\\n".join(r for r in rows if r.strip()) + "\\n")
"""


def make_project(workspace: Path, key: str = "churn", *, version: str = "1",
                 extra_files: dict[str, str | bytes] | None = None) -> Path:
    """A small valid project; ``version`` changes one code file between bundles."""
    d = workspace / key
    (d / "recipes").mkdir(parents=True, exist_ok=True)
    (d / "data").mkdir(exist_ok=True)
    (d / "shipyard.toml").write_text(MANIFEST.format(key=key))
    (d / "recipes" / "clean.py").write_text(RECIPE + f"\nVERSION = {version!r}\n")
    (d / "data" / "raw.csv").write_text("id,value\n1,a\n2,b\n")
    (d / "data" / "clean.csv").write_text("stale output, never shipped\n")
    (d / "README.md").write_text(textwrap.dedent(f"# {key}\n"))
    # Things a bundle must leave out.
    for junk in (".git/config", "__pycache__/x.cpython-311.pyc", ".venv/bin/python",
                 "recipes/__pycache__/clean.cpython-311.pyc", ".ipynb_checkpoints/a.ipynb"):
        (d / junk).parent.mkdir(parents=True, exist_ok=True)
        (d / junk).write_text("junk")
    for rel, content in (extra_files or {}).items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return d
