"""Appending to the audit ledger, and reading it back.

``Node._handle`` decides every command's fate, so it is the one place that records it: a
node whose role verifies commands (Deployer, Govern) hands each outcome to an
``AuditRecorder``.  Recording never blocks nor fails a command: ``record`` puts the entry
in a bounded buffer (``BUFFER`` entries) without waiting, and a background publisher,
run under ``loops.supervised`` so that a NATS timeout or an outage cannot end it, appends
the entries to ``SY_AUDIT`` with the entry id as ``Nats-Msg-Id`` (a retried append is
stored once).  When the buffer is full the entry is dropped and counted (``dropped``),
and the count shows in the node's heartbeat like every other drop.  A node that stops
gracefully (SIGTERM) waits, after its last request is answered, up to
``FLUSH_TIMEOUT_S`` for the buffer to be appended (``flush``), so the last commands
before a stop are in the ledger; what is still buffered after that is logged as lost.

The stream is created with ``deny_delete`` and ``deny_purge``: the server refuses to
purge it, to remove one of its messages, or to lift those flags, whoever asks.  Deleting
the whole stream, or shrinking its limits with an update, is not covered by the flags, so
every shipyard identity's NATS permissions deny those two API subjects, the admin's too
(``nodes.auth.permissions.ledger_guard``): only the server operator, who writes the
server's configuration or owns its storage, can remove the ledger.  No ``max_age``: an
audit ledger is kept, not rotated (``max_bytes`` bounds it, and then the server refuses
new entries rather than drop old ones, ``discard=new``).

``shipyard audit at T`` answers from the deployment records in ``sy_deploy``, not from
this ledger: see ``deployed_at``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
import msgspec
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from nodes.runtime.jetstream import publish_retry
from nodes.runtime.kvcache import snapshot
from nodes.runtime.loops import supervised
from protocol import subjects
from protocol.api import API_DEPLOYMENT_VALUE
from protocol.audit import AUDIT_ENTRY, AuditEntry, Deployed
from protocol.base import encode
from protocol.deploy import DEPLOYMENT_VALUE, Update, deployment_keys

BUFFER = 10_000
FLUSH_TIMEOUT_S = 5.0
AUDIT_MAX_BYTES = 8 << 30
READ_BUFFER = 1024


async def ensure_audit_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the stream if missing.  An existing one is used as it is: no shipyard
    identity may update it (``nodes.auth.permissions.ledger_guard``), and the server would
    refuse an update that lifts its deny flags anyway."""
    try:
        await js.add_stream(_audit_config(replicas))
    except nats.js.errors.BadRequestError:  # exists with another config: keep it
        await js.stream_info(subjects.AUDIT_STREAM)


def _audit_config(replicas: int) -> StreamConfig:
    return (StreamConfig(
        name=subjects.AUDIT_STREAM,
        description="every command Deployer and Govern received, with its outcome",
        subjects=[subjects.AUDIT_ALL],
        max_bytes=AUDIT_MAX_BYTES,
        discard=DiscardPolicy.NEW,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120,
        deny_delete=True,
        deny_purge=True,
    ))


