"""Frames between an API node and its worker processes (one Unix socket each), and the
page each worker shares with its node.

Requests reach a worker through its own queue-group subscriptions; this channel carries
what the node decides, what it needs to know, and hedged copies the node hands to a
worker it knows is not stalled.  Frames use ``nodes.runtime.framing``; each direction is
one tagged union of frozen Structs.  Both ends always run the same code, so these follow
no compatibility rules, unlike ``protocol/``.

The busy page (``BusyPage``, a small shared file mapping) holds the worker's busy-since
clock, the reply subject of the request it runs, and how many wait in its queue.  The
node reads it while the worker's event loop is stuck in user code: to kill a worker
stuck far past the request timeout, to tell the requester that its request is being
worked on (so it is not hedged), to answer the request itself when the worker dies
running it, and to see the backlog at every scaling sample.
"""

from __future__ import annotations

import mmap
import struct

import msgspec

# -- node -> worker ---------------------------------------------------------------------


class EndpointCode(msgspec.Struct, frozen=True, array_like=True):
    """Where one endpoint's code is, inside a generation's directory."""

    name: str
    kind: str
    code: str
    function: str


class Load(msgspec.Struct, frozen=True, tag=True):
    """Load a generation (its ``load()`` and ``warmup()``) beside serving.  ``python``:
    the code environment's interpreter its endpoints run in (a user-code host of the
    worker, ``nodes.api.hosts``); "" runs them in the worker itself (the builtin
    environment)."""

    service: str
    generation: str
    directory: str
    endpoints: list[EndpointCode]
    python: str = ""


class Route(msgspec.Struct, frozen=True, tag=True):
    """Serve ``service`` with this mapping from now on; ``kinds``: generation ->
    {endpoint: kind}, every generation of it already loaded."""

    service: str
    mapping: bytes  # ApiMapping, JSON
    kinds: dict[str, dict[str, str]]
    description: str
    capture: bytes = b""  # CaptureSettings, JSON ("": capture off)


class Drain(msgspec.Struct, frozen=True, tag=True):
    """Leave every queue group, answer what was received."""


class Serve(msgspec.Struct, frozen=True, tag=True):
    """Run one request that arrived at the node (a hedged copy, or one another worker
    passed on) before those queued, and reply to ``reply``."""

    service: str
    endpoint: str
    reply: str
    data: bytes
    headers: dict[str, str] | None = None


ToWorker = Load | Route | Drain | Serve


# -- worker -> node ---------------------------------------------------------------------


class Loaded(msgspec.Struct, frozen=True, tag=True):
    service: str
    generation: str
    error: str  # "" when it worked
    seconds: float


class Routed(msgspec.Struct, frozen=True, tag=True):
    service: str
    error: str  # "" when it worked


class Drained(msgspec.Struct, frozen=True, tag=True):
    pass


class StatRow(msgspec.Struct, frozen=True, array_like=True):
    service: str
    endpoint: str
    generation: str
    shadow: bool
    requests: int
    errors: int
    latency_sum: float
    buckets: list[int]


class Backlog(msgspec.Struct, frozen=True, array_like=True):
    service: str
    endpoint: str
    waiting: int


class Stats(msgspec.Struct, frozen=True, tag=True):
    """Every second: the worker's counters, cumulative."""

    rows: list[StatRow]
    backlog: list[Backlog]
    overloaded: int
    shadow_mismatches: int
    captured: int = 0  # calls published to the capture stream
    capture_dropped: int = 0  # calls that could not be (queue full, publish failed)


class Retiring(msgspec.Struct, frozen=True, tag=True):
    """The worker stops serving and exits (after a ``MemoryError``): replace it."""

    reason: str


class PassOn(msgspec.Struct, frozen=True, tag=True):
    """A request the worker cannot start within its queue timeout: the node hands it to
    another worker, holds it while workers start, or answers ``overloaded``."""

    service: str
    endpoint: str
    reply: str
    data: bytes
    headers: dict[str, str] | None = None


FromWorker = Loaded | Routed | Drained | Stats | Retiring | PassOn

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def decode_to_worker(body: bytes) -> ToWorker:
    return _to_worker.decode(body)


def decode_from_worker(body: bytes) -> FromWorker:
    return _from_worker.decode(body)


# -- the busy page ----------------------------------------------------------------------

_SINCE = struct.Struct("<d")
_LENGTH = struct.Struct("<H")
_QUEUED = struct.Struct("<I")
_REPLY_AT = _SINCE.size + _LENGTH.size
PAGE_SIZE = 1024
_QUEUED_AT = PAGE_SIZE - _QUEUED.size
MAX_REPLY = _QUEUED_AT - _REPLY_AT


class BusyPage:
    """``since`` (monotonic seconds; 0: idle) and the reply subject of the request in
    progress.  One writer (the worker), one reader (its node); the worker writes the
    subject before the clock and clears the clock first, so a reader that sees a clock
    sees that request's subject."""

    def __init__(self, page: mmap.mmap) -> None:
        self.page = page

    @staticmethod
    def blank() -> bytes:
        return bytes(PAGE_SIZE)

    def start(self, since: float, reply: str) -> None:
        subject = reply.encode()
        n = len(subject) if len(subject) <= MAX_REPLY else 0  # too long: not announced
        page = self.page
        _LENGTH.pack_into(page, _SINCE.size, n)
        page[_REPLY_AT:_REPLY_AT + n] = subject[:n]
        _SINCE.pack_into(page, 0, since)

    def stop(self) -> None:
        _SINCE.pack_into(self.page, 0, 0.0)

    def since(self) -> float:
        return float(_SINCE.unpack_from(self.page)[0])

    def set_queued(self, n: int) -> None:
        """How many requests wait in the worker's queue (the node's scaler reads it
        every sample, fresher than the once-a-second counters)."""
        _QUEUED.pack_into(self.page, _QUEUED_AT, min(max(0, n), 0xFFFFFFFF))

    def queued(self) -> int:
        return int(_QUEUED.unpack_from(self.page, _QUEUED_AT)[0])

    def read(self) -> tuple[float, str]:
        """(since, reply subject); (0.0, "") when idle."""
        since = self.since()
        if not since:
            return 0.0, ""
        (n,) = _LENGTH.unpack_from(self.page, _SINCE.size)
        reply = bytes(self.page[_REPLY_AT:_REPLY_AT + min(n, MAX_REPLY)])
        return since, reply.decode(errors="replace")
