"""Running a scenario or a build on a node and reporting it the same way everywhere.

``report_run`` wraps the flow engine: it emits ``run.started``, a ``run.step`` event
per step (handed to a bounded queue so a slow event store never slows the run),
``run.finished`` with the outcome, duration, metrics, the error and the log tail, and
stores the log in the ``sy_run_logs`` object store so it outlives the node.  The Design
node's test builds and the Automation nodes' scenario runs share it, so both read the
same.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nodes.flow.errors import FlowError
from nodes.flow.progress import Progress
from nodes.flow.results import (
    BuildResult,
    FlowEvent,
    Outcome,
    RecipeFinished,
    RecipeStarted,
    ScenarioResult,
    StepFinished,
    StepStarted,
)
from nodes.runtime import transfer
from nodes.runtime.kvcache import delete_if
from nodes.runtime.node import handles
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import Request
from protocol.errors import NotFound
from protocol.events import Event
from protocol.scenarios import (
    NodeCancelRun,
    NodeRunLog,
    RunCancelled,
    RunFinished,
    RunLock,
    RunLog,
    RunProgress,
    RunStarted,
    RunSummary,
    StepSummary,
    run_log_name,
)
from protocol.state import RunState

PROGRESS_QUEUE = 1000


class Reports(Protocol):
    """Where run events go: what ``fail_lost_run`` needs of a node."""

    @property
    def log(self) -> Any: ...

    async def emit(self, event: Event) -> None: ...


class RunHost(Reports, Protocol):
    """What running and reporting a run needs of its node (Design or Automation)."""

    @property
    def name(self) -> str: ...

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def settings(self) -> NatsSettings: ...

    async def beat_now(self) -> None: ...


@dataclass
class RunInfo:
    run_id: str
    project: str
    scenario: str
    infra: str
    node: str
    bundle: str
    trigger: str
    firing: str
    params: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    cancel: anyio.Event = field(default_factory=anyio.Event)
    log_path: Path | None = None


Work = Callable[[Progress, anyio.Event], Awaitable[ScenarioResult | BuildResult]]


def summarize(run: RunInfo, result: ScenarioResult | BuildResult | None,
              error: str = "", log_tail: list[str] | None = None) -> RunSummary:
    now = time.time()
    steps: list[StepSummary] = []
    metrics: dict[str, Any] = {}
    outcome = Outcome.FAILED.value
    if isinstance(result, ScenarioResult):
        outcome = result.outcome.value
        steps = [StepSummary(index=s.index, kind=s.kind, name=s.name, outcome=s.outcome.value,
                             message=s.message, duration_s=round(s.duration_s, 4))
                 for s in result.steps]
        for s in result.steps:
            metrics.update(s.metrics)
        error = error or _failure(result)
        log_tail = log_tail or result.log_tail
    elif isinstance(result, BuildResult):
        outcome = result.outcome.value
        steps = [StepSummary(index=i, kind="recipe", name=r.recipe, outcome=r.outcome.value,
                             message=r.reason, duration_s=round(r.duration_s, 4))
                 for i, r in enumerate(result.recipes)]
        metrics = dict(result.metrics)
        failed = [r for r in result.recipes if r.outcome == Outcome.FAILED]
        error = error or (f"recipe {failed[0].recipe}: {failed[0].reason}" if failed
                          else result.message if outcome == Outcome.FAILED.value else "")
        if not log_tail and failed:
            log_tail = failed[0].log_tail
    return RunSummary(run_id=run.run_id, project=run.project, scenario=run.scenario,
                      infra=run.infra, node=run.node, bundle=run.bundle, trigger=run.trigger,
                      params=run.params, started_at=run.started_at, finished_at=now,
                      outcome=outcome, duration_s=round(now - run.started_at, 4), error=error,
                      metrics=metrics, steps=steps, log_tail=list(log_tail or [])[-50:])


def _failure(result: ScenarioResult) -> str:
    if result.outcome not in (Outcome.FAILED, Outcome.CANCELLED):
        return ""
    bad = [s for s in result.steps if s.outcome in (Outcome.FAILED, Outcome.CANCELLED)]
    if bad:
        return f"step {bad[0].index + 1} ({bad[0].name}): {bad[0].message or result.message}"
    return result.message


async def report_run(node: RunHost, run: RunInfo, work: Work,
                     before_finish: Callable[[], Awaitable[None]] | None = None) -> RunSummary:
    """Run ``work`` with progress and log reporting; never raises for the run's own
    failures (they are in the summary).  ``before_finish`` runs after the work and
    before ``run.finished`` is published (to free a lock, so whoever sees the event can
    trigger the scenario again at once)."""
    await node.emit(RunStarted(run_id=run.run_id, project=run.project, scenario=run.scenario,
                               infra=run.infra, node=run.node, bundle=run.bundle,
                               trigger=run.trigger, firing=run.firing, params=run.params))
    send, recv = anyio.create_memory_object_stream[RunProgress](PROGRESS_QUEUE)
    dropped = 0

    def progress(event: FlowEvent) -> None:
        nonlocal dropped
        item = _progress_event(run, event)
        if item is None:
            return
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            dropped += 1

    async def publish() -> None:
        async with recv:
            async for item in recv:
                await node.emit(item)

    summary: RunSummary
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        try:
            result = await work(progress, run.cancel)
            summary = summarize(run, result)
        except FlowError as exc:
            summary = summarize(run, None, error=str(exc))
        except Exception as exc:
            node.log.exception("run crashed", run=run.run_id)
            summary = summarize(run, None, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            send.close()
    if dropped:
        node.log.warning("progress events dropped", run=run.run_id, dropped=dropped)
    await store_log(node, run)
    if before_finish is not None:
        await before_finish()
    await node.emit(RunFinished(run=summary))
    return summary


def _progress_event(run: RunInfo, e: FlowEvent) -> RunProgress | None:
    def make(step: int, kind: str, name: str, status: str, message: str = "",
             duration: float = 0.0) -> RunProgress:
        return RunProgress(run_id=run.run_id, project=run.project, scenario=run.scenario,
                           node=run.node, step=step, kind=kind, name=name, status=status,
                           message=message, duration_s=round(duration, 4))

    if isinstance(e, StepStarted):
        return make(e.step, e.kind, e.name, "STARTED")
    if isinstance(e, StepFinished):
        return make(e.step, e.kind, e.name, e.outcome.value, e.message, e.duration_s)
    if isinstance(e, RecipeStarted) and run.trigger == "build":
        return make(-1, "recipe", e.recipe, "STARTED")
    if isinstance(e, RecipeFinished) and run.trigger == "build":
        return make(-1, "recipe", e.recipe, e.outcome.value, e.reason, e.duration_s)
    return None


async def store_log(node: RunHost, run: RunInfo) -> None:
    """Keep the run's log in the object store (best effort: the node still has it)."""
    if run.log_path is None or not await anyio.Path(run.log_path).exists():
        return
    try:
        await transfer.put_file(node.js, subjects.RUN_LOGS_STORE, run_log_name(run.run_id),
                                run.log_path, replicas=node.settings.replicas)
    except Exception as exc:  # the log stays on the node's disk
        node.log.warning("run log not stored", run=run.run_id, error=str(exc))


