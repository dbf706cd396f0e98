"""Shared helpers for the flow engine tests (no tests here): write a project to disk,
open a ``Flow`` on it with a real worker pool."""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nodes.flow import Flow, FlowEvent, Limits, WorkerPool
from nodes.project.manifest import Manifest, parse_manifest

HEADER = '[project]\nkey = "demo"\n'


def write_project(root: Path, manifest: str, files: dict[str, str] | None = None) -> Manifest:
    """Write ``shipyard.toml`` (``[project]`` added) and ``files`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    text = HEADER + textwrap.dedent(manifest)
    (root / "shipyard.toml").write_text(text)
    for rel, body in (files or {}).items():
        write(root / rel, body)
    return parse_manifest(text)


def write(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def read(path: Path) -> str:
    return path.read_text()


def leftovers(directory: Path) -> list[str]:
    """Temporary outputs left in ``directory`` (there should be none)."""
    return [p.name for p in directory.iterdir() if ".sy-tmp-" in p.name]


def resolved(path: Path) -> Path:
    return path.resolve()


def set_mtime(path: Path, seconds: float) -> None:
    os.utime(path, (seconds, seconds))


@asynccontextmanager
async def open_flow(root: Path, manifest: Manifest, *, data_dir: Path | None = None,
                    seed_dir: Path | None = None, limits: Limits | None = None,
                    kill_grace_s: float = 0.5) -> AsyncIterator[Flow]:
    async with WorkerPool(kill_grace_s=kill_grace_s) as pool:
        yield Flow(manifest, code_dir=root, data_dir=data_dir, seed_dir=seed_dir, pool=pool,
                   limits=limits)


class Events:
    """A progress hook that keeps every event."""

    def __init__(self) -> None:
        self.events: list[FlowEvent] = []

    def __call__(self, event: FlowEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


# A recipe copying its single input to its single output.
COPY = """
def run(ctx):
    (src,) = ctx.inputs.values()
    (dst,) = ctx.outputs.values()
    dst.write_text(src.read_text())
"""

# A -> B pipeline used by several tests: raw (source) -> clean -> report.
PIPELINE = """
[datasets.raw]
path = "data/raw.csv"

[datasets.clean]
path = "data/clean.csv"

[datasets.report]
path = "out/report.csv"

[recipes.clean]
code = "recipes/clean.py"
inputs = ["raw"]
outputs = ["clean"]

[recipes.report]
code = "recipes/report.py"
inputs = ["clean"]
outputs = ["report"]
"""
