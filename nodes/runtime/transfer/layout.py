"""The Object Store layout in JetStream, and the meta data of stored objects.

``upload.put_file`` and ``download.get_file`` keep nats-py's Object Store layout (stream
``OBJ_<bucket>``, chunks on ``$O.<bucket>.C.<nuid>``, ObjectInfo JSON with a rollup
header on ``$O.<bucket>.M.<base64url(name)>``), so ``nats object`` and nats-py read what
they write and vice versa.  This module spells that layout once, reads and checks the
meta data (``stat``), deletes objects, creates buckets, and holds what both directions
share: the errors, and bounded waits (no progress for ``timeout`` raises
``TransferStalled``).

Digests: the meta data's ``digest`` is SHA-256, as the Object Store layout requires.
``put_file`` also records a BLAKE3 digest in the meta's ``metadata`` (key ``BLAKE3_KEY``),
which ``get_file`` prefers (see ``download``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.nuid import NUID

from protocol.errors import BadRequest, NotFound, OperationError

DEFAULT_TIMEOUT = 10.0
_DIGEST_PREFIX = "SHA-256="
BLAKE3_KEY = "sy-blake3"  # in the meta's user metadata: BLAKE3 of the object, lowercase hex
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ROLLUP = {"Nats-Rollup": "sub"}
_STREAM_NOT_FOUND = 10059
_BUCKET_RE = re.compile(r"^[a-zA-Z0-9_-]+$")


class TransferError(OperationError):
    """Raised when an object cannot be moved intact; ``details`` name bucket and object."""

    code = "transfer_failed"

    def __init__(self, bucket: str, name: str, problem: str, **details: Any) -> None:
        super().__init__(f"object {name!r} in bucket {bucket!r}: {problem}",
                         details={"bucket": bucket, "name": name, **details})


class CorruptObject(TransferError):
    """Raised when stored bytes disagree with the object's meta data: size, SHA-256 or
    chunk count (a truncated object, a tampered chunk, a rewritten digest)."""


class TransferStalled(TransferError):
    """Raised when the server neither acks nor delivers anything for ``timeout`` seconds,
    or refuses the transfer (stream full, consumer gone).  Retrying may succeed."""


class StoredObject(msgspec.Struct, frozen=True, kw_only=True):
    """An object as its meta data describes it; digests are lowercase hex, ``blake3`` is
    empty for objects stored by other writers (nats-py, ``nats object``)."""

    name: str
    bucket: str
    size: int
    chunks: int
    sha256: str
    nuid: str
    blake3: str = ""
    meta: dict[str, str] = {}
    mtime: str = ""


class _Options(msgspec.Struct, omit_defaults=True):
    max_chunk_size: int | None = None
    link: dict[str, Any] | None = None


class _Info(msgspec.Struct, omit_defaults=True):
    """ObjectInfo JSON as Go and nats-py write it; ``metadata`` is Go's user meta field."""

    name: str
    bucket: str
    nuid: str
    size: int
    mtime: str
    chunks: int
    digest: str = ""
    deleted: bool = False
    description: str | None = None
    headers: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    options: _Options | None = None


_INFO = msgspec.json.Decoder(_Info)
_ENCODER = msgspec.json.Encoder()
_nuid = NUID()


def _stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def _chunks_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def _check(bucket: str, name: str) -> None:
    if not _BUCKET_RE.match(bucket):
        raise BadRequest(f"bad bucket name {bucket!r}: use letters, digits, '-' and '_'")
    if not name:
        raise BadRequest("object name must not be empty")


