"""A scenario run: its steps in order, one structured result.

* ``build``: builds the step's datasets (``force`` from the step); FAILED if a recipe
  failed.
* ``check``: evaluates the datasets' checks; an ERROR check fails the step, a WARNING
  or EMPTY one makes it a WARNING (recorded, the run goes on).
* ``python``: runs the script's ``run(ctx)`` in a job process like a recipe, with
  ``ctx.params``, ``ctx.log``, ``ctx.metric`` and ``ctx.datasets``.

After a FAILED or CANCELLED step the remaining steps are SKIPPED.  The run's
parameters are the scenario's ``params`` overlaid with the caller's.  Triggers and
scheduling are the node's business, not the engine's.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from nodes.flow.build import run_build
from nodes.flow.errors import FlowError
from nodes.flow.jobs import CANCELLED, Stopper, run_job
from nodes.flow.progress import Progress, emit
from nodes.flow.results import (
    CheckStatus,
    Outcome,
    ScenarioResult,
    StepFinished,
    StepResult,
    StepStarted,
)
from nodes.flow.run_log import RunLog
from nodes.flow.wire import JobSpec
from nodes.project.manifest import Step

if TYPE_CHECKING:
    from pathlib import Path

    from nodes.flow.engine import Flow

TAIL_LINES = 50


def step_name(step: Step) -> str:
    if step.name:
        return step.name
    if step.build is not None:
        return "build " + ", ".join(step.build)
    if step.check is not None:
        return "check " + ", ".join(step.check)
    return f"python {step.python}"


async def run_scenario(flow: Flow, name: str, *, params: dict[str, Any],
                       log_path: Path | None = None, progress: Progress | None = None,
                       cancel: anyio.Event | None = None) -> ScenarioResult:
    """Run scenario ``name`` of ``flow``; its log goes to ``log_path`` (if given).
    Raises ``FlowError`` if the scenario is unknown or a code file is missing;
    everything that goes wrong while running is in the result."""
    scenario = flow.manifest.scenarios.get(name)
    if scenario is None:
        known = ", ".join(sorted(flow.manifest.scenarios)) or "none"
        raise FlowError([f"unknown scenario {name!r} (known: {known})"])
    await flow.validate(scenario=name)
    run_params = {**scenario.params, **params}
    started_at, t0 = time.time(), time.monotonic()
    steps: list[StepResult] = []
    async with RunLog(log_path) as log, anyio.create_task_group() as tg:
        stopper = Stopper()
        tg.start_soon(stopper.watch, cancel, scenario.timeout_s or flow.limits.run_timeout_s)
        log.write("engine", f"scenario {name} started: {len(scenario.steps)} step(s)")
        blocker = ""
        for i, step in enumerate(scenario.steps):
            kind, sname = step.kind, step_name(step)
            if blocker or stopper.is_set:
                cancelled = stopper.reason == CANCELLED
                why = blocker or ("cancelled" if cancelled else stopper.reason)
                steps.append(StepResult(index=i, kind=kind, name=sname,
                                        outcome=Outcome.CANCELLED if cancelled and not blocker
                                        else Outcome.SKIPPED, message=f"not run: {why}"))
                continue
            log.write("engine", f"step {i + 1} ({sname}) started")
            await emit(progress, StepStarted(scenario=name, step=i, kind=kind, name=sname), log)
            s0 = time.monotonic()
            result = await _step(flow, i, step, sname, params=run_params, log=log,
                                 progress=progress, stopper=stopper)
            result = _with_duration(result, time.monotonic() - s0)
            steps.append(result)
            log.write("engine", f"step {i + 1} ({sname}) {result.outcome} in "
                                f"{result.duration_s:.2f}s" +
                                (f": {result.message}" if result.message else ""))
            await emit(progress, StepFinished(scenario=name, step=i, kind=kind, name=sname,
                                              outcome=result.outcome,
                                              duration_s=result.duration_s,
                                              message=result.message), log)
            if result.outcome in (Outcome.FAILED, Outcome.CANCELLED):
                blocker = f"step {i + 1} ({sname}) {result.outcome.lower()}"
        tg.cancel_scope.cancel()
        outcome, message = _summary(steps)
        duration = round(time.monotonic() - t0, 4)
        log.write("engine", f"scenario {name} {outcome} in {duration:.2f}s: {message}")
        tail = log.tail(TAIL_LINES)
    return ScenarioResult(scenario=name, outcome=outcome, message=message,
                          started_at=started_at, duration_s=duration, steps=steps,
                          log_path=str(log_path) if log_path is not None else None,
                          log_tail=tail)


def _with_duration(r: StepResult, seconds: float) -> StepResult:
    return msgspec.structs.replace(r, duration_s=round(seconds, 4))


def _summary(steps: list[StepResult]) -> tuple[Outcome, str]:
    for wanted in (Outcome.CANCELLED, Outcome.FAILED):
        for s in steps:
            if s.outcome is wanted:
                return wanted, f"step {s.index + 1} ({s.name}) {wanted.lower()}: {s.message}"
    warnings = [s for s in steps if s.outcome is Outcome.WARNING]
    if warnings:
        return Outcome.WARNING, "; ".join(f"step {s.index + 1} ({s.name}): {s.message}"
                                          for s in warnings)
    return Outcome.SUCCESS, f"{len(steps)} step(s) succeeded"


async def _step(flow: Flow, i: int, step: Step, sname: str, *, params: dict[str, Any],
                log: RunLog, progress: Progress | None, stopper: Stopper) -> StepResult:
    if step.build is not None:
        b = await run_build(flow, list(step.build), force=step.force, params=params,
                            log=log, progress=progress, stopper=stopper, step=i)
        return StepResult(index=i, kind="build", name=sname, outcome=b.outcome,
                          message=b.message, metrics=b.metrics, recipes=b.recipes)
    if step.check is not None:
        names = list(step.check)
        checks = await flow.check(names)
        metrics = await flow.metrics(names)
        for c in checks:
            log.write("check", f"{c.status} {c.message}")
        statuses = {c.status for c in checks}
        if CheckStatus.ERROR in statuses:
            outcome = Outcome.FAILED
        elif statuses & {CheckStatus.WARNING, CheckStatus.EMPTY}:
            outcome = Outcome.WARNING
        else:
            outcome = Outcome.SUCCESS
        bad = [f"{c.status} {c.message}" for c in checks if c.status is not CheckStatus.OK]
        message = "; ".join(bad) if bad else \
            f"{len(checks)} check(s) OK" if checks else "no checks defined"
        return StepResult(index=i, kind="check", name=sname, outcome=outcome,
                          message=message, metrics={n: m for n, m in metrics.items() if m},
                          checks=checks)
    assert step.python is not None
    code = flow.code(step.python)
    spec = JobSpec(kind="script", name=re.sub(r"\W", "_", sname), code=str(code),
                   cwd=str(flow.code_dir), sys_path=[str(code.parent), str(flow.code_dir)],
                   datasets={d: str(flow.path(d)) for d in flow.manifest.datasets},
                   data_dir=str(flow.data_dir), code_dir=str(flow.code_dir),
                   params=params, memory_mb=flow.limits.memory_mb, measure=False)
    source = f"python {step.python}"

    async def started(pid: int | None) -> None:
        log.write(source, f"started (pid {pid})")

    pool = flow.pool_for(flow.manifest.script_env())
    job = await run_job(pool, spec, log=log, source=source,
                        timeout_s=flow.limits.recipe_timeout_s, stopper=stopper,
                        on_started=started)
    recorded = {k: v for m in (job.report.metrics if job.report else {}).values()
                for k, v in m.items()}
    return StepResult(index=i, kind="python", name=sname, outcome=job.outcome,
                      message=job.reason, metrics={sname: recorded} if recorded else {})
