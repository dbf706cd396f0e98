"""Projects with code environments, tiny wheels to lock them with, and node processes
that build them with the real ``uv`` and no internet.

The Design node locks against a local folder of wheels (``SHIPYARD_FIND_LINKS``,
``SHIPYARD_NO_INDEX``); nodes install either from that folder (``--find-links
--no-index``) or, with a package index that nothing answers, only from the wheels
``bundle create --wheels`` stored in ``sy_wheels``.  Every process shares one uv cache
inside the test's folder, so no test sees another's cache.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import Background, shipyard, shipyard_argv, wait_until
from tests.wheels import make_wheel

HB = "0.2"
NO_INDEX = "http://127.0.0.1:9/simple"  # the discard port: no package index answers here

ENV = """\
code_env = "ml"

[code_envs.ml]
requirements = [{requirements}]
"""

RECIPE_MANIFEST = """\
[project]
key = "{key}"
{env}
[datasets.raw]
path = "data/raw.csv"
ship = true

[datasets.seen]
path = "data/seen.json"

[recipes.look]
code = "recipes/look.py"
inputs = ["raw"]
outputs = ["seen"]

[scenarios.look]
steps = [{{ build = ["seen"], force = true }}]
"""

# What the recipe saw: the version of every package it was asked about, where each came
# from, and the interpreter it ran in.
LOOK = """\
import importlib
import json
import sys


def run(ctx):
    seen = {"python": sys.executable}
    for name in ctx.inputs["raw"].read_text().split():
        module = importlib.import_module(name)
        seen[name] = getattr(module, "VERSION", "not the user's: " + module.__file__)
    ctx.outputs["seen"].write_text(json.dumps(seen))
"""


def make_wheels(dest: Path) -> Path:
    """tinypkg 1.0 and 2.0, and a fake msgspec 0.0.1 (shipyard uses the real one)."""
    make_wheel(dest, "tinypkg", "1.0")
    make_wheel(dest, "tinypkg", "2.0")
    make_wheel(dest, "msgspec", "0.0.1")
    return dest


def make_recipe_project(workspace: Path, key: str, requirements: Sequence[str] | None,
                        looks_at: Sequence[str] = ("tinypkg",)) -> Path:
    """A project whose recipe ``look`` imports ``looks_at`` and writes what it saw;
    ``requirements``: its code environment ``ml`` (None: no environment)."""
    d = workspace / key
    (d / "recipes").mkdir(parents=True, exist_ok=True)
    (d / "data").mkdir(exist_ok=True)
    env = "" if requirements is None else ENV.format(
        requirements=", ".join(json.dumps(r) for r in requirements))
    (d / "shipyard.toml").write_text(RECIPE_MANIFEST.format(key=key, env=env))
    (d / "recipes" / "look.py").write_text(LOOK)
    (d / "data" / "raw.csv").write_text(" ".join(looks_at) + "\n")
    return d


def counting_uv(tmp: Path) -> tuple[Path, Path]:
    """A ``uv`` that appends each call's sub-command to a log, then runs the real one:
    (the script, for ``SHIPYARD_UV``; the log)."""
    from uv import find_uv_bin

    log = tmp / "uv-calls.log"
    script = tmp / "uv-counting"
    script.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec "{find_uv_bin()}" "$@"\n')
    script.chmod(0o755)
    return script, log


def uv_calls(log: Path, command: str) -> int:
    """How many times the counting ``uv`` ran ``command`` (``venv``: one per build)."""
    return log.read_text().split().count(command) if log.exists() else 0


def uv_env(base: dict[str, str], tmp: Path, *, wheels: Path | None = None) -> dict[str, str]:
    """A process environment: one uv cache per test; ``wheels``: lock and install from
    that folder only."""
    env = dict(base, UV_CACHE_DIR=str(tmp / "uv-cache"), SHIPYARD_LOG_LEVEL="info")
    if wheels is not None:
        env.update(SHIPYARD_FIND_LINKS=str(wheels), SHIPYARD_NO_INDEX="1")
    return env


class Cluster:
    """Deployer, Design and the nodes a test asks for, each a real process."""

    def __init__(self, url: str, tmp: Path, cli_env: dict[str, str], wheels: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.wheels = wheels
        self.ws = tmp / "ws"
        self.ws.mkdir(exist_ok=True)
        self.env = uv_env(dict(cli_env, SHIPYARD_NATS_URL=url), tmp)
        self.procs: dict[str, Background] = {}

    def start(self, role: str, name: str, *extra: str, wheels: bool = False,
              env: dict[str, str] | None = None) -> Background:
        argv = ["node", "start", role, "--name", name, "--heartbeat-interval", HB]
        if role in ("automation", "api", "design"):
            argv += ["--data-dir", str(self.data_dir(name))]
        if role == "design":
            argv += ["--workspace", str(self.ws)]
        env = dict(uv_env(self.env, self.tmp, wheels=self.wheels if wheels else None),
                   **(env or {}))
        proc = Background(shipyard_argv(*argv, *extra), env=env)
        self.procs[name] = proc
        proc.wait_line("node ready", timeout=30)
        return proc

    def data_dir(self, node: str) -> Path:
        return self.tmp / "nodes" / node

    def envs_dir(self, node: str) -> Path:
        return self.data_dir(node) / "envs"

    def built(self, node: str) -> list[str]:
        """Digests of the environment folders on ``node``'s disk."""
        d = self.envs_dir(node)
        return sorted(p.name for p in d.iterdir() if len(p.name) == 64) if d.is_dir() else []

    def cli(self, *args: str, timeout: float = 60.0, check: bool = False) -> Any:
        return shipyard(*args, env=self.env, cwd=self.tmp, timeout=timeout, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def registered(self, n: int) -> None:
        wait_until(lambda: len(self.json("nodes")) >= n, timeout=20,
                   message=f"{n} nodes registered")

    def envs(self, node: str) -> list[dict[str, Any]]:
        """``shipyard envs --json``: the environments ``node`` reports."""
        for n in self.json("envs"):
            if n["node"] == node:
                envs: list[dict[str, Any]] = n["envs"]
                return envs
        return []

    def seen(self, node: str, project: str) -> dict[str, str]:
        """What the last run of the ``look`` recipe saw on ``node``."""
        path = self.data_dir(node) / "projects" / project / "datasets" / "data" / "seen.json"
        seen: dict[str, str] = json.loads(path.read_text())
        return seen

    def look(self, project: str, infra: str = "prod") -> dict[str, Any]:
        """Run scenario ``look`` of ``project`` and wait for it; its summary."""
        summary: dict[str, Any] = self.json("scenario", "run", project, "look", "--infra",
                                            infra, "--wait")
        return summary

    def stop(self) -> None:
        """Stop every node gracefully; fail naming any that did not stop in time."""
        hung = []
        for name, p in self.procs.items():
            try:
                p.stop(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                hung.append(f"{name}:\n" + "\n".join(p.lines[-30:]))
        assert not hung, "nodes did not stop on SIGTERM: " + "\n".join(hung)


@contextmanager
def cluster(url: str, tmp: Path, cli_env: dict[str, str]) -> Iterator[Cluster]:
    c = Cluster(url, tmp, cli_env, make_wheels(tmp / "wheels"))
    try:
        c.start("deployer", "deployer")
        c.start("design", "design", wheels=True)
        yield c
    finally:
        c.stop()
