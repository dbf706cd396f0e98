"""One job (a recipe or a python step) from spawn to a readable outcome, and the
``Stopper`` that ends a whole run early (cancel event or run deadline).
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from nodes.flow.pool import LOST, JobExit, WorkerPool
from nodes.flow.results import Outcome
from nodes.flow.run_log import LineSplitter, RunLog
from nodes.flow.wire import JobSpec, Report

JOB_TAIL_LINES = 30
CANCELLED = "cancelled"


class Stopper:
    """Set once, with the reason a run stops early; every job of the run watches it."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    @property
    def outcome(self) -> Outcome:
        return Outcome.CANCELLED if self.reason == CANCELLED else Outcome.FAILED

    async def watch(self, cancel: anyio.Event | None, timeout_s: float | None) -> None:
        """Run until cancelled by the caller: set on ``cancel`` or after ``timeout_s``."""
        if cancel is None and timeout_s is None:
            return
        with anyio.move_on_after(timeout_s) as scope:
            if cancel is None:
                await anyio.sleep_forever()
            else:
                await cancel.wait()
        if scope.cancelled_caught:
            self.set(f"killed: run timeout after {timeout_s:g}s")
        else:
            self.set(CANCELLED)


@dataclass(frozen=True)
class JobResult:
    outcome: Outcome
    reason: str
    duration_s: float
    pid: int | None
    exit_code: int | None
    peak_rss_mb: float | None
    report: Report | None
    log_tail: list[str]


async def run_job(pool: WorkerPool, spec: JobSpec, *, log: RunLog, source: str,
                  timeout_s: float | None, stopper: Stopper,
                  on_started: Callable[[int | None], Awaitable[None]]) -> JobResult:
    """Run ``spec`` in a new job process, its output going to ``log`` as ``source``;
    stop it after ``timeout_s`` or when ``stopper`` is set.  Never raises for what the
    user's code does; a cancelled caller stops the job and gets the cancellation."""
    tail: deque[str] = deque(maxlen=JOB_TAIL_LINES)

    def line(text: str) -> None:
        tail.append(text)
        log.write(source, text)

    splitter = LineSplitter(line)
    t0 = time.monotonic()
    async with pool.job(spec, on_output=splitter) as job:
        await on_started(job.pid)
        done = await job.wait(timeout=timeout_s, stop=stopper.event)
    splitter.close()
    duration = time.monotonic() - t0
    outcome, reason = describe(done, timeout_s=timeout_s, memory_mb=spec.memory_mb,
                               stopper=stopper)
    code = done.returncode if done.returncode >= 0 and not done.lost else None
    if done.report is not None and done.report.exit_code:
        code = done.report.exit_code
    return JobResult(outcome=outcome, reason=reason, duration_s=round(duration, 4),
                     pid=job.pid, exit_code=code,
                     peak_rss_mb=round(done.peak_rss_kb / 1024, 1) if done.peak_rss_kb else None,
                     report=done.report, log_tail=list(tail))


def describe(done: JobExit, *, timeout_s: float | None, memory_mb: int | None,
             stopper: Stopper) -> tuple[Outcome, str]:
    """The outcome of a job and, unless it succeeded, why in a few words."""
    if done.stopped == "timeout":
        return Outcome.FAILED, f"killed: timeout after {timeout_s:g}s"
    if done.stopped == "stopped":
        return stopper.outcome, stopper.reason
    if done.lost:
        return Outcome.FAILED, LOST
    if done.spawn_error:
        return Outcome.FAILED, done.spawn_error
    report = done.report
    if report is not None:
        if report.ok and done.returncode == 0:
            return Outcome.SUCCESS, ""
        if not report.ok:
            return Outcome.FAILED, report.error or f"exited with code {done.returncode}"
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        hint = ""
        if memory_mb and -done.returncode in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            # Native code often crashes like this when an allocation fails.
            hint = f" (it may have hit its memory limit of {memory_mb} MB)"
        return Outcome.FAILED, f"killed by {name}{hint}"
    if done.returncode > 0:
        return Outcome.FAILED, f"exited with code {done.returncode}"
    return Outcome.FAILED, "exited without reporting a result"
