"""Frames between the engine, its fork server and the job processes it forks.

Framed by ``nodes.runtime.framing`` (shared with the API node's workers), one tagged
union per direction.
Private to the flow package: both ends always run the same code, so there are no
compatibility rules here, unlike ``protocol/``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from nodes.runtime.framing import HEADER as HEADER
from nodes.runtime.framing import Deframer as Deframer
from nodes.runtime.framing import frame as frame


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a job process needs: what to run, where, with which limits."""

    kind: str                                  # "recipe" or "script"
    name: str                                  # recipe name or script step name
    code: str                                  # absolute path of the Python file
    cwd: str
    sys_path: list[str] = []
    inputs: dict[str, str] = {}                # dataset -> path
    outputs: dict[str, str] = {}               # dataset -> temporary path
    datasets: dict[str, str] = {}              # every dataset -> path (scripts)
    data_dir: str = ""
    code_dir: str = ""
    params: dict[str, Any] = {}
    memory_mb: int | None = None
    measure: bool = True                       # compute size/row metrics of outputs


# -- engine -> fork server --------------------------------------------------------------

class Spawn(msgspec.Struct, frozen=True, tag=True):
    job: int
    spec: JobSpec


class Stop(msgspec.Struct, frozen=True, tag=True):
    """SIGTERM the job's process group now, SIGKILL it after ``grace_s``."""

    job: int
    grace_s: float


ToServer = Spawn | Stop


# -- fork server -> engine --------------------------------------------------------------

class Ready(msgspec.Struct, frozen=True, tag=True):
    pid: int


class Started(msgspec.Struct, frozen=True, tag=True):
    job: int
    pid: int


class Output(msgspec.Struct, frozen=True, tag=True):
    """Bytes the job wrote to its stdout or stderr (ctx.log writes there too)."""

    job: int
    data: bytes


class Exited(msgspec.Struct, frozen=True, tag=True):
    """The job process is gone.  ``returncode`` as in ``subprocess`` (negative: killed
    by that signal); ``report`` is the job's encoded ``Report`` (empty if it died before
    writing one); ``spawn_error`` is set when the fork itself failed."""

    job: int
    returncode: int
    report: bytes = b""
    peak_rss_kb: int = 0
    spawn_error: str = ""


FromServer = Ready | Started | Output | Exited


# -- job process -> engine (through the fork server, in ``Exited.report``) -----------------

class Report(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    exit_code: int = 0
    error: str = ""                            # "ValueError: bad row"
    traceback_tail: list[str] = []
    memory_error: bool = False
    metrics: dict[str, dict[str, int | float]] = {}


_spec = msgspec.msgpack.Decoder(JobSpec)
_to_server = msgspec.msgpack.Decoder(ToServer)
_from_server = msgspec.msgpack.Decoder(FromServer)
_report = msgspec.msgpack.Decoder(Report)
_encoder = msgspec.msgpack.Encoder()


def encode_report(report: Report) -> bytes:
    return _encoder.encode(report)


def decode_report(data: bytes) -> Report | None:
    try:
        return _report.decode(data) if data else None
    except msgspec.DecodeError:
        return None


def decode_spec(body: bytes) -> JobSpec:
    return _spec.decode(body)


def decode_to_server(body: bytes) -> ToServer:
    return _to_server.decode(body)


def decode_from_server(body: bytes) -> FromServer:
    return _from_server.decode(body)
