"""API packages: the Design node packs one API service of a project as an immutable version.

A package holds what its endpoints need and nothing else: the manifest, each endpoint's
code module with the Python files beside it (helpers it imports), and the endpoint's
artifacts (files or folders).  The archive has the bundle layout (``files/<path>`` plus
``bundle.json``, here the package record), so API nodes unpack it with the same verifying
``unpack``; the record (``ApiPackageInfo``) lists every file with size and SHA-256 and a
digest over them.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

import anyio
import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nodes.auth.artifacts import sign_package
from nodes.design.envs import EnvLocker
from nodes.project.files import Walker
from nodes.project.manifest import MANIFEST, ApiService, Manifest
from nodes.runtime import transfer
from nodes.runtime.hosts import Logs
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import snapshot
from nodes.runtime.node import handles
from nodes.runtime.progress import LOCKING, PACKING, STORING, ProgressNotices
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import (
    API_PACKAGE_INFO,
    ApiPackageCreated,
    ApiPackageInfo,
    ApiPackageList,
    ApiPackageStored,
    ApiPackageSummary,
    CreateApiPackage,
    EndpointSpec,
    ListApiPackages,
    check_version,
    package_key,
    package_keys,
)
from protocol.base import Request, encode, new_id
from protocol.bundles import FileEntry, files_digest
from protocol.envs import EnvLock, diff_envs
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.events import Event


class PackagerHost(Logs, Protocol):
    """What packing and storing API packages needs of the Design node."""

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def settings(self) -> NatsSettings: ...

    async def emit(self, event: Event) -> None: ...

    async def project(self, key: str) -> tuple[Path, Manifest]:
        """The project ``key``'s folder and strictly validated manifest."""
        ...

    @property
    def envs(self) -> EnvLocker: ...

    def progress(self, req: Request[Any]) -> ProgressNotices:
        """The progress notices of ``req``, the request being served."""
        ...


def endpoint_specs(service: ApiService) -> dict[str, EndpointSpec]:
    return {name: EndpointSpec(kind=ep.kind, code=ep.code,
                               function=ep.function or ("predict" if ep.kind == "prediction"
                                                        else name),
                               artifacts=list(ep.artifacts), description=ep.description)
            for name, ep in service.endpoints.items()}


def collect(project_dir: Path, service_name: str, service: ApiService) -> list[str]:
    """Relative paths of every file the package of ``service`` holds.

    Raises ``BadRequest`` naming the manifest field when a code file or artifact is
    missing, and ``LinksOutside`` naming every link among them that leaves the project
    (links inside it are packed as copies of their targets; see ``files``)."""
    walker = Walker(project_dir)
    root = walker.root
    where = f"{project_dir.name}/{MANIFEST}: api_services.{service_name}.endpoints"
    files: set[str] = set()

    def add(rel: str) -> None:
        if walker.check(rel) is not None:
            files.add(PurePosixPath(rel).as_posix())

    add(MANIFEST)
    for name, ep in service.endpoints.items():
        if not (root / ep.code).is_file():
            raise BadRequest(f"{where}.{name}.code: {ep.code} does not exist")
        add(ep.code)
        parent = PurePosixPath(ep.code).parent.as_posix()
        if parent != ".":  # the code's folder: the Python files it may import
            files.update(rel for rel, _ in walker.files(
                parent, only=lambda fname: fname.endswith(".py")))
        else:  # code at the project's top: the Python files beside it, not below
            for p in sorted(root.iterdir()):
                if p.name.endswith(".py") and p.is_file():
                    add(p.name)
        for art in ep.artifacts:
            path = root / art
            if path.is_dir():
                files.update(rel for rel, _ in walker.files(art.rstrip("/")))
            elif path.is_file():
                add(art)
            elif path.is_symlink() and walker.check(art) is None:
                continue  # a link out of the project to nothing: refused below
            else:
                raise BadRequest(f"{where}.{name}.artifacts: {art} does not exist")
    walker.raise_refused(project_dir.name)
    return sorted(files)


