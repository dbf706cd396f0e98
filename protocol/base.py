"""Message base classes, the request/reply envelope and the per-family codecs.

Evolution rules (every message, every family):

1. Every message carries ``v`` (the schema version it was written with).
2. A new field always has a default, so older senders stay valid.
3. A field never changes type or meaning; retire it and add a new one instead.
4. Unknown fields are ignored when decoding, so newer senders stay readable.
5. A new message kind is a new tag in its family's union; a reader that does not know
   the tag refuses it with a ``DecodeError`` (and a CLI shows the raw JSON).

JSON is the wire format so ``nats sub 'sy.>'`` shows readable traffic.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, ClassVar, Generic, TypeVar, get_args

import msgspec

from protocol.errors import DecodeError

SCHEMA_VERSION = 1

R = TypeVar("R")
T = TypeVar("T")


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every message: frozen, tagged by ``type``, versioned by ``v``."""

    v: int = SCHEMA_VERSION


class Command(Message, Generic[R], frozen=True, kw_only=True):
    """A request body.  ``R`` is the reply body type, so clients get typed answers."""


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The typed error half of a reply: a stable ``code`` and a human ``message``."""

    code: str
    message: str
    details: dict[str, Any] = {}


class Request(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """The command envelope: metadata beside the body.

    ``id`` is the idempotency key and correlation id: a retried command re-uses it.
    ``identity``, ``signature`` and ``nonce`` sign admin commands (``protocol.auth``).
    """

    body: T
    id: str
    ts: float
    sender: str = ""
    identity: str | None = None
    signature: str | None = None
    nonce: str | None = None
    v: int = SCHEMA_VERSION


class Reply(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """Exactly one of ``ok`` (the reply body) or ``error`` is set.

    ``re`` is the ``id`` of the request answered, so a requester that re-uses its reply
    subjects (``nodes.runtime.requests``) can tell this reply from a late one to an
    earlier request; None when the request's id could not be read.
    """

    ok: T | None = None
    error: ErrorInfo | None = None
    re: str | None = None
    v: int = SCHEMA_VERSION


class RequestId(msgspec.Struct):
    """Only the ``id`` of a request envelope: what a reply names when the rest of the
    request could not be decoded."""

    id: str


# msgspec raises RecursionError (not DecodeError) for JSON nested deeper than the
# interpreter's recursion limit (about 1,000 levels): 2 KB of "[" is enough.
NESTED_TOO_DEEPLY = "JSON nested too deeply (at most about 1,000 levels)"

# One encoder for every message; msgspec encoders are stateless and thread-safe.
_ENCODER = msgspec.json.Encoder()
encode = _ENCODER.encode


_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def new_id() -> str:
    """A unique id: a random per-process prefix and a counter (no syscall per id)."""
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def make_request(body: Command[Any], *, sender: str = "", request_id: str | None = None,
                 identity: str | None = None) -> bytes:
    """Encode ``body`` in a request envelope."""
    return encode(Request(body=body, id=request_id or new_id(), ts=time.time(),
                          sender=sender, identity=identity))


def tag_of(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__name__} has no string tag")
    return tag


class Codec(Generic[T]):
    """One decoder for one message type (or tagged union), created once."""

    def __init__(self, kind: Any) -> None:
        self.kind = kind  # the type or union decoded (the catalogue lists its tags)
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(kind)

    def decode(self, data: bytes, subject: str = "?") -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(subject, bytes(data[:512]), str(exc)) from exc
        except RecursionError as exc:  # msgspec's answer to JSON nested past its depth
            raise DecodeError(subject, bytes(data[:512]), NESTED_TOO_DEEPLY) from exc

    @staticmethod
    def encode(msg: Any) -> bytes:
        return _ENCODER.encode(msg)


class Family:
    """The commands one role answers, and the replies it sends back.

    ``commands`` and ``replies`` are tagged unions.  A command's tag is its verb: it is
    served on ``sy.cmd.<role>.<verb>`` (or ``sy.node.<node>.<verb>`` for node-direct
    families).
    """

    _of: ClassVar[dict[type[Any], Family]] = {}

    def __init__(self, role: str, commands: Any, replies: Any, *, direct: bool = False) -> None:
        self.role = role
        self.direct = direct
        members: tuple[type[Command[Any]], ...] = get_args(commands) or (commands,)
        self.verbs: dict[str, type[Command[Any]]] = {tag_of(m): m for m in members}
        self.requests: Codec[Request[Any]] = Codec(Request[commands])
        self.replies: Codec[Reply[Any]] = Codec(Reply[replies])
        for m in members:
            Family._of[m] = self

    @classmethod
    def of(cls, command: type[Any]) -> Family:
        family = cls._of.get(command)
        if family is None:
            import protocol.families  # noqa: F401 - registers every family

            family = cls._of.get(command)
        if family is None:
            raise TypeError(f"{command.__name__} belongs to no command family")
        return family