def _stored(info: _Info) -> StoredObject:
    if info.options is not None and info.options.link is not None:
        raise BadRequest(f"object {info.name!r} in bucket {info.bucket!r} is a link to "
                         f"{info.options.link}: links are not supported")
    digest = info.digest
    b64 = digest[len(_DIGEST_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if digest[:len(_DIGEST_PREFIX)].upper() != _DIGEST_PREFIX or len(raw) != 32:
        raise CorruptObject(info.bucket, info.name, f"meta has no valid SHA-256 digest: "
                            f"{digest!r}")
    meta = dict(info.metadata or {})
    b3 = meta.pop(BLAKE3_KEY, "")
    if b3 and not _HEX64.match(b3):
        raise CorruptObject(info.bucket, info.name, f"meta has no valid BLAKE3 digest: {b3!r}")
    return StoredObject(name=info.name, bucket=info.bucket, size=info.size, chunks=info.chunks,
                        sha256=raw.hex(), nuid=info.nuid, blake3=b3, meta=meta,
                        mtime=info.mtime)


@contextlib.asynccontextmanager
async def _nats_errors(bucket: str, name: str, doing: str) -> AsyncIterator[None]:
    """Turn nats-py's timeouts and API errors into ``TransferStalled``."""
    try:
        yield
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise TransferStalled(bucket, name, f"no answer from the server while {doing}") from exc
    except nats.js.errors.APIError as exc:
        raise TransferStalled(bucket, name, f"server refused {doing}: "
                              f"{exc.description} (code {exc.code})") from exc


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[TaskGroup]:
    """A task group that raises a lone error as itself, not inside an ExceptionGroup."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _status(msg: Msg) -> str | None:
    """``"status <code> <description>"`` for a server status message, else None."""
    if not msg.headers or "Status" not in msg.headers:
        return None
    return f"status {msg.headers['Status']} {msg.headers.get('Description', '')}".rstrip()


async def ensure_bucket(js: JetStreamContext, bucket: str, *, replicas: int = 1) -> None:
    """Open the bucket, or create it (file storage) with nats-py's ``create_object_store``
    so the stream config is the standard one.  An existing bucket is left as it is."""
    _check(bucket, "-")
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.stream_info(_stream(bucket))
        return
    config = ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas)
    with contextlib.suppress(nats.js.errors.BadRequestError):  # created concurrently
        await js.create_object_store(bucket, config=config)


async def _read_info(js: JetStreamContext, bucket: str, name: str) -> _Info:
    _check(bucket, name)
    async with _nats_errors(bucket, name, "reading meta data"):
        try:
            msg = await js.get_last_msg(_stream(bucket), _meta_subject(bucket, name))
        except nats.js.errors.NotFoundError as exc:
            what = "bucket" if exc.err_code == _STREAM_NOT_FOUND else "object"
            raise NotFound(f"{what} not found: object {name!r} in bucket {bucket!r}",
                           details={"bucket": bucket, "name": name}) from None
    try:
        info = _INFO.decode(msg.data or b"")
    except msgspec.DecodeError as exc:
        raise CorruptObject(bucket, name, f"meta data is not valid ObjectInfo: {exc}") from exc
    if info.deleted:
        raise NotFound(f"object {name!r} in bucket {bucket!r} was deleted",
                       details={"bucket": bucket, "name": name})
    return info


async def stat(js: JetStreamContext, bucket: str, name: str) -> StoredObject:
    """The object's meta data.  Raises ``NotFound``; ``CorruptObject`` for unreadable meta;
    ``BadRequest`` for a link (links are not supported)."""
    return _stored(await _read_info(js, bucket, name))


async def delete(js: JetStreamContext, bucket: str, name: str) -> None:
    """Mark the object deleted (as nats-py does) and purge its chunks.  Raises ``NotFound``."""
    info = await _read_info(js, bucket, name)
    tomb = msgspec.structs.replace(info, deleted=True, size=0, chunks=0, digest="",
                                   mtime=datetime.now(UTC).isoformat())
    async with _nats_errors(bucket, name, "deleting"):
        await js.publish(_meta_subject(bucket, name), _ENCODER.encode(tomb), headers=_ROLLUP)
        await js.purge_stream(_stream(bucket), subject=_chunks_subject(bucket, info.nuid))


class _Flow:
    """Wakes a transfer loop from a subscription callback; waits are bounded."""

    def __init__(self, bucket: str, name: str) -> None:
        self.bucket, self.name = bucket, name
        self.error: TransferError | None = None
        self._wake = anyio.Event()

    async def wait(self, timeout: float, what: str) -> None:
        if self.error is None:
            try:
                with anyio.fail_after(timeout):
                    await self._wake.wait()
            except TimeoutError:
                raise TransferStalled(self.bucket, self.name, f"stalled: {what} did not "
                                      f"arrive within {timeout:g}s") from None
        self._wake = anyio.Event()
        if self.error is not None:
            raise self.error

