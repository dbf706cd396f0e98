"""Control frames between an API node and its worker processes (one Unix socket each).

Requests never travel here: every worker joins the services' queue groups itself.  This
channel carries what the node decides and what it needs to know::

    node -> worker
        [LOAD, service, generation, directory, [[endpoint, kind, code, function], ...]]
        [ROUTE, service, mapping (ApiMapping JSON), {generation: {endpoint: kind}}, description]
        [DRAIN]                       leave every queue group, answer what was received
    worker -> node
        [LOADED, service, generation, error, seconds]   error "" when it worked
        [ROUTED, service, error]
        [DRAINED]
        [STATS, rows, overloaded, shadow_mismatches]    every second; rows as in metrics

A frame is a 4-byte little-endian length and a msgpack array of items.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

LOAD, ROUTE, DRAIN = 1, 2, 3
LOADED, ROUTED, DRAINED, STATS = 1, 2, 3, 4

HEADER = struct.Struct("<I")
BUSY = struct.Struct("<d")  # the worker's busy-since clock (0: idle), shared memory

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[list[Any]]).decode


def frame(items: list[Any]) -> bytes:
    body = _encode(items)
    return HEADER.pack(len(body)) + body


def decode(body: bytes | memoryview) -> list[list[Any]]:
    return _decode(body)
