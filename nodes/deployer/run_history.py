"""The Deployer's view of scenario runs: manual triggers, history, logs, cancel, and
runs whose node died.

History is the run events in the event stream, folded into one summary per run (read
back on start, so it survives restarts); an event whose names are invalid or do not
match its subject is dropped and counted, since a run's id and node reach subjects and
object names when someone asks for its log.  Manual runs go to one online Automation node
of the infra that runs the project; the firing id comes from the request id, so a
retried command is the same firing.  A lock whose holder is gone (lost, or restarted as
a new process) is freed and its run recorded as failed, "node lost".
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from nats.js.kv import KeyValue

from nodes.deployer.host import DeskHost, RequireInfra
from nodes.deployer.registry import Registry
from nodes.runtime import transfer
from nodes.runtime.events import read_events
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import KVCache
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from nodes.runtime.run_reports import fail_lost_run, read_tail
from protocol import subjects
from protocol.base import Request
from protocol.errors import NotFound, OperationError, Unavailable
from protocol.registry import LOST, ONLINE
from protocol.scenarios import (
    MANUAL,
    RUN_LOCK,
    CancelRun,
    FireScenario,
    Firing,
    GetRunLog,
    ListRuns,
    NodeCancelRun,
    NodeRunLog,
    RunAccepted,
    RunCancelled,
    RunFinished,
    RunList,
    RunLock,
    RunLog,
    RunProgress,
    RunScenario,
    RunStarted,
    RunSummary,
    StepSummary,
    lock_keys,
    run_log_name,
    validate_run_event,
)
from protocol.state import AutomationState

HISTORY_S = 30 * 24 * 3600
MAX_RUNS = 20_000
UNKNOWN_HOLDER_GRACE_S = 30.0
FAILED_NEWS_S = 600.0  # a failure read again later (a consumer restart) is not news


class RunDesk:
    def __init__(self, host: DeskHost, registry: Registry, *,
                 require_infra: RequireInfra, on_run_finished: Callable[[], None],
                 on_run_failed: Callable[[RunSummary], None] | None = None) -> None:
        """``on_run_finished``: called when a run ends (the bundle deployments' views
        show each project's last run); ``on_run_failed``: called once for each run seen
        failing live (not for runs read back from history)."""
        self.host = host
        self.registry = registry
        self.require_infra = require_infra
        self.on_run_finished = on_run_finished
        self.on_run_failed = on_run_failed
        self.live = False  # the stored history has been read: events now are news
        self.log = host.log.bind(component="runs")
        self.runs: OrderedDict[str, RunSummary] = OrderedDict()
        # (infra, project) -> scenario -> its last finished run (kept past ``MAX_RUNS``).
        self.latest: dict[tuple[str, str], dict[str, RunSummary]] = {}
        self._locks_kv: KeyValue | None = None
        self._locks: KVCache[RunLock] | None = None
        self._kick = anyio.Event()

    async def setup(self) -> None:
        self._locks_kv = await ensure_kv(self.host.js, subjects.LOCKS_BUCKET,
                                         replicas=self.host.settings.replicas)
        self._locks = KVCache(self._locks_kv, lock_keys(), RUN_LOCK.decode)

    async def started(self, tg: TaskGroup) -> None:
        assert self._locks is not None
        await tg.start(self._follow)
        await tg.start(self._locks.run)
        tg.start_soon(partial(supervised, "dead lock holders", self._sweep, log=self.host.log))

    def kick(self) -> None:
        self._kick.set()

    # -- history -------------------------------------------------------------------------

    async def _follow(self, *, task_status: TaskStatus[None]) -> None:
        """Fold run events into summaries: the stored history first, then live."""
        ready = anyio.Event()
        started = False

        def caught_up() -> None:
            self.live = True
            ready.set()
        async with anyio.create_task_group() as tg:
            async def consume() -> None:
                async for stored in read_events(self.host.nc, since_s=HISTORY_S, follow=True,
                                                subject=subjects.RUN_EVENTS_ALL,
                                                caught_up=caught_up):
                    if stored.event is None:
                        continue
                    try:
                        validate_run_event(stored.event, stored.subject)
                    except ValueError as exc:  # InvalidMessage is one
                        self.host.drops.drop("run event", stored.subject.rsplit(".", 1)[0],
                                             stored.subject, str(exc))
                        continue
                    self.fold(stored.event)

            # Folding is idempotent (one summary per run id), so a consumer restarted
            # after a NATS error may read history again.
            tg.start_soon(partial(supervised, "run history", consume, log=self.host.log))
            await ready.wait()
            if not started:
                started = True
                task_status.started()

    def fold(self, event: Any) -> None:
        if isinstance(event, RunStarted):
            if event.run_id in self.runs:
                return
            self._put(RunSummary(run_id=event.run_id, project=event.project,
                                 scenario=event.scenario, infra=event.infra, node=event.node,
                                 bundle=event.bundle, trigger=event.trigger,
                                 params=event.params, started_at=event.ts))
        elif isinstance(event, RunProgress):
            run = self.runs.get(event.run_id)
            if run is not None and run.outcome == "RUNNING" and event.step >= 0 \
                    and event.status != "STARTED":
                step = StepSummary(index=event.step, kind=event.kind, name=event.name,
                                   outcome=event.status, message=event.message,
                                   duration_s=event.duration_s)
                self._put(msgspec.structs.replace(run, steps=[*run.steps, step]))
        elif isinstance(event, RunFinished):
            before = self.runs.get(event.run.run_id)
            self._put(event.run)
            self.on_run_finished()
            if self.live and self.on_run_failed is not None and event.run.outcome == "FAILED" \
                    and (before is None or before.outcome == "RUNNING") \
                    and time.time() - (event.run.finished_at or 0.0) < FAILED_NEWS_S:
                self.on_run_failed(event.run)

    def _put(self, run: RunSummary) -> None:
        if run.finished_at is not None:
            latest = self.latest.setdefault((run.infra, run.project), {})
            seen = latest.get(run.scenario)
            if seen is None or run.finished_at >= (seen.finished_at or 0.0):
                latest[run.scenario] = run
        self.runs[run.run_id] = run
        self.runs.move_to_end(run.run_id)
        while len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)

    def last_runs(self, infra: str, project: str) -> list[RunSummary]:
        """The last finished run of each scenario of ``project`` on ``infra``."""
        return list(self.latest.get((infra, project), {}).values())

    # -- dead holders --------------------------------------------------------------------

    async def _sweep(self) -> None:
        assert self._locks is not None and self._locks_kv is not None
        while not self.host.stopping_requested:
            self._kick = anyio.Event()
            now = time.time()
            for key, entry in list(self._locks.entries.items()):
                reason = self._holder_gone(entry.value, now)
                if reason:
                    await fail_lost_run(self.host, self._locks_kv, key, entry.revision,
                                        entry.value, reason)
            with anyio.move_on_after(1.0):
                await self._kick.wait()

    def _holder_gone(self, lock: RunLock, now: float) -> str:
        rec = self.registry.nodes.get(lock.node)
        if rec is None:
            if now - lock.started_at > UNKNOWN_HOLDER_GRACE_S:
                return f"node lost: {lock.node} is unknown to the registry"
            return ""
        if rec.info.status == LOST:
            return f"node lost: {lock.node} stopped heartbeating while running it"
        if rec.instance and rec.instance != lock.instance \
                and rec.info.first_seen > lock.started_at:
            return f"node lost: {lock.node} restarted while running it"
        return ""

    # -- commands ------------------------------------------------------------------------

    @handles(RunScenario)
    async def run_scenario(self, cmd: RunScenario, req: Request[Any]) -> RunAccepted:
        await self.require_infra(cmd.infra, "automation")
        candidates = []
        for info in self.registry.query(role="automation", infra=cmd.infra,
                                             status=ONLINE):
            state = info.state
            if not isinstance(state, AutomationState):
                continue
            st = state.bundles.get(cmd.project)
            if st is not None and st.active:
                candidates.append((len(state.runs), info.name))
        if not candidates:
            raise Unavailable(f"no online automation node of infra {cmd.infra} runs project "
                              f"{cmd.project} (deploy a bundle of it first)")
        firing = Firing(id=f"manual-{req.id}", trigger=MANUAL, params=cmd.params,
                        by=cmd.by or req.sender)
        fire = FireScenario(project=cmd.project, scenario=cmd.scenario, firing=firing)
        last_error: OperationError | None = None
        for _, name in sorted(candidates):
            try:
                return await self.host.caller().call(fire, node=name, timeout=10)
            except Unavailable as exc:  # went away just now: try the next one
                last_error = exc
        assert last_error is not None
        raise last_error

    @handles(ListRuns)
    async def list_runs(self, cmd: ListRuns, req: Request[Any]) -> RunList:
        runs = [r for r in reversed(self.runs.values())
                if r.project == cmd.project and (cmd.infra is None or r.infra == cmd.infra)
                and (cmd.scenario is None or r.scenario == cmd.scenario)]
        return RunList(runs=runs[:max(1, cmd.limit)])

    def _run(self, run_id: str) -> RunSummary:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"unknown run {run_id!r} (see: shipyard runs PROJECT)")
        return run

    @handles(GetRunLog)
    async def run_log(self, cmd: GetRunLog, req: Request[Any]) -> RunLog:
        run = self._run(cmd.run_id)
        if run.outcome != "RUNNING":
            stored = await self._stored_log(run.run_id, cmd.max_bytes)
            if stored is not None:
                return stored
        try:
            return await self.host.caller().call(
                NodeRunLog(run_id=run.run_id, max_bytes=cmd.max_bytes), node=run.node,
                timeout=10)
        except Unavailable:
            raise NotFound(f"the log of run {run.run_id} is not stored and node {run.node} "
                           "is not running") from None

    async def _stored_log(self, run_id: str, max_bytes: int) -> RunLog | None:
        with tempfile.TemporaryDirectory(prefix="sy-runlog-") as tmp:
            dest = Path(tmp) / "run.log"
            try:
                await transfer.get_file(self.host.js, subjects.RUN_LOGS_STORE,
                                        run_log_name(run_id), dest)
            except NotFound:
                return None
            text, cut = await read_tail(dest, max_bytes)
        return RunLog(run_id=run_id, text=text, truncated=cut)

    @handles(CancelRun)
    async def cancel(self, cmd: CancelRun, req: Request[Any]) -> RunCancelled:
        run = self._run(cmd.run_id)
        if run.outcome != "RUNNING":
            return RunCancelled(run_id=run.run_id, node=run.node, was_running=False)
        self.log.info("cancel requested", run=run.run_id, by=cmd.by or req.sender)
        return await self.host.caller().call(NodeCancelRun(run_id=run.run_id), node=run.node,
                                             timeout=10)
