"""Running ``uv``: the one place that finds the binary, sets its environment and bounds
its time.

``uv`` resolves requirements into locks (Design node) and builds environments from them
(every node).  It is a dependency of shipyard (the PyPI package ships the binary), so a
node needs nothing installed beside shipyard.  Every call is a subprocess bounded in
time: a hung index or a compile that never ends is killed, and the failure carries the
last lines uv wrote, which is what a person needs to see in ``deploy --wait``.

Where packages come from is ``IndexSettings``: node options ``--index-url``,
``--find-links`` and ``--no-index``, or ``SHIPYARD_INDEX_URL``, ``SHIPYARD_FIND_LINKS``
(``os.pathsep``-separated) and ``SHIPYARD_NO_INDEX=1``.  uv's own ``UV_*`` variables
apply too.  uv never downloads a Python interpreter here: an environment's ``python``
must be one the host has.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from protocol.errors import OperationError

DEFAULT_TIMEOUT_S = 600.0
TAIL_LINES = 20


class UvFailed(OperationError):
    """uv exited non-zero or ran out of time; the message ends with its last lines."""

    def __init__(self, doing: str, tail: str, *, timed_out: bool = False) -> None:
        self.doing = doing
        self.tail = tail
        self.timed_out = timed_out
        super().__init__(f"{doing}: {tail}" if tail else doing)


def uv_bin() -> str:
    """The ``uv`` executable: ``SHIPYARD_UV`` if set, else the one the ``uv`` package ships."""
    explicit = os.environ.get("SHIPYARD_UV")
    if explicit:
        return explicit
    from uv import find_uv_bin  # the PyPI package's own locator

    return str(find_uv_bin())


@dataclass(frozen=True)
class IndexSettings:
    """Where uv looks for packages when it resolves or installs from an index."""

    index_url: str | None = None
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> IndexSettings:
        env = os.environ if environ is None else environ
        links = [p for p in env.get("SHIPYARD_FIND_LINKS", "").split(os.pathsep) if p]
        return cls(index_url=env.get("SHIPYARD_INDEX_URL") or None, find_links=links,
                   no_index=env.get("SHIPYARD_NO_INDEX", "") not in ("", "0"))

    def args(self) -> list[str]:
        """uv command-line options for these settings."""
        out: list[str] = []
        if self.index_url:
            out += ["--default-index", self.index_url]
        for link in self.find_links:
            out += ["--find-links", link]
        if self.no_index:
            out.append("--no-index")
        return out


def uv_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment uv runs with: never download an interpreter, no colour, no
    progress bars, and none of the variables that would point it at another venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")}
    env.update({"UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1", "UV_NO_PROGRESS": "1"})
    env.update(extra or {})
    return env


async def run_uv(args: Sequence[str], *, doing: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run ``uv <args>``; return its stdout.  Raises ``UvFailed`` (with the last lines
    of its output) when it fails or runs past ``timeout_s`` (it is killed)."""
    return await run_tool([uv_bin(), *args], doing=doing, timeout_s=timeout_s, cwd=cwd,
                          env=uv_environ(env))


async def run_tool(argv: Sequence[str], *, doing: str, timeout_s: float,
                   cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run ``argv`` bounded in time; stdout on success, ``UvFailed`` with the last
    ``TAIL_LINES`` of stderr (or stdout) otherwise."""
    proc = await anyio.open_process(list(argv), stdin=subprocess.DEVNULL, cwd=cwd,
                                    env=dict(env) if env is not None else None,
                                    start_new_session=True)
    out, err = bytearray(), deque[str](maxlen=TAIL_LINES)
    timed_out = False

    async def read_out() -> None:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            out.extend(chunk)

    async def read_err() -> None:
        assert proc.stderr is not None
        pending = b""
        async for chunk in proc.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            err.extend(x.decode("utf-8", "replace").rstrip() for x in lines if x.strip())
        if pending.strip():
            err.append(pending.decode("utf-8", "replace").rstrip())

    try:
        with anyio.move_on_after(timeout_s) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_out)
                tg.start_soon(read_err)
                await proc.wait()
        if scope.cancelled_caught:
            timed_out = True
    finally:
        if proc.returncode is None:
            with anyio.CancelScope(shield=True):
                _kill_group(proc.pid)
                await proc.wait()
    if timed_out:
        tail = "\n".join(err)
        raise UvFailed(f"{doing}: gave up after {timeout_s:g} s", tail, timed_out=True)
    if proc.returncode != 0:
        tail = "\n".join(err) or out.decode("utf-8", "replace").strip()[-2000:]
        raise UvFailed(f"{doing} (exit {proc.returncode})", tail)
    return out.decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
