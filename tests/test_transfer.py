"""nodes.runtime.transfer against a real nats-server: round trips, replacement, integrity
checks that leave ``dest`` untouched, stalls that fail instead of hanging, and
interoperability with nats-py's own Object Store.  ``get_file`` is checked on both receive
paths: the direct one (``bulkfetch``: its own connection and threads, with the client's
credentials and TLS) and the nats-py subscription it falls back to."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import blake3
import nats.js.errors
import nkeys
import pytest
import structlog.testing
from nats.js import JetStreamContext

from nodes.runtime import bulkfetch, transfer
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from nodes.runtime.transfer import (
    CorruptObject,
    TransferError,
    TransferStalled,
    download,
    get_file,
    put_file,
    stat,
    upload,
)
from protocol.errors import BadRequest, NotFound

CHUNK = 64 * 1024
STREAM = "OBJ_files"


@asynccontextmanager
async def jetstream(settings: NatsSettings, timeout: float = 5.0) -> AsyncIterator[Any]:
    nc = await connect(settings, name="test-transfer")
    try:
        yield nc.jetstream(timeout=timeout)
    finally:
        await nc.close()


def write(path: Path, size: int, seed: int = 0) -> bytes:
    data = hashlib.shake_256(f"{seed}".encode()).digest(size) if size else b""
    path.write_bytes(data)
    return data


def leftovers(directory: Path) -> list[str]:
    """Files beside ``dest`` other than ``dest`` itself (a partial temp file would show)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "dest.bin")


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sy-transfer-")]


