"""``Flow``: one project's datasets, recipes and scenarios at a place on this node.

A ``Flow`` is cheap: make one per request (the Design node) or per activated bundle
(Automation nodes), and share one ``Pools`` (or, with no code environments, one
``WorkerPool``) between all of them.

Code environments: ``envs`` maps each environment name the manifest uses
(``Manifest.recipe_env``/``script_env``) to that environment's Python executable on
this node; a recipe or python step without one runs in the node's own interpreter.
Each interpreter has its own warm fork server (``Pools.get``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from nodes.flow import files
from nodes.flow.build import run_build
from nodes.flow.errors import FlowError
from nodes.flow.graph import Graph
from nodes.flow.jobs import Stopper
from nodes.flow.metrics import evaluate, load_metrics
from nodes.flow.pool import Pools, WorkerPool
from nodes.flow.progress import Progress
from nodes.flow.results import BuildResult, CheckResult, Metrics, ScenarioResult
from nodes.flow.run_log import RunLog
from nodes.flow.scenario import run_scenario as _run_scenario
from nodes.project.manifest import Manifest


def check_params(params: Mapping[str, Any] | None) -> None:
    """Raises ``FlowError`` if ``params`` cannot be sent to a job process."""
    try:
        msgspec.json.encode(dict(params or {}))
    except (TypeError, msgspec.EncodeError) as exc:
        raise FlowError([f"run parameters must be plain data (str, numbers, bool, None, "
                         f"lists, dicts): {exc}"]) from None


@dataclass(frozen=True)
class Limits:
    """Defaults for what the manifest does not say.  ``jobs``: recipes of one build
    running at once.  ``memory_mb``/``recipe_timeout_s``: per recipe or python step,
    unless ``Recipe.memory_mb``/``timeout_s`` says otherwise.  ``run_timeout_s``: a
    whole build or scenario run, unless ``Scenario.timeout_s`` says otherwise.

    The memory limit caps address space (``RLIMIT_AS``), which counts what a process
    reserves, not only what it touches: libraries that start many threads (BLAS, thread
    pools) reserve tens of MB per thread, hence a roomy default.  0 means no limit."""

    jobs: int = 4
    memory_mb: int = 4096
    recipe_timeout_s: float | None = None
    run_timeout_s: float | None = None


class Flow:
    """The flow engine for one project.

    ``code_dir`` holds the recipe code (the project on Design, the unpacked bundle on
    Automation); dataset paths resolve under ``data_dir`` (default: ``code_dir``);
    shipped datasets missing from ``data_dir`` are copied from ``seed_dir``.

    ``pool``: the ``Pools`` of this node, or a single ``WorkerPool`` (then every
    recipe and step runs in that pool's interpreter).  ``envs``: code environment name
    -> Python executable (see the module docstring).

    Raises ``FlowError`` at once if the manifest's DAG is invalid (unknown dataset,
    two writers, cycle); ``validate()`` also checks the code files and that every code
    environment needed is in ``envs``.
    """

    def __init__(self, manifest: Manifest, *, code_dir: Path, pool: WorkerPool | Pools,
                 data_dir: Path | None = None, seed_dir: Path | None = None,
                 limits: Limits | None = None, envs: Mapping[str, str] | None = None,
                 ) -> None:
        self.manifest = manifest
        self.graph = Graph.of(manifest)
        self.code_dir = code_dir.resolve()
        self.data_dir = (data_dir or code_dir).resolve()
        self.seed_dir = seed_dir.resolve() if seed_dir is not None else None
        self.pool = pool
        self.envs = dict(envs or {})
        self.limits = limits or Limits()

    def env_identity(self, recipe: str) -> str:
        """What identifies the environment ``recipe`` runs in, for deciding whether its
        outputs are up to date: the interpreter's path, which holds the lock's digest
        (``<data dir>/envs/<digest>/bin/python``); ``""`` for the builtin one."""
        env = self.manifest.recipe_env(recipe)
        return self.envs.get(env, "") if env else ""

    def pool_for(self, env: str | None) -> WorkerPool:
        """The pool running user code of code environment ``env`` (None: the builtin
        one).  Raises ``FlowError`` for an environment this node does not have."""
        if env is None:
            python = None
        else:
            python = self.envs.get(env)
            if python is None:
                have = ", ".join(sorted(self.envs)) or "none"
                raise FlowError([f"code environment {env!r} is not available here "
                                 f"(available: {have})"])
        if isinstance(self.pool, Pools):
            return self.pool.get(python)
        if python is not None and python != self.pool.python:
            raise FlowError([f"code environment {env!r} needs its own interpreter "
                             f"({python}): give the Flow a Pools, not a WorkerPool"])
        return self.pool

    def _check_envs(self, recipes: Iterable[str], scripts: bool) -> None:
        problems = []
        wanted = {self.manifest.recipe_env(r) for r in recipes}
        if scripts:
            wanted.add(self.manifest.script_env())
        for env in sorted(e for e in wanted if e is not None):
            try:
                self.pool_for(env)
            except FlowError as exc:
                problems += exc.problems
        if problems:
            raise FlowError(problems)
    def path(self, dataset: str) -> Path:
        """Where ``dataset`` lives on this node."""
        return self.data_dir / self.manifest.datasets[dataset].path

    def code(self, rel: str) -> Path:
        return self.code_dir / rel

    async def validate(self, *, targets: Iterable[str] | None = None,
                       scenario: str | None = None) -> None:
        """Raises ``FlowError`` naming every missing recipe code file or python step
        script (the DAG itself was checked when the Flow was made).  With ``targets``
        or ``scenario``, only the files that building those or running that needs."""
        recipes: list[str] | None = None
        scenarios: list[str] | None = None
        if targets is not None or scenario is not None:
            wanted = list(targets or [])
            scenarios = [scenario] if scenario is not None else []
            for sname in scenarios:
                wanted += [d for st in self.manifest.scenarios[sname].steps
                           for d in st.build or ()]
            recipes = self.graph.needed(wanted)
        steps = self.manifest.scenarios.values() if scenarios is None else \
            [self.manifest.scenarios[s] for s in scenarios]
        self._check_envs(self.manifest.recipes if recipes is None else recipes,
                         any(st.python is not None for sc in steps for st in sc.steps))
        problems = await anyio.to_thread.run_sync(
            lambda: self.graph.missing_files(self.code_dir, recipes=recipes,
                                             scenarios=scenarios))
        if problems:
            raise FlowError(problems)

    async def seed(self) -> list[str]:
        """Copy shipped datasets that ``data_dir`` lacks from ``seed_dir``; returns
        the names copied.  Builds and scenario runs do this first by themselves."""
        if self.seed_dir is None or self.seed_dir == self.data_dir:
            return []
        shipped = {name: Path(ds.path) for name, ds in self.manifest.datasets.items()
                   if ds.ship}
        return await anyio.to_thread.run_sync(files.seed, shipped, self.seed_dir,
                                              self.data_dir)

    async def metrics(self, datasets: Iterable[str]) -> dict[str, Metrics]:
        """The persisted metrics of ``datasets`` (built-in ones measured if missing or
        stale; a missing dataset has none).  Raises ``FlowError`` for unknown names."""
        names = list(datasets)
        self.graph.check_targets(names)
        paths = {name: self.path(name) for name in names}

        def read() -> dict[str, Metrics]:
            return {n: load_metrics(self.data_dir, n, p) for n, p in paths.items()}

        return await anyio.to_thread.run_sync(read)

    async def check(self, datasets: Iterable[str]) -> list[CheckResult]:
        """Evaluate the manifest checks of ``datasets`` against their metrics: one
        result per check, OK / WARNING / ERROR / EMPTY.  Raises ``FlowError``."""
        names = list(datasets)
        metrics = await self.metrics(names)
        exists = await anyio.to_thread.run_sync(
            lambda: {n: self.path(n).exists() for n in names})
        return [evaluate(n, c, metrics[n], present=exists[n])
                for n in names for c in self.manifest.datasets[n].checks]

    async def build(self, targets: Iterable[str], *, force: bool = False,
                    params: Mapping[str, Any] | None = None,
                    log: RunLog | Path | None = None, progress: Progress | None = None,
                    cancel: anyio.Event | None = None,
                    timeout_s: float | None = None) -> BuildResult:
        """Build the datasets ``targets``: run the recipes they need that are out of
        date (all of them with ``force``), upstream first, independent ones in
        parallel.  Setting ``cancel`` stops running recipes (result CANCELLED), as does
        cancelling the caller's scope (which then propagates).  Raises ``FlowError`` if
        a target is unknown or a code file is missing; recipe failures are in the
        result."""
        names = list(targets)
        self.graph.check_targets(names)
        check_params(params)
        await self.validate(targets=names)
        async with self._log(log) as runlog, anyio.create_task_group() as tg:
            stopper = Stopper()
            tg.start_soon(stopper.watch, cancel, timeout_s or self.limits.run_timeout_s)
            result = await run_build(self, names, force=force, params=dict(params or {}),
                                     log=runlog, progress=progress, stopper=stopper)
            tg.cancel_scope.cancel()
        return result

    async def run_scenario(self, name: str, *, params: Mapping[str, Any] | None = None,
                           log_path: Path | None = None, progress: Progress | None = None,
                           cancel: anyio.Event | None = None) -> ScenarioResult:
        """Run scenario ``name``'s steps in order; see ``nodes.flow.scenario``.
        Raises ``FlowError`` if the scenario is unknown or a code file is missing."""
        check_params(params)
        return await _run_scenario(self, name, params=dict(params or {}), log_path=log_path,
                                  progress=progress, cancel=cancel)

    @asynccontextmanager
    async def _log(self, log: RunLog | Path | None) -> AsyncIterator[RunLog]:
        if isinstance(log, RunLog):
            yield log
            return
        async with RunLog(log) as runlog:
            yield runlog

