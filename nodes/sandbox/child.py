"""Inside a job process: become a clean process, set limits, load the user's file,
call ``run(ctx)``, report.

Runs in a process the fork server has just forked, so it owns the whole process: it
may change limits, directories and ``sys`` freely, and it always ends with
``os._exit`` (never returning into the fork server's loop).  The report goes back on
the control pipe (fd 3); everything else (``ctx.log``, prints, tracebacks) on
stdout/stderr, which the fork server forwards to the engine's run log.  Standard
library only: it runs in the user's interpreter.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import resource
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from . import frames
from .context import RecipeContext, ScriptContext
from .measure import measure
from .messages import JobSpec, Report
from .orphans import die_with_parent
from .tracebacks import user_traceback

TRACEBACK_LINES = 20
EXIT_FAILED = 1      # run(ctx) raised
EXIT_REPORT = 70     # the report itself could not be written
EXIT_SETUP = 71      # the process failed before it could run anything
CTL_FD, SPEC_FD = 3, 4


def become_job(spec: bytes | None, out_w: int, ctl_w: int, spec_r: int | None) -> NoReturn:
    """In a process just forked from the fork server: leave its session, signal
    handlers and file descriptors behind, then run ``spec`` (an encoded ``JobSpec``
    frame) -- or, for a spare process forked ahead of need, wait for it on ``spec_r``
    first."""
    try:
        os.setsid()
        die_with_parent()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        keep = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (ctl_w, spec_r) if fd is not None]
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        for target, fd in zip((CTL_FD, SPEC_FD), keep, strict=False):
            os.dup2(fd, target)
        os.closerange(CTL_FD + len(keep), os.sysconf("SC_OPEN_MAX"))
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                          errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                          errors="backslashreplace", closefd=False)
    except BaseException:
        os._exit(EXIT_SETUP)
    if spec is None:
        try:
            kind, meta, blob = frames.read_frame(SPEC_FD)
            os.close(SPEC_FD)
        except BaseException:  # the fork server retired this spare (EOF)
            os._exit(0)
    else:
        kind, meta, blob = frames.split(spec)
    try:
        job = frames.decode({JobSpec.KIND: JobSpec}, kind, meta, blob)
    except BaseException:
        os._exit(EXIT_SETUP)
    run_job(job, CTL_FD)


def set_memory_limit(memory_mb: int | None) -> None:
    """Cap this process's address space; allocations past it raise MemoryError.  The
    hard limit too, so user code cannot lift it (the process runs one job only)."""
    if not memory_mb:
        return
    limit = memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _context(spec: JobSpec) -> RecipeContext | ScriptContext:
    common = {"name": spec.name, "params": dict(spec.params),
              "data_dir": Path(spec.data_dir), "code_dir": Path(spec.code_dir)}
    if spec.kind == "recipe":
        return RecipeContext(inputs={k: Path(v) for k, v in spec.inputs.items()},
                             outputs={k: Path(v) for k, v in spec.outputs.items()}, **common)
    return ScriptContext(datasets={k: Path(v) for k, v in spec.datasets.items()}, **common)


def _execute(spec: JobSpec) -> Report:
    ctx = _context(spec)
    module = load(Path(spec.code), f"shipyard_{spec.kind}_{spec.name}".replace("-", "_"))
    run = getattr(module, "run", None)
    if not callable(run):
        return Report(ok=False, error=f"{spec.code} does not define run(ctx)")
    try:
        run(ctx)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    metrics = {k: dict(v) for k, v in ctx.metrics.items()}
    if spec.kind == "recipe":
        missing = [name for name, p in spec.outputs.items() if not os.path.lexists(p)]
        if missing:
            return Report(ok=False, error="run(ctx) returned without writing output(s) "
                                          + ", ".join(f"{m!r} (ctx.outputs[{m!r}])"
                                                      for m in missing))
        if spec.measure:
            for name, p in spec.outputs.items():
                metrics[name] = {**measure(Path(p)), **metrics.get(name, {})}
    return Report(ok=True, metrics=metrics)


def _failure(exc: BaseException, memory_mb: int | None) -> Report:
    lines = user_traceback(exc).rstrip("\n").splitlines()
    print("\n".join(lines), file=sys.stderr, flush=True)
    tail = lines[-TRACEBACK_LINES:]
    if isinstance(exc, MemoryError):
        error = f"memory limit exceeded ({memory_mb} MB)" if memory_mb else "out of memory"
        return Report(ok=False, memory_error=True, traceback_tail=tail,
                      error=f"{error}: MemoryError")
    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Report(ok=False, error=error, traceback_tail=tail)


def run_job(spec: JobSpec, ctl_fd: int) -> NoReturn:
    """Run ``spec`` in this (freshly forked) process and exit: 0 on success,
    the ``sys.exit`` code if the code called it, else 1."""
    code = 0
    try:
        os.chdir(spec.cwd)
        sys.path[:0] = spec.sys_path
        sys.argv = [spec.code]
        set_memory_limit(spec.memory_mb)
        report = _execute(spec)
        code = 0 if report.ok else EXIT_FAILED
    except SystemExit as exc:  # only a non-zero exit reaches here (see _execute)
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        report = Report(ok=False, exit_code=code, error=f"sys.exit({exc.code!r}) called")
    except BaseException as exc:
        report = _failure(exc, spec.memory_mb)
        code = EXIT_FAILED
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        frames.write_all(ctl_fd, frames.encode(report))
    except BaseException:
        os._exit(EXIT_REPORT)
    os._exit(code & 0xFF if code >= 0 else EXIT_FAILED)