class Fetches:
    """Outcomes of the direct receive path (``bulkfetch.Fetch.run``) in this test: "ok" or
    the exception's class name.  The real function runs; this only records."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []


@pytest.fixture
def fetches(monkeypatch: Any) -> Fetches:
    record = Fetches()
    real = bulkfetch.Fetch.run

    async def recording(self: bulkfetch.Fetch, job: bulkfetch.Job, progress: Any = None) -> int:
        try:
            written = await real(self, job, progress)
        except BaseException as exc:
            record.outcomes.append(type(exc).__name__)
            raise
        record.outcomes.append("ok")
        return written

    monkeypatch.setattr(bulkfetch.Fetch, "run", recording)
    return record


@pytest.fixture(autouse=True)
def direct_for_small_objects(monkeypatch: Any) -> None:
    """The direct path normally starts at 1 MiB; these tests use small objects."""
    monkeypatch.setattr(download, "DIRECT_MIN_BYTES", 0)


@pytest.fixture(params=["direct", "nats-py"])
def receive(request: Any, monkeypatch: Any, fetches: Fetches) -> str:
    """Run the test on both receive paths (``FAST_RECEIVE``)."""
    monkeypatch.setattr(download, "FAST_RECEIVE", request.param == "direct")
    return str(request.param)


@pytest.mark.parametrize(("size", "chunks"), [
    (0, 0),                     # empty: no chunks at all
    (1000, 1),                  # smaller than one chunk
    (CHUNK * 3, 3),             # an exact multiple
    (CHUNK * 40 + 123, 41),     # many chunks, a short last one, several write batches
])
async def test_round_trip_returns_identical_bytes(settings: NatsSettings, tmp_path: Path,
                                                  size: int, chunks: int, receive: str,
                                                  fetches: Fetches) -> None:
    """What put_file stores, get_file writes back byte for byte, with matching meta, on
    either receive path (an empty object has no chunks to receive)."""
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    data = write(src, size)
    async with jetstream(settings) as js:
        stored = await put_file(js, "files", "bundle.tar", src, chunk_size=CHUNK,
                                meta={"project": "demo"})
        got = await get_file(js, "files", "bundle.tar", dest)
        info = await stat(js, "files", "bundle.tar")
    assert dest.read_bytes() == data
    assert stored == got == info
    assert (stored.size, stored.chunks) == (size, chunks)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.blake3 == blake3.blake3(data).hexdigest()
    assert stored.meta == {"project": "demo"}
    assert fetches.outcomes == (["ok"] if receive == "direct" and chunks else [])
    assert fetch_threads() == []


async def test_default_chunk_size_and_expected_digest(settings: NatsSettings,
                                                      tmp_path: Path) -> None:
    """The default chunk size round-trips, and a matching expected_sha256 is accepted."""
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    data = write(src, 3 * transfer.DEFAULT_CHUNK_SIZE + 7)
    async with jetstream(settings) as js:
        stored = await put_file(js, "files", "big", src)
        await get_file(js, "files", "big", dest, expected_sha256=stored.sha256.upper())
    assert stored.chunks == 4 and dest.read_bytes() == data


async def test_replacing_an_object_purges_its_old_chunks(settings: NatsSettings,
                                                         tmp_path: Path) -> None:
    """Re-using a name serves the new bytes and leaves no chunk of the old object."""
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    write(src, CHUNK * 3, seed=1)
    async with jetstream(settings) as js:
        first = await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        data = write(src, CHUNK + 5, seed=2)
        second = await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await get_file(js, "files", "obj", dest)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg(STREAM, f"$O.files.C.{first.nuid}")
        state = (await js.stream_info(STREAM)).state
    assert dest.read_bytes() == data and second.nuid != first.nuid
    assert state.messages == second.chunks + 1  # the new chunks and one meta message


async def test_missing_objects_and_buckets_raise_not_found(settings: NatsSettings,
                                                           tmp_path: Path) -> None:
    """A missing object (or bucket, or a deleted object) is NotFound naming both; no file
    is created."""
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    write(src, 10)
    async with jetstream(settings) as js:
        with pytest.raises(NotFound, match="bucket not found: object 'x' in bucket 'nope'"):
            await get_file(js, "nope", "x", dest)
        await put_file(js, "files", "there", src)
        with pytest.raises(NotFound, match="object not found: object 'x' in bucket 'files'"):
            await get_file(js, "files", "x", dest)
        stored = await stat(js, "files", "there")
        await transfer.delete(js, "files", "there")
        with pytest.raises(NotFound, match="'there' in bucket 'files' was deleted"):
            await stat(js, "files", "there")
        with pytest.raises(NotFound):
            await transfer.delete(js, "files", "there")
        with pytest.raises(nats.js.errors.NotFoundError):  # chunks purged
            await js.get_last_msg(STREAM, f"$O.files.C.{stored.nuid}")
    assert not dest.exists()


async def test_bad_arguments_raise_bad_request(settings: NatsSettings, tmp_path: Path) -> None:
    """A bad bucket name, an empty object name or an oversized chunk is refused up front."""
    src = tmp_path / "src.bin"
    write(src, 10)
    async with jetstream(settings) as js:
        with pytest.raises(BadRequest, match="bucket name"):
            await put_file(js, "a.b", "x", src)
        with pytest.raises(BadRequest, match="must not be empty"):
            await put_file(js, "files", "", src)
        with pytest.raises(BadRequest, match="chunk_size"):
            await put_file(js, "files", "x", src, chunk_size=2 << 20)
        with pytest.raises(BadRequest, match="meta key 'sy-blake3' is reserved"):
            await put_file(js, "files", "x", src, meta={transfer.BLAKE3_KEY: "x"})


async def test_links_are_refused(settings: NatsSettings, tmp_path: Path) -> None:
    """An Object Store link (written by Go clients) is a BadRequest, not a corrupt object."""
    link = {"name": "l", "bucket": "files", "nuid": "", "size": 0, "chunks": 0,
            "mtime": "2025-01-01T00:00:00Z", "options": {"link": {"bucket": "files",
                                                                  "name": "obj"}}}
    async with jetstream(settings) as js:
        await transfer.ensure_bucket(js, "files")
        await js.publish("$O.files.M." + base64.urlsafe_b64encode(b"l").decode(),
                         json.dumps(link).encode(), headers={"Nats-Rollup": "sub"})
        with pytest.raises(BadRequest, match="'l' in bucket 'files' is a link"):
            await get_file(js, "files", "l", tmp_path / "dest.bin")
    assert not (tmp_path / "dest.bin").exists()


async def _chunk_seqs(js: JetStreamContext) -> list[int]:
    """Stream sequences of the chunks in OBJ_files (the tests' buckets hold one object)."""
    last = (await js.stream_info(STREAM)).state.last_seq
    seqs = []
    for seq in range(1, last + 1):
        try:
            msg = await js.get_msg(STREAM, seq)
        except nats.js.errors.NotFoundError:
            continue
        if ".C." in (msg.subject or ""):
            seqs.append(seq)
    return seqs


async def _rewrite_meta(js: JetStreamContext, **changes: Any) -> None:
    subject = "$O.files.M." + base64.urlsafe_b64encode(b"obj").decode()
    info = json.loads((await js.get_last_msg(STREAM, subject)).data or b"")
    await js.publish(subject, json.dumps({**info, **changes}).encode(),
                     headers={"Nats-Rollup": "sub"})


async def _alter_chunk(js: JetStreamContext) -> None:
    seqs = await _chunk_seqs(js)
    msg = await js.get_msg(STREAM, seqs[1])
    await js.delete_msg(STREAM, seqs[1])
    await js.publish(msg.subject or "", bytes(b ^ 1 for b in msg.data or b""))


async def _drop_middle_chunk(js: JetStreamContext) -> None:
    await js.delete_msg(STREAM, (await _chunk_seqs(js))[2])


async def _drop_last_chunk(js: JetStreamContext) -> None:
    await js.delete_msg(STREAM, (await _chunk_seqs(js))[-1])


async def _append_chunk(js: JetStreamContext) -> None:
    msg = await js.get_msg(STREAM, (await _chunk_seqs(js))[0])
    await js.publish(msg.subject or "", b"extra")


async def _wrong_digest(js: JetStreamContext) -> None:
    await _rewrite_meta(js, metadata={transfer.BLAKE3_KEY: blake3.blake3(b"other").hexdigest()})


async def _malformed_digest(js: JetStreamContext) -> None:
    await _rewrite_meta(js, metadata={transfer.BLAKE3_KEY: "not hex"})


async def _wrong_size(js: JetStreamContext) -> None:
    await _rewrite_meta(js, size=CHUNK * 5)


async def _more_chunks_in_meta(js: JetStreamContext) -> None:
    await _rewrite_meta(js, chunks=6, size=CHUNK * 6)


async def _smaller_max_chunk_in_meta(js: JetStreamContext) -> None:
    await _rewrite_meta(js, options={"max_chunk_size": 1000})


@pytest.mark.parametrize(("tamper", "problem"), [
    (_alter_chunk, "BLAKE3 mismatch"),
    (_drop_middle_chunk, "truncated: meta says 5 chunks, 4 are stored"),
    (_drop_last_chunk, "truncated: meta says 5 chunks, 4 are stored"),
    (_more_chunks_in_meta, "truncated: meta says 6 chunks, 5 are stored"),
    (_append_chunk, "extra chunks: meta says 5 chunks, 6 are stored"),
    (_wrong_digest, "BLAKE3 mismatch"),
    (_malformed_digest, "meta has no valid BLAKE3 digest: 'not hex'"),
    (_wrong_size, "size mismatch: meta says 327680, 327590 arrived"),
    (_smaller_max_chunk_in_meta, "chunk 1 has 65536 bytes, more than the meta's max_chunk_size"),
], ids=["altered-chunk", "dropped-middle-chunk", "dropped-last-chunk", "meta-more-chunks",
        "appended-chunk", "meta-wrong-digest", "meta-malformed-digest", "meta-wrong-size",
        "meta-smaller-max-chunk"])
async def test_tampered_objects_fail_and_leave_dest_untouched(
        settings: NatsSettings, tmp_path: Path,
        tamper: Callable[[JetStreamContext], Awaitable[None]], problem: str,
        receive: str) -> None:
    """An altered, removed or extra chunk, or meta that lies about size, chunk count or
    digest, raises CorruptObject on either path; dest keeps its old bytes and no temp
    file remains."""
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, CHUNK * 5 - 90)
    out.mkdir()
    dest = out / "dest.bin"
    dest.write_bytes(b"previous contents")
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await tamper(js)
        with pytest.raises(CorruptObject, match=problem) as caught:
            await get_file(js, "files", "obj", dest)
    assert isinstance(caught.value, TransferError)
    assert caught.value.details["bucket"] == "files" and caught.value.details["name"] == "obj"
    assert dest.read_bytes() == b"previous contents"
    assert leftovers(out) == [] and fetch_threads() == []


