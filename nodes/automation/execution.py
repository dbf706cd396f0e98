"""Running a claimed firing on an Automation node.

A firing this node won (see ``claims``) runs here under the scenario's lock, at most
``max_runs`` at once, in the node's worker pools (one per interpreter: the node's own,
and one per code environment of the bundle the firing runs), reported like every run
(``run.started``, steps, ``run.finished``, the log kept in ``sy_run_logs``; see
``nodes.runtime.run_reports``).  The lock is released just before ``run.finished`` is
published, so whoever sees the event can fire the scenario again at once; releasing it
starts the firing parked on it, if any.  The release is retried through a NATS outage
(compare-and-set: safe to repeat) for up to ``RELEASE_TIMEOUT_S``, since a lock left
behind would hold the scenario.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus

from nodes.automation.claims import Claims
from nodes.automation.envs import EnvNotBuilt
from nodes.automation.store import ActiveManifests, BundleStore
from nodes.envs.options import BuildInterrupted
from nodes.flow.engine import Flow, Limits
from nodes.flow.errors import FlowError
from nodes.flow.pool import Pools
from nodes.flow.progress import Progress
from nodes.flow.results import ScenarioResult
from nodes.runtime import transfer
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from nodes.runtime.run_reports import LocalRuns, RunHost, RunInfo
from protocol import subjects
from protocol.base import Request
from protocol.scenarios import FireScenario, Firing, RunAccepted, RunLock, lock_key
from protocol.state import RunState

# How long a finished run keeps trying to release its scenario's lock through an outage
# (after that the lock is freed when this node restarts or is declared lost).
RELEASE_TIMEOUT_S = 300.0

# Environment name -> interpreter, for a run of (project, bundle).
Pythons = Callable[[str, str], Awaitable[dict[str, str]]]


class ExecutionHost(RunHost, Protocol):
    """What running firings needs of its node, beyond reporting runs."""

    @property
    def tg(self) -> TaskGroup: ...

    @property
    def store(self) -> BundleStore: ...

    @property
    def shutdown_timeout(self) -> float: ...

    @property
    def stopping_requested(self) -> bool: ...


class Execution:
    def __init__(self, host: ExecutionHost, claims: Claims, manifests: ActiveManifests,
                 local: LocalRuns, *, pythons: Pythons, max_runs: int = 4) -> None:
        self.host = host
        self.pythons = pythons
        self.claims = claims
        self.manifests = manifests
        self.local = local
        self.log = host.log.bind(component="execution")
        self.slots = anyio.CapacityLimiter(max_runs)
        self.pools: Pools | None = None

    async def setup(self) -> None:
        await transfer.ensure_bucket(self.host.js, subjects.RUN_LOGS_STORE,
                                     replicas=self.host.settings.replicas)

    async def started(self, tg: TaskGroup) -> None:
        await tg.start(self._host_pool)

    async def _host_pool(self, *, task_status: TaskStatus[None]) -> None:
        async with Pools() as pools:
            self.pools = pools
            task_status.started()
            await anyio.sleep_forever()

    async def forget_envs(self, removed: list[Path]) -> None:
        """Stop the warm fork servers of environments that were removed (each is two
        idle processes, which would otherwise stay until the node restarts)."""
        if self.pools is not None:
            for env in removed:
                for python in await self.pools.discard(env):
                    self.log.info("fork server of a removed code env stopped",
                                  python=python)

    def state(self) -> dict[str, RunState]:
        return self.local.state()

    async def stopping(self) -> None:
        """Cancel running runs (they end CANCELLED, are reported and release their
        locks) and wait for them."""
        await self.local.cancel_all()

    async def fire(self, project: str, scenario: str, firing: Firing) -> RunAccepted:
        """Claim ``firing`` and run it here if this node won it.  Raises ``NotFound``
        for an unknown project or scenario."""
        claim = await self.claims.claim(project, scenario, firing)
        if claim.lock is not None:
            self.host.tg.start_soon(self._execute, claim.lock, claim.revision)
        return claim.accepted

    async def _execute(self, lock: RunLock, revision: int) -> None:
        key = lock_key(lock.infra, lock.project, lock.scenario)
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                # Retried through a NATS outage (compare-and-set: safe to repeat), since a
                # lock left behind would hold the scenario; bounded, so a stop can finish.
                limit = (self.host.shutdown_timeout if self.host.stopping_requested
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

    async def _release(self, key: str, run_id: str) -> None:
        nxt = await self.claims.release(key, run_id)
        if nxt is not None:
            self.host.tg.start_soon(self._execute, *nxt)

    async def _run(self, lock: RunLock, release: Callable[[], Awaitable[None]]) -> None:
        assert self.pools is not None
        _, manifest = await self.manifests.get(lock.project)
        sc = manifest.scenarios.get(lock.scenario)
        store = self.host.store
        bundle_dir = store.bundle_dir(lock.project, lock.bundle)
        run = RunInfo(run_id=lock.run_id, project=lock.project, scenario=lock.scenario,
                      infra=lock.infra, node=self.host.name, bundle=lock.bundle,
                      trigger=lock.firing.trigger, firing=lock.firing.id,
                      params=dict(lock.firing.params), started_at=lock.started_at)
        pools = self.pools

        async def work(progress: Progress, cancel: anyio.Event) -> ScenarioResult:
            try:
                envs = await self.pythons(lock.project, lock.bundle)
            except (EnvNotBuilt, BuildInterrupted) as exc:  # the run fails, with why
                raise FlowError([str(exc)]) from None
            flow = Flow(manifest, code_dir=bundle_dir, pool=pools, envs=envs,
                        data_dir=store.data_dir(lock.project), seed_dir=bundle_dir,
                        limits=Limits(run_timeout_s=sc.timeout_s if sc else None))
            return await flow.run_scenario(lock.scenario, params=run.params,
                                           log_path=run.log_path, progress=progress,
                                           cancel=cancel)

        summary = await self.local.run(run, work, before_finish=release)
        self.log.info("run finished", run=run.run_id, outcome=summary.outcome,
                      seconds=summary.duration_s)

    # -- node-direct commands ------------------------------------------------------------

    @handles(FireScenario)
    async def handle_fire(self, cmd: FireScenario, req: Request[Any]) -> RunAccepted:
        return await self.fire(cmd.project, cmd.scenario, cmd.firing)
