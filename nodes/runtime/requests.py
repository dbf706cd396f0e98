"""Lean request/reply: one wildcard inbox subscription per connection.

nats-py's ``request`` pays per call for a random token (a ``getrandom`` syscall), an
``asyncio.wait_for`` and loop look-ups.  This keeps one reply subscription, names
requests with tokens drawn in batches, and times them out with one timer handle each.
Request paths that run per user request (the HTTP gateway, node-to-node calls, the CLI)
use it.

Two kinds of reply subject:

* ``<inbox>.<token>``, new for every request: where a reply may come from a process the
  request was not sent to (an API node answers what another of its connections
  received), and for requests that hear progress notices (``<reply>.progress``).
* ``<inbox>.p.<slot>`` (``subjects.reused_reply``), re-used (``request(..., accept=...)``,
  what ``Caller`` uses for commands without progress notices): one request at a time
  per slot, the reply recognised by ``accept`` (the request id it names).  A slot whose
  request timed out or failed is never used again, so a late reply to it finds no one;
  ``accept`` turns away a second reply to an earlier request.  The slots are one token
  deeper than the subjects an API node may publish to on its own (``_INBOX.*.*.*``,
  ``nodes.auth.permissions``): only a responder the server let answer the request
  reaches one.

  Why: nats-server caches by subject, both its match of a subject against the
  subscriptions and its check of a publisher's permissions.  A reply subject it has seen
  costs it a look-up; a new one per request, a full match and, with auth on, a full
  permission check of the reply.  Measured (``python -m bench natsperm``, no auth): 8.6
  against 14.0 µs of server CPU a request with one responder, 20.8 against 29.5 with
  two; with auth on, a control-plane responder's reply check adds ~1-2 µs instead of
  3-4 (``python -m bench echo --auth``, bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import weakref
from collections.abc import Awaitable, Callable

import anyio
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nodes.runtime import natscompat
from nodes.runtime.connection import PublishDenied, denials_of
from protocol import subjects

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
        # Each request waiting for its reply, by token or slot, with the subject it was
        # sent to (a publish the server refuses fails the requests sent there).
        self._pending: dict[str, tuple[asyncio.Future[Msg], str]] = {}
        self._slot_prefix = ""
        self._slots: dict[str, tuple[asyncio.Future[Msg], Callable[[Msg], bool], str]] = {}
        self._free_slots: list[str] = []
        self._slots_made = 0
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
            inbox = prefix[:-1]
            slot_prefix = subjects.reused_reply(inbox, "")
            await self.nc.subscribe(subjects.reused_reply(inbox, "*"), cb=self._on_slot_reply,
                                    pending_msgs_limit=100_000)
            self._loop = asyncio.get_running_loop()
            # A connection opened with credentials tells of the publishes its server
            # refused; the requests sent there fail at once, not at their timeout.
            denials = denials_of(self.nc)
            if denials is not None:
                denials.listen(self._refused)
            self._slot_prefix = slot_prefix
            self._prefix = prefix

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix):], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    async def _on_slot_reply(self, msg: Msg) -> None:
        slot = msg.subject[len(self._slot_prefix):]
        entry = self._slots.get(slot)
        if entry is None:
            return  # a slot retired after a timeout, or a reply already taken
        future, accept, _ = entry
        if future.done() or not accept(msg):
            return
        del self._slots[slot]
        future.set_result(msg)

    def fail_pending(self, exc: Exception) -> int:
        """Fail every request waiting for a reply (the connection dropped: a reply sent
        meanwhile is lost, so waiting out the deadline only delays the answer).  Returns
        how many were failed."""
        pending, self._pending = self._pending, {}
        slots, self._slots = self._slots, {}
        failed = 0
        for future in [*(f for f, _ in pending.values()), *(f for f, _, _ in slots.values())]:
            if not future.done():
                future.set_exception(exc)
                failed += 1
        return failed

    def _refused(self, subject: str, exc: PublishDenied) -> int:
        """Fail the requests sent to ``subject`` (lower-cased), whose publish the server
        refused; returns how many.  Rare, so a scan: a request does no work for it beyond
        keeping its subject beside its future."""
        waiting = [*self._pending.values(),
                   *((future, sent_to) for future, _, sent_to in self._slots.values())]
        failed = 0
        for future, sent_to in waiting:
            if sent_to.lower() == subject and not future.done():
                future.set_exception(exc)
                failed += 1
        return failed

    def _expire(self, token: str) -> None:
        entry = self._pending.pop(token, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(nats.errors.TimeoutError())

    def _expire_slot(self, slot: str, future: asyncio.Future[Msg]) -> None:
        entry = self._slots.get(slot)
        if entry is not None and entry[0] is future:
            del self._slots[slot]
        if not future.done():
            future.set_exception(nats.errors.TimeoutError())

    async def request(self, subject: str, payload: bytes, *, timeout: float,
                      headers: dict[str, str] | None = None,
                      on_progress: Callable[[Msg], Awaitable[None]] | None = None,
                      accept: Callable[[Msg], bool] | None = None) -> Msg:
        """Send a request and wait for its reply.

        Raises ``nats.errors.NoRespondersError`` at once when nothing subscribes to
        ``subject``, and ``nats.errors.TimeoutError`` after ``timeout`` seconds.  On a
        connection opened with credentials, raises ``PublishDenied`` as soon as the
        server refuses the publish.  With ``on_progress``, the progress notices of this
        request (``subjects.command_progress`` of its reply subject) are handed to it
        until the reply comes.  With ``accept`` (and no ``on_progress``),
        the request goes out on a re-used reply subject and the reply is the first
        message ``accept`` returns True for (it must recognise this request's reply:
        the ``re`` of a ``protocol.base.Reply``).
        """
        if not self._prefix:
            await self._start()
        if accept is not None and on_progress is None:
            return await self._request_on_slot(subject, payload, timeout, headers, accept)
        loop = self._loop
        assert loop is not None
        token = self._tokens.next()
        future: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = (future, subject)
        timer = loop.call_later(timeout, self._expire, token)
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

    async def _request_on_slot(self, subject: str, payload: bytes, timeout: float,
                               headers: dict[str, str] | None,
                               accept: Callable[[Msg], bool]) -> Msg:
        loop = self._loop
        assert loop is not None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            self._slots_made += 1
            slot = str(self._slots_made)
        future: asyncio.Future[Msg] = loop.create_future()
        self._slots[slot] = (future, accept, subject)
        timer = loop.call_later(timeout, self._expire_slot, slot, future)
        answered = False
        try:
            await self.nc.publish(subject, payload, reply=self._slot_prefix + slot,
                                  headers=headers)
            msg = await future
            answered = True
        finally:
            timer.cancel()
            entry = self._slots.get(slot)
            if entry is not None and entry[0] is future:
                del self._slots[slot]
            if answered:  # its one reply came: no other will be taken for it
                self._free_slots.append(slot)
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
    return len(r._pending) + len(r._slots) if r else 0

