"""The fork server: the sandbox entry point ``forkserver`` (``launch.argv``), with
arguments ``[--spares=N] [MODULE ...]``, in the interpreter of a code environment (or
the node's own).

A small single-threaded process that has imported Python, the job runner and the
modules named on its command line once, and then forks one fresh process per job.
Forking a warm, idle process costs about a millisecond where starting Python costs tens,
yet each job still gets a process of its own: its own memory limit, its own session
(so a kill reaches everything it started), nothing left over from the previous job.

It keeps ``N`` (default 1) *spare* processes forked ahead of need, already detached and
waiting for a job spec on a pipe, so a job's start does not wait for a fork; each
spare still runs exactly one job.

It talks to the engine over its stdin/stdout in ``frames``: ``Spawn``/``Stop`` in;
``Ready``, ``Started``, ``Output``, ``Exited`` out (``messages``).  It never decodes a
job's spec or report: it forwards them as they are.  It reaps its jobs itself and
sends ``Exited`` only after forwarding all they wrote, so the engine sees a job's
output and report complete and in order.  It exits, killing its jobs, when its stdin
closes (the engine is gone); Linux also kills it and each job if their parent dies.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import frames
from .child import become_job
from .messages import TO_SERVER, Exited, Output, Ready, Spawn, Started, Stop
from .orphans import die_with_parent

READ = 1 << 16
SPARE_BACKOFF_S = 1.0  # after a spare died unused, wait this long before forking another


@dataclass
class Proc:
    """A forked process: a job's, or a spare (``job`` None) waiting on ``spec_w``."""

    pid: int
    out_r: int
    ctl_r: int
    spec_w: int | None = None
    job: int | None = None
    report: bytearray = field(default_factory=bytearray)
    kill_at: float | None = None


