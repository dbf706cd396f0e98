"""The Design node: hosts projects, test-builds them, makes bundles and API packages.

Every subdirectory of the workspace that holds a ``shipyard.toml`` is a project,
known by its manifest's ``project.key``.

Bundles and API packages carry a lock of each code environment they use, made here
(``nodes/design/envs.py``) from the node's package index settings: ``index`` when given,
else ``IndexSettings.from_env()`` (``SHIPYARD_INDEX_URL``, ``SHIPYARD_FIND_LINKS``,
``SHIPYARD_NO_INDEX``).

A test build runs in the same environments as production: the build locks each
environment its recipes use, as ``bundle create`` would, and builds it in the node's own
``EnvStore`` (``<data dir>/envs``) before the first recipe starts, so "test before you
deploy" runs the libraries a bundle made now would run.  A lock that has not changed
builds nothing the second time.
"""

from __future__ import annotations

import dataclasses
import functools
import getpass
import os
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.js.kv import KeyValue

from nodes.auth.artifacts import sign_bundle
from nodes.design.api_packages import ApiPackager
from nodes.design.envs import EnvLocker
from nodes.envs.lock import LockFailed
from nodes.envs.options import EnvOptions, node_env_store
from nodes.envs.store import EnvBuildFailed
from nodes.envs.uv import IndexSettings
from nodes.flow.engine import Flow, check_params
from nodes.flow.errors import FlowError
from nodes.flow.pool import Pools
from nodes.flow.progress import Progress
from nodes.flow.results import BuildResult
from nodes.project.bundle import pack
from nodes.project.manifest import MANIFEST, Manifest, ManifestError, load_manifest
from nodes.runtime import transfer
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import snapshot
from nodes.runtime.loops import forever
from nodes.runtime.node import Node, handles
from nodes.runtime.progress import LOCKING, PACKING, STORING
from nodes.runtime.run_reports import LocalRuns, RunInfo
from protocol import subjects
from protocol.base import Family, Request, encode, new_id
from protocol.bundles import (
    BUNDLE_INFO,
    BundleCreated,
    BundleInfo,
    BundleList,
    BundleSummary,
    CreateBundle,
    ListBundles,
    ListProjects,
    ProjectList,
    ProjectStatus,
    bundle_key,
    bundle_keys,
    check_bundle_id,
    diff_bundles,
)
from protocol.deploy import BundleStored
from protocol.design import DESIGN, RUNNER
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.scenarios import DESIGN_BUILD, BuildDatasets, RunAccepted
from protocol.state import DesignState


