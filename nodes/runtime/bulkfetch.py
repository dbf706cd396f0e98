"""Pull a JetStream consumer's messages straight into a file, off the event loop.

nats-py copies every received byte several times on the event-loop thread (socket ->
transport buffer -> parser buffer -> payload slice -> ``Msg``), which caps a bulk read
near 1.2-1.5 GB/s even before anything is written.  ``Fetch`` instead opens a dedicated
connection to the server nats-py is connected to (same credentials, same TLS context, see
``dial_from``) and drives it from one worker thread with a blocking socket: ``recv_into``
fills a small ring of blocks, NATS frames (``MSG``/``HMSG``, ``PING``, status messages)
are parsed in place, payload slices go to the file descriptor with ``writev`` and to a
second thread that hashes them.  Credit is requested with ``$JS.API.CONSUMER.MSG.NEXT``
pull requests, at most ``window`` messages ahead, so memory stays bounded (the ring, plus
what the kernel buffers).

The caller creates the consumer (over nats-py, while the thread connects) and owns the
policy: ``check`` sees each message's reply subject and size before its bytes are
written, and may raise.  Failures surface as ``DirectReadUnavailable`` (nothing was
pulled yet: use another path), ``Stalled`` (no bytes for ``timeout`` seconds) or
``Refused`` (the server ended the read: a status message, ``-ERR``, a closed connection);
an ``OSError`` from writing the file stays what it is.  Leaving ``async with Fetch(...)``
early (an error, cancellation) shuts the socket down from the event loop, which unblocks
the thread, and returns only once both threads ended.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from nats.aio.client import Client as NATS
from nats.aio.client import __version__ as nats_py_version

from nodes.runtime import natscompat
from nodes.runtime.logs import get_logger

BLOCK_BYTES = 1 << 20  # one ring block: the most a single recv_into reads
BLOCKS = 8  # ring size; a block is reused once it is written and hashed
MAX_HEAD = 64 << 10  # the longest MSG/HMSG line plus headers accepted
KEEP_RINGS = 1  # rings kept for the next fetch (allocating and faulting one in costs ms)
_PONG = b"PONG\r\n"
_rings: list[mmap.mmap] = []
_rings_lock = threading.Lock()


def _take_ring() -> mmap.mmap:
    """An anonymous mapping (no zero-fill pass, unlike ``bytearray``), with transparent
    huge pages where the kernel offers them: fewer page faults on first use."""
    size = BLOCK_BYTES * BLOCKS
    with _rings_lock:
        while _rings:
            ring = _rings.pop()
            if len(ring) == size:
                return ring
            with contextlib.suppress(BufferError):
                ring.close()
    ring = mmap.mmap(-1, size)
    with contextlib.suppress(AttributeError, OSError):
        ring.madvise(mmap.MADV_HUGEPAGE)
    return ring


def _give_ring(ring: mmap.mmap) -> None:
    with _rings_lock:
        if len(_rings) < KEEP_RINGS:
            _rings.append(ring)
            return
    with contextlib.suppress(BufferError):  # a view still exists: the GC unmaps it
        ring.close()

Check = Callable[[int, bytes, int], None]  # (message number from 1, reply subject, size)


class DirectReadUnavailable(Exception):
    """Raised when no dedicated connection can be used (unsupported connection options,
    or the server refused or did not answer the handshake); nothing was pulled."""


class Stalled(Exception):
    """Raised when nothing arrives for ``timeout`` seconds; ``received`` messages came."""

    def __init__(self, received: int, timeout: float) -> None:
        self.received, self.timeout = received, timeout
        super().__init__(f"no bytes for {timeout:g}s after {received} messages")


class Refused(Exception):
    """Raised when the server ends the read: a status message (``status 409 Consumer
    Deleted``), an ``-ERR`` line, or a closed or broken connection."""


@dataclass(frozen=True)
class Dial:
    """How to open a connection like nats-py's, read from its client object on the loop."""

    host: str
    port: int
    name: str | None
    connect_timeout: float
    tls_hostname: str | None
    tls_first: bool
    ssl_context: Callable[[], ssl.SSLContext]
    auth: bool  # credentials were configured (the server may also ask: auth_required)
    sign: Callable[[str], bytes] | None = None
    jwt: Callable[[], bytes | bytearray] | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    url_user: str | None = None
    url_password: str | None = field(default=None, repr=False)

    def connect_command(self, info: dict[str, Any]) -> bytes:
        """CONNECT as nats-py builds it, signing *this* connection's nonce."""
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "lang": "python3",
                                "version": nats_py_version, "protocol": 1,
                                "headers": True, "no_responders": True}
        if self.name:
            opts["name"] = self.name
        if self.auth or info.get("auth_required"):
            if "nonce" in info and self.sign is not None:
                opts["sig"] = self.sign(info["nonce"]).decode()
                if self.jwt is not None:
                    opts["jwt"] = bytes(self.jwt()).decode()
                elif self.nkey is not None:
                    opts["nkey"] = self.nkey
                if self.token is not None:
                    opts["auth_token"] = self.token
            elif self.user is not None and self.password is not None:
                opts["user"], opts["pass"] = self.user, self.password
            elif self.token is not None:
                opts["auth_token"] = self.token
            elif self.url_user is not None:
                if self.url_password is None:
                    opts["auth_token"] = self.url_user
                else:
                    opts["user"], opts["pass"] = self.url_user, self.url_password
        return b"CONNECT " + json.dumps(opts, sort_keys=True).encode() + b"\r\n"


