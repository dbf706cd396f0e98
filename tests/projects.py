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


FLOW_MANIFEST = """\
[project]
key = "{key}"
name = "Flows"

[datasets.raw]
path = "data/raw.csv"
ship = true

[datasets.clean]
path = "data/clean.csv"
checks = [{{ metric = "row_count", min = 1, soft_min = 4 }}]

[datasets.slow]
path = "data/slow.csv"

[datasets.burned]
path = "data/burned.txt"

[recipes.clean]
code = "recipes/clean.py"
inputs = ["raw"]
outputs = ["clean"]

[recipes.slow]
code = "recipes/slow.py"
inputs = ["raw"]
outputs = ["slow"]

[recipes.burn]
code = "recipes/burn.py"
outputs = ["burned"]

[scenarios.nightly]
steps = [{{ build = ["clean"] }}, {{ check = ["clean"] }}]

[scenarios.report]
steps = [{{ python = "scripts/report.py" }}]
triggers = [{{ after = "nightly" }}]

[scenarios.welcome]
steps = [{{ python = "scripts/report.py" }}]
triggers = [{{ on_activation = true }}]

[scenarios.slow]
steps = [{{ build = ["slow"], force = true }}]

[scenarios.quick_timeout]
steps = [{{ build = ["slow"], force = true }}]
timeout_s = 1

[scenarios.burn]
steps = [{{ build = ["burned"], force = true }}]
{extra}"""

FLOW_FILES = {
    "recipes/clean.py": (
        "def run(ctx):\n"
        "    rows = ctx.inputs['raw'].read_text().splitlines()\n"
        "    keep = [r for r in rows if r.strip() and not r.endswith(',')]\n"
        "    suffix = str(ctx.params.get('suffix', ''))\n"
        "    ctx.log.info(f'keeping {len(keep) - 1} rows, suffix {suffix!r}')\n"
        "    ctx.outputs['clean'].write_text('\\n'.join(r + suffix for r in keep) + '\\n')\n"
        "    ctx.metric('kept', len(keep) - 1)\n"),
    "recipes/slow.py": (
        "import time\n"
        "def run(ctx):\n"
        "    seconds = float(ctx.params.get('seconds', 1.0))\n"
        "    ctx.log.info(f'sleeping {seconds}s')\n"
        "    time.sleep(seconds)\n"
        "    ctx.outputs['slow'].write_text('id\\n1\\n')\n"),
    "recipes/burn.py": (
        "import time\n"
        "def run(ctx):\n"
        "    end = time.monotonic() + float(ctx.params.get('seconds', 2.0))\n"
        "    n = 0\n"
        "    while time.monotonic() < end:\n"
        "        n += sum(i * i for i in range(1000))\n"
        "    ctx.outputs['burned'].write_text(str(n))\n"),
    "scripts/report.py": (
        "def run(ctx):\n"
        "    ctx.log.info('report ran')\n"),
    "data/raw.csv": "id,value\n1,a\n2,b\n3,\n4,d\n",
}


def make_flow_project(workspace: Path, key: str = "flows", *, extra: str = "",
                      files: dict[str, str] | None = None) -> Path:
    d = workspace / key
    for rel, content in {**FLOW_FILES, **(files or {})}.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    (d / "shipyard.toml").write_text(FLOW_MANIFEST.format(key=key, extra=extra))
    return d
