"""Download an object into a file: bounded memory, checked, replaced atomically.

nats-py's ``ObjectStore.get`` writes from the event loop, a task hop per chunk (~49 MB/s
for 100 MB here).  ``get_file`` pulls from an ephemeral no-ack consumer with credit for
``WINDOW_BYTES`` (bounded memory, well under the server's 64 MB per-client limit) into a
temporary file, renamed into place once size and digest match.  Objects of
``DIRECT_MIN_BYTES`` or more are received by ``bulkfetch``: a second connection with the
client's own credentials and TLS, read by a worker thread straight into the file while
another thread hashes (~1.5x nats-py's receive path here); smaller ones, and connections it
cannot reproduce, use a nats-py subscription with hashing and writing in worker threads.
Every wait is bounded: no progress for ``timeout`` raises ``TransferStalled``.

Digests: ``get_file`` checks the bytes against the meta's BLAKE3 digest when it is there:
BLAKE3 is as strong a check at a quarter of SHA-256's CPU (0.13 vs 0.48 CPU-s/GB with
AVX-512 and SHA-NI), and when the server and the receiver share the cores, CPU per byte
sets the speed.  A caller that trusts only a SHA-256 (``expected_sha256`` without
``expected_blake3``) gets the bytes checked with SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import blake3
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from nodes.runtime import bulkfetch, natscompat
from nodes.runtime.logs import get_logger
from nodes.runtime.transfer.layout import (
    DEFAULT_TIMEOUT,
    CorruptObject,
    StoredObject,
    TransferError,
    TransferStalled,
    _chunks_subject,
    _Flow,
    _Info,
    _nats_errors,
    _nuid,
    _read_info,
    _status,
    _stored,
    _stream,
    _task_group,
)

WINDOW_BYTES = 8 << 20  # most bytes of chunks pulled but not yet written
BLOCK_BYTES = 2 << 20  # bytes written (and hashed) per worker-thread hop
# get_file reads objects of DIRECT_MIN_BYTES or more through a dedicated connection on
# worker threads (``bulkfetch``); when that is impossible (a websocket URL, a refused
# handshake) it says so in a log line and uses the nats-py subscription instead.  Smaller
# objects skip the extra connection: below ~512 KiB it costs more than it saves.
# FAST_RECEIVE = False: always nats-py.
FAST_RECEIVE = True
DIRECT_MIN_BYTES = 1 << 20


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
            kind = _NotYetServed if _not_yet_served(status, self.received) \
                else TransferStalled
            self.error = kind(self.bucket, self.name, f"server ended the read: {status}")
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


class _NotYetServed(TransferStalled):
    """The first pull found no responder (status 503): in a cluster, the new consumer's
    pull subject may not have reached the client's server yet.  Nothing was received."""


# Attempts (with backoff from 50 ms) at a read whose first pull found no responder.
NOT_YET_SERVED_ATTEMPTS = 5


def _not_yet_served(status: str, received: int) -> bool:
    return received == 0 and status.startswith("status 503")


async def _receive(js: JetStreamContext, info: _Info, fd: int, h: Any,
                   progress: Callable[[int, int], None] | None, timeout: float) -> int:
    """Pull every chunk into ``fd``; a read refused before its first chunk because the
    consumer was not yet served where the client is (a cluster) is tried again with a
    new consumer (nothing was written or hashed yet)."""
    delay = 0.05
    for attempt in range(NOT_YET_SERVED_ATTEMPTS):
        try:
            return await _receive_once(js, info, fd, h, progress, timeout)
        except _NotYetServed:
            if attempt == NOT_YET_SERVED_ATTEMPTS - 1:
                raise
            await anyio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def _receive_once(js: JetStreamContext, info: _Info, fd: int, h: Any,
                        progress: Callable[[int, int], None] | None, timeout: float) -> int:
    """Pull every chunk into ``fd`` through an ephemeral no-ack consumer; bytes written."""
    nc = natscompat.js_client(js)
    stream, consumer = _stream(info.bucket), _nuid.next().decode()
    config = ConsumerConfig(name=consumer, ack_policy=AckPolicy.NONE, mem_storage=True,
                            filter_subject=_chunks_subject(info.bucket, info.nuid),
                            num_replicas=1, inactive_threshold=max(30.0, 3 * timeout))
    fetch = None
    if FAST_RECEIVE and info.size >= DIRECT_MIN_BYTES:
        try:
            fetch = bulkfetch.Fetch(bulkfetch.dial_from(nc), nc.new_inbox(),
                                    name=f"sy-transfer-{consumer}")
        except bulkfetch.DirectReadUnavailable as exc:
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
                         subject=f"{natscompat.js_api_prefix(js)}.CONSUMER.MSG.NEXT."
                                 f"{stream}.{consumer}",
                         window=max(2, WINDOW_BYTES // max_chunk))
            if fetch is not None:
                try:
                    return await _receive_direct(fetch, pull, fd, h, progress, timeout)
                except bulkfetch.DirectReadUnavailable as exc:  # nothing was pulled yet
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
    ``bulkfetch.DirectReadUnavailable`` before any chunk was pulled if it cannot be used."""
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
        kind = _NotYetServed if _not_yet_served(str(exc), fetch.received) else TransferStalled
        raise kind(info.bucket, info.name, f"server ended the read: {exc}") from exc


async def _receive_nats_py(nc: NATS, pull: _Pull, fd: int, h: Any,
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
