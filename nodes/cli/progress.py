"""Progress bars for long operations: on a terminal only.

One helper for every command that waits (packing and storing a bundle or an API
package, following a run): a bar with what is happening and the time spent, drawn on
stderr while the operation runs and erased when it ends.  Off a terminal (a pipe, a file,
CI) it prints nothing at all, so scripts read only the command's result; the lines a
command prints anyway (a run's steps) go through ``Bar.note``, which puts them above
the bar on a terminal and on stdout as before otherwise.  ``deploy --wait`` keeps its
own per-node bars (``nodes.cli.waiting``), which follow the same rule.

A command whose node tells how it is getting on (``protocol.progress``) passes
``Bar.notices`` as the call's ``progress``: the bar then shows the node's stage and its
count (files, or bytes stored of the archive's size).  Off a terminal that is ``None``,
and the call does not even subscribe to the notices.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from nodes.cli.common import err, out
from protocol.progress import CommandProgress

# A console that is never a terminal: a ``Bar`` on it shows nothing.
QUIET = Console(file=io.StringIO(), force_terminal=False)


class _Count(ProgressColumn):
    """Done of total, as bytes (``DownloadColumn``) or as items (``MofNCompleteColumn``)
    as the task's ``bytes_`` field says; nothing while the total is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_, self.items = DownloadColumn(), MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return (self.bytes_ if task.fields.get("bytes_") else self.items).render(task)


class Bar:
    """A progress bar (``total`` known: a fraction; unknown: a pulse), or nothing when
    ``console`` is not a terminal.  Use as a context manager."""

    def __init__(self, description: str, total: float | None = None, *,
                 bytes_: bool = False, console: Console | None = None,
                 lines: Console | None = None) -> None:
        self.console = console if console is not None else err
        self.lines = lines if lines is not None else out
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        if self.console.is_terminal:
            # Descriptions carry names and nodes' reasons verbatim: no markup in them.
            columns: list[ProgressColumn] = [
                SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                _Count(), TimeElapsedColumn()]
            self.progress = Progress(*columns, console=self.console, transient=True)
            self.task = self.progress.add_task(description, total=total, bytes_=bytes_)

    @property
    def shown(self) -> bool:
        return self.progress is not None

    def __enter__(self) -> Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=completed, total=total,
                                 description=description)

    def stage(self, description: str, completed: float = 0, total: float | None = None, *,
              bytes_: bool = False) -> None:
        """Show a new state: ``completed`` of ``total`` (unknown: ``None``, a pulse),
        counted in bytes when ``bytes_``."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=description, completed=completed,
                                 total=total, bytes_=bytes_)
            if total is None:  # update() keeps the old total when given None
                for task in self.progress.tasks:
                    if task.id == self.task:
                        task.total = None

    def notices(self, what: str) -> Callable[[CommandProgress], None] | None:
        """What shows a node's progress notices on this bar as ``what: <stage>``, or
        ``None`` when the bar is not shown (nothing to subscribe to them for)."""
        if self.progress is None:
            return None

        def show(p: CommandProgress) -> None:
            self.stage(f"{what}: {p.stage}", p.done, p.total, bytes_=p.unit == "bytes")

        return show

    def advance(self, amount: float = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, amount)

    def note(self, text: str | Text) -> None:
        """A line the command prints whatever the output: above the bar on a terminal,
        on stdout (``lines``) as usual otherwise."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            self.lines.print(text)


def bar(description: str, total: float | None = None, *, bytes_: bool = False) -> Bar:
    """A ``Bar`` on stderr (shown only when stderr is a terminal)."""
    return Bar(description, total, bytes_=bytes_)