def _resolve(value: Any) -> str | None:
    value = value() if callable(value) else value
    return None if value is None else str(value)


def dial_from(nc: NATS) -> Dial:
    """The connection options of nats-py client ``nc``; ``DirectReadUnavailable`` if
    they cannot be reproduced."""
    uri = nc.connected_url
    if uri is None:
        raise DirectReadUnavailable("the nats-py client is not connected")
    if uri.scheme not in ("nats", "tls"):
        raise DirectReadUnavailable(f"{uri.scheme}:// connections are not supported")
    try:
        options: dict[str, Any] = nc.options
        credentials = natscompat.credentials_of(nc)
        return Dial(
            host=uri.hostname or "127.0.0.1", port=uri.port or 4222,
            name=f"{options.get('name') or 'nats-py'} (bulk fetch)",
            connect_timeout=float(options.get("connect_timeout") or 2),
            tls_hostname=(options.get("tls_hostname") or natscompat.server_tls_name(nc)
                          or uri.hostname),
            tls_first=bool(options.get("tls_handshake_first")),
            ssl_context=lambda: nc.ssl_context, auth=credentials.configured,
            sign=credentials.sign, jwt=credentials.jwt, nkey=credentials.nkey,
            user=_resolve(options.get("user")), password=_resolve(options.get("password")),
            token=_resolve(options.get("token")), url_user=uri.username,
            url_password=uri.password)
    except (AttributeError, KeyError, TypeError) as exc:
        raise DirectReadUnavailable(f"cannot read nats-py's connection options: "
                                    f"{exc!r}") from exc


@dataclass(frozen=True)
class Job:
    """One consumer read: ``count`` messages via ``pull_subject``, into ``fd``."""

    pull_subject: str  # $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>
    count: int
    window: int  # messages requested but not yet received, at most
    size_limit: int  # stop once more payload bytes than this arrived
    fd: int
    hasher: Any  # hashlib or blake3 object: update() releases the GIL for big buffers
    check: Check
    timeout: float  # no bytes for this long: Stalled
    preallocate: int = 0  # bytes to reserve in the file first (0: don't)
    progress_every: int = 2 << 20


