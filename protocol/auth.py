"""Identities and signed commands: what is signed, who may send what, and why a command
is refused.

A human or a node is an *identity*: a name, a role and an Ed25519 public key (an nkeys
user key, ``U...``).  The same private key authenticates the NATS connection (the server
checks it against its nonce) and signs each command, so one credentials file serves both.

What a signature covers (``signed_bytes``), in this order, one per line: a domain tag, the
subject the command is sent on, the request id, the timestamp as the envelope spells it,
the nonce, the identity, then the exact bytes of the JSON ``body``.  The subject binds the
verb and role; the body is signed as sent (the verifier takes it out of the envelope as
raw bytes, never re-encodes it), so a newer sender's unknown fields still verify.

A verifier refuses, with a ``forbidden`` error (HTTP 403):

* an unsigned command, a malformed signature, or one that does not verify;
* an identity it does not know, or one that was revoked;
* a command stamped more than ``MAX_AGE_S`` seconds in the past or more than
  ``MAX_SKEW_S`` in the future;
* a nonce it has already seen (it remembers nonces until their command would be too old
  anyway, so the replay cache is bounded by the rate of commands, at most
  ``REPLAY_CACHE_MAX``), in its own process or, through the ``sy_nonces`` KV bucket, in
  any verifier of the stack since ``NONCE_TTL_S`` ago (a restarted Deployer, another
  instance of its queue group, the Govern node);
* a command the identity's role may not send (``REQUIRED_ROLE``).

A retry of a command keeps its request id (the idempotency key) but is signed afresh with
a new nonce and timestamp, so a retry is never mistaken for a replay.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from protocol.api import (
    CreateApiKey,
    CreateApiPackage,
    DeployApi,
    ListApiKeys,
    ListApiPackages,
    RevokeApiKey,
    RollbackApi,
)
from protocol.base import Command
from protocol.bundles import CreateBundle, ListBundles, ListProjects
from protocol.deploy import (
    CreateInfra,
    DeployBundle,
    GetHistory,
    ListDeployments,
    ListInfras,
    RollbackBundle,
    SetInfra,
)
from protocol.govern import GetReview, ListArtifacts, RequestReview, ReviewArtifact
from protocol.health import GetHealth, SendTestAlert
from protocol.registry import ForgetNode, ListNodes
from protocol.scenarios import BuildDatasets, CancelRun, GetRunLog, ListRuns, RunScenario
from protocol.subjects import token

SIGNING_DOMAIN: Final = b"shipyard-command-v1"
MAX_AGE_S: Final = 60.0
MAX_SKEW_S: Final = 60.0  # how far in the future a timestamp may be (clock skew)
REPLAY_CACHE_MAX: Final = 100_000
# How long the stack-wide nonce record lives (``sy_nonces`` bucket TTL): a command stamped
# up to MAX_SKEW_S ahead stays acceptable until MAX_AGE_S after its stamp.
NONCE_TTL_S: Final = MAX_AGE_S + MAX_SKEW_S

# -- roles ---------------------------------------------------------------------------------

HUMAN_ROLES: Final = ("admin", "deployer", "reviewer", "viewer")
NODE_ROLES: Final = ("deployer", "design", "govern", "automation", "api", "gateway")

# A human role includes what the roles after it in this list may do.
_RANK: Final = {"viewer": 0, "reviewer": 1, "deployer": 2, "admin": 3}

# The least human role each command needs.  A command missing here needs ``admin``
# (closed by default: a new command is refused to everyone else until it is placed).
REQUIRED_ROLE: Final[dict[type[Command[Any]], str]] = {
    ListNodes: "viewer", ListInfras: "viewer", ListDeployments: "viewer",
    GetHistory: "viewer", ListRuns: "viewer", GetRunLog: "viewer", ListApiKeys: "viewer",
    ListBundles: "viewer", ListProjects: "viewer", ListApiPackages: "viewer",
    DeployBundle: "deployer", RollbackBundle: "deployer", RunScenario: "deployer",
    CancelRun: "deployer", DeployApi: "deployer", RollbackApi: "deployer",
    CreateApiKey: "deployer", RevokeApiKey: "deployer", CreateBundle: "deployer",
    BuildDatasets: "deployer", CreateApiPackage: "deployer",
    ListArtifacts: "viewer", GetReview: "viewer", RequestReview: "deployer",
    ReviewArtifact: "reviewer",
    CreateInfra: "admin", SetInfra: "admin", ForgetNode: "admin",
    GetHealth: "viewer", SendTestAlert: "deployer",
}


def required_role(command: type[Any]) -> str:
    return REQUIRED_ROLE.get(command, "admin")


def may_send(role: str, command: type[Any], kind: str = "user") -> bool:
    """Whether an identity of ``kind`` and ``role`` may send ``command``.  Nodes send no
    admin command, whatever their role is called (a ``deployer`` node is not a
    ``deployer`` human; the ``shipyard up`` supervisor acts as the stack's admin)."""
    rank = _RANK.get(role)
    return kind == "user" and rank is not None and rank >= _RANK[required_role(command)]


def commands_for(role: str) -> list[type[Command[Any]]]:
    """The commands a human ``role`` may send (what its NATS user may publish)."""
    return [cls for cls in REQUIRED_ROLE if may_send(role, cls)]


def check_role(role: str, kind: str) -> str:
    roles = HUMAN_ROLES if kind == "user" else NODE_ROLES
    if role not in roles:
        raise ValueError(f"invalid {kind} role {role!r}: expected one of {', '.join(roles)}")
    return role


# -- identity records (KV ``sy_identities``, key = name) -------------------------------------

class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who may connect and sign: written by ``shipyard auth``, read by verifiers."""

    name: str
    kind: str  # "user" or "node"
    role: str
    public_key: str
    infra: str | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    v: int = 1

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


IDENTITY = msgspec.json.Decoder(Identity)


def identity_key(name: str) -> str:
    return token(name, "identity name")


# -- the signed part of an envelope ---------------------------------------------------------

class SignedPart(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of a request envelope a verifier reads, the body kept as raw bytes."""

    body: msgspec.Raw
    id: str
    ts: float
    identity: str | None = None
    signature: str | None = None
    nonce: str | None = None


SIGNED_PART = msgspec.json.Decoder(SignedPart)


def signed_bytes(subject: str, request_id: str, ts: float, nonce: str, identity: str,
                 body: bytes) -> bytes:
    """The bytes an identity signs for one command (see the module docstring)."""
    head = "\n".join((subject, request_id, repr(ts), nonce, identity))
    return b"%s\n%s\n%s" % (SIGNING_DOMAIN, head.encode(), bytes(body))


# -- nonces already used (KV ``sy_nonces``, create-only: a second create is a replay) -------

def nonce_digest(nonce: str) -> str:
    """A fixed-length, key-safe stand-in for a nonce (the sender chooses its characters)."""
    return hashlib.blake2b(nonce.encode(), digest_size=16).hexdigest()


def nonce_key(identity: str, digest: str) -> str:
    """The record of one identity's nonce (``digest`` from ``nonce_digest``)."""
    return f"{token(identity, 'identity name')}.{token(digest, 'nonce digest')}"


# Why a command was refused (the ``reason`` in a ``forbidden`` error's details).
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad_signature"
UNKNOWN_IDENTITY = "unknown_identity"
REVOKED = "revoked"
STALE = "stale"
REPLAYED = "replayed"
ROLE = "role"
REPLAY_CACHE_FULL = "replay_cache_full"
