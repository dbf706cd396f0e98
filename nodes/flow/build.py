"""A build: the needed recipes, each started as soon as its upstream recipes are done,
at most ``Limits.jobs`` at a time.

Like ``make -k``: a failed recipe skips what depends on it, and independent branches
go on.  A recipe is up to date (skipped) when every output exists and none is older
than an input or the code file, and no upstream recipe ran in this build; ``force``
runs them all.  Outputs are written to temporary paths and renamed into place only
when ``run(ctx)`` returns, so a failure leaves the previous outputs as they were.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from nodes.flow import files
from nodes.flow.jobs import CANCELLED, Stopper, run_job
from nodes.flow.metrics import built_in_env, load_metrics, save_metrics
from nodes.flow.progress import Progress, emit
from nodes.flow.results import (
    BuildResult,
    Metrics,
    Outcome,
    RecipeFinished,
    RecipeRun,
    RecipeSkipped,
    RecipeStarted,
)
from nodes.flow.run_log import RunLog
from nodes.flow.wire import JobSpec

if TYPE_CHECKING:
    from nodes.flow.engine import Flow


@dataclass(frozen=True)
class _Prepared:
    up_to_date: bool
    why: str                             # why not up to date / what is missing
    missing: list[str]                   # input datasets that do not exist
    temps: dict[str, Path]               # temporary outputs, when the recipe will run
    metrics: dict[str, Metrics]          # persisted metrics, when up to date


UP_TO_DATE = "up to date"

# One run of a recipe at a time per data directory, across builds and Flow objects: a
# second build waits, then finds the outputs up to date instead of redoing the work.
_locks: weakref.WeakValueDictionary[tuple[Path, str], anyio.Lock] = \
    weakref.WeakValueDictionary()


def _recipe_lock(data_dir: Path, recipe: str) -> anyio.Lock:
    key = (data_dir, recipe)
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = anyio.Lock()
    return lock


class _Build:
    def __init__(self, flow: Flow, *, force: bool, params: dict[str, Any], log: RunLog,
                 progress: Progress | None, stopper: Stopper, step: int | None) -> None:
        self.flow = flow
        self.force = force
        self.params = params
        self.log = log
        self.progress = progress
        self.stopper = stopper
        self.step = step
        self.limiter = anyio.CapacityLimiter(max(1, flow.limits.jobs))
        self.done: dict[str, anyio.Event] = {}
        self.runs: dict[str, RecipeRun] = {}
        self.good: set[str] = set()      # outputs valid: ran, or up to date
        self.ran: set[str] = set()       # ran in this build

    async def recipe(self, name: str) -> None:
        try:
            run = await self._recipe(name)
            self.runs[name] = run
            if run.outcome is Outcome.SUCCESS or run.reason == UP_TO_DATE:
                self.good.add(name)
        finally:
            self.done[name].set()  # downstream recipes decide from ``good``
        source = f"recipe {name}"
        if run.outcome is Outcome.SKIPPED:
            self.log.write(source, f"skipped: {run.reason}")
            await emit(self.progress, RecipeSkipped(recipe=name, reason=run.reason,
                                                    step=self.step), self.log)
            return
        text = f"{run.outcome} in {run.duration_s:.2f}s"
        self.log.write(source, text + (f": {run.reason}" if run.reason else ""))
        await emit(self.progress, RecipeFinished(recipe=name, outcome=run.outcome,
                                                 duration_s=run.duration_s, reason=run.reason,
                                                 step=self.step), self.log)

    async def _recipe(self, name: str) -> RecipeRun:
        flow = self.flow
        recipe = flow.manifest.recipes[name]
        upstream = flow.graph.upstream(name)
        for u in upstream:
            await self.done[u].wait()
        outputs = list(recipe.outputs)
        bad = [u for u in upstream if u not in self.good]
        if bad and self.stopper.is_set:
            return self._not_started(name, outputs)
        if bad:
            return RecipeRun(recipe=name, outcome=Outcome.SKIPPED, outputs=outputs,
                             reason=f"upstream failed: {', '.join(bad)}")
        async with self.limiter, _recipe_lock(flow.data_dir, name):
            if self.stopper.is_set:
                return self._not_started(name, outputs)
            rebuild = self.force or any(u in self.ran for u in upstream)
            try:
                prep = await anyio.to_thread.run_sync(self._prepare, name, rebuild)
            except OSError as exc:
                return RecipeRun(recipe=name, outcome=Outcome.FAILED, outputs=outputs,
                                 reason=f"cannot prepare outputs: {exc}")
            if prep.missing:
                where = ", ".join(f"{d!r} ({flow.manifest.datasets[d].path})"
                                  for d in prep.missing)
                return RecipeRun(recipe=name, outcome=Outcome.FAILED, outputs=outputs,
                                 reason=f"input dataset not found: {where}")
            if prep.up_to_date:
                return RecipeRun(recipe=name, outcome=Outcome.SKIPPED, outputs=outputs,
                                 reason=UP_TO_DATE, metrics=prep.metrics)
            return await self._run(name, prep)

    def _not_started(self, name: str, outputs: list[str]) -> RecipeRun:
        if self.stopper.reason == CANCELLED:
            return RecipeRun(recipe=name, outcome=Outcome.CANCELLED, outputs=outputs,
                             reason="cancelled before it started")
        return RecipeRun(recipe=name, outcome=Outcome.SKIPPED, outputs=outputs,
                         reason=f"not started: {self.stopper.reason}")

    def _prepare(self, name: str, rebuild: bool) -> _Prepared:
        flow = self.flow
        recipe = flow.manifest.recipes[name]
        inputs = {d: flow.path(d) for d in recipe.inputs}
        outputs = {d: flow.path(d) for d in recipe.outputs}
        fresh = files.freshness(inputs, outputs, flow.code(recipe.code))
        if fresh.missing_inputs:
            return _Prepared(False, fresh.reason, fresh.missing_inputs, {}, {})
        env = flow.env_identity(name)
        if fresh.up_to_date and any(built_in_env(flow.data_dir, d) != env for d in outputs):
            # Other libraries may compute other outputs: a bundle that changes (or rolls
            # back) its locked packages rebuilds what they wrote.
            fresh = files.Freshness(False, [], "code environment changed")
        if fresh.up_to_date and not rebuild:
            metrics = {d: load_metrics(flow.data_dir, d, p) for d, p in outputs.items()}
            return _Prepared(True, fresh.reason, [], {}, metrics)
        why = "forced" if self.force else fresh.reason if not fresh.up_to_date \
            else "upstream rebuilt"
        return _Prepared(False, why, [], files.temp_outputs(outputs), {})

    async def _run(self, name: str, prep: _Prepared) -> RecipeRun:
        flow = self.flow
        recipe = flow.manifest.recipes[name]
        code = flow.code(recipe.code)
        spec = JobSpec(kind="recipe", name=name, code=str(code), cwd=str(flow.code_dir),
                       sys_path=[str(code.parent), str(flow.code_dir)],
                       inputs={d: str(flow.path(d)) for d in recipe.inputs},
                       outputs={d: str(p) for d, p in prep.temps.items()},
                       data_dir=str(flow.data_dir), code_dir=str(flow.code_dir),
                       params=self.params,
                       memory_mb=recipe.memory_mb or flow.limits.memory_mb)
        source = f"recipe {name}"

        async def started(pid: int | None) -> None:
            self.log.write(source, f"started (pid {pid}; {prep.why})")
            await emit(self.progress, RecipeStarted(recipe=name, pid=pid, step=self.step),
                       self.log)

        committed = False
        try:
            pool = flow.pool_for(flow.manifest.recipe_env(name))
            job = await run_job(pool, spec, log=self.log, source=source,
                                timeout_s=recipe.timeout_s or flow.limits.recipe_timeout_s,
                                stopper=self.stopper, on_started=started)
            outcome, reason, metrics = job.outcome, job.reason, {}
            if outcome is Outcome.SUCCESS:
                assert job.report is not None
                try:
                    metrics = await anyio.to_thread.run_sync(
                        self._commit, name, prep.temps, job.report.metrics)
                    committed = True
                    self.ran.add(name)
                except OSError as exc:
                    outcome, reason = Outcome.FAILED, f"cannot move outputs into place: {exc}"
        finally:
            if not committed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(files.discard, prep.temps)
        return RecipeRun(recipe=name, outcome=outcome, reason=reason,
                         duration_s=job.duration_s, outputs=list(recipe.outputs),
                         metrics=metrics, exit_code=job.exit_code, pid=job.pid,
                         peak_rss_mb=job.peak_rss_mb,
                         log_tail=job.log_tail if outcome is not Outcome.SUCCESS else [])

    def _commit(self, name: str, temps: dict[str, Path],
                measured: dict[str, Metrics]) -> dict[str, Metrics]:
        flow = self.flow
        outputs = {d: flow.path(d) for d in temps}
        files.commit(temps, outputs)
        env = flow.env_identity(name)
        return {d: save_metrics(flow.data_dir, d, p, dict(measured.get(d, {})), recipe=name,
                                env=env)
                for d, p in outputs.items()}


async def run_build(flow: Flow, targets: list[str], *, force: bool, params: dict[str, Any],
                    log: RunLog, progress: Progress | None, stopper: Stopper,
                    step: int | None = None) -> BuildResult:
    """Build ``targets`` (validated by the caller) and report every needed recipe."""
    t0 = time.monotonic()
    seeded = await flow.seed()
    if seeded:
        log.write("engine", f"seeded from the bundle: {', '.join(seeded)}")
    needed = flow.graph.needed(targets)
    log.write("engine", f"build {', '.join(targets)}: {len(needed)} recipe(s) "
                        f"({', '.join(needed) or 'none'}){' forced' if force else ''}")
    b = _Build(flow, force=force, params=params, log=log, progress=progress,
               stopper=stopper, step=step)
    b.done = {r: anyio.Event() for r in needed}
    async with anyio.create_task_group() as tg:
        for r in needed:
            tg.start_soon(b.recipe, r)
    runs = [b.runs[r] for r in needed]

    sources = [t for t in targets if t not in flow.graph.producers]
    wanted = list(dict.fromkeys([*targets, *(d for r in runs for d in r.outputs)]))

    def finish() -> tuple[list[str], dict[str, Metrics]]:
        missing = [t for t in sources if not flow.path(t).exists()]
        metrics = {d: load_metrics(flow.data_dir, d, flow.path(d)) for d in wanted}
        return missing, {d: m for d, m in metrics.items() if m}

    missing, metrics = await anyio.to_thread.run_sync(finish)
    problems = [f"recipe {r.recipe} {r.outcome.lower()}: {r.reason}" for r in runs
                if r.outcome in (Outcome.FAILED, Outcome.CANCELLED)]
    problems += [f"source dataset {t!r} not found at {flow.manifest.datasets[t].path} "
                 f"(no recipe writes it)" for t in missing]
    if any(r.outcome is Outcome.CANCELLED for r in runs) and stopper.reason == CANCELLED:
        outcome = Outcome.CANCELLED
    elif problems or any(r.outcome is Outcome.FAILED for r in runs):
        outcome = Outcome.FAILED
    elif stopper.is_set and any(r.reason.startswith("not started") for r in runs):
        outcome = Outcome.FAILED
        problems.append(stopper.reason)
    else:
        outcome = Outcome.SUCCESS
    ran = sum(r.outcome is Outcome.SUCCESS for r in runs)
    message = "; ".join(problems) if problems else \
        f"{ran} recipe(s) run, {len(runs) - ran} up to date"
    duration = round(time.monotonic() - t0, 4)
    log.write("engine", f"build {outcome} in {duration:.2f}s: {message}")
    return BuildResult(targets=targets, outcome=outcome, message=message,
                       duration_s=duration, recipes=runs, metrics=metrics)
