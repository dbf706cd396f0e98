"""The run log: every line of a build or scenario run, timestamped, in one file.

Lines come from the engine ("recipe clean started") and from job processes (their
``ctx.log`` lines, prints and tracebacks).  ``write`` never blocks the event loop: it
appends to memory, and a writer task puts batches into the file from a worker thread
(within ``FLUSH_DELAY_S``, and everything when the log is closed).
The last lines stay in memory (``tail``) for failure reports.

The writer task lives in a task group the log opens on entry and closes on exit (an
``AsyncExitStack`` holds it, and is told how the ``async with`` ended), so the writer
never outlives the log, and an error in the body is raised as itself, not wrapped in an
exception group.  A file
that cannot be written (a full disk) does not fail the run: the log says so in its tail
and keeps the lines in memory.

    async with RunLog(path) as log:
        log.write("engine", "build started")
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

import anyio

TAIL_LINES = 200
MAX_BYTES = 64 * 1024 * 1024  # beyond this a run log keeps only its tail in memory
FLUSH_DELAY_S = 0.2           # lines reach the file at most this late (and at the end)


def _stamp(now: float) -> str:
    ms = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"


class RunLog:
    """A run's log: file ``path`` (optional) plus the last ``tail_lines`` in memory."""

    def __init__(self, path: Path | None = None, *, tail_lines: int = TAIL_LINES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._pending: list[str] = []
        self._written = 0
        self._truncated = False
        self._file: IO[str] | None = None
        self._wake = anyio.Event()
        self._closing = anyio.Event()
        self._closed = False
        self._writer_done = anyio.Event()
        self._stack: AsyncExitStack | None = None
        self.write_error = ""  # why the file stopped being written, if it did

    async def __aenter__(self) -> RunLog:
        if self._stack is not None:
            raise RuntimeError("a RunLog is entered once")
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._open())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._stack is not None
        return await self._stack.__aexit__(et, exc, tb)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        if self.path is not None:
            path = self.path

            def open_file() -> IO[str]:
                path.parent.mkdir(parents=True, exist_ok=True)
                return path.open("a", encoding="utf-8")

            self._file = await anyio.to_thread.run_sync(open_file)
        failed: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer)
                try:
                    yield
                except Exception as exc:  # the body's own error: raised as itself, below
                    failed = exc
                finally:
                    # Flush everything, even when the body was cancelled or failed.
                    self._closed = True
                    self._closing.set()
                    self._wake.set()
                    with anyio.CancelScope(shield=True):
                        await self._writer_done.wait()
                        # A cancelled writer leaves lines behind: they go in now.
                        batch, self._pending = self._pending, []
                        await self._flush(batch)
            if failed is not None:
                raise failed
        finally:
            if self._file is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(self._file.close)
                    except OSError as exc:  # closed all the same; its last flush failed
                        self.write_error = self.write_error or f"{type(exc).__name__}: {exc}"

    def write(self, source: str, text: str) -> None:
        """Log ``text`` (one or more lines) from ``source`` ("engine", "recipe clean")."""
        stamp = _stamp(time.time())
        for line in text.splitlines() or [""]:
            entry = f"{stamp} [{source}] {line}"
            self._tail.append(entry)
            if self._file is not None:
                self._pending.append(entry)
        if self._pending:
            self._wake.set()

    def lines_writer(self, source: str) -> LineSplitter:
        """A callback for a job's output bytes that logs whole lines."""
        return LineSplitter(lambda line: self.write(source, line))

    def tail(self, n: int = 50) -> list[str]:
        return list(self._tail)[-n:]

    async def _writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                if not self._closed:
                    # Gather what else comes soon: one thread hop per batch, not per line.
                    with anyio.move_on_after(FLUSH_DELAY_S):
                        await self._closing.wait()
                self._wake = anyio.Event()
                batch, self._pending = self._pending, []
                await self._flush(batch)
                if self._closed and not self._pending:
                    return
        finally:
            self._writer_done.set()

    async def _flush(self, batch: list[str]) -> None:
        if not batch or self._file is None or self.write_error:
            return
        try:
            await anyio.to_thread.run_sync(self._write_batch, batch)
        except OSError as exc:  # the run goes on; its tail stays in memory
            self.write_error = f"{type(exc).__name__}: {exc}"
            self._tail.append(f"{_stamp(time.time())} [engine] log file not written from "
                              f"here on: {self.write_error}")

    def _write_batch(self, batch: list[str]) -> None:
        assert self._file is not None
        if self._truncated:
            return
        text = "\n".join(batch) + "\n"
        if self._written + len(text) > self.max_bytes:
            text = f"{_stamp(time.time())} [engine] log truncated at {self.max_bytes} bytes\n"
            self._truncated = True
        self._file.write(text)
        self._file.flush()
        self._written += len(text)


class LineSplitter:
    """Turns a byte stream into lines (a partial last line waits for more bytes)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self._buf = b""

    def __call__(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self.emit(line.decode("utf-8", "replace").rstrip("\r"))
        if len(self._buf) > 64 * 1024:  # a huge line without newline: log it in pieces
            self.emit(self._buf.decode("utf-8", "replace"))
            self._buf = b""

    def close(self) -> None:
        if self._buf:
            self.emit(self._buf.decode("utf-8", "replace").rstrip("\r"))
            self._buf = b""