class DesignNode(Node):
    role: ClassVar[str] = "design"
    family: ClassVar[Family | None] = DESIGN
    direct_families: ClassVar[tuple[Family, ...]] = (RUNNER,)

    def __init__(self, *, workspace: Path | None = None, data_dir: Path | None = None,
                 index: IndexSettings | None = None, envs: EnvOptions | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.env_options = envs or EnvOptions(index=index or IndexSettings.from_env())
        index = index if index is not None else self.env_options.index
        self.envs = EnvLocker(self, index)
        self.workspace = (workspace or Path("projects")).resolve()
        self.data_dir = (data_dir or Path(".shipyard") / "nodes" / self.name).resolve()
        self.env_store = node_env_store(self.data_dir,
                                        dataclasses.replace(self.env_options, index=index),
                                        lambda: self.js)
        self._env_runs: dict[str, set[str]] = {}  # digest -> test builds running in it
        self.local = LocalRuns(self, self.data_dir / "runs")
        self.add_handlers(self.local)
        self.api_packages = ApiPackager(self)
        self.add_handlers(self.api_packages)
        self.pools: Pools | None = None
        self._bundles: KeyValue | None = None

    @property
    def bundles_kv(self) -> KeyValue:
        assert self._bundles is not None
        return self._bundles

    async def setup(self) -> None:
        await anyio.Path(self.workspace).mkdir(parents=True, exist_ok=True)
        self._bundles = await ensure_kv(self.js, subjects.BUNDLE_BUCKET,
                                        replicas=self.settings.replicas,
                                        description="shipyard bundle records")
        await transfer.ensure_bucket(self.js, subjects.BUNDLE_STORE,
                                     replicas=self.settings.replicas)
        await transfer.ensure_bucket(self.js, subjects.RUN_LOGS_STORE,
                                     replicas=self.settings.replicas)
        await self.api_packages.setup()
        await self.envs.setup()

    async def started(self, tg: TaskGroup) -> None:
        await tg.start(self._host_pool)
        tg.start_soon(functools.partial(forever, "code env collection", self._collect_envs,
                                        log=self.log,
                                        interval=self.env_options.gc_interval_s))

    async def _collect_envs(self) -> None:
        """Remove environments no test build has used for the store's grace period."""
        await self.env_store.collect({d for d, runs in self._env_runs.items() if runs})

    async def _host_pool(self, *, task_status: TaskStatus[None]) -> None:
        async with Pools() as pools:
            self.pools = pools
            task_status.started()
            await anyio.sleep_forever()

    async def stopping(self) -> None:
        await self.local.cancel_all()

    def state(self) -> DesignState:
        return DesignState(workspace=str(self.workspace), runs=self.local.state(),
                           envs=self.env_store.states(
                               {d: [f"build {r}" for r in sorted(runs)]
                                for d, runs in self._env_runs.items() if runs}))

    # -- test builds ---------------------------------------------------------------------

    @handles(BuildDatasets)
    async def build(self, cmd: BuildDatasets, req: Request[Any]) -> RunAccepted:
        """Test-build datasets in the workspace, with the engine Automation nodes use."""
        assert self.pools is not None
        if not cmd.datasets:
            raise BadRequest("name at least one dataset to build")
        project_dir, manifest = await self.project(cmd.project)
        pools = self.pools
        flow = Flow(manifest, code_dir=project_dir, pool=pools)
        flow.graph.check_targets(cmd.datasets)
        check_params(cmd.params)
        wanted = {e for e in (manifest.recipe_env(r) for r in flow.graph.needed(cmd.datasets))
                  if e}
        # Every environment's name is checked now; its interpreter comes once it is built.
        await Flow(manifest, code_dir=project_dir, pool=pools,
                   envs=dict.fromkeys(wanted, "")).validate(targets=cmd.datasets)
        run = RunInfo(run_id=f"{manifest.project.key}-build-{time.strftime('%Y%m%dT%H%M%S')}-"
                             f"{new_id()[-6:]}",
                      project=manifest.project.key, scenario="build " + ",".join(cmd.datasets),
                      infra="design", node=self.name, bundle="workspace", trigger=DESIGN_BUILD,
                      firing=req.id, params=dict(cmd.params))

        async def work(progress: Progress, cancel: anyio.Event) -> BuildResult:
            try:
                envs = await self._build_envs(project_dir, manifest, wanted, run.run_id)
                built = Flow(manifest, code_dir=project_dir, pool=pools, envs=envs)
                return await built.build(cmd.datasets, force=cmd.force, params=run.params,
                                         log=run.log_path, progress=progress, cancel=cancel)
            finally:
                for runs in self._env_runs.values():
                    runs.discard(run.run_id)

        self.tg.start_soon(self.local.run, run, work)
        return RunAccepted(run_id=run.run_id, node=self.name)

    async def _build_envs(self, project_dir: Path, manifest: Manifest, names: set[str],
                          run_id: str) -> dict[str, str]:
        """Lock and build every environment in ``names``: env name -> python.  A lock
        or build failure fails the run (``FlowError``) with its reason."""
        if not names:
            return {}
        try:
            locks = await self.envs.lock(project_dir, manifest, names, wheels=False)
            out: dict[str, str] = {}
            for name, lock in sorted(locks.items()):
                self._env_runs.setdefault(lock.digest, set()).add(run_id)
                self.log.info("building code env", env=name, digest=lock.digest[:12])
                out[name] = str(await self.env_store.ensure(lock))
            return out
        except (LockFailed, EnvBuildFailed) as exc:
            raise FlowError([str(exc)]) from None

    # -- workspace ---------------------------------------------------------------------

    def _scan(self) -> list[tuple[Path, Manifest | None, str]]:
        """(dir, manifest or None, error) for every project directory (blocking).

        A key that several folders claim is an error on each of them (the manifest is
        kept): picking one would bundle whichever folder sorts first."""
        out: list[tuple[Path, Manifest | None, str]] = []
        if not self.workspace.is_dir():
            return out
        for d in sorted(self.workspace.iterdir()):
            if not (d / MANIFEST).is_file():
                continue
            try:
                out.append((d, load_manifest(d), ""))
            except ManifestError as exc:
                out.append((d, None, exc.message))
        folders: dict[str, list[Path]] = {}
        for d, m, _ in out:
            if m is not None:
                folders.setdefault(m.project.key, []).append(d)
        return [(d, m, _duplicate(m.project.key, folders[m.project.key])
                 if m is not None and len(folders[m.project.key]) > 1 else error)
                for d, m, error in out]

    async def project(self, key: str) -> tuple[Path, Manifest]:
        """The project ``key``, with its manifest validated strictly.

        Raises ``BadRequest`` if its manifest is invalid or several folders claim the
        key, ``NotFound`` if no folder does; ``BadName`` if ``key`` is malformed."""
        subjects.token(key, "project")
        scanned = await anyio.to_thread.run_sync(self._scan)
        for d, manifest, error in scanned:
            if manifest is not None and manifest.project.key == key:
                if error:
                    raise BadRequest(error, details={"folders": [
                        str(f) for f, m, _ in scanned if m is not None and m.project.key == key]})
                return d, manifest
        for d, manifest, error in scanned:
            if manifest is None and d.name == key:
                raise BadRequest(error, details={"file": f"{d.name}/{MANIFEST}"})
        known = sorted(m.project.key for _, m, _ in scanned if m is not None)
        raise NotFound(f"unknown project {key!r} in workspace {self.workspace}"
                       + (f"; known: {', '.join(known)}" if known else "; it has no projects"))

    @handles(ListProjects)
    async def list_projects(self, cmd: ListProjects, req: Request[Any]) -> ProjectList:
        scanned = await anyio.to_thread.run_sync(self._scan)
        projects = []
        for d, m, error in scanned:
            if m is None or error:
                projects.append(ProjectStatus(key=m.project.key if m else d.name,
                                              name=m.project.name if m else "", path=str(d),
                                              ok=False, error=error))
            else:
                projects.append(ProjectStatus(
                    key=m.project.key, name=m.project.name, path=str(d), ok=True,
                    datasets=len(m.datasets), recipes=len(m.recipes),
                    scenarios=len(m.scenarios), api_services=sorted(m.api_services)))
        return ProjectList(workspace=str(self.workspace), projects=projects)

    # -- bundles -----------------------------------------------------------------------

    async def bundle_infos(self, project: str) -> list[BundleInfo]:
        snap = await snapshot(self.bundles_kv, bundle_keys(project))
        infos = []
        for _rev, raw in snap.values():
            try:
                infos.append(BUNDLE_INFO.decode(raw))
            except msgspec.DecodeError:
                self.log.warning("unreadable bundle record skipped", project=project)
        return sorted(infos, key=lambda b: b.created_at)

    @handles(ListBundles)
    async def list_bundles(self, cmd: ListBundles, req: Request[Any]) -> BundleList:
        infos = await self.bundle_infos(cmd.project)
        if not infos:
            await self.project(cmd.project)  # NotFound if the project is unknown too
        return BundleList(project=cmd.project,
                          bundles=[BundleSummary.of(b) for b in infos])

    @handles(CreateBundle)
    async def create_bundle(self, cmd: CreateBundle, req: Request[Any]) -> BundleCreated:
        try:
            check_bundle_id(cmd.bundle_id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        project_dir, manifest = await self.project(cmd.project)
        key = bundle_key(manifest.project.key, cmd.bundle_id)
        existing = await self._get_info(key)
        if existing is not None:
            raise Conflict(_immutable(existing))
        by = cmd.created_by or req.sender or getpass.getuser()
        notices = self.progress(req)
        wanted = manifest.bundle_envs()
        if wanted:
            await notices(LOCKING, 0, len(wanted), "envs")
        envs = await self.envs.lock(project_dir, manifest, wanted,
                                    wheels=cmd.wheels)  # refusals before anything is stored
        if wanted:
            await notices(LOCKING, len(wanted), len(wanted), "envs")
        fd, tmp = tempfile.mkstemp(prefix=f"sy-bundle-{cmd.bundle_id}-", suffix=".tar")
        os.close(fd)
        archive = Path(tmp)
        try:
            await notices(PACKING, 0, None, "files")
            packed = await anyio.to_thread.run_sync(
                lambda: pack(project_dir, manifest, archive, bundle_id=cmd.bundle_id,
                             created_by=by, notes=cmd.notes, envs=envs))
            files = len(packed.info.files)
            await notices(PACKING, files, files, "files")
            name = f"{manifest.project.key}/{cmd.bundle_id}/{new_id()}.tar"
            stored = await transfer.put_file(
                self.js, subjects.BUNDLE_STORE, name, archive,
                meta={"project": manifest.project.key, "bundle": cmd.bundle_id},
                on_progress=lambda sent, size: notices(STORING, sent, size, "bytes"))
        finally:
            await anyio.Path(archive).unlink(missing_ok=True)
        info = sign_bundle(self.settings, msgspec.structs.replace(
            packed.info, archive=name, archive_size=stored.size,
            archive_sha256=stored.sha256, archive_blake3=stored.blake3))
        previous = await self.bundle_infos(manifest.project.key)
        try:
            await self.bundles_kv.create(key, encode(info))
        except nats.js.errors.KeyWrongLastSequenceError:
            await transfer.delete(self.js, subjects.BUNDLE_STORE, name)
            existing = await self._get_info(key)
            raise Conflict(_immutable(existing) if existing else
                           f"bundle {cmd.bundle_id} was created concurrently") from None
        await self.emit(BundleStored(project=info.project, bundle=info.id, by=by,
                                     files=len(info.files), size=info.size, digest=info.digest))
        self.log.info("bundle created", project=info.project, bundle=info.id,
                      files=len(info.files), size=info.size, skipped=len(packed.skipped),
                      envs={n: lock.digest[:12] for n, lock in info.envs.items()})
        return BundleCreated(bundle=BundleSummary.of(info),
                             diff=diff_bundles(previous[-1] if previous else None, info))

    async def _get_info(self, key: str) -> BundleInfo | None:
        try:
            entry = await self.bundles_kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return BUNDLE_INFO.decode(entry.value) if entry.value else None


def _duplicate(key: str, folders: list[Path]) -> str:
    return (f"project key {key!r} is claimed by {len(folders)} folders: "
            + ", ".join(str(f) for f in folders)
            + f"; a key names one project: change project.key in all but one {MANIFEST}")


def _immutable(b: BundleInfo) -> str:
    return (f"bundle {b.id} of project {b.project} already exists (created by "
            f"{b.created_by or '?'}); bundle ids are immutable: choose a new id")
