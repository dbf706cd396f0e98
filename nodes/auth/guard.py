"""Verifying signed commands: the check ``Node._handle`` runs before a handler.

``CommandGuard.check`` is pure (identities and clock are injected) and synchronous: a
signature check, a dict look-up and a heap push, no I/O; ``CommandGuard.verify``, what a
serving node runs, adds the stack-wide nonce claim (below).  Nodes that set
``verifies_commands`` (Deployer, Govern) get a guard fed by a ``KVCache`` of the
``sy_identities`` bucket (a watch plus a periodic re-read), so a revoke reaches every
verifier within milliseconds, and the revoked identity's NATS connection is closed by the
server on the same reload.

A node verifies only when it runs with shipyard credentials: on a stack started with
``--insecure`` nobody signs and nothing is checked.

Every refusal is logged and handed to ``on_refusal`` (the seam an audit ledger plugs into).

Replays are refused stack-wide.  A verifying node keeps each accepted nonce twice: in
its own process (the fast path: a replay to the same process is refused without I/O) and
in the ``sy_nonces`` KV bucket, created with a TTL of ``auth.NONCE_TTL_S`` (no command
older than that is accepted anyway).  The record is made with ``kv.create``, which the
server refuses when the key exists, so of two verifiers that see the same command (a
restarted Deployer, another instance of its queue group, the Govern node) exactly one
accepts it, and the check-and-record is one atomic JetStream publish: no read then write
race.  That publish is the one round trip the guard adds to a signed command (a few
hundred µs here, see bench/RESULTS.md "auth"); it comes after every cheap and costly
check, so forgeries cost it nothing.  If the bucket cannot be written the command is
refused as ``unavailable`` (retry-safe: a retry is re-signed with a new nonce).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import msgspec
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from nodes.auth import keys
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import KVCache
from protocol import auth, subjects
from protocol.auth import IDENTITY, SIGNED_PART, Identity, SignedPart
from protocol.errors import Forbidden, Unavailable


@dataclass(frozen=True)
class Refusal:
    """One refused command (what an audit ledger records)."""

    subject: str
    identity: str | None
    reason: str
    message: str
    request_id: str | None
    ts: float


class CommandGuard:
    def __init__(self, lookup: Callable[[str], Identity | None], *,
                 clock: Callable[[], float] = time.time,
                 on_refusal: Callable[[Refusal], None] | None = None,
                 max_age: float = auth.MAX_AGE_S, max_skew: float = auth.MAX_SKEW_S,
                 cache_max: int = auth.REPLAY_CACHE_MAX) -> None:
        self.lookup = lookup
        self.clock = clock
        self.on_refusal = on_refusal
        self.max_age = max_age
        self.max_skew = max_skew
        self.cache_max = cache_max
        self.log = structlog.get_logger().bind(component="guard")
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, tuple[str, str]]] = []  # heap
        self.accepted = 0
        self.refused = 0

    def check(self, subject: str, data: bytes, command: type[Any]) -> Identity:
        """Return the identity that signed this command, or raise ``Forbidden``."""
        identity = self._check(subject, data, command)[0]
        self.accepted += 1
        return identity

    async def verify(self, subject: str, data: bytes, command: type[Any],
                     nonces: NonceLedger | None) -> Identity:
        """``check``, then claim the nonce stack-wide in ``nonces`` (when given): raise
        ``Forbidden`` (``replayed``) if another verifier, or this one before a restart,
        accepted it already."""
        identity, part = self._check(subject, data, command)
        if nonces is not None:
            assert part.nonce is not None  # _check refuses a command without one
            try:
                fresh = await nonces.claim(identity.name, part.nonce)
            except Exception as exc:
                self.log.error("nonce not recorded: command refused", subject=subject,
                               identity=identity.name, error=str(exc) or type(exc).__name__)
                raise Unavailable("cannot record the command's nonce in "
                                  f"{subjects.NONCES_BUCKET} ({type(exc).__name__}): "
                                  "try again") from None
            if not fresh:
                self._refuse(subject, identity.name, part.id, auth.REPLAYED,
                             "replayed command: this nonce was used already")
        self.accepted += 1
        return identity

    def _check(self, subject: str, data: bytes, command: type[Any],
               ) -> tuple[Identity, SignedPart]:
        try:
            part = SIGNED_PART.decode(data)
        except msgspec.DecodeError:
            # Unreachable after a successful envelope decode; refused all the same.
            self._refuse(subject, None, None, auth.BAD_SIGNATURE, "unreadable envelope")
        who = part.identity
        if not who or not part.signature or not part.nonce:
            self._refuse(subject, who, part.id, auth.UNSIGNED,
                         "unsigned command: this stack requires commands signed with an "
                         "identity's key (pass --identity FILE or set SHIPYARD_IDENTITY)")
        identity = self.lookup(who)
        if identity is None:
            self._refuse(subject, who, part.id, auth.UNKNOWN_IDENTITY,
                         f"unknown identity {who!r}")
        if identity.revoked:
            self._refuse(subject, who, part.id, auth.REVOKED,
                         f"identity {who!r} was revoked")
        now = self.clock()
        self._forget(now)
        age = now - part.ts
        if age > self.max_age or -age > self.max_skew:
            self._refuse(subject, who, part.id, auth.STALE,
                         f"command stamped {age:.1f} s ago: at most {self.max_age:g} s "
                         "old (check the sender's clock)")
        seen = (who, part.nonce)
        if seen in self._seen:
            self._refuse(subject, who, part.id, auth.REPLAYED,
                         "replayed command: this nonce was used already")
        if len(self._seen) >= self.cache_max:
            self._refuse(subject, who, part.id, auth.REPLAY_CACHE_FULL,
                         f"more than {self.cache_max} signed commands in "
                         f"{self.max_age:g} s: try again shortly")
        # The costly check (~75 µs here) after the cheap ones; the nonce is recorded
        # only once the signature holds, so a forgery cannot burn a real nonce.
        try:
            sig = base64.b64decode(part.signature, validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        signed = auth.signed_bytes(subject, part.id, part.ts, part.nonce, who, part.body)
        if not keys.verify(identity.public_key, signed, sig):
            self._refuse(subject, who, part.id, auth.BAD_SIGNATURE,
                         f"the signature does not verify against identity {who!r}")
        if not auth.may_send(identity.role, command, identity.kind):
            self._refuse(subject, who, part.id, auth.ROLE,
                         f"identity {who!r} ({identity.kind} role {identity.role}) may not "
                         f"send this command: it needs role {auth.required_role(command)}")
        self._seen.add(seen)
        heapq.heappush(self._expiry, (part.ts + self.max_age, seen))
        return identity, part

    @property
    def remembered(self) -> int:
        """Nonces held in the replay cache."""
        return len(self._seen)

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, key = heapq.heappop(self._expiry)
            self._seen.discard(key)

    def _refuse(self, subject: str, identity: str | None, request_id: str | None,
                reason: str, message: str) -> NoReturn:
        self.refused += 1
        refusal = Refusal(subject=subject, identity=identity, reason=reason, message=message,
                          request_id=request_id, ts=self.clock())
        self.log.warning("command refused", subject=subject, identity=identity,
                         reason=reason, request_id=request_id, error=message)
        if self.on_refusal is not None:
            try:
                self.on_refusal(refusal)
            except Exception:
                self.log.exception("refusal hook failed")
        raise Forbidden(message, details={"reason": reason})


class NonceLedger:
    """The nonces every verifier of the stack accepted in the last ``NONCE_TTL_S``."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def claim(self, identity: str, nonce: str) -> bool:
        """Record ``identity``'s ``nonce``; False if it was recorded already (a replay)."""
        key = auth.nonce_key(identity, auth.nonce_digest(nonce))
        try:
            await self.kv.create(key, b"")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True


