"""Length-prefixed msgpack frames between a node and the processes it starts.

One format for every such pipe (the flow engine's fork server and jobs, the API node's
workers): a 4-byte big-endian length, then the msgpack body of one tagged, frozen
``msgspec.Struct``.  Both ends always run the same code, so the frames follow no
compatibility rules, unlike ``protocol/``; what they carry is typed, never positional.
Kept to the standard library and msgspec: worker processes import it on their start-up
path.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a length past this is a broken stream, not a frame

_encoder = msgspec.msgpack.Encoder()


class FrameError(Exception):
    """The stream does not hold frames: a bad length or an undecodable body."""


def frame(msg: Any) -> bytes:
    """One frame: the length, then ``msg`` encoded with msgpack."""
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def length(head: bytes) -> int:
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes is over the limit of {MAX_FRAME}")
    return int(n)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; ``asyncio.IncompleteReadError`` at the end of the stream."""
    return await reader.readexactly(length(await reader.readexactly(HEADER.size)))


class Deframer:
    """Accumulates bytes; yields complete frame bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            n = length(bytes(self._buf[:HEADER.size]))
            if len(self._buf) < HEADER.size + n:
                break
            out.append(bytes(self._buf[HEADER.size:HEADER.size + n]))
            del self._buf[:HEADER.size + n]
        return out
