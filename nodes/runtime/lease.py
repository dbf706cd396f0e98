"""The lease that makes one instance of a control-plane role the active one.

Several Deployer (or Govern) processes may run at once, so that losing one loses
nothing; two acting at once would double every registry judgement, event and desired
state write.  The role's key in the ``sy_leases`` KV bucket (``protocol.leases``) says
which instance acts.  JetStream decides, not anything home-made: every write is a
compare-and-set that the lease stream's leader judges.

* **acquire**: ``create`` when the key is absent (succeeds only if it still is);
* **renew**: ``update(last=revision)``, a compare-and-set on the revision the holder
  wrote last.  The revision is the holder's fencing token: once another instance has
  written the key, the old holder's next renewal fails and it steps down at once;
* **take over**: a standby reads the key from the stream's *leader* every poll.  Once it
  has seen the key at one revision for the holder's TTL (``LeaseRecord.ttl_s``, at
  least its own), it writes the key with ``update(last=that revision)``: that succeeds
  only if the holder has not renewed.  If its reads went unanswered for ``OUTAGE_S``
  (2 s: the stream had no leader; one slow read, 1 s at most, does not count), it
  counts the TTL again from the first answer after the gap;
* **release**: a holder that stops gracefully deletes the key (compare-and-set too), so
  a standby takes over within one poll instead of one TTL.

The bucket has no ``max_age``: the server never expires the key by itself (an older
bucket that has one is updated when opened; if that fails, its max age caps the TTL, and
the key may vanish during an election: a standby may then take it, which is safe, only
slower).

**Why it is safe.**  The holder acts only until ``sent + TTL - slack``, ``sent`` being
when it sent the renewal that holds the key (timed by its own clock).  A standby starts
acting only after a compare-and-set on revision ``r`` succeeded, that is after the key
stayed at ``r`` (no renewal of the holder was stored after ``r``), and after it had
seen ``r`` for a TTL counted from the moment it *received* its first read of ``r``.
The holder sent ``r`` before the server stored it, which was before any read returned
it; so the holder's last moment of acting, ``sent(r) + TTL - slack``, falls at least
``slack`` before the standby's first.  The slack (0.5 s) covers the drift of two clocks
over 3 s (parts per million) and the time between a check and the action it allows
(the event loop's latency, tens of ms on a loaded host).  A renewal whose reply was lost
but that was stored moves the revision on: the standby starts counting again.  A
standby's takeover whose reply was lost names the standby: its next read finds its own
instance and confirms by renewing.  A holder that starts over in its own process takes
back only a key that still names its instance, with a compare-and-set on the revision
its old term left: that term had stopped acting before the new one was built, and the
compare-and-set proves nobody else wrote the key in between.  A process frozen longer
than the slack (SIGSTOP, a VM pause, a blocked event loop) is the case no lease without
storage fencing covers: its next renewal's compare-and-set decides as soon as it runs
again (held if the key is still at its revision, since nobody else can have acted;
otherwise it steps down).

**Why the holder keeps the role through a JetStream election.**  Killing the server that
leads the lease stream leaves it without a leader for 3.3-8 s (23 kills measured here;
nats-server waits a randomised election timeout), so no renewal can be stored for
longer than the holder's 2.5 s: it must stop acting, and it does.  But nobody else can
write the key either, and a standby's count restarts with the first read the *new*
leader answers (an election leaves it unanswered for 3.3 s or more, longer than
``OUTAGE_S``).  The old holder (``Node``: it stops acting, then, in the same process,
starts over as a standby with the same instance) finds the key still naming its
instance and takes it back with one compare-and-set on that revision, while a standby
needs a full TTL of the new leader's answers.  Measured (``python -m bench.cluster
--failover``, 16 kills of the lease stream's leader): the holder had its key back
0.1-1.2 s after the new leader's election and kept the role every time, with no process
exit.  Before, the bucket expired the key by ``max_age`` during the election, any
instance could take it afterwards, and the old holder exited to be restarted: on the
same benchmark the role moved in 3 kills out of 4, and 4 Deployer processes exited.

What was weighed and not done:

* *Keep acting while no leader can accept anyone's write.*  A holder cannot tell an
  election (nobody can write) from a partition that cuts it off from a leader a standby
  still reaches (the standby takes the key a TTL later); acting past its deadline would
  double the role in the second case.  So it stops, and pays one state load instead.
* *A TTL longer than an election* (10 s) would keep the holder acting through it, and
  make the takeover after its SIGKILL 10 s instead of 3.
* *Placing the lease stream's leader* (a step-down request to move it) does not help:
  whichever server leads it can be the one that dies.
* *Faster retries*: renewals are retried every poll already; the holder's lease bucket
  is reopened every poll too (two JetStream requests) when it starts over.

The price of the holder's priority: when the active instance dies *during* an election
of the lease stream (two faults at once), a standby takes the key a TTL after the new
leader's first answer (3.1-3.8 s after it, 2 runs), where the server's expiry let it
take the key as soon as the election ended.

The numbers (``LEASE_TTL_S`` = 3 s, ``RENEW_EVERY_S`` = 1 s, ``CLOCK_SLACK_S`` = 0.5 s,
``POLL_S`` = 0.25 s, ``OP_TIMEOUT_S`` = 1 s):

* A renewal is tried every second, each bounded by ``OP_TIMEOUT_S`` and by the time
  left; failed ones are retried every poll until ``sent + TTL - slack``.
* The holder renewed at most 1 s before a SIGKILL, and a standby had read that revision
  within one poll of it being stored; it takes the key a TTL after that read: takeover
  within ~2-3.3 s of the SIGKILL, plus the time to load state (first accepted deploy
  3.0 s p50, 3.35 s max over 32 kills here), and within one poll after a graceful stop.
* A key left behind by a stack killed whole (nothing released it) is taken by the first
  instance to start, a TTL after its first read of it (the server does not expire it).

A holder that loses the lease because another instance wrote the key (``TAKEN``) does
not go back to standby in the same process: ``Node`` cancels everything it runs, closes
its connection and exits non-zero, and its supervisor starts a fresh process.  A holder
whose renewals failed until its deadline stops acting the same way, then a fresh
``Node`` (same instance, nothing else kept) waits as a standby in the same process.
State lives in KV and streams, so a new term loads it whole when it becomes active, and
nothing held in memory by the old term can leak into the next.
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
from nats.js import JetStreamContext
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
OUTAGE_S = 2.0  # a standby's reads unanswered this long: the lease stream had no leader

TAKEN = "taken by another instance"  # the one reason a holder does not rejoin as standby
_DELETED = ("DEL", "PURGE")  # a KV entry's operation header when the key was removed
_UNREADABLE = LeaseRecord(role="", node="", instance="")  # a value that did not decode


class LeaseLost(ShipyardError):
    """Raised by ``Node.serve`` after the node stopped acting because its lease was lost
    (another instance holds it, or renewals failed until it could have expired)."""

    def __init__(self, role: str, reason: str) -> None:
        self.role = role
        self.reason = reason
        super().__init__(f"lost the {role} lease ({reason}): stopped acting; a restart "
                         "waits as a standby")


def lease_stream() -> str:
    """The stream behind the ``sy_leases`` bucket (KV's naming: ``KV_<bucket>``)."""
    return f"KV_{subjects.LEASES_BUCKET}"


def leases_js(nc: NATS) -> JetStreamContext:
    """A JetStream context whose operations time out after ``OP_TIMEOUT_S``."""
    return nc.jetstream(timeout=OP_TIMEOUT_S)


async def open_leases(nc: NATS, *, replicas: int = 1) -> KeyValue:
    """The ``sy_leases`` bucket (``open_lease_bucket`` without the TTL)."""
    return (await open_lease_bucket(nc, replicas=replicas))[0]


async def open_lease_bucket(nc: NATS, *, replicas: int = 1) -> tuple[KeyValue, float]:
    """The ``sy_leases`` bucket, created without a max age (see the module docstring),
    and the lease TTL to use with it (``bucket_ttl``).  An existing bucket that has a
    max age is updated to have none (best effort).  Two JetStream requests when the
    bucket exists: a holder that starts over after an election waits for them."""
    js = leases_js(nc)
    try:
        kv = await js.key_value(subjects.LEASES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        try:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=subjects.LEASES_BUCKET, history=1, replicas=replicas,
                storage=StorageType.FILE,
                description="shipyard control-plane leases: the active instance per role"))
            return kv, LEASE_TTL_S
        except nats.js.errors.BadRequestError:
            kv = await js.key_value(subjects.LEASES_BUCKET)  # created concurrently
    max_age = (await kv.status()).ttl
    if max_age and not await _drop_max_age(js, max_age):
        return kv, min(float(max_age), LEASE_TTL_S)
    return kv, LEASE_TTL_S


