"""A small process supervisor: one OS process per node, restarted with backoff.

Children run in their own sessions, so a Ctrl-C reaches only the supervisor, which
then stops them in order (nodes first, NATS last).  Each child also asks Linux to
SIGTERM it if the supervisor dies (``SHIPYARD_PARENT_PID``), so nothing is orphaned
even by ``kill -9`` of the supervisor.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import Process, TaskGroup

from nodes.runtime.logs import get_logger
from nodes.runtime.run import PARENT_PID_ENV

ExitHook = Callable[["Child", int], Awaitable[None]]


@dataclass
class Child:
    """One supervised node process."""

    name: str
    role: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: Process | None = None
    restarts: int = 0
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Keeps children running until ``stop()``.

    A child that exits is restarted after ``backoff`` seconds, doubling up to
    ``max_backoff`` while it keeps crashing; a child that ran for ``stable_after``
    seconds starts again from the initial backoff.
    """

    def __init__(self, *, backoff: float = 1.0, max_backoff: float = 30.0,
                 stable_after: float = 30.0, on_exit: ExitHook | None = None) -> None:
        self.children: dict[str, Child] = {}
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.on_exit = on_exit
        self.stopping = False
        self.log = get_logger(component="supervisor")
        self._tg: TaskGroup | None = None

    def add(self, child: Child) -> None:
        self.children[child.name] = child

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every child and keep them running; ready once all are spawned."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for child in self.children.values():
                await tg.start(self._keep_running, child)
            task_status.started()

    async def _spawn(self, child: Child) -> None:
        env = {**os.environ, **child.env, PARENT_PID_ENV: str(os.getpid())}
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file: IO[bytes] = child.log_path.open("ab")
        try:
            child.proc = await anyio.open_process(
                child.argv, stdin=None, stdout=log_file, stderr=log_file, env=env,
                start_new_session=True)
        finally:
            log_file.close()  # the child holds its own descriptor
        child.started_at = time.monotonic()

    async def _keep_running(self, child: Child, *, task_status: Any) -> None:
        delay = self.backoff
        await self._spawn(child)
        task_status.started()
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self.stopping:
                return
            ran = time.monotonic() - child.started_at
            if ran >= self.stable_after:
                delay = self.backoff
            self.log.warning("node exited; restarting", node=child.name, pid=child.pid,
                             exit=describe_exit(code), restart_in_s=delay)
            if self.on_exit is not None:
                try:
                    await self.on_exit(child, code)
                except Exception as exc:
                    self.log.warning("exit hook failed", error=str(exc))
            await anyio.sleep(delay)
            if self.stopping:
                return
            delay = min(delay * 2, self.max_backoff)
            child.restarts += 1
            await self._spawn(child)
            self.log.info("node restarted", node=child.name, pid=child.pid,
                          restarts=child.restarts)

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child, wait up to ``timeout``, then SIGKILL what is left."""
        self.stopping = True
        live = [c for c in self.children.values()
                if c.proc is not None and c.proc.returncode is None]
        for c in live:
            assert c.proc is not None
            c.proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout):
            for c in live:
                assert c.proc is not None
                await c.proc.wait()
        for c in live:
            assert c.proc is not None
            if c.proc.returncode is None:
                self.log.warning("node did not stop in time; killing", node=c.name)
                c.proc.kill()
                await c.proc.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
