"""Test helpers: run nodes inside a test, wait for conditions with a deadline."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio

from nodes.runtime.node import Node

T = TypeVar("T")


async def wait_for(condition: Callable[[], Any], *, timeout: float = 10.0,
                   interval: float = 0.02, message: str = "condition") -> Any:
    """Poll ``condition`` (sync or async) until it returns a truthy value; fail with
    ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} "
                                 f"(last value: {last!r})")
        await anyio.sleep(interval)


@asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[tuple[Node, ...]]:
    """Serve ``nodes`` for the body of the ``async with``; stop them gracefully after."""
    async with anyio.create_task_group() as tg:
        for node in nodes:
            await tg.start(node.serve)
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def shipyard(*args: str, env: dict[str, str], cwd: Path | None = None,
             timeout: float = 30.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``shipyard`` CLI in a subprocess."""
    proc = subprocess.run([sys.executable, "-P", "-m", "nodes.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"shipyard {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


async def ashipyard(*args: str, env: dict[str, str], cwd: Path | None = None,
                    timeout: float = 30.0,
                    check: bool = False) -> subprocess.CompletedProcess[str]:
    """``shipyard`` from an async test: in a worker thread, so nodes served in the test's
    event loop (heartbeats, lease renewals) keep running while the CLI does."""
    return await anyio.to_thread.run_sync(
        lambda: shipyard(*args, env=env, cwd=cwd, timeout=timeout, check=check))


async def gather(*aws: Awaitable[T]) -> list[T]:
    results: list[Any] = [None] * len(aws)

    async def one(i: int, aw: Awaitable[T]) -> None:
        results[i] = await aw

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(aws):
            tg.start_soon(one, i, aw)
    return results


def argv(*parts: str | Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in parts:
        out.extend([p] if isinstance(p, str) else p)
    return out


def wait_until(condition: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Synchronous ``wait_for`` for subprocess tests."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} "
                                 f"(last value: {last!r})")
        time.sleep(interval)


class Background:
    """A real subprocess whose output lines are collected by a reader thread."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str], cwd: Path | None = None,
                 ) -> None:
        import threading
        self.proc = subprocess.Popen(list(args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 30.0) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None and not any(needle in x for x in self.lines):
                raise AssertionError(f"process exited ({self.proc.returncode}) before "
                                     f"printing {needle!r}:\n" + "\n".join(self.lines))
            return next((x for x in self.lines if needle in x), None)
        return str(wait_until(found, timeout=timeout, message=f"output line {needle!r}"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return code


def shipyard_argv(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "nodes.cli", *args]


def pid_alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists": check its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Fleet:
    """Nodes served in one task group, each started and stopped when the test says."""

    def __init__(self, tg: Any) -> None:
        self.tg = tg
        self._done: dict[int, anyio.Event] = {}
        self.nodes: list[Node] = []

    async def start(self, node: Node) -> Node:
        done = anyio.Event()

        async def serve(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                await node.serve(task_status=task_status)
            finally:
                done.set()

        await self.tg.start(serve)
        self._done[id(node)] = done
        self.nodes.append(node)
        return node

    async def stop(self, node: Node) -> None:
        """Graceful stop; returns once the node has shut down."""
        node.stop()
        await self._done[id(node)].wait()
        self.nodes.remove(node)


@asynccontextmanager
async def fleet() -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as tg:
        f = Fleet(tg)
        try:
            yield f
        finally:
            for node in list(f.nodes):
                node.stop()
