"""The Automation node: converges on its infra's desired bundles and activates them.

Desired state comes from the ``sy_deploy`` KV bucket (keys ``bundle.<infra>.*``): a
watch for speed, a periodic re-read and a re-read on reconnect for certainty, and a
full read on start, so a node that was down, or joins later, converges by itself.

Per project, one activation at a time: fetch (streamed to disk, skipped when the bundle
is already unpacked here), verify and unpack in a worker thread, build the bundle's code
environments that are not built here yet (``envs``), switch atomically.  A bundle that
fails verification, or whose environment cannot be built, is refused for that update
(reported, not retried in a loop; a new deploy tries again); a transport failure is
retried with backoff.  The previous bundle stays active, and keeps running scenarios,
until the new one is completely in place.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.auth.artifacts import trust_of
from nodes.automation.claims import Claims
from nodes.automation.envs import BundleEnvs, EnvNotBuilt
from nodes.automation.execution import Execution
from nodes.automation.schedule import Schedule
from nodes.automation.store import ActiveManifests, BundleStore
from nodes.envs.options import EnvOptions, node_env_store
from nodes.project.bundle import BundleRejected
from nodes.runtime import transfer
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache
from nodes.runtime.loops import forever, supervised
from nodes.runtime.node import Node
from nodes.runtime.run_reports import LocalRuns
from protocol import subjects
from protocol.base import Family, encode, new_id
from protocol.bundles import BUNDLE_INFO, BundleInfo, bundle_key
from protocol.deploy import (
    DEPLOYMENT_VALUE,
    ActivationReport,
    BundleActivated,
    BundleActivationFailed,
    DeploymentRecord,
    deployment_keys,
)
from protocol.design import RUNNER
from protocol.errors import BadName, NotFound
from protocol.state import AutomationState, BundleFailure, BundleState

PROGRESS_EVERY_S = 0.1


class Permanent(Exception):
    """An activation failure that retrying the same bundle cannot fix."""


class AutomationNode(Node):
    role: ClassVar[str] = "automation"
    direct_families: ClassVar[tuple[Family, ...]] = (RUNNER,)

    def __init__(self, *, data_dir: Path | None = None, keep_bundles: int = 5,
                 resync_interval: float = 5.0, max_parallel_activations: int = 4,
                 max_parallel_runs: int = 4, envs: EnvOptions | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.data_dir = (data_dir or Path(".shipyard") / "nodes" / self.name).resolve()
        self.store = BundleStore(self.data_dir, keep=keep_bundles)
        self.env_options = envs or EnvOptions()
        self.envs = BundleEnvs(self.store, node_env_store(self.data_dir, self.env_options,
                                                          lambda: self.js), self.log)
        self.resync_interval = resync_interval
        self.limiter = anyio.CapacityLimiter(max_parallel_activations)
        self.projects: dict[str, BundleState] = {}  # heartbeat state per project
        self._activating: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._kick = anyio.Event()
        self._desired: KVCache[DeploymentRecord] | None = None
        self._bundles_kv: KeyValue | None = None
        # Scenarios: triggers (schedule) turn into firings, one node claims each
        # (claims) and runs it (execution); each part gets what it uses.
        manifests = ActiveManifests(self.store, self.projects, self.name)
        self.local_runs = LocalRuns(self, self.data_dir / "runs")
        self.claims = Claims(self, manifests)
        self.execution = Execution(self, self.claims, manifests, self.local_runs,
                                   pythons=self.envs.pythons, max_runs=max_parallel_runs)
        self.schedule = Schedule(self, manifests, self.projects, fire=self.execution.fire,
                                 marks=lambda: self.claims.locks)
        self.add_handlers(self.execution)
        self.add_handlers(self.local_runs)

    @property
    def desired(self) -> KVCache[DeploymentRecord]:
        assert self._desired is not None
        return self._desired

    async def setup(self) -> None:
        await anyio.Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        # Its user may read only its infra's keys: no stream info (it lists every key).
        deploy_kv = await ensure_kv(self.js, subjects.DEPLOY_BUCKET,
                                    replicas=self.settings.replicas, read_info=False)
        self._bundles_kv = await ensure_kv(self.js, subjects.BUNDLE_BUCKET,
                                           replicas=self.settings.replicas)
        await transfer.ensure_bucket(self.js, subjects.BUNDLE_STORE,
                                     replicas=self.settings.replicas)
        await transfer.ensure_bucket(self.js, subjects.WHEELS_STORE,
                                     replicas=self.settings.replicas)
        for project in await anyio.to_thread.run_sync(self.store.projects):
            await self._load_local(project)
        self._desired = KVCache(deploy_kv, deployment_keys("bundle", self.infra),
                                DEPLOYMENT_VALUE.decode, on_change=self._on_desired,
                                resync_interval=self.resync_interval)
        await self.claims.setup()
        await self.execution.setup()
        await self.envs.refresh()

    async def _load_local(self, project: str) -> None:
        active = await anyio.to_thread.run_sync(self.store.active, project)
        state = await anyio.to_thread.run_sync(self.store.read_state, project)
        cached = await anyio.to_thread.run_sync(self.store.cached, project)
        previous = state.get("previous")
        self.projects[project] = BundleState(
            active=active, previous=previous if isinstance(previous, str) else None,
            stage="idle", cached=cached)

    async def started(self, tg: TaskGroup) -> None:
        await tg.start(self.desired.run)
        await self.execution.started(tg)
        await self.schedule.started()
        await self.claims.release_stale_locks()
        self.schedule.schedule_active()
        tg.start_soon(partial(supervised, "converge", self._converge_loop, tg, log=self.log))
        tg.start_soon(partial(forever, "envs", self._collect_envs, log=self.log,
                              interval=self.env_options.gc_interval_s))

    async def _collect_envs(self) -> None:
        await self.execution.forget_envs(await self.envs.collect())

    async def stopping(self) -> None:
        self.schedule.stopping()
        await self.execution.stopping()

    async def reconnected(self) -> None:
        self.desired.resync()

    def state(self) -> AutomationState:
        return AutomationState(data_dir=str(self.data_dir), bundles=dict(self.projects),
                               runs=self.execution.state(), envs=self.envs.states())

    def _set(self, project: str, **changes: Any) -> BundleState:
        """Change fields of ``project``'s state (the one place it changes)."""
        st = msgspec.structs.replace(self.projects.get(project) or BundleState(), **changes)
        self.projects[project] = st
        return st

    # -- convergence ---------------------------------------------------------------------

    async def _on_desired(self, key: str, entry: Entry[DeploymentRecord] | None) -> None:
        self._kick.set()

    async def _converge_loop(self, tg: TaskGroup) -> None:
        while not self.stopping_requested:
            self._kick = anyio.Event()
            now = time.monotonic()
            for entry in list(self.desired.entries.values()):
                rec = entry.value
                project = rec.project
                if project in self._activating or self._retry_at.get(project, 0) > now:
                    continue
                st = self.projects.get(project) or BundleState()
                if st.active == rec.desired and st.update == rec.update_id:
                    continue
                failed = st.failed
                if failed is not None and failed.bundle == rec.desired \
                        and failed.update == rec.update_id:
                    continue  # refused for this update; a new deploy will try again
                if st.active == rec.desired:  # already running it: nothing to move
                    self._set(project, update=rec.update_id, failed=None)
                    continue
                self._activating.add(project)
                tg.start_soon(self._activate, rec)
            with anyio.move_on_after(1.0 if self._retry_at else self.resync_interval):
                await self._kick.wait()

    async def _activate(self, rec: DeploymentRecord) -> None:
        project, bundle = rec.project, rec.desired
        self._set(project, target=bundle, stage="starting", update=rec.update_id)
        t0 = time.monotonic()
        transferred = 0
        try:
            async with self.limiter:
                transferred = await self._install(rec)
                await self._build_envs(rec)
                before = await anyio.to_thread.run_sync(self.store.activate, project, bundle)
            previous = self.projects[project].previous
            self._set(project, active=bundle, previous=before if before != bundle else previous,
                      stage="idle", failed=None, error="")
            self._retry_at.pop(project, None)
            duration = time.monotonic() - t0
            self.log.info("bundle activated", project=project, bundle=bundle,
                          ms=round(duration * 1000, 1), transferred=transferred)
            await self._report(rec, "activated", transferred=transferred, duration=duration)
            await self.beat_now()
            await self.emit(BundleActivated(project=project, infra=self.infra, node=self.name,
                                            bundle=bundle, update_id=rec.update_id,
                                            duration_s=round(duration, 4),
                                            transferred=transferred))
            self._set(project, cached=await anyio.to_thread.run_sync(self._prune, project))
            await self.envs.refresh()
            await self.schedule.on_activated(project, bundle, rec.update_id)
        except Permanent as exc:
            await self._failed(rec, str(exc))
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self.log.warning("activation interrupted; will retry", project=project,
                             bundle=bundle, error=reason)
            self._set(project, stage="retrying", error=reason)
            self._retry_at[project] = time.monotonic() + 2.0
        except Exception as exc:  # a defect: refuse this update, keep the node running
            self.log.exception("activation failed unexpectedly", project=project,
                               bundle=bundle)
            await self._failed(rec, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._activating.discard(project)
            self._kick.set()

    async def _build_envs(self, rec: DeploymentRecord) -> None:
        """Build the bundle's environments that are not built here yet (the active
        bundle keeps running meanwhile).  Raises ``Permanent`` when one cannot be."""

        async def building(env: str) -> None:
            self._set(rec.project, stage="building")
            await self._report(rec, "building", env=env)
            await self.envs.refresh()
            await self.beat_now()

        try:
            await self.envs.prepare(rec.project, rec.desired, building)
        except EnvNotBuilt as exc:
            raise Permanent(str(exc)) from None

    def _prune(self, project: str) -> list[str]:
        self.store.prune(project)
        return self.store.cached(project)

    async def _install(self, rec: DeploymentRecord) -> int:
        """Make the bundle available unpacked here; return bytes fetched (0 if cached)."""
        project, bundle = rec.project, rec.desired
        info = await self._bundle_info(project, bundle)
        refusal = (await trust_of(self)).bundle_refusal(info)  # signed by a Design key
        if refusal is not None:
            raise Permanent(refusal)
        if await anyio.to_thread.run_sync(self.store.has, project, bundle):
            return 0
        downloads = self.data_dir / "downloads"
        await anyio.Path(downloads).mkdir(parents=True, exist_ok=True)
        archive = downloads / f"{project}-{bundle}-{new_id()}.tar"
        last = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or done == total:
                last = now
                self._report_nowait(rec, "fetching", done=done, total=total)

        self._set(project, stage="fetching")
        try:
            try:
                await transfer.get_file(self.js, subjects.BUNDLE_STORE, info.archive, archive,
                                        progress=progress, expected_sha256=info.archive_sha256,
                                        expected_blake3=info.archive_blake3 or None)
            except transfer.TransferError as exc:
                raise Permanent(f"stored archive is damaged: {exc}") from None
            except NotFound as exc:
                raise Permanent(f"stored archive is missing: {exc.message}") from None
            self._set(project, stage="unpacking")
            await self._report(rec, "unpacking", total=info.archive_size)
            try:
                await anyio.to_thread.run_sync(self.store.install, project, archive, info)
            except BundleRejected as exc:
                raise Permanent(exc.reason) from None
        finally:
            await anyio.Path(archive).unlink(missing_ok=True)
        return info.archive_size

    async def _bundle_info(self, project: str, bundle: str) -> BundleInfo:
        assert self._bundles_kv is not None
        try:
            key = bundle_key(project, bundle)
        except BadName as exc:
            raise Permanent(exc.message) from None
        try:
            entry = await self._bundles_kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            raise Permanent(f"bundle {bundle} of {project} does not exist") from None
        if not entry.value:
            raise Permanent(f"bundle {bundle} of {project} was deleted")
        try:
            return BUNDLE_INFO.decode(entry.value)
        except Exception as exc:
            raise Permanent(f"bundle record is unreadable: {exc}") from None

    async def _failed(self, rec: DeploymentRecord, reason: str) -> None:
        st = self._set(rec.project, stage="failed", failed=BundleFailure(
            bundle=rec.desired, update=rec.update_id, reason=reason))
        self.log.error("bundle refused", project=rec.project, bundle=rec.desired,
                       reason=reason, still_active=st.active)
        await self._report(rec, "failed", reason=reason)
        await self.beat_now()
        await self.emit(BundleActivationFailed(
            project=rec.project, infra=self.infra, node=self.name, bundle=rec.desired,
            update_id=rec.update_id, reason=reason, still_active=st.active))

    # -- reports -------------------------------------------------------------------------

    def _activation_report(self, rec: DeploymentRecord, stage: str, *, done: int = 0,
                           total: int = 0, transferred: int = 0, reason: str = "",
                           duration: float = 0.0, env: str = "") -> ActivationReport:
        return ActivationReport(node=self.name, infra=self.infra, project=rec.project,
                                bundle=rec.desired, update_id=rec.update_id, stage=stage,
                                env=env,
                                bytes_done=done, bytes_total=total, transferred=transferred,
                                reason=reason, duration_s=round(duration, 4), ts=time.time())

    async def _report(self, rec: DeploymentRecord, stage: str, **kw: Any) -> None:
        report = self._activation_report(rec, stage, **kw)
        try:
            await self.nc.publish(report.subject(), encode(report))
        except Exception as exc:  # progress is best effort; heartbeats carry the outcome
            self.log.debug("report not sent", error=str(exc))

    def _report_nowait(self, rec: DeploymentRecord, stage: str, **kw: Any) -> None:
        self.tg.start_soon(lambda: self._report(rec, stage, **kw))
