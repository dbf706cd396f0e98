"""The lease that makes one instance of a control-plane role the active one.

Several Deployer (or Govern) processes may run at once, so that losing one loses
nothing; two acting at once would double every registry judgement, event and desired
state write.  The role's key in the ``sy_leases`` KV bucket (``protocol.leases``) says
which instance acts.  JetStream decides, not anything home-made:

* **acquire**: ``create`` (succeeds only if the key is absent);
* **renew**: ``update(last=revision)``, a compare-and-set on the revision the holder
  wrote last.  The revision is the holder's fencing token: once another instance has
  written the key, the old holder's next renewal fails and it steps down at once;
* **expire**: the bucket's ``max_age`` is the lease TTL, so a holder that stops renewing
  (SIGKILL, a partition, a frozen host) loses the key by the *server's* clock, and a
  standby's next ``create`` succeeds;
* **release**: a holder that stops gracefully deletes the key (compare-and-set too), so
  a standby takes over within one poll instead of one TTL.

The numbers (``LEASE_TTL_S`` = 3 s, ``RENEW_EVERY_S`` = 1 s, ``CLOCK_SLACK_S`` = 0.5 s,
``POLL_S`` = 0.25 s):

* The holder times each renewal from the moment it *sent* it.  The server stamps the
  message when it stores it, which is later, so the key cannot expire before
  ``sent + TTL``.  The holder acts only until ``sent + TTL - slack``: when renewals keep
  failing (it is cut off from the JetStream leader), it stops acting 0.5 s before any
  standby could hold the key.  The slack covers the drift of two clocks over 3 s (parts
  per million) and the time between a check and the action it allows, which on a
  loaded host is the event loop's latency (tens of ms).  A process frozen longer than
  the slack (SIGSTOP, a VM pause, a blocked event loop) is the case no lease without
  storage fencing covers: its next renewal's compare-and-set decides as soon as it runs
  again. If the key is still at its revision (the server has not expired it, nobody
  created it since) it holds on, since no other instance can have acted; otherwise it
  steps down.
* A renewal is tried every second, each bounded by ``OP_TIMEOUT_S`` (1 s) and by the
  time left; so two consecutive failures still leave the lease held (a JetStream
  leader election in a 3-server cluster was measured at ~2 s here), a third steps down.
* A standby polls ``create`` every 0.25 s.  The holder renewed at most 1 s before it
  died, so the key expires at most 3 s after the death, and the standby holds it about
  0.25 s later: takeover within ~3.3 s of a SIGKILL, and within one poll (plus the
  time to load state) after a graceful stop.

A holder that loses the lease does not try to go back to standby in the same process:
``Node`` cancels everything it runs, closes its connection and exits non-zero, and its
supervisor starts a fresh process, which waits as a standby.  State lives in KV and
streams, so a fresh process loads it whole when it becomes active, and nothing held in
memory by the old term can leak into the next.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from nodes.runtime.logs import get_logger
from protocol import subjects
from protocol.base import encode
from protocol.errors import ShipyardError
from protocol.leases import LEASE_VALUE, LeaseRecord, lease_key

LEASE_TTL_S = 3.0
RENEW_EVERY_S = 1.0
CLOCK_SLACK_S = 0.5
POLL_S = 0.25
OP_TIMEOUT_S = 1.0


class LeaseLost(ShipyardError):
    """Raised by ``Node.serve`` after the node stopped acting because its lease was lost
    (another instance holds it, or renewals failed until it could have expired)."""

    def __init__(self, role: str, reason: str) -> None:
        self.role = role
        self.reason = reason
        super().__init__(f"lost the {role} lease ({reason}): stopped acting; a restart "
                         "waits as a standby")


async def open_leases(nc: NATS, *, replicas: int = 1, ttl: float = LEASE_TTL_S) -> KeyValue:
    """The ``sy_leases`` bucket (created with ``ttl`` as its max age), on a JetStream
    context whose operations time out after ``OP_TIMEOUT_S``.  An existing bucket keeps
    its own TTL: read it with ``bucket_ttl`` and build the ``Lease`` with that."""
    js = nc.jetstream(timeout=OP_TIMEOUT_S)
    try:
        return await js.key_value(subjects.LEASES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(
            bucket=subjects.LEASES_BUCKET, history=1, ttl=ttl, replicas=replicas,
            storage=StorageType.FILE,
            description="shipyard control-plane leases: the active instance per role"))
    except nats.js.errors.BadRequestError:
        return await js.key_value(subjects.LEASES_BUCKET)  # created concurrently


async def bucket_ttl(kv: KeyValue) -> float:
    """The lease TTL the bucket enforces (its max age); ``LEASE_TTL_S`` if it has none."""
    with anyio.fail_after(OP_TIMEOUT_S * 5):
        status = await kv.status()
    return float(status.ttl) if status.ttl else LEASE_TTL_S


class Lease:
    """One instance's claim on its role's lease.

    ``acquire`` waits (as a standby) until this instance holds the key; ``hold`` renews
    it until it is lost, then calls ``on_lost(reason)`` (synchronously, at once) and
    returns; ``release`` gives it up.  ``clock`` is injectable for tests.
    """

    def __init__(self, kv: KeyValue, *, role: str, node: str, instance: str,
                 ttl: float = LEASE_TTL_S, renew_every: float = RENEW_EVERY_S,
                 slack: float = CLOCK_SLACK_S, poll: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not renew_every + slack < ttl:
            raise ValueError(f"lease renewal every {renew_every:g}s with {slack:g}s slack "
                             f"does not fit in a {ttl:g}s TTL")
        self.kv = kv
        self.key = lease_key(role)
        self.role = role
        self.node = node
        self.instance = instance
        self.ttl = ttl
        self.renew_every = renew_every
        self.slack = slack
        self.poll = poll
        self.clock = clock
        self.revision: int | None = None  # the fencing token while held
        self.previous = ""  # who held it before this instance (node name), if anyone
        self.last_sent = 0.0  # when the renewal that holds it now was sent
        self._unconfirmed = 0.0  # when the first renewal with no answer yet was sent
        self._released = False
        self.log = get_logger(component="lease", role=role, node=node)
        self._value = encode(LeaseRecord(role=role, node=node, instance=instance,
                                         host=socket.gethostname(), pid=os.getpid(),
                                         acquired_at=time.time()))

    @property
    def held(self) -> bool:
        """Whether this instance may act now (by its own clock, with the slack)."""
        return self.revision is not None and self.clock() < self.valid_until

    @property
    def valid_until(self) -> float:
        return self.last_sent + self.ttl - self.slack

    async def try_acquire(self) -> bool:
        """One attempt: True if this instance now holds the lease.  Never raises."""
        sent = self.clock()
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                revision = await self.kv.create(self.key, self._value)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            return await self._held_by_other()
        except (TimeoutError, nats.errors.Error) as exc:
            self.log.debug("lease not taken", error=str(exc) or type(exc).__name__)
            return False
        self.revision, self.last_sent = revision, sent
        return True

    async def _held_by_other(self) -> bool:
        """The key exists: note its holder; if it is this instance (an earlier create
        whose reply was lost), confirm by renewing."""
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                entry = await self.kv.get(self.key)
        except (TimeoutError, nats.errors.Error):
            return False
        if entry.value is None or entry.revision is None:
            return False
        try:
            holder = LEASE_VALUE.decode(entry.value, self.key)
        except ShipyardError:
            return False
        if holder.instance != self.instance:
            self.previous = holder.node
            return False
        self.revision = entry.revision
        return await self.renew() is None

    async def acquire(self) -> None:
        """Wait until this instance holds the lease (standby until then)."""
        waited = False
        while not await self.try_acquire():
            if not waited:
                self.log.info("standby: another instance holds the lease",
                              holder=self.previous or None)
                waited = True
            await anyio.sleep(self.poll)
        self.log.info("lease acquired: active", revision=self.revision,
                      previous=self.previous or None)

    async def renew(self) -> str | None:
        """One renewal; None if it held, else why it failed.  Never raises."""
        if self.revision is None:
            return "not held"
        sent = self.clock()
        left = self.valid_until - sent
        # Past ``valid_until`` (the event loop stalled, or renewals kept failing) the
        # compare-and-set is still the judge: it succeeds only if the key is still at
        # this instance's revision, i.e. the server has not expired it and nobody else
        # created it since, so no other instance can have acted in between.
        stalled = bool(self.last_sent) and left <= 0
        try:
            with anyio.fail_after(OP_TIMEOUT_S if stalled or not self.last_sent
                                  else min(OP_TIMEOUT_S, left)):
                revision = await self.kv.update(self.key, self._value, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._unconfirmed and await self._confirm_lost_reply():
                return None
            self.revision = None
            return "taken by another instance"
        except (TimeoutError, nats.errors.Error) as exc:
            self._unconfirmed = self._unconfirmed or sent
            return "expired" if stalled else str(exc) or type(exc).__name__
        if stalled:
            self.log.warning("lease renewed after a stall: still held, nobody took it",
                             late_s=round(-left, 3))
        self.revision, self.last_sent, self._unconfirmed = revision, sent, 0.0
        return None

    async def _confirm_lost_reply(self) -> bool:
        """A renewal whose reply was lost may have been stored: if the key still names
        this instance, hold it at that revision, timed from the first unanswered send
        (the server stored it no earlier)."""
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                entry = await self.kv.get(self.key)
            holder = LEASE_VALUE.decode(entry.value or b"", self.key)
        except (TimeoutError, nats.errors.Error, ShipyardError):
            return False
        if holder.instance != self.instance or entry.revision is None:
            return False
        self.revision, self.last_sent, self._unconfirmed = entry.revision, self._unconfirmed, 0.0
        return True

    async def hold(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``renew_every`` until the lease is lost; then ``on_lost(reason)``.

        Failed renewals are retried until ``valid_until``; a compare-and-set conflict
        (another instance wrote the key) ends it at once.  Never raises.
        """
        while True:
            await anyio.sleep(max(0.0, self.last_sent + self.renew_every - self.clock()))
            while True:
                error = await self.renew()
                if self._released:
                    return  # given up on purpose: nothing was lost
                if error is None:
                    break
                if self.revision is None or self.clock() >= self.valid_until:
                    self.log.error("lease lost: stepping down", reason=error)
                    self.revision = None
                    on_lost(error)
                    return
                self.log.warning("lease renewal failed; retrying", error=error,
                                 valid_for_s=round(self.valid_until - self.clock(), 3))
                await anyio.sleep(min(self.poll, max(0.0, self.valid_until - self.clock())))

    async def release(self) -> None:
        """Give the lease up (a graceful stop), so a standby takes over at once."""
        self._released = True
        revision, self.revision = self.revision, None
        if revision is None:
            return
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                await self.kv.delete(self.key, last=revision)
            self.log.info("lease released")
        except (TimeoutError, nats.errors.Error) as exc:
            self.log.warning("lease not released; it expires on its own",
                             error=str(exc) or type(exc).__name__)