class _Hashing:
    """Hashes what tarfile reads through it (files are streamed, never held whole)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def pack(project_dir: Path, manifest: Manifest, service_name: str, out: Path, *,
         version: str, created_by: str, notes: str,
         env: EnvLock | None = None) -> ApiPackageInfo:
    """Write the package archive to ``out`` and return its record (blocking); ``env`` is
    the lock of the code environment its endpoints run in."""
    service = manifest.api_services[service_name]
    root = project_dir.resolve()
    entries: list[FileEntry] = []
    files = collect(project_dir, service_name, service)  # refusals before anything is written
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = root / rel
            st = path.stat()
            ti = tarfile.TarInfo(f"files/{rel}")
            ti.size, ti.mtime = st.st_size, int(st.st_mtime)
            ti.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
            with path.open("rb") as f:
                reader = _Hashing(f)
                tar.addfile(ti, reader)
            entries.append(FileEntry(path=rel, size=st.st_size, sha256=reader.h.hexdigest()))
        info = ApiPackageInfo(service=service_name, version=version,
                              project=manifest.project.key, created_at=time.time(),
                              created_by=created_by, notes=notes,
                              description=service.description,
                              endpoints=endpoint_specs(service), files=entries,
                              digest=files_digest(entries), size=sum(e.size for e in entries),
                              env=env)
        raw = msgspec.json.encode(info)
        ti = tarfile.TarInfo("bundle.json")  # the name unpack() expects
        ti.size, ti.mtime, ti.mode = len(raw), int(info.created_at), 0o644
        tar.addfile(ti, io.BytesIO(raw))
    return info


class ApiPackager:
    """The Design node's API packaging component (registered with ``add_handlers``)."""

    def __init__(self, host: PackagerHost) -> None:
        self.host = host
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None
        return self._kv

    async def setup(self) -> None:
        r = self.host.settings.replicas
        self._kv = await ensure_kv(self.host.js, subjects.API_PACKAGE_BUCKET, replicas=r,
                                   description="shipyard API package records")
        await transfer.ensure_bucket(self.host.js, subjects.API_PACKAGE_STORE, replicas=r)

    async def infos(self, service: str) -> list[ApiPackageInfo]:
        snap = await snapshot(self.kv, package_keys(service))
        out = []
        for _rev, raw in snap.values():
            try:
                out.append(API_PACKAGE_INFO.decode(raw))
            except msgspec.DecodeError:
                self.host.log.warning("unreadable API package record skipped", service=service)
        return sorted(out, key=lambda p: p.created_at)

    @handles(ListApiPackages)
    async def list_packages(self, cmd: ListApiPackages, req: Request[Any]) -> ApiPackageList:
        try:
            infos = await self.infos(cmd.service)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return ApiPackageList(service=cmd.service,
                              packages=[ApiPackageSummary.of(p) for p in infos])

    @handles(CreateApiPackage)
    async def create(self, cmd: CreateApiPackage, req: Request[Any]) -> ApiPackageCreated:
        try:
            check_version(cmd.version)
            key = package_key(cmd.service, cmd.version)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        project_dir, manifest = await self.host.project(cmd.project)
        if cmd.service not in manifest.api_services:
            known = ", ".join(sorted(manifest.api_services)) or "none"
            raise NotFound(f"project {cmd.project!r} has no API service {cmd.service!r} "
                           f"(its services: {known})")
        if (existing := await self._get(key)) is not None:
            raise Conflict(_immutable(existing))
        by = cmd.created_by or req.sender or getpass.getuser()
        env_name = manifest.service_env(cmd.service)
        notices = self.host.progress(req)
        wanted = {env_name} if env_name else set()
        if wanted:
            await notices(LOCKING, 0, len(wanted), "envs")
        locks = await self.host.envs.lock(project_dir, manifest, wanted,
                                          wheels=cmd.wheels)  # refusals before storing
        if wanted:
            await notices(LOCKING, len(wanted), len(wanted), "envs")
        env = locks.get(env_name) if env_name else None
        fd, tmp = tempfile.mkstemp(prefix=f"sy-apipkg-{cmd.version}-", suffix=".tar")
        os.close(fd)
        archive = Path(tmp)
        try:
            await notices(PACKING, 0, None, "files")
            info = await anyio.to_thread.run_sync(
                lambda: pack(project_dir, manifest, cmd.service, archive, version=cmd.version,
                             created_by=by, notes=cmd.notes, env=env))
            await notices(PACKING, len(info.files), len(info.files), "files")
            name = f"{cmd.service}/{cmd.version}/{new_id()}.tar"
            stored = await transfer.put_file(
                self.host.js, subjects.API_PACKAGE_STORE, name, archive,
                meta={"service": cmd.service, "version": cmd.version},
                on_progress=lambda sent, size: notices(STORING, sent, size, "bytes"))
        finally:
            await anyio.Path(archive).unlink(missing_ok=True)
        info = sign_package(self.host.settings, msgspec.structs.replace(
            info, archive=name, archive_size=stored.size, archive_sha256=stored.sha256,
            archive_blake3=stored.blake3))
        previous = await self.infos(cmd.service)
        try:
            await self.kv.create(key, encode(info))
        except nats.js.errors.KeyWrongLastSequenceError:
            await transfer.delete(self.host.js, subjects.API_PACKAGE_STORE, name)
            raise Conflict(f"API package {cmd.service} {cmd.version} was created "
                           "concurrently") from None
        await self.host.emit(ApiPackageStored(
            service=info.service, version=info.version, project=info.project, by=by,
            files=len(info.files), size=info.size, digest=info.digest))
        self.host.log.info("API package created", service=info.service, version=info.version,
                           files=len(info.files), size=info.size)
        prev = previous[-1] if previous else None
        before = {f.path: f.sha256 for f in prev.files} if prev else {}
        after = {f.path: f.sha256 for f in info.files}
        return ApiPackageCreated(
            package=ApiPackageSummary.of(info), previous=prev.version if prev else None,
            added=sorted(set(after) - set(before)), removed=sorted(set(before) - set(after)),
            changed=sorted(p for p in set(after) & set(before) if after[p] != before[p]),
            packages=diff_envs(_envs(prev), _envs(info)))

    async def _get(self, key: str) -> ApiPackageInfo | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return API_PACKAGE_INFO.decode(entry.value) if entry.value else None


def _envs(p: ApiPackageInfo | None) -> dict[str, EnvLock]:
    return {p.env.name: p.env} if p is not None and p.env is not None else {}


def _immutable(p: ApiPackageInfo) -> str:
    return (f"API package {p.service} {p.version} already exists (created by "
            f"{p.created_by or '?'}); versions are immutable: choose a new version")
