"""The engine's side of the fork server: start it, run jobs through it, replace it.

``WorkerPool`` owns one fork server process (see ``forkserver``) and a reader task
that routes its frames to the jobs waiting for them.  The event loop only ever awaits
pipe reads: user code never runs here, in a thread or otherwise.

A job is an async context manager, so whatever happens to the caller (an exception,
its cancel scope) the job's process group is stopped before the caller moves on::

    async with pool.job(spec, on_output=log.write_bytes) as job:
        print(job.pid)
        done = await job.wait(timeout=60, stop=cancel_event)

If the fork server dies (killed, crashed), the jobs it was running end as lost and the
next job starts a new one.

``Pools`` holds one ``WorkerPool`` per interpreter: the node's own (the builtin code
environment) and each code environment's ``bin/python`` that a flow has used, each
started on first use and shared by every flow, as one ``WorkerPool`` alone is.  A fork
server in a code environment runs the same ``nodes.sandbox`` code, started in isolated
mode (``nodes.sandbox.launch``), so its jobs see that environment's packages only.  A
one-recipe build costs the same from either (``bench/sandbox.py``: within the noise of
a loaded 2-core box, 10-20 ms p50 both).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup

from nodes.flow.wire import (
    Deframer,
    Exited,
    FrameError,
    JobSpec,
    Output,
    Ready,
    Report,
    Started,
    Stop,
    decode_from_server,
    decode_report,
    encode,
    spawn,
)
from nodes.sandbox import launch

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``nodes`` package
START_TIMEOUT_S = 30.0
LOST = "the flow worker process died"


class StartFailed(RuntimeError):
    """The fork server could not start: an interpreter that is missing or broken."""


@dataclass(frozen=True)
class JobExit:
    """How a job ended.  ``stopped`` is ``"timeout"`` or ``"stopped"`` when the
    engine ended it, ``lost`` when the fork server died under it."""

    returncode: int
    report: Report | None
    peak_rss_kb: int = 0
    stopped: str | None = None
    spawn_error: str = ""
    lost: bool = False


@dataclass(eq=False)
class RunningJob:
    id: int
    on_output: Callable[[bytes], None]
    pool: WorkerPool
    pid: int | None = None
    started: anyio.Event = field(default_factory=anyio.Event)
    exited: anyio.Event = field(default_factory=anyio.Event)
    exit: Exited | None = None
    lost: bool = False

    def _finish(self, msg: Exited, *, lost: bool = False) -> None:
        if self.exit is None:
            self.exit = msg
            self.lost = lost
        self.started.set()
        self.exited.set()

    async def wait(self, *, timeout: float | None = None,
                   stop: anyio.Event | None = None) -> JobExit:
        """Wait until the job exits; stop it (SIGTERM, then SIGKILL after the pool's
        grace period) once ``timeout`` seconds pass or ``stop`` is set."""
        stopped: str | None = None
        with anyio.move_on_after(timeout) as scope:
            if stop is None:
                await self.exited.wait()
            else:
                await _first(self.exited, stop)
        if not self.exited.is_set():
            stopped = "timeout" if scope.cancelled_caught else "stopped"
            with anyio.CancelScope(shield=True):
                await self.pool._stop(self)
        assert self.exit is not None
        return JobExit(returncode=self.exit.returncode, report=decode_report(self.exit.report),
                       peak_rss_kb=self.exit.peak_rss_kb, stopped=stopped,
                       spawn_error=self.exit.spawn_error, lost=self.lost)


async def _first(exited: anyio.Event, stop: anyio.Event) -> None:
    """Return when either event is set."""
    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await exited.wait()
        tg.cancel_scope.cancel()


class WorkerPool:
    """Runs jobs in processes forked from a warm fork server.

    ``preload`` names modules the fork server imports once, so jobs that use them
    start fast (for example ``["pandas"]``; beware modules that start threads at
    import, or keep global state such as a random seed, which every job then shares).
    ``spares`` is how many job processes the server keeps forked ahead of need.
    ``kill_grace_s`` is how long a stopped job gets between SIGTERM and SIGKILL.
    """

    def __init__(self, *, preload: Sequence[str] = (), spares: int = 1,
                 kill_grace_s: float = 1.0, python: str | None = None) -> None:
        self.preload = list(preload)
        self.spares = spares
        self.kill_grace_s = kill_grace_s
        self.python = python or sys.executable
        self.builtin = self.python == sys.executable
        self.jobs: dict[int, RunningJob] = {}
        self.restarts = -1  # the first start is not a restart
        self._next = 0
        self._proc: Process | None = None
        self._server_pid: int | None = None
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._start_lock = anyio.Lock()
        self._send_lock = anyio.Lock()

    @property
    def pid(self) -> int | None:
        """The fork server's pid, if it is running."""
        return self._server_pid if self._proc is not None else None

    def _attach(self, tg: TaskGroup) -> None:
        """Run in ``tg`` (a ``Pools``'s), starting the fork server on the first job."""
        self._tg = tg

    async def __aenter__(self) -> WorkerPool:
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        try:
            await self._ensure()
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            await self._shutdown()
        assert self._tg is not None and self._stack is not None
        self._tg.cancel_scope.cancel()
        # The body's exception propagates by itself; passing it to the task group
        # would wrap it in an ExceptionGroup and break callers' ``except FlowError``.
        await self._stack.__aexit__(None, None, None)

    @asynccontextmanager
    async def job(self, spec: JobSpec, *,
                  on_output: Callable[[bytes], None] = lambda _: None,
                  ) -> AsyncIterator[RunningJob]:
        """Start ``spec`` in a new process; stop it on leaving the block if it is still
        running.  The job has its ``pid`` (None if the fork failed) on entry.  If the
        fork server cannot start (an interpreter that is gone or broken), the job has
        already ended, with the reason as its ``spawn_error``."""
        self._next += 1
        j = RunningJob(id=self._next, on_output=on_output, pool=self)
        try:
            proc = await self._ensure()
        except StartFailed as exc:
            j._finish(Exited(job=j.id, returncode=-1, spawn_error=str(exc)))
            yield j
            return
        self.jobs[j.id] = j
        try:
            await self._send(proc, spawn(j.id, spec))
            with anyio.move_on_after(START_TIMEOUT_S):
                await j.started.wait()
            if not j.started.is_set():  # a wedged server: replace it (this job is lost)
                proc.kill()
                await j.started.wait()
            yield j
        finally:
            if not j.exited.is_set():
                with anyio.CancelScope(shield=True):
                    await self._stop(j)
            self.jobs.pop(j.id, None)

    # -- internals ---------------------------------------------------------------------

    async def _ensure(self) -> Process:
        async with self._start_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            if self._tg is None:
                raise RuntimeError("WorkerPool used outside 'async with'")
            if self.builtin:  # as user code here always ran: beside the node's packages
                env = {**os.environ,
                       "PYTHONPATH": os.pathsep.join(
                           [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
                cwd = ROOT
            else:  # a code environment: its packages only (see nodes.sandbox.launch)
                env = {k: v for k, v in os.environ.items()
                       if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
                cwd = Path("/")
            argv = launch.argv(self.python, "forkserver",
                               [f"--spares={self.spares}", *self.preload],
                               isolated=not self.builtin)
            try:
                proc = await anyio.open_process(argv, stdin=-1, stdout=-1, stderr=None,
                                                env=env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                raise StartFailed(f"cannot start the flow worker process with "
                                  f"{self.python}: {exc}") from exc
            try:
                with anyio.fail_after(START_TIMEOUT_S):
                    await self._tg.start(self._read, proc)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):  # it may be gone already
                    proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()
                if isinstance(exc, TimeoutError):
                    raise StartFailed(f"the flow worker process with {self.python} did "
                                      f"not start within {START_TIMEOUT_S:g}s") from None
                raise
            self._proc = proc
            self.restarts += 1
            return proc

    async def _read(self, proc: Process, *, task_status: Any) -> None:
        """Route the fork server's frames until it exits."""
        assert proc.stdout is not None
        deframer = Deframer()
        ready = False
        try:
            async for chunk in proc.stdout:
                for kind, meta, blob in deframer.feed(chunk):
                    msg = decode_from_server(kind, meta, blob)
                    if isinstance(msg, Output):
                        j = self.jobs.get(msg.job)
                        if j is not None:
                            j.on_output(msg.data)
                    elif isinstance(msg, Started):
                        j = self.jobs.get(msg.job)
                        if j is not None:
                            j.pid = msg.pid
                            j.started.set()
                    elif isinstance(msg, Exited):
                        j = self.jobs.get(msg.job)
                        if j is not None:
                            j._finish(msg)
                    elif isinstance(msg, Ready) and not ready:
                        ready = True
                        self._server_pid = msg.pid
                        task_status.started()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except FrameError:  # a broken stream: the server is of no more use
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            if self._proc is proc or self._proc is None:
                self._proc = None
            for j in list(self.jobs.values()):
                j._finish(Exited(job=j.id, returncode=-9, spawn_error=LOST), lost=True)
            with anyio.CancelScope(shield=True):
                # Cancelled while the server runs (its task group is going away): stop
                # it here, since nothing else knows about it any more.
                await _stop_server(proc)
        if not ready:
            raise StartFailed(f"the flow worker process with {self.python} exited at "
                              f"start (code {proc.returncode})")

    async def _send(self, proc: Process, data: bytes) -> None:
        assert proc.stdin is not None
        async with self._send_lock:
            # If the server died, the reader finishes every job as lost.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await proc.stdin.send(data)

    async def _stop(self, j: RunningJob) -> None:
        """SIGTERM the job, SIGKILL it after the grace period; if the fork server does
        not report it gone soon after, replace the server (its death kills the job)."""
        proc = self._proc
        if proc is None or j.exited.is_set():
            return
        await self._send(proc, encode(Stop(job=j.id, grace_s=self.kill_grace_s)))
        with anyio.move_on_after(self.kill_grace_s + 5.0):
            await j.exited.wait()
        if not j.exited.is_set():
            proc.kill()
            await j.exited.wait()

    async def _shutdown(self) -> None:
        proc = self._proc
        if proc is None:
            return
        await _stop_server(proc)
        self._proc = None


async def _stop_server(proc: Process, grace_s: float = 5.0) -> None:
    """Close the fork server's stdin (it kills its jobs and exits); kill it if it is
    still there after ``grace_s``."""
    if proc.returncode is None and proc.stdin is not None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await proc.stdin.aclose()
    with anyio.move_on_after(grace_s):
        await proc.wait()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class Pools:
    """One ``WorkerPool`` per Python interpreter, each created on first ``get`` and
    started on its first job; ``preload``, ``spares`` and ``kill_grace_s`` apply to
    every one of them (a preload module missing from an environment is skipped there,
    with a line on stderr).  The node's own interpreter's pool starts on entry, as a
    lone ``WorkerPool`` does, so a node that cannot fork finds out at once::

        async with Pools() as pools:
            flow = Flow(manifest, code_dir=d, pool=pools, envs={"ml": "/.../bin/python"})
    """

    def __init__(self, *, preload: Sequence[str] = (), spares: int = 1,
                 kill_grace_s: float = 1.0) -> None:
        self.preload = list(preload)
        self.spares = spares
        self.kill_grace_s = kill_grace_s
        self.pools: dict[str, WorkerPool] = {}
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    def get(self, python: str | None = None) -> WorkerPool:
        """The pool of interpreter ``python`` (default: the node's own)."""
        python = python or sys.executable
        pool = self.pools.get(python)
        if pool is None:
            if self._tg is None:
                raise RuntimeError("Pools used outside 'async with'")
            pool = WorkerPool(preload=self.preload, spares=self.spares,
                              kill_grace_s=self.kill_grace_s, python=python)
            pool._attach(self._tg)
            self.pools[python] = pool
        return pool

    async def discard(self, under: Path) -> list[str]:
        """Stop the pools of interpreters inside folder ``under`` (a code environment
        that was removed), except one that is running a job; the interpreters stopped."""
        stopped = []
        for python, pool in list(self.pools.items()):
            if Path(python).is_relative_to(under) and not pool.jobs:
                del self.pools[python]
                with anyio.CancelScope(shield=True):
                    await pool._shutdown()
                stopped.append(python)
        return stopped

    async def __aenter__(self) -> Pools:
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        try:
            await self.get()._ensure()
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            for pool in self.pools.values():
                await pool._shutdown()
        assert self._tg is not None and self._stack is not None
        self._tg.cancel_scope.cancel()
        self._tg = None
        await self._stack.__aexit__(None, None, None)
