"""The one frame layout between shipyard and the processes that run user code.

A frame is a 9-byte header -- message kind (1 byte), metadata length, blob length (4
bytes each, big-endian) -- then the metadata as compact UTF-8 JSON, then the blob: raw
bytes carried as they are (a job's output, its report, a request's payload, a reply's
body), never escaped or base64-encoded.

Both ends use this module: inside a user's interpreter it is loaded with the rest of the
sandbox (standard library only), and the engine and API worker import it as
``nodes.sandbox.frames`` to write frames; they decode the metadata with msgspec into the
same dataclasses (``messages``), so what crosses the pipe is typed and checked on the
shipyard side.  Both ends always run the same code: no compatibility rules here.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

HEAD = struct.Struct(">BII")  # kind, metadata length, blob length
MAX_FRAME = 256 * 1024 * 1024  # a length past this is a broken stream, not a frame

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode


class FrameError(Exception):
    """The stream does not hold frames: a bad header, kind or body."""


def pack(kind: int, meta: bytes, blob: bytes = b"") -> bytes:
    """One frame from its parts (the metadata already JSON)."""
    return HEAD.pack(kind, len(meta), len(blob)) + meta + blob


def encode(msg: Any) -> bytes:
    """One frame holding ``msg``, a message dataclass (``messages``)."""
    blob_field = msg.BLOB
    meta = dict(msg.__dict__)
    blob = meta.pop(blob_field) if blob_field else b""
    return pack(msg.KIND, _dumps(meta).encode(), blob)


def sizes(head: bytes) -> tuple[int, int, int]:
    """(kind, metadata length, blob length) of a frame header; ``FrameError`` if the
    lengths are absurd."""
    kind, n_meta, n_blob = HEAD.unpack(head)
    if n_meta + n_blob > MAX_FRAME:
        raise FrameError(f"frame of {n_meta + n_blob} bytes is over the limit of {MAX_FRAME}")
    return kind, n_meta, n_blob


def decode(kinds: dict[int, Any], kind: int, meta: bytes, blob: bytes) -> Any:
    """The message in a frame, with the standard library (the sandbox side)."""
    cls = kinds.get(kind)
    if cls is None:
        raise FrameError(f"unknown frame kind {kind}")
    try:
        fields = json.loads(meta)
        if cls.BLOB:
            fields[cls.BLOB] = blob
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise FrameError(f"bad {cls.__name__} frame: {exc}") from None


def split(data: bytes) -> tuple[int, bytes, bytes]:
    """(kind, metadata, blob) of one whole frame."""
    kind, n_meta, n_blob = sizes(data[:HEAD.size])
    end = HEAD.size + n_meta
    if len(data) != end + n_blob:
        raise FrameError("truncated frame")
    return kind, data[HEAD.size:end], data[end:]


class Deframer:
    """Accumulates bytes; yields (kind, metadata, blob) of each complete frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= HEAD.size:
            kind, n_meta, n_blob = sizes(bytes(buf[pos:pos + HEAD.size]))
            end = pos + HEAD.size + n_meta + n_blob
            if len(buf) < end:
                break
            meta_end = pos + HEAD.size + n_meta
            out.append((kind, bytes(buf[pos + HEAD.size:meta_end]), bytes(buf[meta_end:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def read_exactly(fd: int, n: int) -> bytes:
    """``n`` bytes from a blocking ``fd``; ``EOFError`` if it closes first."""
    if n == 0:
        return b""
    chunk = os.read(fd, n)
    if len(chunk) == n:
        return chunk
    buf = bytearray(chunk)
    while len(buf) < n:
        if not chunk:
            raise EOFError
        chunk = os.read(fd, n - len(buf))
        buf += chunk
    return bytes(buf)


def read_frame(fd: int) -> tuple[int, bytes, bytes]:
    """The next frame on a blocking ``fd``; ``EOFError`` at its end."""
    kind, n_meta, n_blob = sizes(read_exactly(fd, HEAD.size))
    body = read_exactly(fd, n_meta + n_blob)
    return kind, body[:n_meta], body[n_meta:]


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