async def _drop_max_age(js: JetStreamContext, max_age: float) -> bool:
    log = get_logger(component="lease")
    try:
        info = await js.stream_info(lease_stream())
        await js.update_stream(info.config.evolve(max_age=0))
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("lease bucket still expires keys; its max age caps the lease TTL",
                    max_age_s=max_age, error=str(exc) or type(exc).__name__)
        return False
    log.info("lease bucket no longer expires keys", was_s=max_age)
    return True


async def bucket_ttl(kv: KeyValue) -> float:
    """The lease TTL: ``LEASE_TTL_S``, or the bucket's max age if it still has a shorter
    one (the server would expire the key sooner)."""
    with anyio.fail_after(OP_TIMEOUT_S * 5):
        status = await kv.status()
    return min(float(status.ttl), LEASE_TTL_S) if status.ttl else LEASE_TTL_S


class Lease:
    """One instance's claim on its role's lease.

    ``acquire`` waits (as a standby) until this instance holds the key; ``hold`` renews
    it until it is lost, then calls ``on_lost(reason)`` (synchronously, at once) and
    returns; ``release`` gives it up.  ``js`` reads the key from the stream's leader;
    ``clock`` is injectable for tests.
    """

    def __init__(self, kv: KeyValue, *, js: JetStreamContext, role: str, node: str,
                 instance: str, ttl: float = LEASE_TTL_S, renew_every: float = RENEW_EVERY_S,
                 slack: float = CLOCK_SLACK_S, poll: float = POLL_S,
                 outage: float = OUTAGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not renew_every + slack < ttl:
            raise ValueError(f"lease renewal every {renew_every:g}s with {slack:g}s slack "
                             f"does not fit in a {ttl:g}s TTL")
        self.kv = kv
        self.js = js
        self.key = lease_key(role)
        self.role = role
        self.node = node
        self.instance = instance
        self.ttl = ttl
        self.renew_every = renew_every
        self.slack = slack
        self.poll = poll
        self.outage = outage
        self.clock = clock
        self.revision: int | None = None  # the fencing token while held
        self.previous = ""  # who held it before this instance (node name), if anyone
        self.reclaimed = False  # taken back from an earlier term of this same instance
        self.last_sent = 0.0  # when the renewal that holds it now was sent
        self._unconfirmed = 0.0  # when the first renewal with no answer yet was sent
        self._seen: tuple[int, float] | None = None  # (revision, first read of it) as standby
        self._unanswered = 0.0  # when the first of the standby's unanswered reads was sent
        self._released = False
        self.log = get_logger(component="lease", role=role, node=node)
        self._value = encode(LeaseRecord(role=role, node=node, instance=instance,
                                         host=socket.gethostname(), pid=os.getpid(),
                                         acquired_at=time.time(), ttl_s=ttl))

    @property
    def held(self) -> bool:
        """Whether this instance may act now (by its own clock, with the slack)."""
        return self.revision is not None and self.clock() < self.valid_until

    @property
    def valid_until(self) -> float:
        return self.last_sent + self.ttl - self.slack

    async def read(self) -> tuple[int, LeaseRecord | None] | None:
        """The key as the lease stream's *leader* has it: (revision, holder), the holder
        None when the key is absent or deleted (revision 0 if it never was written);
        None when no leader answered (an election, a partition).  Never raises."""
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                msg = await self.js.get_msg(
                    lease_stream(), subject=f"$KV.{subjects.LEASES_BUCKET}.{self.key}",
                    direct=False)
        except nats.js.errors.NotFoundError:
            return 0, None
        except (TimeoutError, nats.errors.Error):
            return None
        if (msg.headers or {}).get("KV-Operation") in _DELETED or msg.seq is None:
            return msg.seq or 0, None
        try:
            return msg.seq, LEASE_VALUE.decode(msg.data or b"", self.key)
        except ShipyardError:
            return msg.seq, _UNREADABLE

    async def try_acquire(self) -> bool:
        """One attempt: True if this instance now holds the lease.  Never raises."""
        sent = self.clock()
        seen = await self.read()
        if seen is None:  # nobody can write the key now (or this read was slow)
            self._unanswered = self._unanswered or sent
            return False
        if self._unanswered and self.clock() - self._unanswered >= self.outage:
            self._seen = None  # the stream had no leader: count again, from its answers
        self._unanswered = 0.0
        revision, holder = seen
        if holder is None:
            return await self._create()
        if holder.instance == self.instance:
            # Ours: an earlier term of this process that stepped down, or a write whose
            # reply was lost.  Nobody else wrote since: take it back by renewing, a fresh
            # compare-and-set timed from its own send.
            self.revision, self.reclaimed = revision, True
            self.last_sent = self._unconfirmed = 0.0
            if await self.renew() is None:
                return True
            self.reclaimed = False
            return False
        self.previous = holder.node
        now = self.clock()  # the read was answered no earlier than the holder's send
        if self._seen is None or self._seen[0] != revision:
            self._seen = (revision, now)
            return False
        if now - self._seen[1] < max(self.ttl, holder.ttl_s):
            return False
        return await self._take(revision)

    async def _create(self) -> bool:
        sent = self.clock()
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                revision = await self.kv.create(self.key, self._value)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            return False  # another instance created it first: the next read says who
        except (TimeoutError, nats.errors.Error) as exc:
            self.log.debug("lease not taken", error=str(exc) or type(exc).__name__)
            return False
        self.revision, self.last_sent = revision, sent
        return True

    async def _take(self, revision: int) -> bool:
        """The key stayed at ``revision`` for the holder's TTL: its holder has stopped
        acting.  Take it with a compare-and-set on that revision."""
        sent = self.clock()
        try:
            with anyio.fail_after(OP_TIMEOUT_S):
                mine = await self.kv.update(self.key, self._value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            self._seen = None  # renewed (or taken) meanwhile
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            # Unknown outcome: if it was stored, the next read finds this instance.
            self.log.debug("lease not taken", error=str(exc) or type(exc).__name__)
            return False
        self.revision, self.last_sent, self._seen = mine, sent, None
        return True

    async def acquire(self) -> None:
        """Wait until this instance holds the lease (standby until then)."""
        waited = False
        while not await self.try_acquire():
            if not waited and self.previous:
                self.log.info("standby: another instance holds the lease",
                              holder=self.previous)
                waited = True
            await anyio.sleep(self.poll)
        if self.reclaimed:
            self.log.info("lease taken back: active again", revision=self.revision)
        else:
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
        # this instance's revision, i.e. nobody else wrote it since, so no other
        # instance can have acted in between.
        stalled = bool(self.last_sent) and left <= 0
        try:
            with anyio.fail_after(OP_TIMEOUT_S if stalled or not self.last_sent
                                  else min(OP_TIMEOUT_S, left)):
                revision = await self.kv.update(self.key, self._value, last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._unconfirmed and await self._confirm_lost_reply():
                return None
            self.revision = None
            return TAKEN
        except (TimeoutError, nats.errors.Error) as exc:
            self._unconfirmed = self._unconfirmed or sent
            return "expired" if stalled else str(exc) or type(exc).__name__
        if stalled:
            self.log.warning("lease renewed after a stall: still held, nobody took it",
                             late_s=round(-left, 3))
        self.revision, self.last_sent, self._unconfirmed = revision, sent, 0.0
        return None

    async def _confirm_lost_reply(self) -> bool:
        """A renewal whose reply was lost may have been stored: if the stream's leader
        has the key at a later revision that names this instance, hold it at that
        revision, timed from the first unanswered send (the server stored it no
        earlier)."""
        seen = await self.read()
        if seen is None or self.revision is None:
            return False
        revision, holder = seen
        if holder is None or holder.instance != self.instance or revision <= self.revision:
            return False
        self.revision, self.last_sent, self._unconfirmed = revision, self._unconfirmed, 0.0
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
