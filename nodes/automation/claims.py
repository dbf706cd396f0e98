"""Scenario triggers and runs on an Automation node.

Every node of an infra sees the same triggers (its cron clock, the bundle activation it
performed, the upstream run it heard of, a manual request the Deployer forwards).
Exactly one node runs each firing, and a scenario never runs twice at once:

1. the node creates the firing's key in ``sy_fired`` (KV create: one winner per firing);
2. it creates the scenario's lock ``lock.<infra>.<project>.<scenario>``; if the lock is
   taken, the firing is parked on it as the one ``pending`` firing (coalesced: more
   firings while one is pending add nothing);
3. when a run ends, its node starts the pending firing under the same lock, or deletes
   the lock, both by compare-and-set.

A node that dies holding a lock is noticed by the Deployer (or by itself on restart),
which marks the run failed ("node lost") and frees the lock.

Cron: each node keeps the schedule; the slot's time is the firing id, so every node
fires the same slot.  A mark (``cron.<infra>.<project>.<scenario>``) remembers the last
slot fired; slots missed while every node was down yield at most one catch-up run
(``catch_up = false`` turns it off), never a pile.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from croniter import croniter
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from nodes.flow.engine import Flow, Limits
from nodes.flow.pool import WorkerPool
from nodes.project.manifest import Manifest, ManifestError, load_manifest
from nodes.runtime import transfer
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import delete_if, snapshot
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from nodes.runtime.run_reports import LocalRuns, RunInfo, fail_lost_run
from protocol import subjects
from protocol.base import Request, encode, new_id
from protocol.errors import BadName, BadRequest, NotFound
from protocol.scenarios import (
    AFTER,
    CRON,
    ON_ACTIVATION,
    RUN_LOCK,
    FireScenario,
    Firing,
    RunAccepted,
    RunFinished,
    RunLock,
    cron_mark_key,
    fired_key,
    lock_key,
    lock_keys,
    validate_run_event,
)
from protocol.state import RunState
from protocol.stream import EVENT, AnyEvent

if TYPE_CHECKING:
    from nodes.automation.node import AutomationNode

FIRED_TTL_S = 7 * 24 * 3600
# A cron slot is a wall-clock time; waiting for it in steps of at most this long keeps a
# clock step (NTP, a suspended VM) from delaying a slot by more than one step.
CRON_RECHECK_S = 30.0
# How long a finished run keeps trying to release its scenario's lock through an outage
# (after that the lock is freed when this node restarts or is declared lost).
RELEASE_TIMEOUT_S = 300.0
SUCCESSFUL = ("SUCCESS", "WARNING")


def run_id_for(project: str, scenario: str) -> str:
    return f"{project}-{scenario}-{time.strftime('%Y%m%dT%H%M%S')}-{new_id()[-6:]}"


class Runner:
    def __init__(self, node: AutomationNode, *, max_runs: int = 4) -> None:
        self.node = node
        self.log = node.log.bind(component="runner")
        self.slots = anyio.CapacityLimiter(max_runs)
        self.local = LocalRuns(node, node.data_dir / "runs")
        self.pool: WorkerPool | None = None
        self._fired: KeyValue | None = None
        self._locks: KeyValue | None = None
        self._schedules: dict[str, anyio.CancelScope] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}

    @property
    def fired(self) -> KeyValue:
        assert self._fired is not None
        return self._fired

    @property
    def locks(self) -> KeyValue:
        assert self._locks is not None
        return self._locks

    async def setup(self) -> None:
        js, r = self.node.js, self.node.settings.replicas
        try:
            self._fired = await js.key_value(subjects.FIRED_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            try:
                self._fired = await js.create_key_value(KeyValueConfig(
                    bucket=subjects.FIRED_BUCKET, history=1, ttl=FIRED_TTL_S, replicas=r,
                    storage=StorageType.FILE, description="shipyard trigger firings"))
            except nats.js.errors.BadRequestError:
                self._fired = await js.key_value(subjects.FIRED_BUCKET)
        self._locks = await ensure_kv(js, subjects.LOCKS_BUCKET, replicas=r,
                                      description="shipyard scenario locks and cron marks")
        await transfer.ensure_bucket(js, subjects.RUN_LOGS_STORE, replicas=r)

    async def started(self, tg: TaskGroup) -> None:
        await tg.start(self._host_pool)
        await self.node.subscribe_decoded(
            subjects.RUN_EVENTS_ALL, EVENT, self._on_run_event, validate=validate_run_event,
            kind="run event", sender=lambda s: s.rsplit(".", 1)[0],
            pending_msgs_limit=10_000)
        await self._release_stale_locks()
        for project, st in list(self.node.projects.items()):
            if st.active:
                self.schedule(project)

    async def _host_pool(self, *, task_status: TaskStatus[None]) -> None:
        async with WorkerPool() as pool:
            self.pool = pool
            task_status.started()
            await anyio.sleep_forever()

    def state(self) -> dict[str, RunState]:
        return self.local.state()

    async def stopping(self) -> None:
        """Stop scheduling; cancel running runs (they end CANCELLED, are reported and
        release their locks) and wait for them."""
        for scope in self._schedules.values():
            scope.cancel()
        await self.local.cancel_all()

    # -- manifests -----------------------------------------------------------------------

    async def manifest(self, project: str) -> tuple[str, Manifest]:
        st = self.node.projects.get(project)
        bundle = st.active if st is not None else None
        if not bundle:
            raise NotFound(f"project {project!r} is not active on node {self.node.name}")
        cached = self._manifests.get((project, bundle))
        if cached is None:
            where = self.node.store.bundle_dir(project, bundle)
            try:
                cached = await anyio.to_thread.run_sync(
                    lambda: load_manifest(where, strict=False))
            except ManifestError as exc:
                raise BadRequest(f"bundle {bundle} of {project}: {exc.message}") from None
            self._manifests[(project, bundle)] = cached
        return bundle, cached

    # -- triggers ------------------------------------------------------------------------

    def schedule(self, project: str) -> None:
        """(Re)start the cron schedules of ``project``'s active bundle."""
        old = self._schedules.pop(project, None)
        if old is not None:
            old.cancel()
        scope = anyio.CancelScope()
        self._schedules[project] = scope
        self.node.tg.start_soon(self._cron_project, project, scope)

    async def _cron_project(self, project: str, scope: anyio.CancelScope) -> None:
        with scope:
            await supervised(f"schedules of {project}", self._cron_schedules, project,
                             log=self.log)

    async def _cron_schedules(self, project: str) -> None:
        try:
            _, manifest = await self.manifest(project)
        except (NotFound, BadRequest) as exc:
            self.log.warning("no schedule", project=project, error=exc.message)
            return
        async with anyio.create_task_group() as tg:
            for name, sc in manifest.scenarios.items():
                for trig in sc.triggers:
                    if trig.cron is not None:
                        catch_up = sc.catch_up if trig.catch_up is None else trig.catch_up
                        # A NATS timeout in a KV call restarts the schedule (which re-reads
                        # its mark), after a backoff; it never ends it.
                        tg.start_soon(partial(
                            supervised, f"cron {project}/{name}", self._cron, project, name,
                            trig.cron, catch_up, log=self.log))

    async def _cron(self, project: str, scenario: str, expr: str, catch_up: bool) -> None:
        if not croniter.is_valid(expr):
            self.log.error("invalid cron expression", project=project, scenario=scenario,
                           cron=expr)
            return
        try:
            mark_key = cron_mark_key(self.node.infra, project, scenario)
        except BadName as exc:
            self.log.error("cannot schedule", project=project, scenario=scenario,
                           error=exc.message)
            return
        mark = await self._mark(mark_key)
        now = time.time()
        last_slot = croniter(expr, now).get_prev(float)
        if mark is None:
            await self._set_mark(mark_key, last_slot)  # new: wait for the next slot
        elif last_slot > mark:
            missed = _count_slots(expr, mark, now)
            await self._set_mark(mark_key, last_slot)
            if catch_up:
                await self._fire_quietly(project, scenario, Firing(
                    id=f"cron-{int(last_slot)}", trigger=CRON,
                    detail=f"{expr} (catch-up: {missed} slot(s) missed)"))
            else:
                self.log.info("missed cron slots skipped", project=project,
                              scenario=scenario, missed=missed)
        it = croniter(expr, max(now, last_slot))
        while True:
            slot = it.get_next(float)
            await _sleep_until(slot)
            await self._set_mark(mark_key, slot)
            await self._fire_quietly(project, scenario, Firing(
                id=f"cron-{int(slot)}", trigger=CRON, detail=expr))

    async def _mark(self, key: str) -> float | None:
        try:
            entry = await self.locks.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return float(entry.value or b"")
        except ValueError:
            return None

    async def _set_mark(self, key: str, slot: float) -> None:
        current = await self._mark(key)
        if current is None or slot > current:
            await self.locks.put(key, str(slot).encode())

    async def on_activated(self, project: str, bundle: str, update_id: str) -> None:
        """A bundle became active here: reschedule, and fire on_activation scenarios."""
        self.schedule(project)
        try:
            _, manifest = await self.manifest(project)
        except (NotFound, BadRequest):
            return
        for name, sc in manifest.scenarios.items():
            if any(t.on_activation for t in sc.triggers):
                await self._fire_quietly(project, name, Firing(
                    id=f"act-{update_id}", trigger=ON_ACTIVATION, detail=bundle))

    async def _on_run_event(self, event: AnyEvent) -> None:
        if not isinstance(event, RunFinished) or event.run.outcome not in SUCCESSFUL:
            return
        run = event.run
        if run.infra != self.node.infra or run.project not in self.node.projects:
            return
        try:
            _, manifest = await self.manifest(run.project)
        except (NotFound, BadRequest):
            return
        for name, sc in manifest.scenarios.items():
            if any(t.after == run.scenario for t in sc.triggers):
                await self._fire_quietly(run.project, name, Firing(
                    id=f"after-{run.run_id}", trigger=AFTER, detail=run.run_id))

    async def _fire_quietly(self, project: str, scenario: str, firing: Firing) -> None:
        try:
            await self.fire(project, scenario, firing)
        except Exception as exc:  # a trigger must never take the node down
            self.log.warning("firing failed", project=project, scenario=scenario,
                             firing=firing.id, error=str(exc) or type(exc).__name__)

    # -- claiming ------------------------------------------------------------------------

    async def fire(self, project: str, scenario: str, firing: Firing) -> RunAccepted:
        """Claim ``firing`` for this infra and run it here, or park it on the running
        run.  Raises ``NotFound`` for an unknown project or scenario."""
        bundle, manifest = await self.manifest(project)
        if scenario not in manifest.scenarios:
            known = ", ".join(sorted(manifest.scenarios)) or "none"
            raise NotFound(f"project {project} (bundle {bundle}) has no scenario "
                           f"{scenario!r}; scenarios: {known}")
        infra = self.node.infra
        try:
            await self.fired.create(fired_key(infra, project, scenario, firing.id),
                                    self.node.name.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return RunAccepted(run_id="", node="", coalesced=True,
                               detail=f"firing {firing.id} is already claimed")
        key = lock_key(infra, project, scenario)
        while True:
            lock = RunLock(run_id=run_id_for(project, scenario), project=project,
                           scenario=scenario, infra=infra, node=self.node.name,
                           instance=self.node.instance, bundle=bundle, firing=firing,
                           started_at=time.time())
            try:
                revision = await self.locks.create(key, encode(lock))
            except nats.js.errors.KeyWrongLastSequenceError:
                parked = await self._park(key, firing)
                if parked is not None:
                    return parked
                continue  # the lock went away meanwhile: try again
            self.node.tg.start_soon(self._execute, lock, int(revision))
            return RunAccepted(run_id=lock.run_id, node=self.node.name)

    async def _park(self, key: str, firing: Firing) -> RunAccepted | None:
        try:
            entry = await self.locks.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        current = RUN_LOCK.decode(entry.value)
        if current.pending is not None:
            return RunAccepted(run_id=current.run_id, node=current.node, coalesced=True,
                               detail=f"{current.scenario} is running ({current.run_id}) and "
                                      "a run is already queued after it")
        parked = msgspec.structs.replace(current, pending=firing)
        try:
            await self.locks.update(key, encode(parked), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return RunAccepted(run_id=current.run_id, node=current.node, coalesced=True,
                           detail=f"{current.scenario} is running ({current.run_id}); one more "
                                  "run will follow it")

    # -- running -------------------------------------------------------------------------

    async def _execute(self, lock: RunLock, revision: int) -> None:
        key = lock_key(lock.infra, lock.project, lock.scenario)
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                # Retried through a NATS outage (compare-and-set: safe to repeat), since a
                # lock left behind would hold the scenario; bounded, so a stop can finish.
                limit = (self.node.shutdown_timeout if self.node.stopping_requested
                         else RELEASE_TIMEOUT_S)
                with anyio.move_on_after(limit, shield=True) as scope:
                    await supervised(f"release {key}", self._release, key, lock.run_id,
                                     log=self.log)
                if scope.cancelled_caught:
                    self.log.error("lock not released", lock=key, run=lock.run_id,
                                   seconds=limit)

        try:
            async with self.slots:
                await self._run(lock, release)
        except Exception:  # a defect must not end the node; the lock is released below
            self.log.exception("run failed unexpectedly", run=lock.run_id)
        finally:
            await release()

    async def _run(self, lock: RunLock, release: Callable[[], Awaitable[None]]) -> None:
        assert self.pool is not None
        _, manifest = await self.manifest(lock.project)
        sc = manifest.scenarios.get(lock.scenario)
        bundle_dir = self.node.store.bundle_dir(lock.project, lock.bundle)
        run = RunInfo(run_id=lock.run_id, project=lock.project, scenario=lock.scenario,
                      infra=lock.infra, node=self.node.name, bundle=lock.bundle,
                      trigger=lock.firing.trigger, firing=lock.firing.id,
                      params=dict(lock.firing.params), started_at=lock.started_at)
        flow = Flow(manifest, code_dir=bundle_dir, pool=self.pool,
                    data_dir=self.node.store.data_dir(lock.project), seed_dir=bundle_dir,
                    limits=Limits(run_timeout_s=sc.timeout_s if sc else None))
        summary = await self.local.run(run, lambda progress, cancel: flow.run_scenario(
            lock.scenario, params=run.params, log_path=run.log_path, progress=progress,
            cancel=cancel), before_finish=release)
        self.log.info("run finished", run=run.run_id, outcome=summary.outcome,
                      seconds=summary.duration_s)

    async def _release(self, key: str, run_id: str) -> None:
        """End ``run_id``'s hold on the lock: start the pending firing, or delete it."""
        while True:
            try:
                entry = await self.locks.get(key)
            except nats.js.errors.KeyNotFoundError:
                return
            if not entry.value:
                return
            current = RUN_LOCK.decode(entry.value)
            if current.run_id != run_id:
                return  # taken over (the Deployer declared us lost): not ours any more
            if current.pending is not None and not self.node.stopping_requested:
                try:
                    bundle, _ = await self.manifest(current.project)
                except (NotFound, BadRequest):
                    bundle = current.bundle
                nxt = msgspec.structs.replace(
                    current, run_id=run_id_for(current.project, current.scenario),
                    node=self.node.name, instance=self.node.instance, bundle=bundle,
                    firing=current.pending, pending=None, started_at=time.time())
                try:
                    revision = await self.locks.update(key, encode(nxt),
                                                       last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                self.node.tg.start_soon(self._execute, nxt, int(revision))
                return
            if await delete_if(self.locks, key, entry.revision or 0):
                return

    async def _release_stale_locks(self) -> None:
        """Locks held by an earlier process of this node: those runs died with it."""
        snap = await snapshot(self.locks, lock_keys(self.node.infra))
        for key, (revision, raw) in snap.items():
            try:
                lock = RUN_LOCK.decode(raw)
            except msgspec.DecodeError:
                continue
            if lock.node == self.node.name and lock.instance != self.node.instance:
                await fail_lost_run(self.node, self.locks, key, revision, lock,
                                    f"node restarted: {self.node.name} was running it "
                                    "when its previous process ended")

    # -- node-direct commands ------------------------------------------------------------

    @handles(FireScenario)
    async def handle_fire(self, cmd: FireScenario, req: Request[Any]) -> RunAccepted:
        return await self.fire(cmd.project, cmd.scenario, cmd.firing)


async def _sleep_until(when: float) -> None:
    """Sleep until wall-clock time ``when``, rechecking the clock every ``CRON_RECHECK_S``."""
    while (remaining := when - time.time()) > 0:  # noqa: ASYNC110 (no event: a clock)
        await anyio.sleep(min(remaining, CRON_RECHECK_S))


def _count_slots(expr: str, since: float, until: float, cap: int = 10_000) -> int:
    it = croniter(expr, since)
    n = 0
    while n < cap and it.get_next(float) <= until:
        n += 1
    return n