async def test_a_caller_trusting_only_sha256_gets_the_bytes_checked_with_it(
        settings: NatsSettings, tmp_path: Path, receive: str) -> None:
    """Altered bytes whose meta BLAKE3 was rewritten to match pass a BLAKE3 check, so a
    caller that names only a SHA-256 gets SHA-256 over the bytes, and the change is
    caught; naming the original BLAKE3 catches it before any byte moves."""
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, CHUNK * 5 - 90)
    out.mkdir()
    dest = out / "dest.bin"
    async with jetstream(settings) as js:
        stored = await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await _alter_chunk(js)
        data = src.read_bytes()  # _alter_chunk re-publishes chunk 2, flipped, last
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
        altered = b"".join([chunks[0], *chunks[2:], bytes(x ^ 1 for x in chunks[1])])
        await _rewrite_meta(js, metadata={transfer.BLAKE3_KEY: blake3.blake3(altered).hexdigest()})
        with pytest.raises(CorruptObject, match="SHA-256 mismatch"):
            await get_file(js, "files", "obj", dest, expected_sha256=stored.sha256)
        with pytest.raises(CorruptObject, match=f"BLAKE3 is .*, expected {stored.blake3}"):
            await get_file(js, "files", "obj", dest, expected_sha256=stored.sha256,
                           expected_blake3=stored.blake3)
        # Without expectations the meta is all there is, and the bytes do match it.
        got = await get_file(js, "files", "obj", dest)
    assert dest.read_bytes() == altered and got.blake3 != stored.blake3
    assert leftovers(out) == []