async def read_tail(path: Path, max_bytes: int) -> tuple[str, bool]:
    """The last ``max_bytes`` of a text file, and whether it was cut."""

    def read() -> tuple[str, bool]:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace"), size > max_bytes

    return await anyio.to_thread.run_sync(read)


async def fail_lost_run(node: Reports, locks: KeyValue, key: str, revision: int, lock: RunLock,
                        reason: str) -> bool:
    """Free the lock of a run whose node died, and record the run as failed.

    Only whoever frees the lock (compare-and-set) reports, so the run is reported once
    even if the Deployer and the restarted node both notice."""
    if not await delete_if(locks, key, revision):
        return False
    now = time.time()
    error = reason + (f"; the firing queued after it ({lock.pending.id}) was dropped"
                      if lock.pending is not None else "")
    summary = RunSummary(run_id=lock.run_id, project=lock.project, scenario=lock.scenario,
                         infra=lock.infra, node=lock.node, bundle=lock.bundle,
                         trigger=lock.firing.trigger, params=lock.firing.params,
                         started_at=lock.started_at, finished_at=now, outcome="FAILED",
                         duration_s=round(now - lock.started_at, 4), error=error)
    node.log.warning("run marked failed", run=lock.run_id, reason=reason)
    await node.emit(RunFinished(run=summary))
    return True


class LocalRuns:
    """The runs a node is executing now, and the node-direct commands about them
    (logs, cancel); shared by Automation and Design nodes."""

    def __init__(self, host: RunHost, runs_dir: Path) -> None:
        self.host = host
        self.runs_dir = runs_dir
        self.running: dict[str, RunInfo] = {}
        self._idle = anyio.Event()

    def log_path(self, run_id: str) -> Path:
        return self.runs_dir / run_id / "run.log"

    def state(self) -> dict[str, RunState]:
        return {rid: RunState(project=r.project, scenario=r.scenario, trigger=r.trigger,
                              started_at=r.started_at) for rid, r in self.running.items()}

    async def run(self, run: RunInfo, work: Work,
                  before_finish: Callable[[], Awaitable[None]] | None = None) -> RunSummary:
        run.log_path = run.log_path or self.log_path(run.run_id)
        self.running[run.run_id] = run
        await self.host.beat_now()
        try:
            return await report_run(self.host, run, work, before_finish)
        finally:
            self.running.pop(run.run_id, None)
            if not self.running:
                self._idle.set()
            await self.host.beat_now()

    async def cancel_all(self) -> None:
        """Cancel every run and wait until each is reported."""
        for run in self.running.values():
            run.cancel.set()
        while self.running:
            self._idle = anyio.Event()
            await self._idle.wait()

    @handles(NodeCancelRun)
    async def handle_cancel(self, cmd: NodeCancelRun, req: Request[Any]) -> RunCancelled:
        run = self.running.get(cmd.run_id)
        if run is not None:
            run.cancel.set()
        return RunCancelled(run_id=cmd.run_id, node=self.host.name,
                            was_running=run is not None)

    @handles(NodeRunLog)
    async def handle_log(self, cmd: NodeRunLog, req: Request[Any]) -> RunLog:
        path = self.log_path(cmd.run_id)
        if not await anyio.Path(path).exists():
            raise NotFound(f"node {self.host.name} has no log of run {cmd.run_id}")
        text, cut = await read_tail(path, cmd.max_bytes)
        return RunLog(run_id=cmd.run_id, text=text, truncated=cut,
                      running=cmd.run_id in self.running)
