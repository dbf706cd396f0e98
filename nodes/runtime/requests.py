"""Lean request/reply: one wildcard inbox subscription per connection.

nats-py's ``request`` pays per call for a random token (a ``getrandom`` syscall), an
``asyncio.wait_for`` and loop look-ups.  This keeps one reply subscription, names
requests with a counter, and times them out with one timer handle each.  Request paths
that run per user request (the HTTP gateway, node-to-node calls, the CLI) use it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nodes.runtime import natscompat
from protocol import subjects

if TYPE_CHECKING:
    from nodes.runtime.connection import PublishDenials

NO_RESPONDERS = "503"
MAX_PENDING_NOTICES = 64  # progress notices waiting for their callback (more are dropped)
NOTICES_GRACE_S = 1.0  # most time spent handing on notices received before the reply


TOKEN_BYTES = 9  # 72 random bits per reply token: 12 base64 characters
_TOKEN_BATCH = 512  # tokens drawn from the OS at once (one read per 512 requests)


class Tokens:
    """Reply tokens no one can guess: an API node may publish to its requesters' reply
    subjects (it answers requests its node or another worker received), so a token must
    not tell the next ones, or a node could answer requests that went elsewhere.  Random
    bytes read from the OS in batches: ~0.2 µs a token, where a read per token costs ~1."""

    def __init__(self) -> None:
        self._batch = b""
        self._at = 0

    def next(self) -> str:
        at = self._at
        if at + TOKEN_BYTES > len(self._batch):
            self._batch, at = os.urandom(TOKEN_BYTES * _TOKEN_BATCH), 0
        self._at = at + TOKEN_BYTES
        return base64.urlsafe_b64encode(self._batch[at:at + TOKEN_BYTES]).decode()


class Requester:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = Tokens()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = anyio.Lock()

    async def _start(self) -> None:
        async with self._lock:
            if self._prefix:
                return
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self._on_reply,
                                    pending_msgs_limit=100_000)
            self._loop = asyncio.get_running_loop()
            self._prefix = prefix

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._prefix):], None)
        if future is not None and not future.done():
            future.set_result(msg)

    def fail_pending(self, exc: Exception) -> int:
        """Fail every request waiting for a reply (the connection dropped: a reply sent
        meanwhile is lost, so waiting out the deadline only delays the answer).  Returns
        how many were failed."""
        pending, self._pending = self._pending, {}
        failed = 0
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
                failed += 1
        return failed

    def _expire(self, token: str) -> None:
        future = self._pending.pop(token, None)
        if future is not None and not future.done():
            future.set_exception(nats.errors.TimeoutError())

    async def request(self, subject: str, payload: bytes, *, timeout: float,
                      headers: dict[str, str] | None = None,
                      denials: PublishDenials | None = None,
                      on_progress: Callable[[Msg], Awaitable[None]] | None = None) -> Msg:
        """Send a request and wait for its reply.

        Raises ``nats.errors.NoRespondersError`` at once when nothing subscribes to
        ``subject``, and ``nats.errors.TimeoutError`` after ``timeout`` seconds.  With
        ``denials`` (a connection opened with credentials), raises ``PublishDenied`` as
        soon as the server refuses the publish.  With ``on_progress``, the progress
        notices of this request (``subjects.command_progress`` of its reply subject) are
        handed to it until the reply comes.
        """
        if not self._prefix:
            await self._start()
        loop = self._loop
        assert loop is not None
        token = self._tokens.next()
        future: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = future
        timer = loop.call_later(timeout, self._expire, token)
        if denials is not None:
            denials.watch(subject, future)
        notices: Subscription | None = None
        try:
            if on_progress is not None:  # subscribed before the request can be seen
                notices = await self.nc.subscribe(
                    subjects.command_progress(self._prefix + token), cb=on_progress,
                    pending_msgs_limit=MAX_PENDING_NOTICES)
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            self._pending.pop(token, None)
            if denials is not None:
                denials.unwatch(future)
            if notices is not None:
                # The notices sent before the reply were received before it: hand them
                # on (briefly: a callback that hangs only loses the rest), then stop.
                with anyio.move_on_after(NOTICES_GRACE_S), contextlib.suppress(Exception):
                    await natscompat.handled(notices)
                with contextlib.suppress(Exception):  # the connection closed: so is it
                    await notices.unsubscribe()
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS and not msg.data:
            raise nats.errors.NoRespondersError
        return msg


_by_connection: weakref.WeakKeyDictionary[NATS, Requester] = weakref.WeakKeyDictionary()


def requester(nc: NATS) -> Requester:
    """The connection's shared ``Requester``."""
    r = _by_connection.get(nc)
    if r is None:
        r = _by_connection[nc] = Requester(nc)
    return r


def pending_count(nc: NATS) -> int:
    r = _by_connection.get(nc)
    return len(r._pending) if r else 0

