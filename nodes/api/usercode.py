"""User code in the worker's own interpreter (the builtin environment), and what the
worker needs to run it: the msgspec JSON codec, ``Failed``, ``same_result``.

Loading a generation's modules and calling an endpoint is ``nodes.sandbox.usercode``:
one implementation, which a user-code host in a code environment runs too (with the
standard library's ``json``), so replies are the same wherever an endpoint runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import msgspec

from nodes.api.wire import EndpointCode
from nodes.sandbox import usercode as shared
from nodes.sandbox.usercode import OP_MULTI as OP_MULTI
from nodes.sandbox.usercode import OP_PREDICT as OP_PREDICT
from nodes.sandbox.usercode import OP_RUN as OP_RUN
from nodes.sandbox.usercode import Refused as Failed
from nodes.sandbox.usercode import enc_hook, non_finite, not_finite
from protocol.base import NESTED_TOO_DEEPLY

__all__ = ["OP_MULTI", "OP_PREDICT", "OP_RUN", "Failed", "Generation", "Runnable",
           "check_payload", "encode_result", "same_result"]

JSON = msgspec.json.Decoder()
FEATURES = msgspec.json.Decoder(dict[str, Any])
_ENCODE = msgspec.json.Encoder(enc_hook=enc_hook).encode


def encode_result(value: Any, name: str = "result") -> bytes:
    """``value`` as JSON; ``Failed`` (``bad_result``) if it holds NaN or an infinity.

    msgspec writes a non-finite float as ``null``, so a model's NaN would reach the client
    as a 200 that lies; JSON has no such numbers, so such a result is refused.  The check
    walks the value (dicts, lists, tuples, numpy values) only when the encoded text has a
    ``null`` in it, so a result without one costs a substring search."""
    data = _ENCODE(value)
    if b"null" in data:
        where = non_finite(value, name)
        if where is not None:
            raise not_finite(where)
    return data


class MsgspecCodec:
    """The worker's JSON codec (``nodes.sandbox.usercode.Codec``)."""

    def features(self, raw: bytes) -> dict[str, Any]:
        try:
            return FEATURES.decode(raw)
        except msgspec.DecodeError as exc:
            raise Failed("bad_request", f"features: {exc}; expected a JSON object of "
                                        "feature values") from None
        except RecursionError:
            raise Failed("bad_request", f"features: {NESTED_TOO_DEEPLY}") from None

    def value(self, raw: bytes) -> Any:
        try:
            return JSON.decode(raw)
        except msgspec.DecodeError as exc:
            raise Failed("bad_request", f"malformed JSON body: {exc}; expected any JSON "
                                        "value") from None
        except RecursionError:
            raise Failed("bad_request", f"malformed JSON body: {NESTED_TOO_DEEPLY}") \
                from None

    def encode(self, value: Any, name: str = "result") -> bytes:
        return encode_result(value, name)


CODEC = MsgspecCodec()
_call = shared.call


class Runnable(Protocol):
    """A loaded generation, wherever its code runs (here, or in a user-code host)."""

    name: str

    def call(self, endpoint: str, op: int, payload: Any) -> bytes:
        """The reply body; raises ``Failed``, ``MemoryError``, or anything user code
        raised."""
        ...


class Generation(shared.Generation):
    """A generation loaded in this process."""

    def __init__(self, service: str, name: str, directory: Path,
                 endpoints: list[EndpointCode]) -> None:
        super().__init__(service, name, directory,
                         [msgspec.structs.astuple(e) for e in endpoints])

    def call(self, endpoint: str, op: int, payload: Any) -> bytes:
        return _call(self, endpoint, op, payload, CODEC)


def check_payload(op: int, payload: Any) -> None:
    """Refuse a payload as running it here would (``Failed("bad_request")``, with the
    same words), before it is sent to a user-code host."""
    if op == OP_PREDICT:
        CODEC.features(payload)
    elif op == OP_MULTI:
        for i, raw in enumerate(payload):
            try:
                CODEC.features(raw)
            except Failed as exc:
                raise Failed(exc.code, f"items[{i}]: {exc.message}") from None
    else:
        CODEC.value(payload)


def _strip_generation(body: bytes) -> bytes:
    return body[:body.rfind(b',"generation":')]


def same_result(a: bytes, b: bytes) -> bool:
    """Two reply bodies equal but for the generation that made them (shadow checks)."""
    return _strip_generation(a) == _strip_generation(b)
