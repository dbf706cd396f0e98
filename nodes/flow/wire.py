"""The engine's side of the frames it exchanges with its fork servers and their jobs.

The layout (``nodes.sandbox.frames``) and the messages (``nodes.sandbox.messages``)
are defined once, in the sandbox, because the fork server and the jobs run inside code
environments with the standard library only.  Here the engine decodes the same bytes
with msgspec into those same dataclasses, so every field is type-checked on arrival
(``tests/test_sandbox.py`` runs both sides against each other).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from nodes.sandbox import frames
from nodes.sandbox.frames import Deframer as Deframer
from nodes.sandbox.frames import FrameError as FrameError
from nodes.sandbox.messages import (
    FROM_SERVER,
    Exited,
    JobSpec,
    Output,
    Ready,
    Report,
    Spawn,
    Started,
    Stop,
)

__all__ = ["Deframer", "Exited", "FrameError", "JobSpec", "Output", "Ready", "Report",
           "Spawn", "Started", "Stop", "decode", "decode_from_server", "decode_report",
           "encode", "spawn"]

FromServer = Ready | Started | Output | Exited
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_json = msgspec.json.Encoder().encode


def encode(msg: Any) -> bytes:
    """One frame holding ``msg`` (a ``messages`` dataclass), as ``frames.encode`` writes
    it; without a blob, with msgspec (a ``JobSpec``: ~2 us, against ~20 us for the
    standard library's json)."""
    if msg.BLOB:  # metadata of a few numbers
        return frames.encode(msg)
    return frames.pack(msg.KIND, _json(msg))


def decode(kinds: dict[int, Any], kind: int, meta: bytes, blob: bytes) -> Any:
    """The message in a frame, typed and checked (``FrameError`` if it is not one of
    ``kinds`` or does not fit its class)."""
    cls = kinds.get(kind)
    if cls is None:
        raise FrameError(f"unknown frame kind {kind}")
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        msg = dec.decode(meta)
    except msgspec.DecodeError as exc:
        raise FrameError(f"bad {cls.__name__} frame: {exc}") from None
    if cls.BLOB:
        msg = dataclasses.replace(msg, **{cls.BLOB: blob})
    return msg


def decode_from_server(kind: int, meta: bytes, blob: bytes) -> FromServer:
    msg: FromServer = decode(FROM_SERVER, kind, meta, blob)
    return msg


def spawn(job: int, spec: JobSpec) -> bytes:
    """The ``Spawn`` frame for ``spec``."""
    return frames.encode(Spawn(job=job, spec=encode(spec)))


def decode_report(data: bytes) -> Report | None:
    """A job's report (``Exited.report``), or None if it wrote none or a broken one."""
    if not data:
        return None
    try:
        kind, meta, blob = frames.split(data)
        report: Report = decode({Report.KIND: Report}, kind, meta, blob)
    except (FrameError, Exception):
        return None
    return report
