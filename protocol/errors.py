"""The error tree shared by nodes and clients.

``ShipyardError`` is the root.  Two branches matter:

* ``ProtocolError`` -- bytes that are not a valid shipyard message.  ``DecodeError``
  keeps the raw bytes and the subject so a log line can show exactly what arrived.
* ``OperationError`` -- a request that was understood but refused or failed.  Each
  subclass carries a stable wire ``code``; a handler raises one, the runtime turns it
  into an error reply, and the client raises the same class again from that reply
  (``error_from_wire``).  So ``except NotFound`` works on both sides of the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShipyardError(Exception):
    """Root of every error shipyard raises on purpose."""


class ProtocolError(ShipyardError):
    """Raised when bytes on the wire are not a valid shipyard message."""


class DecodeError(ProtocolError):
    """Raised when a payload cannot be decoded into the expected message type.

    ``raw`` holds the bytes that failed (truncated for display), ``subject`` where they
    arrived; the original msgspec error is chained as ``__cause__``.
    """

    def __init__(self, subject: str, raw: bytes, reason: str) -> None:
        self.subject = subject
        self.raw = raw
        self.reason = reason
        super().__init__(f"cannot decode message on {subject!r}: {reason}")


class InvalidMessage(ProtocolError, ValueError):
    """Raised when a message decodes but breaks a rule: a bad name, a number out of its
    bounds, or a sender that does not match the subject it arrived on.  Messages that
    arrive on plain subscriptions (heartbeats, reports, events) have no one to answer, so
    the subscriber drops them; ``reason`` says what was wrong and what was expected."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class OperationError(ShipyardError):
    """A request that was refused or failed; travels as ``{"code", "message"}``."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        self.message = message
        self.details = details or {}
        super().__init__(message)


class BadRequest(OperationError):
    """The request is malformed or names something in the wrong shape."""

    code = "bad_request"


class BadName(BadRequest, ValueError):
    """A name (node, role, infra, project, service, endpoint, version, ...) breaks the
    naming rules.  Also a ``ValueError``, so validation code that predates the typed tree
    still catches it; as a ``BadRequest`` it reaches the caller as ``bad_request``."""


class NotFound(OperationError):
    """The request names a project, bundle, infra, node or service that does not exist."""

    code = "not_found"


class Conflict(OperationError):
    """The request lost a compare-and-set race or re-uses an immutable id."""

    code = "conflict"


class Unauthorized(OperationError):
    """Credentials are missing or wrong."""

    code = "unauthorized"


class Forbidden(OperationError):
    """The caller is known but may not do this (for example, a policy refuses it)."""

    code = "forbidden"


class Unavailable(OperationError):
    """No node serves the request right now (NATS had no responders)."""

    code = "unavailable"


class Overloaded(OperationError):
    """The node is at its concurrency limit and shed the request."""

    code = "overloaded"


class Timeout(OperationError):
    """The request did not complete before its deadline."""

    code = "timeout"


class TooLarge(OperationError):
    """The request body exceeds the size limit."""

    code = "too_large"


class UserCodeError(OperationError):
    """User code (a recipe, a predict function) raised."""

    code = "user_code"


class NotApproved(OperationError):
    """A deployment refused by its infra's ``prevent`` policy: an artifact it needs has
    not been approved on the Govern node (``details["missing"]`` names each one)."""

    code = "not_approved"


class Internal(OperationError):
    """An unexpected failure inside a node; the node keeps serving."""

    code = "internal"


_BY_CODE: dict[str, type[OperationError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        Conflict,
        Unauthorized,
        Forbidden,
        Unavailable,
        Overloaded,
        Timeout,
        TooLarge,
        UserCodeError,
        NotApproved,
        Internal,
    )
}


def error_class(code: str) -> type[OperationError]:
    """The ``OperationError`` subclass for a wire code (``Internal`` if unknown)."""
    return _BY_CODE.get(code, Internal)


def error_from_wire(code: str, message: str,
                    details: dict[str, Any] | None = None) -> OperationError:
    """Rebuild the typed error a remote handler raised."""
    err = error_class(code)(message, details=details)
    if err.code != code:  # unknown code from a newer peer: keep what it said
        err.details.setdefault("code", code)
    return err
