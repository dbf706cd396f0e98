"""Large files (project bundles) through JetStream: fast, bounded memory, Object Store layout.

nats-py's ``ObjectStore`` acks chunk by chunk on ``put`` and writes from the event loop, a
task hop per chunk, on ``get`` (~49 MB/s for 100 MB here).  This module keeps its layout
(stream ``OBJ_<bucket>``, chunks on ``$O.<bucket>.C.<nuid>``, ObjectInfo JSON with a rollup
header on ``$O.<bucket>.M.<base64url(name)>``), so ``nats object`` and nats-py read what it
writes and vice versa, but ``put_file`` keeps ``WINDOW_BYTES`` of publishes un-acked while a
thread reads and hashes ahead, and ``get_file`` pulls from an ephemeral no-ack consumer with
credit for ``WINDOW_BYTES`` (bounded memory, well under the server's 64 MB per-client limit)
into a temporary file, renamed into place once size and digest match.  Objects of
``DIRECT_MIN_BYTES`` or more are received by ``bulkfetch``: a second connection with the
client's own credentials and TLS, read by a worker thread straight into the file while
another thread hashes (~1.5x nats-py's receive path here); smaller ones, and connections it
cannot reproduce, use a nats-py subscription with hashing and writing in worker threads.
Every wait is bounded: no progress for ``timeout`` raises ``TransferStalled``.

Digests: the meta data's ``digest`` is SHA-256, as the Object Store layout requires.
``put_file`` also records a BLAKE3 digest in the meta's ``metadata`` (key ``BLAKE3_KEY``),
and ``get_file`` checks the bytes against it when it is there: BLAKE3 is as strong a
check at a quarter of SHA-256's CPU (0.13 vs 0.48 CPU-s/GB with AVX-512 and SHA-NI), and
when the server and the receiver share the cores, CPU per byte sets the speed.  A caller
that trusts only a SHA-256 (``expected_sha256`` without ``expected_blake3``) gets the
bytes checked with SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import anyio
import blake3
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ObjectStoreConfig, StorageType
from nats.nuid import NUID

from nodes.runtime import bulkfetch
from nodes.runtime.logs import get_logger
from protocol.errors import BadRequest, NotFound, OperationError

DEFAULT_CHUNK_SIZE = 256 * 1024  # 2x nats-py's: fewer messages, far under max_payload (1 MiB)
WINDOW_BYTES = 8 << 20  # most bytes un-acked (put) or pulled but not yet written (get)
BLOCK_BYTES = 2 << 20  # bytes read, or written, per worker-thread hop
DEFAULT_TIMEOUT = 10.0
# get_file reads objects of DIRECT_MIN_BYTES or more through a dedicated connection on
# worker threads (``bulkfetch``); when that is impossible (a websocket URL, a refused
# handshake) it says so in a log line and uses the nats-py subscription instead.  Smaller
# objects skip the extra connection: below ~512 KiB it costs more than it saves.
# FAST_RECEIVE = False: always nats-py.
FAST_RECEIVE = True
DIRECT_MIN_BYTES = 1 << 20
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
_ACK = msgspec.json.Decoder(dict[str, Any])  # {"stream", "seq"} or {"error": {...}}
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


class _BothHashes:
    """SHA-256 (the Object Store digest) and BLAKE3 (what ``get_file`` checks) in one
    pass; each ``update`` releases the GIL for big buffers."""

    def __init__(self) -> None:
        self.sha256, self.blake3 = hashlib.sha256(), blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.blake3.update(data)


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


class _Acks(_Flow):
    """Counts the publish acks arriving on one inbox."""

    count = 0

    async def on_msg(self, msg: Msg) -> None:
        problem = _status(msg)  # a 503 status: no stream listens on the subject
        error = _ACK.decode(msg.data).get("error") if problem is None else None
        if error is not None:
            problem = f"{error.get('description')} (code {error.get('code')})"
        if problem is not None:
            self.error = TransferStalled(self.bucket, self.name,
                                         f"server refused a chunk: {problem}")
        self.count += problem is None
        self._wake.set()


def _read_block(f: IO[bytes], chunk_size: int, h: Any) -> list[bytes]:
    chunks = []
    for _ in range(max(1, BLOCK_BYTES // chunk_size)):
        chunk = f.read(chunk_size)
        if not chunk:
            break
        h.update(chunk)
        chunks.append(chunk)
    return chunks


async def _read_ahead(out: list[list[bytes]], f: IO[bytes], chunk_size: int, h: Any) -> None:
    out.append(await anyio.to_thread.run_sync(_read_block, f, chunk_size, h))


async def _publish_chunks(js: JetStreamContext, acks: _Acks, subject: str, f: IO[bytes],
                          chunk_size: int, h: Any, timeout: float) -> tuple[int, int]:
    """Publish the file as chunks, ``WINDOW_BYTES`` un-acked at most; (size, chunks)."""
    nc = js._nc
    window = max(2, WINDOW_BYTES // chunk_size)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox + ".*", cb=acks.on_msg)
    size = sent = 0
    try:
        block = await anyio.to_thread.run_sync(_read_block, f, chunk_size, h)
        while block:
            ahead: list[list[bytes]] = []
            async with _task_group() as tg:
                tg.start_soon(_read_ahead, ahead, f, chunk_size, h)
                for chunk in block:
                    while sent - acks.count >= window:
                        await acks.wait(timeout, f"the ack for chunk {acks.count + 1}")
                    # A publish blocks while the socket is full (server stuck): bound it.
                    with anyio.move_on_after(timeout) as sending:
                        await nc.publish(subject, chunk, reply=f"{inbox}.{sent}")
                    if sending.cancelled_caught:
                        raise TransferStalled(acks.bucket, acks.name, f"stalled: could not "
                                              f"send chunk {sent + 1} within {timeout:g}s")
                    sent += 1
                    size += len(chunk)
            block = ahead[0]
        while acks.count < sent:
            await acks.wait(timeout, f"the ack for chunk {acks.count + 1}")
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
    return size, sent


async def put_file(js: JetStreamContext, bucket: str, name: str, path: Path, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, meta: dict[str, str] | None = None,
                   replicas: int = 1, timeout: float = DEFAULT_TIMEOUT) -> StoredObject:
    """Store the file at ``path`` as object ``name``, creating the bucket if needed and
    replacing (and purging) an object of the same name.

    Raises ``BadRequest`` for a bad bucket or empty name, a chunk size over the server's
    max payload or ``meta`` using the reserved key ``BLAKE3_KEY``; ``TransferStalled`` if
    the server refuses a chunk or stops answering (the chunks already sent are purged);
    ``OSError`` if the file cannot be read.
    """
    _check(bucket, name)
    if not 0 < chunk_size <= js._nc.max_payload:
        raise BadRequest(f"chunk_size {chunk_size} must be in 1..{js._nc.max_payload}")
    if meta and BLAKE3_KEY in meta:
        raise BadRequest(f"meta key {BLAKE3_KEY!r} is reserved for the object's digest")
    async with _nats_errors(bucket, name, "opening the bucket"):
        await ensure_bucket(js, bucket, replicas=replicas)
    try:
        old: _Info | None = await _read_info(js, bucket, name)
    except (NotFound, CorruptObject):
        old = None
    nuid = _nuid.next().decode()
    subject = _chunks_subject(bucket, nuid)
    h = _BothHashes()
    async with await anyio.open_file(path, "rb") as f:
        try:
            size, chunks = await _publish_chunks(js, _Acks(bucket, name), subject, f.wrapped,
                                                 chunk_size, h, timeout)
            info = _Info(name=name, bucket=bucket, nuid=nuid, size=size, chunks=chunks,
                         mtime=datetime.now(UTC).isoformat(),
                         metadata={**(meta or {}), BLAKE3_KEY: h.blake3.hexdigest()},
                         digest=_DIGEST_PREFIX
                         + base64.urlsafe_b64encode(h.sha256.digest()).decode(),
                         options=_Options(max_chunk_size=chunk_size))
            async with _nats_errors(bucket, name, "storing meta data"):
                await js.publish(_meta_subject(bucket, name), _ENCODER.encode(info),
                                 headers=_ROLLUP, timeout=timeout)
        except BaseException:
            with anyio.move_on_after(timeout, shield=True), contextlib.suppress(Exception):
                await js.purge_stream(_stream(bucket), subject=subject)
            raise
    if old is not None:
        async with _nats_errors(bucket, name, "purging the replaced object's chunks"):
            await js.purge_stream(_stream(bucket), subject=_chunks_subject(bucket, old.nuid))
    return _stored(info)


def _miscount(bucket: str, name: str, chunks: int, stored: int) -> CorruptObject:
    what = "truncated" if stored < chunks else "extra chunks"
    return CorruptObject(bucket, name, f"{what}: meta says {chunks} chunks, {stored} are "
                         "stored", expected=chunks, got=stored)


class _Receiver(_Flow):
    """Collects pulled chunks (in the subscription callback) into write batches."""

    def __init__(self, info: _Info, max_chunk: int) -> None:
        super().__init__(info.bucket, info.name)
        self.chunks, self.max_chunk = info.chunks, max_chunk
        self.requested = 0  # chunks asked for so far (set by the reading loop)
        self.received = 0
        self.batch: list[bytes] = []
        self.batch_bytes = 0

    async def on_msg(self, msg: Msg) -> None:
        status = _status(msg)
        if status is not None:
            self.error = TransferStalled(self.bucket, self.name,
                                         f"server ended the read: {status}")
        else:
            self.received += 1
            self.batch.append(msg.data)
            self.batch_bytes += len(msg.data)
            tokens = (msg.reply or "").split(".")  # $JS.ACK.<stream>....<pending>[.<token>]
            stored = self.received + int(tokens[8] if len(tokens) == 9 else tokens[10])
            if stored != self.chunks:
                self.error = _miscount(self.bucket, self.name, self.chunks, stored)
            elif len(msg.data) > self.max_chunk:  # would also break the memory bound
                self.error = CorruptObject(self.bucket, self.name, f"chunk {self.received} "
                                           f"has {len(msg.data)} bytes, more than the meta's "
                                           f"max_chunk_size {self.max_chunk}")
        if self.error or self.batch_bytes >= BLOCK_BYTES or self.received >= self.requested:
            self._wake.set()

    async def take(self, timeout: float) -> list[bytes]:
        """The next batch to write: wait until one is full or every request is answered."""
        while not self.batch and self.error is None:
            await self.wait(timeout, f"chunk {self.received + 1} of {self.chunks}")
        if self.error is not None:
            raise self.error
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        return batch


def _hash(h: Any, parts: list[bytes]) -> None:
    for part in parts:
        h.update(part)


def _write(fd: int, parts: list[bytes]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


class _Pull(msgspec.Struct, frozen=True):
    """One read of an object's chunks through a consumer: what both receive paths need."""

    info: _Info
    subject: str  # $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>
    max_chunk: int  # credit is counted in chunks, so it needs their size bound
    window: int  # chunks requested but not yet received, at most