class Server:
    def __init__(self, frames_fd: int, spares: int = 1) -> None:
        self.frames_fd = frames_fd
        self.n_spares = spares
        self.sel = selectors.DefaultSelector()
        self.procs: dict[int, Proc] = {}         # pid -> process
        self.by_job: dict[int, Proc] = {}        # job id -> process
        self.spares: list[Proc] = []
        self.spares_after = 0.0
        self.deframer = frames.Deframer()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        self.sel.register(0, selectors.EVENT_READ, "cmd")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    def send(self, msg: Any) -> None:
        frames.write_all(self.frames_fd, frames.encode(msg))

    def serve(self) -> None:
        self.send(Ready(pid=os.getpid()))
        while True:
            self.refill()
            deadlines = [p.kill_at for p in self.procs.values() if p.kill_at is not None]
            if len(self.spares) < self.n_spares:
                deadlines.append(self.spares_after)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.sel.select(timeout):
                what: Any = key.data
                if what == "cmd":
                    if not self.read_commands():
                        return
                elif what == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                else:
                    self.pump(what[0], what[1], key.fd)
            self.reap()
            now = time.monotonic()
            for p in self.procs.values():
                if p.kill_at is not None and p.kill_at <= now:
                    p.kill_at = None
                    self.killpg(p.pid, signal.SIGKILL)

    def read_commands(self) -> bool:
        data = os.read(0, READ)
        if not data:
            self.shutdown()
            return False
        for kind, meta, blob in self.deframer.feed(data):
            msg = frames.decode(TO_SERVER, kind, meta, blob)
            if isinstance(msg, Spawn):
                self.spawn(msg.job, msg.spec)
            elif isinstance(msg, Stop):
                p = self.by_job.get(msg.job)
                if p is not None:
                    self.killpg(p.pid, signal.SIGTERM)
                    p.kill_at = time.monotonic() + msg.grace_s
        return True

    def fork(self, spec: bytes | None) -> Proc:
        """Fork a job process for ``spec`` (an encoded ``JobSpec`` frame), or a spare
        if ``spec`` is None.  Raises ``OSError``."""
        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        spec_r, spec_w = os.pipe() if spec is None else (None, None)
        try:
            pid = os.fork()
        except OSError:
            for fd in (out_r, out_w, ctl_r, ctl_w, spec_r, spec_w):
                if fd is not None:
                    os.close(fd)
            raise
        if pid == 0:
            become_job(spec, out_w, ctl_w, spec_r)
        for fd in (out_w, ctl_w, spec_r):
            if fd is not None:
                os.close(fd)
        for fd in (out_r, ctl_r):
            os.set_blocking(fd, False)
        p = Proc(pid=pid, out_r=out_r, ctl_r=ctl_r, spec_w=spec_w)
        self.procs[pid] = p
        self.sel.register(out_r, selectors.EVENT_READ, (pid, "out"))
        self.sel.register(ctl_r, selectors.EVENT_READ, (pid, "ctl"))
        return p

    def spawn(self, job: int, spec: bytes) -> None:
        p = None
        while self.spares and p is None:
            spare = self.spares.pop()
            assert spare.spec_w is not None
            try:
                frames.write_all(spare.spec_w, spec)
                p = spare
            except OSError:  # the spare is gone; the reaper will find it
                self.killpg(spare.pid, signal.SIGKILL)
            finally:
                os.close(spare.spec_w)
                spare.spec_w = None
        if p is None:
            try:
                p = self.fork(spec)
            except OSError as exc:
                self.send(Exited(job=job, returncode=-1, spawn_error=f"cannot fork: {exc}"))
                return
        p.job = job
        self.by_job[job] = p
        self.send(Started(job=job, pid=p.pid))

    def refill(self) -> None:
        while len(self.spares) < self.n_spares and time.monotonic() >= self.spares_after:
            try:
                self.spares.append(self.fork(None))
            except OSError:
                self.spares_after = time.monotonic() + SPARE_BACKOFF_S

    def pump(self, pid: int, kind: str, fd: int) -> None:
        """Forward what a job wrote; on EOF stop watching that pipe."""
        try:
            data = os.read(fd, READ)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            return
        p = self.procs.get(pid)
        if p is None or p.job is None:
            return
        if kind == "out":
            self.send(Output(job=p.job, data=data))
        else:
            p.report += data

    def drain(self, p: Proc) -> None:
        for fd in (p.out_r, p.ctl_r):
            while True:
                try:
                    data = os.read(fd, READ)
                except OSError:
                    break
                if not data:
                    break
                if p.job is None:
                    continue
                if fd == p.out_r:
                    self.send(Output(job=p.job, data=data))
                else:
                    p.report += data
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)
            os.close(fd)

    def reap(self) -> None:
        while self.procs:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            p = self.procs.pop(pid, None)
            if p is None:
                continue
            self.killpg(pid, signal.SIGKILL)  # whatever the job left running
            self.drain(p)
            if p.job is None:  # a spare died unused
                if p in self.spares:
                    self.spares.remove(p)
                if p.spec_w is not None:
                    os.close(p.spec_w)
                self.spares_after = time.monotonic() + SPARE_BACKOFF_S
                continue
            self.by_job.pop(p.job, None)
            self.send(Exited(job=p.job, returncode=os.waitstatus_to_exitcode(status),
                             report=bytes(p.report), peak_rss_kb=usage.ru_maxrss))

    @staticmethod
    def killpg(pid: int, sig: int) -> None:
        """Signal the job's process group (its own pid: it called setsid), or the
        process alone if it has not got that far yet."""
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        except PermissionError:
            pass

    def shutdown(self) -> None:
        for p in list(self.procs.values()):
            self.killpg(p.pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    die_with_parent()
    frames_fd = os.dup(1)
    os.dup2(2, 1)  # a stray print (here or in a preloaded module) must not corrupt frames
    spares = 1
    for arg in argv:
        if arg.startswith("--spares="):
            spares = int(arg.partition("=")[2])
            continue
        try:
            importlib.import_module(arg)
        except Exception as exc:
            print(f"shipyard flow: cannot preload {arg!r}: {exc}", file=sys.stderr)
    gc.collect()
    gc.freeze()  # keep warm objects out of the jobs' collections: less copy-on-write
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        Server(frames_fd, spares).serve()
