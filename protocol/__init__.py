"""shipyard's wire contract: subjects, messages, envelopes and errors.

Nothing here talks to NATS; ``nodes`` does.  See ``protocol.subjects`` for the subject
space and ``protocol.base`` for the evolution rules.
"""

from protocol.base import (
    SCHEMA_VERSION,
    Codec,
    Command,
    ErrorInfo,
    Family,
    Message,
    Reply,
    Request,
    encode,
    make_request,
    new_id,
)

__all__ = [
    "SCHEMA_VERSION",
    "Codec",
    "Command",
    "ErrorInfo",
    "Family",
    "Message",
    "Reply",
    "Request",
    "encode",
    "make_request",
    "new_id",
]