async def open_nonces(js: Any, replicas: int = 1) -> NonceLedger:
    """Open the ``sy_nonces`` bucket, creating it if missing."""
    try:
        kv = await js.key_value(subjects.NONCES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        try:
            kv = await js.create_key_value(KeyValueConfig(
                bucket=subjects.NONCES_BUCKET, history=1, ttl=auth.NONCE_TTL_S,
                replicas=replicas, storage=StorageType.FILE,
                description="nonces of accepted signed commands (replays are refused)"))
        except nats.js.errors.BadRequestError:  # created meanwhile by another verifier
            kv = await js.key_value(subjects.NONCES_BUCKET)
    return NonceLedger(kv)


# -- the guard of a serving node ------------------------------------------------------------

_GUARDS: weakref.WeakKeyDictionary[Any, CommandGuard | None] = weakref.WeakKeyDictionary()
_NONCES: weakref.WeakKeyDictionary[Any, NonceLedger] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()


def node_identity(settings: Any) -> keys.Credentials | None:
    """The shipyard identity a node's connection uses, if any."""
    path = getattr(settings, "creds_file", None)
    if path and keys.is_shipyard_credentials(path):
        return keys.read_credentials(path)
    return None


async def guard_of(node: Any) -> CommandGuard | None:
    """The node's guard, opened on first use (None when the node runs without shipyard
    credentials: nothing is verified on an insecure stack)."""
    if node in _GUARDS:
        return _GUARDS[node]
    lock = _LOCKS.setdefault(node, anyio.Lock())
    async with lock:
        if node in _GUARDS:
            return _GUARDS[node]
        guard: CommandGuard | None = None
        if node_identity(node.settings) is not None:
            kv = await ensure_kv(node.js, subjects.IDENTITIES_BUCKET,
                                 replicas=node.settings.replicas,
                                 description="identities that may connect and sign")
            cache: KVCache[Identity] = KVCache(kv, ">", IDENTITY.decode)
            await node.tg.start(cache.run)

            def lookup(name: str) -> Identity | None:
                entry = cache.get(name)
                return entry.value if entry is not None else None

            # A node that defines ``command_refused(refusal)`` hears of every refusal
            # (where an audit ledger records them).
            guard = CommandGuard(lookup, on_refusal=getattr(node, "command_refused", None))
            _NONCES[node] = await open_nonces(node.js, node.settings.replicas)
        _GUARDS[node] = guard
        return guard


async def verify_command(node: Any, subject: str, data: bytes,
                         command: type[Any]) -> Identity | None:
    """Raise ``Forbidden`` unless the command is signed by an identity that may send it;
    return that identity (None on a node without shipyard credentials: nothing checked)."""
    guard = _GUARDS.get(node) if node in _GUARDS else await guard_of(node)
    if guard is not None:
        return await guard.verify(subject, data, command, _NONCES.get(node))
    return None
