"""An API node's local package store: fetched, verified, unpacked generations.

Layout under the node's data directory::

    api/<service>/<version>/             an unpacked, verified package
    api/<service>/<version>/.shipyard-package.json    its record (written last)
    api/<service>/.partial-*             work in progress, never loaded

Packages are immutable, so one verified on disk is never fetched again.  Unpacking uses
the bundle ``unpack``: every file must be listed in the record from the control plane,
with its size and SHA-256, and nothing may escape the target directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nodes.project.bundle import BundleRejected, unpack
from nodes.runtime import transfer
from protocol import subjects
from protocol.api import API_PACKAGE_INFO, ApiPackageInfo, package_key
from protocol.base import new_id
from protocol.bundles import BundleInfo
from protocol.errors import NotFound

RECORD = ".shipyard-package.json"


class PackageRefused(Exception):
    """A package that cannot be served; retrying the same version will not help."""


class PackageStore:
    def __init__(self, root: Path) -> None:
        self.root = root / "api"

    def dir(self, service: str, version: str) -> Path:
        return self.root / service / version

    def has(self, service: str, version: str) -> bool:
        return (self.dir(service, version) / RECORD).is_file()

    def install(self, archive: Path, info: ApiPackageInfo) -> None:
        """Verify and unpack (blocking; raises ``BundleRejected``)."""
        final = self.dir(info.service, info.version)
        if self.has(info.service, info.version):
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        work = final.parent / f".partial-{info.version}-{new_id()}"
        as_bundle = BundleInfo(id=info.version, project=info.project,
                               created_at=info.created_at, created_by=info.created_by,
                               files=info.files, digest=info.digest, size=info.size)
        unpack(archive, as_bundle, work)
        (work / RECORD).write_bytes(msgspec.json.encode(info))
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)

    def remove(self, service: str, version: str) -> None:
        shutil.rmtree(self.dir(service, version), ignore_errors=True)


async def package_info(kv: KeyValue, service: str, version: str) -> ApiPackageInfo:
    try:
        entry = await kv.get(package_key(service, version))
    except (nats.js.errors.KeyNotFoundError, ValueError):
        raise PackageRefused(f"package {service} {version} does not exist") from None
    if not entry.value:
        raise PackageRefused(f"package {service} {version} was deleted")
    try:
        return API_PACKAGE_INFO.decode(entry.value)
    except msgspec.DecodeError as exc:
        raise PackageRefused(f"package record {service} {version} is unreadable: "
                             f"{exc}") from None


async def ensure(js: JetStreamContext, kv: KeyValue, store: PackageStore, downloads: Path,
                 service: str, version: str, *,
                 refusal: Callable[[ApiPackageInfo], str | None] | None = None,
                 ) -> tuple[Path, ApiPackageInfo, int]:
    """The package unpacked here: (directory, record, bytes fetched; 0 if on disk).

    ``refusal(record)`` says why the record may not be used (its signature), or None.
    Raises ``PackageRefused`` (missing, damaged, rejected, untrusted) or a transport
    error (retry).
    """
    info = await package_info(kv, service, version)
    reason = refusal(info) if refusal is not None else None
    if reason is not None:
        raise PackageRefused(reason)
    if await anyio.to_thread.run_sync(store.has, service, version):
        return store.dir(service, version), info, 0
    await anyio.Path(downloads).mkdir(parents=True, exist_ok=True)
    archive = downloads / f"{service}-{version}-{new_id()}.tar"
    try:
        try:
            await transfer.get_file(js, subjects.API_PACKAGE_STORE, info.archive, archive,
                                    expected_sha256=info.archive_sha256,
                                    expected_blake3=info.archive_blake3 or None)
        except transfer.TransferStalled:
            raise
        except transfer.TransferError as exc:
            raise PackageRefused(f"stored archive is damaged: {exc}") from None
        except NotFound as exc:
            raise PackageRefused(f"stored archive is missing: {exc.message}") from None
        try:
            await anyio.to_thread.run_sync(store.install, archive, info)
        except BundleRejected as exc:
            raise PackageRefused(exc.reason) from None
    finally:
        await anyio.Path(archive).unlink(missing_ok=True)
    return store.dir(service, version), info, info.archive_size
