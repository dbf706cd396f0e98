"""Upload a file as an object: windowed publishes, reading and hashing ahead in a thread.

nats-py's ``ObjectStore.put`` acks chunk by chunk, one round trip each.  ``put_file``
keeps ``WINDOW_BYTES`` of chunk publishes un-acked while a worker thread reads and hashes
the next ``BLOCK_BYTES`` ahead, and writes the meta data last, so a reader never sees a
half-written object; a failed upload purges the chunks it sent.  It records both
digests in one pass: SHA-256 (the layout's) and BLAKE3 (what ``get_file`` checks, see
``download``).  Every wait is bounded: no ack for ``timeout`` raises ``TransferStalled``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import anyio
import blake3
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from nodes.runtime import natscompat
from nodes.runtime.transfer.layout import (
    _DIGEST_PREFIX,
    _ENCODER,
    _ROLLUP,
    BLAKE3_KEY,
    DEFAULT_TIMEOUT,
    CorruptObject,
    StoredObject,
    TransferStalled,
    _check,
    _chunks_subject,
    _Flow,
    _Info,
    _meta_subject,
    _nats_errors,
    _nuid,
    _Options,
    _read_info,
    _status,
    _stored,
    _stream,
    _task_group,
    ensure_bucket,
)
from protocol.errors import BadRequest, NotFound

DEFAULT_CHUNK_SIZE = 256 * 1024  # 2x nats-py's: fewer messages, far under max_payload (1 MiB)
WINDOW_BYTES = 8 << 20  # most bytes of chunks published but not yet acked
BLOCK_BYTES = 2 << 20  # bytes read (and hashed) per worker-thread hop
_ACK = msgspec.json.Decoder(dict[str, Any])  # {"stream", "seq"} or {"error": {...}}

OnProgress = Callable[[int, int], Awaitable[None]]  # (bytes sent, the file's size)


class _BothHashes:
    """SHA-256 (the Object Store digest) and BLAKE3 (what ``get_file`` checks) in one
    pass; each ``update`` releases the GIL for big buffers."""

    def __init__(self) -> None:
        self.sha256, self.blake3 = hashlib.sha256(), blake3.blake3()

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.blake3.update(data)


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


async def _publish_chunks(nc: NATS, acks: _Acks, subject: str, f: IO[bytes],
                          chunk_size: int, h: Any, timeout: float,
                          on_progress: OnProgress | None = None) -> tuple[int, int]:
    """Publish the file as chunks, ``WINDOW_BYTES`` un-acked at most; (size, chunks).
    ``on_progress`` hears the bytes sent after each chunk."""
    total = os.fstat(f.fileno()).st_size if on_progress is not None else 0
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
                    if on_progress is not None:
                        await on_progress(size, max(total, size))
            block = ahead[0]
        while acks.count < sent:
            await acks.wait(timeout, f"the ack for chunk {acks.count + 1}")
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()
    return size, sent


async def put_file(js: JetStreamContext, bucket: str, name: str, path: Path, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, meta: dict[str, str] | None = None,
                   replicas: int = 1, timeout: float = DEFAULT_TIMEOUT,
                   on_progress: OnProgress | None = None) -> StoredObject:
    """Store the file at ``path`` as object ``name``, creating the bucket if needed and
    replacing (and purging) an object of the same name.  ``on_progress(sent, size)`` is
    awaited after each chunk is sent, with the bytes sent so far and the file's size.

    Raises ``BadRequest`` for a bad bucket or empty name, a chunk size over the server's
    max payload or ``meta`` using the reserved key ``BLAKE3_KEY``; ``TransferStalled`` if
    the server refuses a chunk or stops answering (the chunks already sent are purged);
    ``OSError`` if the file cannot be read.
    """
    _check(bucket, name)
    nc = natscompat.js_client(js)
    if not 0 < chunk_size <= nc.max_payload:
        raise BadRequest(f"chunk_size {chunk_size} must be in 1..{nc.max_payload}")
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
            size, chunks = await _publish_chunks(nc, _Acks(bucket, name), subject, f.wrapped,
                                                 chunk_size, h, timeout, on_progress)
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
