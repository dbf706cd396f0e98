"""Locked wheels through the ``sy_wheels`` object store: stored once, fetched checked.

Production hosts often reach no package index.  ``bundle create --wheels`` stores every
locked wheel under ``wheel_key(sha256)``: content-addressed, so a wheel that a hundred
bundles lock is one object, and ``store_wheel`` skips the upload when it is there
already (a stat, one round trip: 0.6 ms here, against 4-11 ms to upload a tiny wheel).
A node fetches the wheels of a lock into one folder shared by all its environments
(``fetch_wheels``, four at a time: 7 ms for 3 tiny wheels here), skipping files it
holds with the right hash, and installs from that folder with no index.  Every byte is
checked against the lock's SHA-256: ``get_file`` hashes as it writes and renames into
place only on a match, so a half-fetched or tampered wheel never lands under its real
name.

The file name a wheel is written under comes from the lock (a KV record a Design node
wrote); a name that is not a plain ``*.whl`` file name is refused, so a hostile lock
cannot write outside the folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
from nats.js import JetStreamContext

from nodes.runtime import transfer
from protocol.envs import EnvLock, LockedPackage, wheel_key
from protocol.errors import BadRequest, NotFound, OperationError
from protocol.subjects import WHEELS_STORE

PARALLEL = 4  # wheels fetched at once: enough to hide round trips, few enough to be kind
HASH_BLOCK = 1 << 20


def file_sha256(path: Path) -> str | None:
    """SHA-256 of the file at ``path`` (hex), or None if it does not exist (blocking)."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def wheel_filename(package: LockedPackage) -> str:
    """The file name of ``package``'s locked wheel.  Raises ``OperationError`` when the
    lock has no wheel for it, ``BadRequest`` when the name is not a plain wheel name."""
    if package.wheel is None:
        raise OperationError(f"{package.pin} has no wheel in the lock (only a source "
                             "distribution); expected a wheel for the lock's platform to "
                             "install without an index")
    name = package.wheel.filename
    if (not name.endswith(".whl") or Path(name).name != name or name.startswith(".")
            or "\0" in name):
        raise BadRequest(f"wheel file name {name!r} of {package.pin} is not a plain "
                         "'<name>-<version>-<tags>.whl' file name")
    return name


async def fetch_wheels(js: JetStreamContext, lock: EnvLock, dest: Path, *,
                       timeout: float = transfer.DEFAULT_TIMEOUT) -> None:
    """Fetch the wheel of every package of ``lock`` from ``sy_wheels`` into
    ``dest/<wheel file name>``, checked against the lock's SHA-256; files already there
    with that hash are kept (and their mtime refreshed, which marks them in use).

    Raises ``OperationError`` naming the package when its wheel is not stored or the
    lock has none, ``BadRequest`` for a hostile file name, ``TransferError`` when the
    bytes cannot be moved intact (``CorruptObject``, ``TransferStalled``)."""
    names = [(p, wheel_filename(p)) for p in lock.packages]
    await anyio.to_thread.run_sync(lambda: dest.mkdir(parents=True, exist_ok=True))
    limit = anyio.Semaphore(PARALLEL)

    failed: list[Exception] = []

    async def one(package: LockedPackage, name: str) -> None:
        try:
            await fetch_one(package, name)
        except Exception as exc:  # the first failure is the answer; stop the others
            failed.append(exc)
            tg.cancel_scope.cancel()

    async def fetch_one(package: LockedPackage, name: str) -> None:
        assert package.wheel is not None
        sha = package.wheel.sha256
        target = dest / name
        async with limit:
            if await anyio.to_thread.run_sync(file_sha256, target) == sha:
                await anyio.to_thread.run_sync(os.utime, target)
                return
            try:
                await transfer.get_file(js, WHEELS_STORE, wheel_key(sha), target,
                                        expected_sha256=sha, timeout=timeout)
            except NotFound:
                raise OperationError(
                    f"wheel {name} of {package.pin} is not in {WHEELS_STORE}; expected it "
                    "stored by 'bundle create --wheels'",
                    details={"package": package.name, "version": package.version,
                             "sha256": sha}) from None

    async with anyio.create_task_group() as tg:
        for package, name in names:
            tg.start_soon(one, package, name)
    if failed:
        raise failed[0]


async def store_wheel(js: JetStreamContext, path: Path, sha256: str, *,
                      timeout: float = transfer.DEFAULT_TIMEOUT) -> bool:
    """Store the wheel at ``path`` in ``sy_wheels`` under ``wheel_key(sha256)`` unless an
    object of that name is there already; returns whether it uploaded.

    Raises ``BadRequest`` when ``sha256`` is malformed or is not the file's SHA-256 (the
    object is then removed again), ``TransferError`` when the upload fails, ``OSError``
    when the file cannot be read."""
    key = wheel_key(sha256)
    try:
        stored = await transfer.stat(js, WHEELS_STORE, key)
    except (NotFound, transfer.CorruptObject):
        pass
    else:
        if stored.sha256 == sha256:
            return False
    obj = await transfer.put_file(js, WHEELS_STORE, key, path, timeout=timeout)
    if obj.sha256 != sha256:
        await transfer.delete(js, WHEELS_STORE, key)
        raise BadRequest(f"wheel {path.name} has SHA-256 {obj.sha256}, not {sha256}: not "
                         f"stored in {WHEELS_STORE}")
    return True
