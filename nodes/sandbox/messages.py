"""What crosses the pipes between shipyard and the processes of a user's interpreter.

Plain frozen dataclasses (the standard library only: this module runs inside user
environments), one ``KIND`` number each, and at most one ``bytes`` field, ``BLOB``,
carried raw after the JSON metadata (``frames``).  Shipyard decodes them with msgspec
into these same classes (``nodes.flow.wire``, ``nodes.api.hostproxy``), so each message
is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# -- the flow engine and its fork server ------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """Everything a job process needs: what to run, where, with which limits."""

    KIND: ClassVar[int] = 1
    BLOB: ClassVar[str] = ""
    kind: str                                  # "recipe" or "script"
    name: str                                  # recipe name or script step name
    code: str                                  # absolute path of the Python file
    cwd: str
    sys_path: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)     # dataset -> path
    outputs: dict[str, str] = field(default_factory=dict)    # dataset -> temporary path
    datasets: dict[str, str] = field(default_factory=dict)   # every dataset (scripts)
    data_dir: str = ""
    code_dir: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    memory_mb: int | None = None
    measure: bool = True                       # compute size/row metrics of outputs


@dataclass(frozen=True)
class Spawn:
    """Engine -> fork server: run the job whose encoded ``JobSpec`` frame is ``spec``
    (forwarded to the job process unread)."""

    KIND: ClassVar[int] = 2
    BLOB: ClassVar[str] = "spec"
    job: int
    spec: bytes = b""


@dataclass(frozen=True)
class Stop:
    """Engine -> fork server: SIGTERM the job's process group now, SIGKILL it after
    ``grace_s``."""

    KIND: ClassVar[int] = 3
    BLOB: ClassVar[str] = ""
    job: int
    grace_s: float


@dataclass(frozen=True)
class Ready:
    KIND: ClassVar[int] = 4
    BLOB: ClassVar[str] = ""
    pid: int


@dataclass(frozen=True)
class Started:
    KIND: ClassVar[int] = 5
    BLOB: ClassVar[str] = ""
    job: int
    pid: int


@dataclass(frozen=True)
class Output:
    """Bytes the job wrote to its stdout or stderr (ctx.log writes there too)."""

    KIND: ClassVar[int] = 6
    BLOB: ClassVar[str] = "data"
    job: int
    data: bytes = b""


@dataclass(frozen=True)
class Exited:
    """The job process is gone.  ``returncode`` as in ``subprocess`` (negative: killed
    by that signal); ``report`` is the job's encoded ``Report`` frame (empty if it died
    before writing one); ``spawn_error`` is set when the fork itself failed."""

    KIND: ClassVar[int] = 7
    BLOB: ClassVar[str] = "report"
    job: int
    returncode: int
    peak_rss_kb: int = 0
    spawn_error: str = ""
    report: bytes = b""


@dataclass(frozen=True)
class Report:
    """Job process -> engine (through the fork server, in ``Exited.report``)."""

    KIND: ClassVar[int] = 8
    BLOB: ClassVar[str] = ""
    ok: bool
    exit_code: int = 0
    error: str = ""                            # "ValueError: bad row"
    traceback_tail: list[str] = field(default_factory=list)
    memory_error: bool = False
    metrics: dict[str, dict[str, int | float]] = field(default_factory=dict)


TO_SERVER: dict[int, Any] = {c.KIND: c for c in (Spawn, Stop)}
FROM_SERVER: dict[int, Any] = {c.KIND: c for c in (Ready, Started, Output, Exited)}


# -- an API worker and its user-code host -----------------------------------------------


@dataclass(frozen=True)
class Load:
    """Load a generation's modules (``load()``, ``warmup()``) as ``gen``.  ``endpoints``:
    [name, kind, code file, function] each."""

    KIND: ClassVar[int] = 20
    BLOB: ClassVar[str] = ""
    gen: str
    service: str
    name: str
    directory: str
    endpoints: list[list[str]]


@dataclass(frozen=True)
class Unload:
    """Forget generation ``gen`` (it left the route)."""

    KIND: ClassVar[int] = 21
    BLOB: ClassVar[str] = ""
    gen: str


@dataclass(frozen=True)
class Done:
    """The answer to a ``Load`` or ``Unload``: ``error`` "" when it worked;
    ``memory_error`` when user code ran out of memory."""

    KIND: ClassVar[int] = 22
    BLOB: ClassVar[str] = ""
    error: str = ""
    memory_error: bool = False


@dataclass(frozen=True)
class Call:
    """Run one request of ``gen``'s ``endpoint``: ``op`` as in ``usercode``; ``payload``
    the features (predict), the body (run), or the items' features end to end with
    their lengths in ``sizes`` (multi)."""

    KIND: ClassVar[int] = 23
    BLOB: ClassVar[str] = "payload"
    gen: str
    endpoint: str
    op: int
    sizes: list[int] = field(default_factory=list)
    payload: bytes = b""


REPLY_OK, REPLY_REFUSED, REPLY_MEMORY = 0, 1, 2


@dataclass(frozen=True)
class Reply:
    """The answer to a ``Call``: ``status`` ``REPLY_OK`` with the reply ``body``;
    ``REPLY_REFUSED`` with an error ``code`` and ``message``; ``REPLY_MEMORY`` when the
    call raised ``MemoryError``."""

    KIND: ClassVar[int] = 24
    BLOB: ClassVar[str] = "body"
    status: int
    code: str = ""
    message: str = ""
    body: bytes = b""


TO_HOST: dict[int, Any] = {c.KIND: c for c in (Load, Unload, Call)}
FROM_HOST: dict[int, Any] = {c.KIND: c for c in (Done, Reply)}
