"""The audit ledger: one entry per command a verifying role (Deployer, Govern) received.

Entries are appended to the ``SY_AUDIT`` stream (``subjects.AUDIT_STREAM``), created with
deny-delete and deny-purge: no shipyard credential, the admin's included, can remove an
entry; only the server operator can (by removing the stream's storage).  An entry is
written for every command, accepted or refused, including those refused before any
handler ran (a bad signature, an unknown or revoked identity, a stale or replayed
command, a role that may not send it, a malformed request).

``identity`` is the verified signer of an accepted command; for a refused one it is the
name the envelope claimed (``verified`` false), which may be a lie and is recorded as
such.  ``args`` is the decoded command body, encoded again with its type tag (the
command's own JSON encoding); ``null`` when the request did not decode.
"""

from __future__ import annotations

import msgspec

OK = "ok"
ERROR = "error"
NO_ARGS = msgspec.Raw(b"null")


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # unique, and the stream's dedup id
    ts: float  # when the node decided the command's fate (seconds since the epoch)
    node: str  # the node that received it
    role: str
    subject: str
    command: str  # the body's type tag (the verb)
    request_id: str | None = None
    identity: str | None = None
    verified: bool = False  # the identity's signature was verified
    args: msgspec.Raw = NO_ARGS  # the command body (JSON ``null``: it did not decode)
    outcome: str = OK  # ok | error
    error_code: str | None = None
    error: str | None = None
    reason: str | None = None  # why a ``forbidden`` command was refused (protocol.auth)
    v: int = 1


AUDIT_ENTRY = msgspec.json.Decoder(AuditEntry)


class Deployed(msgspec.Struct, frozen=True, kw_only=True):
    """What one deployment (a project's bundle or an API service's mapping) was at a time
    (``shipyard audit at``)."""

    infra: str
    kind: str  # bundle | api
    name: str  # the project or the service
    deployed: str  # the bundle id, or the API mapping ("v1=90,v2=10")
    since: float  # when that update was made
    by: str
    action: str  # deploy | rollback
    update_id: str
    result: str  # what the update's rollout came to (pending, succeeded, failed, ...)