class AuditRecorder:
    """A bounded buffer of entries and the loop that appends them to ``SY_AUDIT``."""

    def __init__(self, node: str, role: str, log: Any, *, buffer: int = BUFFER) -> None:
        self.node = node
        self.role = role
        self.log = log
        self.subject = subjects.audit(role, node)
        self.recorded = 0
        self.appended = 0
        self.dropped = 0
        self._send, self._recv = anyio.create_memory_object_stream[AuditEntry](buffer)
        self._progress = anyio.Event()  # set after each append (what ``flush`` waits on)

    def record(self, entry: AuditEntry) -> bool:
        """Queue ``entry`` for appending; never waits.  False (and counted) when full."""
        try:
            self._send.send_nowait(entry)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                self.log.error("audit entry dropped: the ledger is not keeping up",
                               dropped=self.dropped, command=entry.command)
            return False
        self.recorded += 1
        return True

    def close(self) -> None:
        """No more entries (the node stopped); what is still buffered is not appended."""
        self._send.close()
        self._recv.close()

    @property
    def backlog(self) -> int:
        """Entries recorded and not appended yet (the one being appended included)."""
        return self.recorded - self.appended

    async def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every entry recorded so far is appended, at most ``timeout``
        seconds; True if it was."""
        target = self.recorded
        with anyio.move_on_after(timeout):
            while self.appended < target:
                await self._progress.wait()
        return self.appended >= target

    def start(self, tg: TaskGroup, js: JetStreamContext, replicas: int = 1) -> None:
        tg.start_soon(partial(supervised, "audit ledger", self._run, js, replicas,
                              log=self.log))

    async def _run(self, js: JetStreamContext, replicas: int) -> None:
        await ensure_audit_stream(js, replicas)
        pending: AuditEntry | None = None
        while True:
            entry = pending or await self._recv.receive()
            pending = entry  # kept until stored, so a failure retries it, not loses it
            await publish_retry(js, self.subject, encode(entry), msg_id=entry.id)
            pending = None
            self.appended += 1
            self._progress.set()
            self._progress = anyio.Event()


# -- reading ---------------------------------------------------------------------------------

async def read_audit(nc: NATS, *, since: float | None = None,
                     ) -> AsyncIterator[tuple[int, AuditEntry | None, bytes]]:
    """Every entry appended at or after ``since`` (seconds since the epoch; None: all),
    as (stream sequence, entry or None when it does not decode, raw bytes).  Ends once
    caught up with the stream."""
    js = nc.jetstream()
    try:
        await js.stream_info(subjects.AUDIT_STREAM)
    except nats.js.errors.NotFoundError:
        return
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
    if since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = dt.datetime.fromtimestamp(since, dt.UTC)
    else:
        config.deliver_policy = DeliverPolicy.ALL
    send, recv = anyio.create_memory_object_stream[Msg](READ_BUFFER)

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(msg)

    sub = await js.subscribe(subjects.AUDIT_ALL, stream=subjects.AUDIT_STREAM, cb=on_msg,
                             ordered_consumer=True, config=config)
    try:
        consumer = await sub.consumer_info()
        delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
        if not consumer.num_pending and not delivered:
            return
        async for msg in recv:
            meta = msg.metadata
            try:
                entry: AuditEntry | None = AUDIT_ENTRY.decode(msg.data)
            except msgspec.DecodeError:
                entry = None
            yield meta.sequence.stream, entry, msg.data
            if meta.num_pending == 0:
                return
    finally:
        send.close()
        recv.close()
        with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()


def _at(history: list[Update], at: float) -> Update | None:
    """The last update made at or before ``at``."""
    found = None
    for update in history:
        if update.at <= at:
            found = update
    return found


async def deployed_at(nc: NATS, at: float, infra: str | None = None) -> list[Deployed]:
    """What was deployed on each infra at time ``at``: every project's bundle and every
    API service's mapping, as the desired state stood then.

    Read from the deployment records' update history, the one source that is right
    across deploys and rollbacks: every change of the desired state (a deploy or a
    rollback, by CLI or by the Govern node) is one compare-and-set of the record that
    appends an ``Update`` with the wall-clock time it took effect and its resolved
    target (``to_bundle``; a rollback's target, which its command does not name, is
    resolved there).  The audit ledger records what was asked, which a rollback does not
    spell; deploy events are published after the write and may be missing if the
    Deployer stopped between the two.  Limits: a record keeps its last 200 updates.
    """
    try:
        kv = await nc.jetstream().key_value(subjects.DEPLOY_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return []
    out: list[Deployed] = []
    for kind in ("bundle", "api"):
        entries = await snapshot(kv, deployment_keys(kind, infra))
        for _, (_, data) in sorted(entries.items()):
            try:
                if kind == "bundle":
                    rec = DEPLOYMENT_VALUE.decode(data)
                    name, rec_infra, history = rec.project, rec.infra, rec.history
                else:
                    api = API_DEPLOYMENT_VALUE.decode(data)
                    name, rec_infra, history = api.service, api.infra, api.history
            except msgspec.DecodeError:
                continue
            update = _at(history, at)
            if update is None:
                continue
            out.append(Deployed(infra=rec_infra, kind=kind, name=name,
                                deployed=update.to_bundle, since=update.at, by=update.by,
                                action=update.action, update_id=update.id,
                                result=update.result))
    out.sort(key=lambda d: (d.infra, d.kind, d.name))
    return out