async def _receive(js: JetStreamContext, info: _Info, fd: int, h: Any,
                   progress: Callable[[int, int], None] | None, timeout: float) -> int:
    """Pull every chunk into ``fd`` through an ephemeral no-ack consumer; bytes written."""
    nc = js._nc
    stream, consumer = _stream(info.bucket), _nuid.next().decode()
    config = ConsumerConfig(name=consumer, ack_policy=AckPolicy.NONE, mem_storage=True,
                            filter_subject=_chunks_subject(info.bucket, info.nuid),
                            num_replicas=1, inactive_threshold=max(30.0, 3 * timeout))
    fetch = None
    if FAST_RECEIVE and info.size >= DIRECT_MIN_BYTES:
        try:
            fetch = bulkfetch.Fetch(bulkfetch.dial_from(nc), nc.new_inbox(),
                                    name=f"sy-transfer-{consumer}")
        except bulkfetch.Unavailable as exc:
            _falling_back(info, exc)
    async with contextlib.AsyncExitStack() as stack:
        if fetch is not None:  # it connects while the consumer is being created
            await stack.enter_async_context(fetch)
        async with _nats_errors(info.bucket, info.name, "creating a consumer"):
            stored = (await js.add_consumer(stream, config, timeout=timeout)).num_pending or 0
        try:
            if stored != info.chunks:  # fail before moving any bytes
                raise _miscount(info.bucket, info.name, info.chunks, stored)
            # Every writer (Go, nats-py, put_file) records the chunk size bound, and a
            # bigger chunk is refused as corrupt, so credit in chunks bounds the bytes.
            max_chunk = (info.options and info.options.max_chunk_size) or nc.max_payload
            pull = _Pull(info=info, max_chunk=max_chunk,
                         subject=f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                         window=max(2, WINDOW_BYTES // max_chunk))
            if fetch is not None:
                try:
                    return await _receive_direct(fetch, pull, fd, h, progress, timeout)
                except bulkfetch.Unavailable as exc:  # nothing was pulled yet
                    _falling_back(info, exc)
            return await _receive_nats_py(nc, pull, fd, h, progress, timeout)
        finally:
            if fetch is not None:
                fetch.abort()  # stop it before its consumer goes (a no-op once finished)
            with anyio.move_on_after(timeout, shield=True), contextlib.suppress(Exception):
                await js.delete_consumer(stream, consumer)


def _falling_back(info: _Info, exc: Exception) -> None:
    get_logger(component="transfer").warning(
        "direct receive unavailable, using the nats-py subscription",
        bucket=info.bucket, object=info.name, reason=str(exc))


async def _receive_direct(fetch: bulkfetch.Fetch, pull: _Pull, fd: int, h: Any,
                          progress: Callable[[int, int], None] | None, timeout: float) -> int:
    """The fast path: ``bulkfetch`` on its own connection and threads.  Raises
    ``bulkfetch.Unavailable`` before any chunk was pulled if it cannot be used."""
    info = pull.info

    def check(n: int, reply: bytes, size: int) -> None:  # runs on the fetch thread
        tokens = reply.split(b".")  # $JS.ACK.<stream>....<pending>[.<token>]
        try:
            stored = n + int(tokens[8] if len(tokens) == 9 else tokens[10])
        except (IndexError, ValueError):
            raise TransferError(info.bucket, info.name, f"chunk {n} came with an unexpected "
                                f"reply subject {reply[:120]!r}") from None
        if stored != info.chunks:
            raise _miscount(info.bucket, info.name, info.chunks, stored)
        if size > pull.max_chunk:
            raise CorruptObject(info.bucket, info.name, f"chunk {n} has {size} bytes, more "
                                f"than the meta's max_chunk_size {pull.max_chunk}")

    plausible = 0 < info.size <= info.chunks * pull.max_chunk
    job = bulkfetch.Job(pull_subject=pull.subject, count=info.chunks, window=pull.window,
                        size_limit=info.size, fd=fd, hasher=h, check=check, timeout=timeout,
                        preallocate=info.size if plausible else 0,
                        progress_every=BLOCK_BYTES)
    report = None if progress is None else (lambda n: progress(n, info.size))
    try:
        return await fetch.run(job, report)
    except bulkfetch.Stalled as exc:
        raise TransferStalled(info.bucket, info.name, f"stalled: chunk {exc.received + 1} "
                              f"of {info.chunks} did not arrive within {timeout:g}s") from None
    except bulkfetch.Refused as exc:
        raise TransferStalled(info.bucket, info.name,
                              f"server ended the read: {exc}") from exc


async def _receive_nats_py(nc: Any, pull: _Pull, fd: int, h: Any,
                           progress: Callable[[int, int], None] | None, timeout: float) -> int:
    """The fallback: a nats-py subscription, batches hashed and written in threads."""
    info, window = pull.info, pull.window
    rx = _Receiver(info, pull.max_chunk)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=rx.on_msg, pending_bytes_limit=4 * WINDOW_BYTES)
    written = done = 0
    try:
        while done < info.chunks and written <= info.size:
            while rx.requested < info.chunks and rx.requested - done < window:
                n = min(max(1, window // 4), info.chunks - rx.requested)
                await nc.publish(pull.subject, b'{"batch":%d}' % n, reply=inbox)
                rx.requested += n
            batch = await rx.take(timeout)
            async with _task_group() as tg:  # hash while writing
                tg.start_soon(anyio.to_thread.run_sync, _hash, h, batch)
                await anyio.to_thread.run_sync(_write, fd, batch)
            done += len(batch)
            written += sum(map(len, batch))
            if progress is not None:
                progress(written, info.size)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
    return written


async def get_file(js: JetStreamContext, bucket: str, name: str, dest: Path, *,
                   progress: Callable[[int, int], None] | None = None,
                   expected_sha256: str | None = None, expected_blake3: str | None = None,
                   durable: bool = False, timeout: float = DEFAULT_TIMEOUT) -> StoredObject:
    """Fetch object ``name`` into ``dest``: replaced atomically, untouched on any failure.

    The bytes are checked against the meta's BLAKE3 digest if it has one and the caller
    did not name a SHA-256 alone, else against its SHA-256: a digest given by the caller
    is always one the bytes are checked against.  ``progress(bytes_written, size)`` is
    called after each batch written.  ``durable`` fsyncs the file before the rename and
    the directory after it, so ``dest`` survives a crash.  Raises ``NotFound``;
    ``CorruptObject`` if the bytes disagree with the meta's size, chunk count or digest,
    or a digest is not the expected one (or the meta has no BLAKE3 to compare with
    ``expected_blake3``); ``TransferStalled`` if nothing arrives for ``timeout`` seconds;
    ``BadRequest`` for links (not supported); ``OSError`` if ``dest`` cannot be written.
    """
    info = await _read_info(js, bucket, name)
    obj = _stored(info)
    for what, want, got in (("SHA-256", expected_sha256, obj.sha256),
                            ("BLAKE3", expected_blake3, obj.blake3)):
        if want is not None and want.lower() != got:
            raise CorruptObject(bucket, name, f"{what} is {got or 'not recorded'}, expected "
                                f"{want.lower()}", expected=want, got=got)
    use_blake3 = bool(obj.blake3) and (expected_blake3 is not None or expected_sha256 is None)
    algorithm, want_digest = ("BLAKE3", obj.blake3) if use_blake3 else ("SHA-256", obj.sha256)
    h: Any = blake3.blake3() if use_blake3 else hashlib.sha256()
    tmp = Path(dest).with_name(f".{Path(dest).name}.{_nuid.next().decode()}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = await anyio.to_thread.run_sync(os.open, tmp, flags, 0o666)
    try:
        try:
            written = await _receive(js, info, fd, h, progress, timeout) if info.chunks else 0
            if durable:
                await anyio.to_thread.run_sync(os.fsync, fd)
        finally:
            await anyio.to_thread.run_sync(os.close, fd)
        checks: tuple[tuple[str, int | str, int | str], ...] = (
            ("size", info.size, written), (algorithm, want_digest, h.hexdigest()))
        for what, meant, came in checks:
            if meant != came:
                raise CorruptObject(bucket, name, f"{what} mismatch: meta says {meant}, "
                                    f"{came} arrived", expected=meant, got=came)
        await anyio.to_thread.run_sync(os.replace, tmp, dest)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(tmp.unlink, True)
        raise
    if durable:
        await anyio.to_thread.run_sync(fsync_dir, Path(dest).parent)
    if progress is not None and info.size == 0:
        progress(0, 0)
    return obj


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a crash (blocking)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