async def test_unexpected_digest_is_refused_before_any_bytes_move(
        settings: NatsSettings, tmp_path: Path) -> None:
    """expected_sha256 that differs from the stored digest fails fast; dest not created."""
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    write(src, 100)
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src)
        with pytest.raises(CorruptObject, match="expected " + "0" * 64):
            await get_file(js, "files", "obj", dest, expected_sha256="0" * 64)
        with pytest.raises(CorruptObject, match="BLAKE3 is [0-9a-f]{64}, expected " + "1" * 64):
            await get_file(js, "files", "obj", dest, expected_blake3="1" * 64)
    assert not dest.exists()


async def test_progress_reports_monotonic_bytes_up_to_the_size(settings: NatsSettings,
                                                               tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    """progress(bytes_written, size) rises strictly, batch by batch, and ends at size."""
    monkeypatch.setattr(download, "BLOCK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(download, "WINDOW_BYTES", 4 * CHUNK)  # so batches stay small
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    size = CHUNK * 30 + 1
    write(src, size)
    calls: list[tuple[int, int]] = []
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await get_file(js, "files", "obj", dest, progress=lambda *a: calls.append(a))
    done = [n for n, _ in calls]
    assert len(calls) >= 8 and {t for _, t in calls} == {size}
    assert done == sorted(set(done)) and done[-1] == size


async def test_a_stalled_get_fails_instead_of_hanging(nats_server: EmbeddedNats,
                                                      settings: NatsSettings, tmp_path: Path,
                                                      monkeypatch: Any, receive: str) -> None:
    """When the server stops delivering mid-transfer (SIGSTOP), get_file raises
    TransferStalled after ``timeout`` (plus at most ``timeout`` more to give up deleting
    the consumer on the frozen server) and removes its partial file."""
    monkeypatch.setattr(download, "BLOCK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(download, "WINDOW_BYTES", 4 * CHUNK)
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, CHUNK * 20)
    out.mkdir()
    assert nats_server.proc is not None
    pid = nats_server.proc.pid

    frozen: list[float] = []

    def freeze(done: int, total: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        frozen.append(time.monotonic())

    async with jetstream(settings, timeout=0.5) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        try:
            with pytest.raises(TransferStalled, match=r"stalled: chunk \d+ of 20 did not arrive"):
                await get_file(js, "files", "obj", out / "dest.bin", progress=freeze,
                               timeout=0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
    assert time.monotonic() - frozen[0] < 2.5
    assert leftovers(out) == [] and not (out / "dest.bin").exists()
    assert fetch_threads() == []


async def test_a_consumer_deleted_mid_get_ends_it_with_the_servers_status(
        settings: NatsSettings, tmp_path: Path, monkeypatch: Any, receive: str) -> None:
    """If the read's consumer disappears mid-transfer, get_file fails with
    TransferStalled on either path: the server's status (409 for waiting pulls, 503 "no
    responders" for a pull sent after) or, for a pull it swallowed, the stall timeout.
    No temp file remains.  (512-byte chunks, two in flight: the read takes far longer
    than the delete.)"""
    monkeypatch.setattr(download, "BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(download, "WINDOW_BYTES", 1 << 10)
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, 3000 * 512)
    out.mkdir()
    async with jetstream(settings) as js, anyio.create_task_group() as tg:
        await put_file(js, "files", "obj", src, chunk_size=512)

        async def delete_the_consumer(names: list[str]) -> None:
            for name in names or [c.name for c in await js.consumers_info(STREAM)]:
                await js.delete_consumer(STREAM, name)

        deleting: list[bool] = []

        def on_progress(done: int, total: int) -> None:
            if not deleting:  # the direct path's thread is named after the consumer
                names = [t.name.split("-")[2] for t in fetch_threads() if t.name.count("-") == 2]
                tg.start_soon(delete_the_consumer, names)
                deleting.append(True)

        with pytest.raises(TransferStalled, match=r"server ended the read: status (409|503)"
                                                  r"|stalled: chunk"):
            await get_file(js, "files", "obj", out / "dest.bin", progress=on_progress,
                           timeout=1.0)
    assert leftovers(out) == [] and fetch_threads() == []


async def test_durable_get_writes_the_same_bytes(settings: NatsSettings, tmp_path: Path,
                                                 receive: str) -> None:
    """durable=True (fsync of file and directory) changes nothing but durability."""
    src, out = tmp_path / "src.bin", tmp_path / "out"
    data = write(src, CHUNK * 3 + 1)
    out.mkdir()
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await get_file(js, "files", "obj", out / "dest.bin", durable=True)
    assert (out / "dest.bin").read_bytes() == data and leftovers(out) == []


async def test_a_stalled_put_fails_instead_of_hanging(nats_server: EmbeddedNats,
                                                      settings: NatsSettings, tmp_path: Path,
                                                      monkeypatch: Any) -> None:
    """When acks stop arriving mid-upload (server SIGSTOPped), put_file raises
    TransferStalled after ``timeout``."""
    monkeypatch.setattr(upload, "BLOCK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(upload, "WINDOW_BYTES", 4 * CHUNK)
    src = tmp_path / "src.bin"
    write(src, CHUNK * 20)
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    read_block = upload._read_block
    blocks = 0

    def read_then_freeze(*args: Any) -> list[bytes]:
        nonlocal blocks
        blocks += 1
        if blocks == 3:
            os.kill(pid, signal.SIGSTOP)
        return read_block(*args)

    monkeypatch.setattr(upload, "_read_block", read_then_freeze)
    async with jetstream(settings, timeout=0.5) as js:
        try:
            with pytest.raises(TransferStalled, match=r"stalled: the ack for chunk \d+ did not"):
                await put_file(js, "files", "obj", src, chunk_size=CHUNK, timeout=0.5)
        finally:
            os.kill(pid, signal.SIGCONT)


async def test_nats_py_object_store_reads_what_put_file_stores(settings: NatsSettings,
                                                               tmp_path: Path) -> None:
    """put_file's layout is the Object Store's: nats-py's ObjectStore.get returns the same
    bytes and verifies the same digest."""
    src = tmp_path / "src.bin"
    data = write(src, CHUNK * 7 + 3)
    async with jetstream(settings) as js:
        stored = await put_file(js, "files", "dir/obj.tar", src, chunk_size=CHUNK)
        store = await js.object_store("files")
        sink = io.BytesIO()
        result = await store.get("dir/obj.tar", writeinto=sink)
    assert sink.getvalue() == data
    assert (result.info.size, result.info.chunks, result.info.nuid) == (
        stored.size, stored.chunks, stored.nuid)


async def test_get_file_reads_what_nats_py_object_store_stores(settings: NatsSettings,
                                                               tmp_path: Path) -> None:
    """Objects written by nats-py's ObjectStore.put (128 KiB chunks) read back intact."""
    dest = tmp_path / "dest.bin"
    data = hashlib.shake_256(b"nats-py").digest(300_000)
    async with jetstream(settings) as js:
        store = await js.create_object_store("files")
        await store.put("obj", data)
        got = await get_file(js, "files", "obj", dest)
    assert dest.read_bytes() == data
    assert (got.size, got.chunks, got.sha256) == (len(data), 3, hashlib.sha256(data).hexdigest())
    assert got.blake3 == ""


async def test_objects_without_blake3_are_checked_with_sha256(
        settings: NatsSettings, tmp_path: Path, receive: str) -> None:
    """An object stored by nats-py carries only SHA-256: altered bytes are caught with it,
    and a caller expecting a BLAKE3 is told there is none to compare."""
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "dest.bin"
    data = hashlib.shake_256(b"nats-py").digest(300_000)
    async with jetstream(settings) as js:
        store = await js.create_object_store("files")
        await store.put("obj", data)
        want = blake3.blake3(data).hexdigest()
        with pytest.raises(CorruptObject, match="BLAKE3 is not recorded, expected"):
            await get_file(js, "files", "obj", dest, expected_blake3=want)
        seqs = await _chunk_seqs(js)
        msg = await js.get_msg(STREAM, seqs[1])
        await js.delete_msg(STREAM, seqs[1])
        await js.publish(msg.subject or "", bytes(b ^ 1 for b in msg.data or b""))
        with pytest.raises(CorruptObject, match="SHA-256 mismatch"):
            await get_file(js, "files", "obj", dest)
    assert leftovers(out) == []


# -- the direct receive path: cancellation, fallback, credentials ---------------------


async def test_cancelling_a_get_mid_transfer_leaves_no_thread_or_temp_file(
        settings: NatsSettings, tmp_path: Path, monkeypatch: Any, fetches: Fetches) -> None:
    """Cancelling get_file while chunks flow ends the receive threads before get_file
    returns, removes the partial file and leaves dest untouched."""
    monkeypatch.setattr(download, "BLOCK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(download, "WINDOW_BYTES", 4 * CHUNK)
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, CHUNK * 40)
    out.mkdir()
    (out / "dest.bin").write_bytes(b"previous contents")
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        with anyio.CancelScope() as scope:
            await get_file(js, "files", "obj", out / "dest.bin",
                           progress=lambda done, total: scope.cancel())
        assert scope.cancelled_caught
        assert fetch_threads() == []
        assert (await js.stream_info(STREAM)).state.consumer_count == 0
    assert fetches.outcomes == ["CancelledError"]
    assert leftovers(out) == [] and (out / "dest.bin").read_bytes() == b"previous contents"


async def test_cancelling_a_stalled_get_unblocks_its_thread_at_once(
        nats_server: EmbeddedNats, settings: NatsSettings, tmp_path: Path,
        monkeypatch: Any) -> None:
    """With the server frozen the receive thread sits in a blocking recv; cancelling
    get_file shuts its socket down from the event loop, so the threads end at once, long
    before the stall timeout, and no temp file remains."""
    monkeypatch.setattr(download, "BLOCK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(download, "WINDOW_BYTES", 4 * CHUNK)
    src, out = tmp_path / "src.bin", tmp_path / "out"
    write(src, CHUNK * 40)
    out.mkdir()
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    threads: list[threading.Thread] = []
    ended_after: list[float] = []

    async def thaw_when_threads_end(deadline: float) -> None:
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join, 10.0)
        ended_after.append(anyio.current_time() - deadline)
        os.kill(pid, signal.SIGCONT)  # so the consumer can be deleted

    async with jetstream(settings) as js, anyio.create_task_group() as tg:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)

        def freeze_then_cancel_soon(done: int, total: int) -> None:
            if not threads:
                threads.extend(fetch_threads())
                os.kill(pid, signal.SIGSTOP)
                scope.deadline = anyio.current_time() + 0.2  # the caller gives up
                tg.start_soon(thaw_when_threads_end, scope.deadline)

        try:
            with anyio.CancelScope() as scope:
                await get_file(js, "files", "obj", out / "dest.bin",
                               progress=freeze_then_cancel_soon, timeout=10.0)
        finally:
            os.kill(pid, signal.SIGCONT)
    assert scope.cancelled_caught and len(threads) == 2  # receiver and hasher
    assert ended_after[0] < 1.0 and not any(t.is_alive() for t in threads)
    assert fetch_threads() == [] and leftovers(out) == []


async def test_fallback_path_when_direct_receive_is_off(settings: NatsSettings,
                                                        tmp_path: Path, monkeypatch: Any,
                                                        fetches: Fetches) -> None:
    """FAST_RECEIVE = False keeps every byte on the nats-py subscription."""
    monkeypatch.setattr(download, "FAST_RECEIVE", False)
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    data = write(src, CHUNK * 9 + 1)
    async with jetstream(settings) as js:
        await put_file(js, "files", "obj", src, chunk_size=CHUNK)
        await get_file(js, "files", "obj", dest)
    assert dest.read_bytes() == data and fetches.outcomes == []


async def test_small_objects_skip_the_extra_connection(settings: NatsSettings,
                                                        tmp_path: Path, monkeypatch: Any,
                                                        fetches: Fetches) -> None:
    """Below DIRECT_MIN_BYTES get_file stays on the nats-py connection; from it on, the
    direct path is used."""
    monkeypatch.setattr(download, "DIRECT_MIN_BYTES", CHUNK * 4)
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    async with jetstream(settings) as js:
        for size in (CHUNK * 4 - 1, CHUNK * 4):
            data = write(src, size)
            await put_file(js, "files", "obj", src, chunk_size=CHUNK)
            await get_file(js, "files", "obj", dest)
            assert dest.read_bytes() == data
    assert fetches.outcomes == ["ok"]


async def test_falls_back_to_nats_py_when_the_server_refuses_a_second_connection(
        tmp_path: Path, fetches: Fetches) -> None:
    """A server that allows one connection refuses the direct path's own: get_file logs
    why and receives the object over the nats-py connection instead."""
    conf = tmp_path / "one.conf"
    conf.write_text("max_connections: 1\n")
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None,
                          extra_args=["-c", str(conf)])
    await server.astart()
    try:
        src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
        data = write(src, CHUNK * 5)
        async with jetstream(NatsSettings(servers=(server.url,))) as js:
            await put_file(js, "files", "obj", src, chunk_size=CHUNK)
            with structlog.testing.capture_logs() as logs:
                await get_file(js, "files", "obj", dest)
    finally:
        await server.astop()
    assert dest.read_bytes() == data and fetches.outcomes == ["DirectReadUnavailable"]
    [line] = [e for e in logs if e["event"].startswith("direct receive unavailable")]
    assert "maximum connections exceeded" in line["reason"]


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    assert shutil.which("openssl"), "the openssl command makes this test's certificate"
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def _nkey_user(directory: Path) -> tuple[str, Path]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed_file = directory / "user.nk"
    seed_file.write_bytes(seed)
    return nkeys.from_seed(bytearray(seed)).public_key.decode(), seed_file


def _secured(kind: str, directory: Path) -> tuple[list[str], dict[str, Any]]:
    """Server arguments and the matching client settings for one kind of security."""
    if kind == "user-password":
        return ["--user", "u", "--pass", "p"], {"user": "u", "password": "p"}
    if kind == "token":
        return ["--auth", "s3cret"], {"token": "s3cret"}
    if kind == "nkey":
        public, seed_file = _nkey_user(directory)
        conf = directory / "nkey.conf"
        conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
        return ["-c", str(conf)], {"nkey_seed_file": str(seed_file)}
    cert, key = _self_signed_cert(directory)  # TLS, plus a password
    return (["--tls", "--tlscert", str(cert), "--tlskey", str(key), "--user", "u",
             "--pass", "p"], {"tls_ca_file": str(cert), "user": "u", "password": "p"})


@pytest.mark.parametrize("kind", ["user-password", "token", "nkey", "tls"])
async def test_direct_receive_uses_the_clients_credentials(tmp_path: Path, kind: str,
                                                           fetches: Fetches) -> None:
    """Against a server that demands a password, a token, a signed nkey nonce or TLS,
    the direct path connects with the nats-py client's own options and succeeds."""
    args, options = _secured(kind, tmp_path)
    server = EmbeddedNats(tmp_path / "nats", port=-1, monitor_port=None, extra_args=args)
    await server.astart()
    try:
        src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
        data = write(src, CHUNK * 6 + 5)
        async with jetstream(NatsSettings(servers=(server.url,), **options)) as js:
            await put_file(js, "files", "obj", src, chunk_size=CHUNK)
            await get_file(js, "files", "obj", dest)
    finally:
        await server.astop()
    assert dest.read_bytes() == data and fetches.outcomes == ["ok"]
