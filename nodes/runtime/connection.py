"""Connecting to NATS: a bounded first connect, then reconnect forever."""

from __future__ import annotations

import contextlib
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats
from nats.aio.client import Client as NATS

from nodes.auth.keys import is_shipyard_credentials, read_credentials
from nodes.auth.signing import Signer, attach
from nodes.runtime.logs import get_logger
from nodes.runtime.settings import NatsSettings
from protocol.errors import ShipyardError


class ConnectionClosed(ShipyardError):
    """Raised by a node whose NATS connection was closed for good (the client library
    stopped reconnecting, for example after the server refused its credentials)."""

    def __init__(self, url: str, reason: str = "") -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"connection to NATS at {url} closed for good"
                         + (f" ({reason})" if reason else ""))


class CannotReachNats(ShipyardError):
    """Raised when the first connection to NATS fails within its deadline."""

    def __init__(self, url: str, reason: str = "") -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach NATS at {url}" + (f" ({reason})" if reason else ""))


class CredentialsRefused(CannotReachNats):
    """Raised when the server refused the credentials of the first connection: an
    authorization violation, or the connection reset right after it was opened (how the
    server's refusal reaches the client when it closes the socket before the client reads
    the error).  Same exit code as any first-connect failure."""

    def __init__(self, url: str, creds: str, reason: str) -> None:
        self.url = url
        self.creds = creds
        self.reason = reason
        ShipyardError.__init__(
            self, f"NATS refused the credentials in {creds}: {reason} (server {url}; "
                  "a revoked or unknown identity, or a server that does not know it yet)")


Hook = Callable[[], Awaitable[None]]
SLOW_LOG_EVERY_S = 5.0  # a slow subscription is logged at most this often (with its count)

_VIOLATION = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


class PublishDenials:
    """Publishes the server refused on one connection, for the requests that wait on them.

    nats-server answers a publish it does not permit with an error that nats-py hands
    only to the error callback (the message is dropped); a request sent that way would
    wait out its whole timeout.  The connection's ``Requester`` listens here
    (``listen``): it already holds every request waiting for a reply, with its subject,
    so the error callback (``refused``) has it fail those sent to the refused subject
    with ``PublishDenied`` at once.  A request pays nothing for this (watching each one
    in a dict of its own cost ~0.3-0.8 µs of client CPU a call, ~5% of a no-op command;
    racing it against a denial event with two tasks, ~14 µs).  The server reports the
    subject lower-cased, so subjects compare so too.
    """

    def __init__(self) -> None:
        # Each listener fails its requests waiting on a refused subject (lower-cased)
        # and returns how many it failed.
        self._listeners: list[Callable[[str, PublishDenied], int]] = []

    def refused(self, message: str) -> bool | None:
        """None: not a publish refusal; True: a request waiting on it was failed with
        ``PublishDenied`` (it reports the refusal itself); False: nothing was waiting."""
        m = _VIOLATION.search(message)
        if m is None:
            return None
        subject = m.group(1)
        key = subject.lower()
        told = 0
        for fail in tuple(self._listeners):
            told += fail(key, PublishDenied(subject))
        return told > 0

    def listen(self, fail: Callable[[str, PublishDenied], int]) -> None:
        """Have ``fail(subject, error)`` called on every refusal: it fails the requests
        waiting on ``subject`` (lower-cased) with ``error`` and returns how many."""
        self._listeners.append(fail)