class Fetch:
    """A dedicated connection on its own threads.

    ``async with Fetch(dial, inbox, name=...)`` starts the thread, which connects and
    subscribes to ``inbox`` at once (so that overlaps whatever the caller does next, such
    as creating the consumer); ``await run(job)`` hands it the job and waits.  Leaving the
    block before ``run`` finished (an error, cancellation) aborts the thread and waits for
    it, bounded, with cancellation shielded.  Threads are named ``name`` and
    ``name-hash``.
    """

    def __init__(self, dial: Dial, inbox: str, *, name: str) -> None:
        self.dial, self.inbox, self.name = dial, inbox, name
        self.job: Job | None = None
        self.progress: Callable[[int], None] | None = None
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.aborted = False
        self.written = self.received = 0
        self.error: BaseException | None = None
        self.work: queue.SimpleQueue[list[memoryview] | int | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._go = threading.Event()
        self._done = anyio.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    async def __aenter__(self) -> Fetch:
        self._token = anyio.lowlevel.current_token()
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # The shut-down socket ends a blocking call at once; the bound only matters if
        # the thread is stuck elsewhere (resolving a host name, a very slow disk).
        bound = self.dial.connect_timeout + (self.job.timeout if self.job else 0)
        with anyio.move_on_after(bound, shield=True):
            if not self._done.is_set():
                self.abort()
                await self._done.wait()
        if not self._done.is_set():
            get_logger(component="bulkfetch").error(
                "receive thread did not stop; abandoning it", thread=self.name)
            return
        with anyio.CancelScope(shield=True):  # it has set done: it ends at once
            await anyio.to_thread.run_sync(self._thread.join)

    async def run(self, job: Job, progress: Callable[[int], None] | None = None) -> int:
        """Pull ``job``; the payload bytes written.  ``progress(written)`` runs on the
        loop every ``job.progress_every`` bytes and at the end.

        Raises ``DirectReadUnavailable`` (nothing was pulled), ``Stalled``, ``Refused``, or what
        ``job.check`` or ``progress`` raised.
        """
        self.job, self.progress = job, progress
        self._go.set()
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.written

    def abort(self) -> None:
        """Unblock the thread from another one: shut the socket down (the thread closes
        it, so its descriptor cannot be reused under it)."""
        with self.lock:
            self.aborted = True
            self._go.set()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def _main(self) -> None:
        hasher: threading.Thread | None = None
        ring: mmap.mmap | None = None
        try:
            sock, rest = self._connect()
            self._go.wait()
            if self.aborted or self.job is None:
                raise Refused("aborted")
            ring = _take_ring()
            hasher = threading.Thread(target=self._hash, args=(self.job.hasher.update,),
                                      name=f"{self.name}-hash", daemon=True)
            hasher.start()
            self._pull(sock, rest, self.job, ring, memoryview(ring))
        except BaseException as exc:  # OSError from writing the file stays OSError
            self.error = exc
        finally:
            self.work.put(None)
            if hasher is not None:
                hasher.join()
            if ring is not None and self.error is None:  # else a traceback may hold views
                _give_ring(ring)
            with self.lock:
                sock_, self.sock = self.sock, None
            if sock_ is not None:
                sock_.close()
            with contextlib.suppress(Exception):
                anyio.from_thread.run_sync(self._done.set, token=self._token)

    def _hash(self, update: Callable[[memoryview], object]) -> None:
        while (item := self.work.get()) is not None:
            if isinstance(item, int):
                self.free.put(item)
            else:
                for piece in item:
                    update(piece)

    def _connect(self) -> tuple[socket.socket, bytes]:
        """Open, handshake and subscribe; returns the socket and bytes read past PONG.
        Raises ``DirectReadUnavailable`` for anything that goes wrong here."""
        dial = self.dial
        try:
            sock: socket.socket = socket.create_connection((dial.host, dial.port),
                                                           timeout=dial.connect_timeout)
        except OSError as exc:
            raise DirectReadUnavailable(f"cannot connect to {dial.host}:{dial.port}: "
                                        f"{exc}") from exc
        try:
            self._adopt(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if dial.tls_first:
                sock = self._adopt(dial.ssl_context().wrap_socket(
                    sock, server_hostname=dial.tls_hostname))
            line, rest = _read_line(sock, b"")
            if not line.startswith(b"INFO "):
                raise DirectReadUnavailable(f"expected INFO from the server, got {line[:80]!r}")
            info = json.loads(line[5:])
            if not info.get("headers"):
                raise DirectReadUnavailable("the server does not support headers")
            if info.get("tls_required") and not dial.tls_first:
                sock = self._adopt(dial.ssl_context().wrap_socket(
                    sock, server_hostname=dial.tls_hostname))
            sock.sendall(dial.connect_command(info)
                         + b"SUB %s 1\r\nPING\r\n" % self.inbox.encode())
            while True:
                line, rest = _read_line(sock, rest)
                if line.startswith(b"PONG"):
                    break
                if line.startswith(b"-ERR"):
                    raise DirectReadUnavailable(f"server refused the connection: {line.decode()}")
                if line.startswith(b"PING"):
                    sock.sendall(_PONG)
        except DirectReadUnavailable:
            raise
        except Exception as exc:  # socket, TLS, JSON, signing the nonce...
            if self.aborted:
                raise Refused("aborted") from exc
            raise DirectReadUnavailable(f"handshake with {dial.host}:{dial.port} failed: "
                              f"{exc or type(exc).__name__}") from exc
        return sock, rest

    def _adopt(self, sock: socket.socket) -> socket.socket:
        """Make ``sock`` the one ``abort`` shuts down (and ``_main`` closes)."""
        with self.lock:
            self.sock = sock
            if self.aborted:
                raise OSError("aborted")
        return sock

    def _pull(self, sock: socket.socket, rest: bytes, job: Job, ring: mmap.mmap,
              mv: memoryview) -> None:
        """The receive loop.  Offsets are absolute in ``ring``; block ``cur`` spans
        ``[base, limit)``.  Payload bytes are taken as soon as they arrive, so only a
        partial protocol line is ever carried over into the next block."""
        sock.settimeout(job.timeout)
        fd, check, count = job.fd, job.check, job.count

        def sendall(data: bytes) -> None:
            try:
                sock.sendall(data)
            except OSError as exc:
                raise self._socket_error(exc, job) from exc

        preallocate = job.preallocate
        for i in range(1, BLOCKS):
            self.free.put(i)
        cur, base, limit = 0, 0, BLOCK_BYTES
        start, end = 0, len(rest)
        mv[:end] = rest
        request = b"PUB %s %s " % (job.pull_subject.encode(), self.inbox.encode())
        remaining = skip = 0  # payload bytes still to come / bytes to discard
        pieces: list[memoryview] = []
        pending = 0  # bytes in pieces, not yet written
        requested = reported = written = 0
        while True:
            while start < end:  # parse everything buffered
                if remaining:
                    take = min(remaining, end - start)
                    pieces.append(mv[start:start + take])
                    pending += take
                    start += take
                    remaining -= take
                    if not remaining:
                        skip = 2
                    continue
                if skip:
                    take = min(skip, end - start)
                    start += take
                    skip -= take
                    continue
                nl = ring.find(b"\r\n", start, end)
                if nl < 0:
                    if end - start > MAX_HEAD:
                        raise Refused(f"protocol line longer than {MAX_HEAD} bytes")
                    break
                op = ring[start:start + 4]
                if op == b"MSG ":  # MSG <subject> <sid> [reply] <size>
                    parts = _fields(ring[start:nl], 4)
                    size = _count(parts[-1])
                    self.received += 1
                    check(self.received, parts[3] if len(parts) == 5 else b"", size)
                    start, remaining, skip = nl + 2, size, 0 if size else 2
                elif op == b"HMSG":  # HMSG <subject> <sid> [reply] <header size> <size>
                    parts = _fields(ring[start:nl], 5)
                    hlen, total = _count(parts[-2]), _count(parts[-1])
                    if total < hlen:
                        raise Refused(f"malformed line {ring[start:nl][:80]!r}")
                    if nl + 2 + hlen > end:
                        if hlen > MAX_HEAD:
                            raise Refused(f"message headers longer than {MAX_HEAD} bytes")
                        break  # wait for the whole header block
                    status = _status(ring[nl + 2:nl + 2 + hlen])
                    start = nl + 2 + hlen
                    if status is None:
                        self.received += 1
                        size = total - hlen
                        check(self.received, parts[3] if len(parts) == 6 else b"", size)
                        remaining, skip = size, 0 if size else 2
                    elif status.startswith("status 100"):  # idle heartbeat: ignore
                        skip = total - hlen + 2
                    else:
                        raise Refused(status)
                elif op == b"PING":
                    sendall(_PONG)
                    start = nl + 2
                elif op.startswith((b"PONG", b"+OK", b"INFO")):
                    start = nl + 2
                else:
                    line = ring[start:nl].decode(errors="replace")
                    raise Refused(line if op == b"-ERR" else f"unexpected line {line[:80]!r}")
            done = self.received >= count and not remaining
            full = limit - end < MAX_HEAD
            if pending and (done or full or written + pending > job.size_limit
                            or written + pending - reported >= job.progress_every):
                _writev(fd, pieces)
                self.work.put(pieces)  # the hashing thread takes them from here
                written += pending
                self.written = written
                pieces, pending = [], 0
            if self.progress is not None and written > reported and (
                    done or written - reported >= job.progress_every):
                anyio.from_thread.run_sync(self.progress, written, token=self._token)
                reported = written
            if done or written > job.size_limit:
                return
            while requested < count and requested - self.received < job.window:
                n = min(max(1, job.window // 4), count - requested)
                body = b'{"batch":%d}' % n
                sendall(request + b"%d\r\n%s\r\n" % (len(body), body))
                requested += n
            if preallocate:  # once the first pulls are out: reserved extents make the
                with contextlib.suppress(OSError):  # writes cheaper than delalloc
                    os.posix_fallocate(fd, 0, preallocate)
                preallocate = 0
            if full:  # on to the next block once it is hashed; carry a partial line over
                self.work.put(cur)
                try:
                    cur = self.free.get(timeout=job.timeout)
                except queue.Empty:
                    raise Refused("the hashing thread stopped") from None
                base = cur * BLOCK_BYTES
                limit = base + BLOCK_BYTES
                mv[base:base + end - start] = mv[start:end]
                start, end = base, base + end - start
            try:
                n = sock.recv_into(mv[end:limit])
            except OSError as exc:
                raise self._socket_error(exc, job) from exc
            if not n:
                raise Refused("aborted" if self.aborted else "the server closed the connection")
            end += n


    def _socket_error(self, exc: OSError, job: Job) -> Exception:
        if self.aborted:
            return Refused("aborted")
        if isinstance(exc, TimeoutError):
            return Stalled(self.received, job.timeout)
        return Refused(f"connection lost: {exc}")


def _read_line(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    while b"\r\n" not in buffered:
        if len(buffered) > MAX_HEAD:
            raise ValueError("protocol line too long")
        data = sock.recv(4096)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        buffered += data
    line, _, rest = buffered.partition(b"\r\n")
    return line, rest


def _fields(line: bytes, least: int) -> list[bytes]:
    parts = line.split()
    if not least <= len(parts) <= least + 1:
        raise Refused(f"malformed line {line[:80]!r}")
    return parts


def _count(field: bytes) -> int:
    if not field.isdigit():
        raise Refused(f"malformed byte count {field[:20]!r}")
    return int(field)


def _status(headers: bytes) -> str | None:
    """``"status 408 Request Timeout"`` for a status header block, else None."""
    first = headers.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(first) < 2:
        return None
    return " ".join(["status", *(p.decode(errors="replace") for p in first[1:])])


def _writev(fd: int, pieces: list[memoryview]) -> None:
    for i in range(0, len(pieces), 512):  # IOV_MAX is 1024
        batch = pieces[i:i + 512]
        done = os.writev(fd, batch)
        for piece in batch:  # a short write (rare for files): finish piece by piece
            if done >= len(piece):
                done -= len(piece)
                continue
            view, done = piece[done:], 0
            while view:
                view = view[os.write(fd, view):]
