"""The Design node's side of code environments: lock what an artifact uses, and with
``--wheels`` store every locked wheel in ``sy_wheels``.

Locking happens before anything of the artifact is stored, so an environment that cannot
be resolved refuses the bundle (or API package) and leaves nothing behind.

Stored wheels are content-addressed (``wheel_key(sha256)``): a wheel is downloaded and
stored only if ``sy_wheels`` does not have it yet, so many bundles sharing a wheel store
it once.  Every downloaded file is checked against the lock's SHA-256 before it is
stored: a node installs from ``sy_wheels`` with ``--require-hashes`` and no index, and a
wrong file there would fail every build that uses it.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
from nats.js import JetStreamContext

from nodes.envs.lock import DEFAULT_LOCK_TIMEOUT_S, requirements_of, resolve
from nodes.envs.uv import IndexSettings
from nodes.project.manifest import Manifest
from nodes.runtime import transfer
from nodes.runtime.hosts import Logs
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.envs import EnvLock, LockedFile, wheel_key
from protocol.errors import BadRequest, NotFound

DOWNLOAD_TIMEOUT_S = 120.0  # per wheel; a hung index must not hold a bundle forever
CHUNK = 1 << 20


class WheelsRefused(BadRequest):
    """``--wheels`` asked for, but a locked file cannot be stored as a wheel."""


class EnvsHost(Logs, Protocol):
    @property
    def js(self) -> JetStreamContext: ...

    @property
    def settings(self) -> NatsSettings: ...


class EnvLocker:
    """Locks environments with the node's package index settings and stores wheels."""

    def __init__(self, host: EnvsHost, index: IndexSettings, *,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        self.host = host
        self.index = index
        self.lock_timeout_s = lock_timeout_s

    async def setup(self) -> None:
        await transfer.ensure_bucket(self.host.js, subjects.WHEELS_STORE,
                                     replicas=self.host.settings.replicas)

    async def lock(self, project_dir: Path, manifest: Manifest, names: set[str], *,
                   wheels: bool) -> dict[str, EnvLock]:
        """Lock every env in ``names`` (and store its wheels with ``wheels``).  Raises
        ``LockFailed``/``ManifestError``/``WheelsRefused`` naming the env."""
        out: dict[str, EnvLock] = {}
        for name in sorted(names):
            reqs = await anyio.to_thread.run_sync(
                functools.partial(requirements_of, project_dir, manifest, name))
            lock = await resolve(name, reqs, python=manifest.code_envs[name].python,
                                 index=self.index, timeout_s=self.lock_timeout_s)
            self.host.log.info("code env locked", env=name, packages=len(lock.packages),
                               digest=lock.digest[:12])
            out[name] = await self.store_wheels(lock) if wheels else lock
        return out

    async def store_wheels(self, lock: EnvLock) -> EnvLock:
        """Store every wheel of ``lock`` in ``sy_wheels`` (once each); the lock, marked
        ``wheels_stored``."""
        sdist_only = sorted(p.pin for p in lock.packages if p.wheel is None)
        if sdist_only:
            raise WheelsRefused(
                f"code env {lock.name!r}: --wheels stores wheels, and "
                f"{', '.join(sdist_only)} has only a source distribution; build a wheel of "
                "it into a --find-links folder, or make the bundle without --wheels",
                details={"env": lock.name, "packages": sdist_only})
        stored = 0
        for p in lock.packages:
            assert p.wheel is not None
            if await self._store(lock.name, p.pin, p.wheel):
                stored += 1
        self.host.log.info("code env wheels stored", env=lock.name, new=stored,
                           already=len(lock.packages) - stored)
        return msgspec.structs.replace(lock, wheels_stored=True)

    async def _store(self, env: str, pin: str, wheel: LockedFile) -> bool:
        """Store one wheel unless ``sy_wheels`` has it; True if it was stored now."""
        key = wheel_key(wheel.sha256)
        try:
            have = await transfer.stat(self.host.js, subjects.WHEELS_STORE, key)
        except (NotFound, transfer.CorruptObject):
            pass  # not there, or unreadable: store it (again)
        else:
            if have.sha256 == wheel.sha256:
                return False
        tmp = Path(await anyio.to_thread.run_sync(
            lambda: tempfile.mkdtemp(prefix="sy-wheel-")))
        try:
            path = tmp / "wheel.whl"
            url = self._with_credentials(wheel.url)
            await anyio.to_thread.run_sync(
                lambda: _download(env, pin, wheel, url, path, DOWNLOAD_TIMEOUT_S))
            await transfer.put_file(self.host.js, subjects.WHEELS_STORE, key, path,
                                    meta={"filename": wheel.filename},
                                    replicas=self.host.settings.replicas)
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        return True

    def _with_credentials(self, url: str) -> str:
        """Locks hold URLs without credentials; give back the index's own to a URL on
        the index's host, so a private index works with ``--wheels`` too."""
        if not self.index.index_url:
            return url
        index, target = urlsplit(self.index.index_url), urlsplit(url)
        if index.username is None or target.username is not None or \
                (index.hostname, index.port) != (target.hostname, target.port):
            return url
        return urlunsplit(target._replace(netloc=index.netloc))


def _download(env: str, pin: str, wheel: LockedFile, url: str, dest: Path,
              timeout_s: float) -> None:
    """Fetch ``url`` (file:, http:, https:) into ``dest`` and check its SHA-256 (blocking)."""
    scheme = urlsplit(url).scheme
    if scheme not in ("file", "http", "https"):
        raise WheelsRefused(f"code env {env!r}: {pin}: cannot fetch {wheel.filename} from "
                            f"{scheme or 'a URL without scheme'!r}: expected file, http "
                            "or https")
    h = hashlib.sha256()
    deadline = time.monotonic() + timeout_s  # urlopen's timeout bounds each read only
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as src, dest.open("wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gave up after {timeout_s:g} s")
    except (OSError, ValueError) as exc:
        raise WheelsRefused(f"code env {env!r}: {pin}: cannot fetch {wheel.filename} from "
                            f"{wheel.url}: {exc}", details={"env": env}) from None
    if h.hexdigest() != wheel.sha256:
        raise WheelsRefused(f"code env {env!r}: {pin}: {wheel.filename} from {wheel.url} "
                            f"has sha256 {h.hexdigest()[:16]}..., the lock says "
                            f"{wheel.sha256[:16]}...; the index changed the file",
                            details={"env": env})
