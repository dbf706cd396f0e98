"""Prediction capture: what a service opted into, and what one captured call looks like.

A service deployed with ``--capture F`` has a fraction ``F`` of its requests recorded,
with the answer, the generation that gave it, its status and its latency, by the API
worker that answered it, after the reply has gone out.  Each one is a ``CapturedCall``
published on ``sy.cap.<service>.<endpoint>`` (``subjects.capture``), which the
``SY_CAPTURE`` stream keeps within a size and an age limit.

Sampling is decided per request: by a hash of the request id when the request carries
one (``REQUEST_ID_HEADER``: every copy of it, and every node, decides the same way; the
id is also the stream's dedup id, so a hedged copy that ran twice is stored once),
otherwise at random.

``--redact a,b.c`` removes fields before anything leaves the worker: top-level keys of
the request's features (each item's, for a multi request; the body, for a function
endpoint) and of the answer (``result``, each of ``results``, ``response``); a dotted path
reaches into nested objects, and into every object of a list on its way (``items.secret``
removes each item's ``secret``).  A removed field is gone: it is not
hashed, masked nor counted in the captured bytes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

# Request headers (NATS) the capture path reads.
REQUEST_ID_HEADER = "Sy-Request-Id"  # a caller's request id: sampling and dedup key
REPLAY_HEADER = "Sy-Replay"  # a replayed request: never captured, latency in the reply
LATENCY_HEADER = "Sy-Latency"  # reply header of a replayed request: seconds in the worker

MAX_REDACT = 32  # paths in one --redact
MAX_PATH = 256
_PATH = re.compile(r"^[^.\s]+(\.[^.\s]+)*\Z")

OPS = ("predict", "multi", "run")


class CaptureSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A service's capture: the fraction of requests recorded (0: off) and the fields
    removed from each before it leaves the worker."""

    fraction: float = 0.0
    redact: list[str] = []

    @property
    def on(self) -> bool:
        return self.fraction > 0.0

    def describe(self) -> str:
        if not self.on:
            return "off"
        text = f"{self.fraction:g}"
        return text + (f" (redact {','.join(self.redact)})" if self.redact else "")


def check_fraction(fraction: float) -> float:
    """``fraction`` if it is in [0, 1]; ``ValueError`` otherwise."""
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"invalid capture fraction {fraction!r}: expected a number from 0 "
                         "(off) to 1 (every request), e.g. 0.1")
    return float(fraction)


def check_redact(paths: list[str]) -> list[str]:
    """The paths, deduplicated in order; ``ValueError`` for a malformed one."""
    if len(paths) > MAX_REDACT:
        raise ValueError(f"{len(paths)} fields to redact: expected at most {MAX_REDACT}")
    out: list[str] = []
    for path in paths:
        if not isinstance(path, str) or len(path) > MAX_PATH or not _PATH.match(path):
            raise ValueError(f"invalid field to redact {path!r}: expected a field name or a "
                             "dotted path (customer.email), no spaces or empty parts")
        if path not in out:
            out.append(path)
    return out


def parse_redact(text: str) -> list[str]:
    """``"email, card.number"`` -> ``["email", "card.number"]``; ``ValueError``."""
    return check_redact([p.strip() for p in text.split(",") if p.strip()])


def sampled(request_id: str, fraction: float) -> bool:
    """Whether the request with this id is captured at ``fraction``: the same answer on
    every node and for every copy of the request."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


def redact(value: Any, paths: list[str]) -> list[str]:
    """Remove ``paths`` from ``value`` (decoded JSON: the objects in it, and in its lists;
    anything else is left as it is), in place; return the paths that were there."""
    removed = []
    for path in paths:
        if _drop(value, path.split(".")):
            removed.append(path)
    return removed


def _drop(value: Any, parts: list[str]) -> bool:
    level = [value]
    for part in parts[:-1]:
        level = [obj.get(part) for obj in _objects(level)]
    found = False
    for obj in _objects(level):
        if parts[-1] in obj:
            del obj[parts[-1]]
            found = True
    return found


def _objects(values: list[Any]) -> list[dict[str, Any]]:
    """The objects among ``values``, those inside lists (at any depth) included, without
    recursion (a list may be nested as deep as JSON lets it)."""
    found: list[dict[str, Any]] = []
    stack = list(reversed(values))
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            found.append(value)
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return found


class CapturedCall(msgspec.Struct, frozen=True, kw_only=True):
    """One captured request and its answer, as the worker that answered it saw them.

    ``request`` is what the endpoint's code was given: the features (predict), the list
    of each item's features (multi), the body (run; a JSON string of its text when it
    was not JSON, with ``text`` set, so a replay sends the same bytes again).
    ``response`` is what it answered: the result, the list of results, the response, or
    for a failure the error body ``{"error": {"code", "message"}}``.
    Both are redacted; ``redacted`` names the request fields that were removed from this
    one, ``redact`` the service's setting when it was captured (replay removes the same
    fields from the new answer before comparing)."""

    id: str  # the request id (REQUEST_ID_HEADER, or made up by the worker); dedup id
    service: str
    endpoint: str
    generation: str
    op: str  # predict | multi | run
    ts: float  # when it was answered (seconds since the epoch)
    latency_s: float  # running the endpoint's code in the worker
    status: int  # the HTTP status of the answer (200, or the error's)
    node: str
    worker: int = 0
    request: msgspec.Raw = msgspec.Raw(b"null")
    response: msgspec.Raw = msgspec.Raw(b"null")
    redacted: list[str] = []
    redact: list[str] = []
    text: bool = False  # run: the body was not JSON, ``request`` is its text (sent as is)
    v: int = 1


CAPTURED_CALL = msgspec.json.Decoder(CapturedCall)


def capture_settings(current: CaptureSettings | None, fraction: float | None,
                     paths: list[str] | None) -> CaptureSettings | None:
    """The settings a deploy asks for: ``fraction`` and ``paths`` (None: keep what
    ``current`` has; off for a new deployment).  Raises ``ValueError``."""
    if fraction is None and paths is None:
        return current
    f = check_fraction(fraction) if fraction is not None else (
        current.fraction if current else 0.0)
    p = check_redact(paths) if paths is not None else (current.redact if current else [])
    if f == 0.0 and not p:
        return None
    return CaptureSettings(fraction=f, redact=p)