class PublishDenied(ShipyardError):
    """The NATS server refused this connection's identity permission to publish."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"the NATS server refused permission to publish to {subject}")


_DENIALS: weakref.WeakKeyDictionary[NATS, PublishDenials] = weakref.WeakKeyDictionary()


def denials_of(nc: NATS) -> PublishDenials | None:
    """The refusals of a connection opened by ``connect`` with credentials."""
    return _DENIALS.get(nc)


class ConnectionStats:
    """Counters the error callback keeps (slow consumers are otherwise silent)."""

    def __init__(self) -> None:
        self.errors = 0
        self.slow_consumers = 0
        self.disconnects = 0
        self.reconnects = 0


async def connect(
    settings: NatsSettings,
    *,
    name: str,
    on_reconnect: Hook | None = None,
    on_disconnect: Hook | None = None,
    on_closed: Hook | None = None,
    stats: ConnectionStats | None = None,
    first_connect_timeout: float | None = None,
) -> NATS:
    """Connect to NATS.

    The first connect must succeed within ``first_connect_timeout`` (default: the
    settings' ``connect_timeout``) or ``CannotReachNats`` is raised.  After that the
    client reconnects forever and re-sends its subscriptions.  ``on_closed`` runs when
    the connection is closed, by ``close()`` or for good by the client library (which
    does so when the server sends an error such as an authorization violation).
    A connection opened with shipyard credentials signs the commands a ``Caller`` sends
    on it (``nodes.auth.signing``).
    """
    log = get_logger(component="nats")
    stats = stats or ConnectionStats()
    connected = False
    first_errors: list[str] = []
    # A refusal is a definite answer (nothing listens there), unlike silence: once every
    # server has refused, the first connect gives up instead of waiting out its deadline.
    refusals: set[int] = set()
    credential_refusals: list[int] = []
    giving_up = anyio.CancelScope()
    creds = settings.creds_file or settings.nkey_seed_file
    denials = PublishDenials() if creds else None
    slow_logged: dict[int, float] = {}  # per subscription id: when a drop was last logged
    slow_dropped: dict[int, int] = {}  # and the drops since

    async def error_cb(exc: Exception) -> None:
        stats.errors += 1
        if not connected:
            # First-connect failures are reported once, by CannotReachNats.
            first_errors.append(_describe(exc))
            if first_errors[-1] == "connection refused":
                refusals.add(len(first_errors))
                if len(refusals) >= len(settings.servers):
                    giving_up.cancel()
            elif creds and _refused_credentials(exc):
                # A definite answer, from that server: give up once as many refusals as
                # there are servers came back (one server of a cluster may not know a
                # new identity yet, or be reloading its config).
                credential_refusals.append(len(first_errors))
                if len(credential_refusals) >= len(settings.servers):
                    giving_up.cancel()
            return
        refused = denials.refused(str(exc)) if denials is not None else None
        if refused:
            pass  # the request that sent it raises Forbidden, which says it all
        elif refused is not None:
            log.warning("publish refused by the NATS server", error=str(exc))
        elif isinstance(exc, nats.errors.SlowConsumerError):
            stats.slow_consumers += 1
            # One call per dropped message: logging each one made a behind process
            # further behind (a Deployer under 5,000 nodes spent a fifth of its time
            # here).  One line per subscription per SLOW_LOG_EVERY_S, with the count.
            now = time.monotonic()
            dropped = slow_dropped.get(exc.sid, 0) + 1
            if now - slow_logged.get(exc.sid, -SLOW_LOG_EVERY_S) < SLOW_LOG_EVERY_S:
                slow_dropped[exc.sid] = dropped
                return
            slow_logged[exc.sid], slow_dropped[exc.sid] = now, 0
            log.warning("slow consumer: messages dropped", subject=exc.subject, sid=exc.sid,
                        dropped=dropped)
        else:
            log.warning("nats error", error=str(exc) or type(exc).__name__)

    async def disconnected_cb() -> None:
        if connected and not nc.is_closed and not nc.is_draining:
            stats.disconnects += 1
            log.warning("disconnected from NATS")
            if on_disconnect is not None:
                await on_disconnect()

    async def reconnected_cb() -> None:
        stats.reconnects += 1
        server = nc.connected_url.netloc if nc.connected_url else "?"
        log.info("reconnected to NATS", server=str(server))
        if on_reconnect is not None:
            await on_reconnect()

    async def closed_cb() -> None:
        if connected and on_closed is not None:
            await on_closed()

    nc = NATS()
    options: dict[str, Any] = dict(
        servers=list(settings.servers),
        name=name,
        connect_timeout=max(1, int(settings.connect_timeout)),
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
        **settings.connect_options(),
    )
    deadline = settings.connect_timeout if first_connect_timeout is None else first_connect_timeout
    try:
        with anyio.fail_after(deadline), giving_up:
            await nc.connect(**options)
        if giving_up.cancelled_caught:
            await _abandon(nc)
            if creds and first_errors and first_errors[-1] != "connection refused":
                raise CredentialsRefused(settings.url, creds, first_errors[-1])
            raise CannotReachNats(settings.url, "connection refused")
    except CannotReachNats:
        raise
    except TimeoutError:
        await _abandon(nc)
        why = first_errors[-1] if first_errors else f"no answer within {deadline:g}s"
        raise CannotReachNats(settings.url, why) from None
    except Exception as exc:
        await _abandon(nc)
        if creds and _refused_credentials(exc):
            raise CredentialsRefused(settings.url, creds, _describe(exc)) from None
        raise CannotReachNats(settings.url, str(exc) or type(exc).__name__) from None
    connected = True
    if denials is not None:
        _DENIALS[nc] = denials
    if settings.creds_file and is_shipyard_credentials(settings.creds_file):
        # The key that authenticated the connection signs the commands sent on it.
        attach(nc, Signer(read_credentials(settings.creds_file)))
    return nc


def _describe(exc: Exception) -> str:
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        return "connection refused"
    if _refused_credentials(exc):
        return ("authorization violation" if "authorization" in str(exc).lower()
                else "the server closed the connection as soon as it was opened")
    return str(exc) or type(exc).__name__


def _refused_credentials(exc: BaseException) -> bool:
    """The server's answer to credentials it does not accept, as it reaches nats-py:
    an ``Authorization Violation`` error, or a reset (or a closed pipe) while the
    connection is being set up, when the server closed it before the error was read."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "connection reset by peer" in text


async def _abandon(nc: NATS) -> None:
    with anyio.move_on_after(1, shield=True), contextlib.suppress(Exception):
        await nc.close()


async def close(nc: NATS, timeout: float = 5.0) -> None:
    """Drain (finish in-flight callbacks, flush publishes) and close, bounded."""
    if nc.is_closed:
        return
    with anyio.move_on_after(timeout, shield=True) as scope:
        with contextlib.suppress(Exception):
            await nc.drain()
    if scope.cancelled_caught or not nc.is_closed:
        with anyio.move_on_after(1, shield=True), contextlib.suppress(Exception):
            await nc.close()
