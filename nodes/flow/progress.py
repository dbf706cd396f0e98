"""The progress hook: how a node hears about steps and recipes as they happen."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from nodes.flow.results import FlowEvent
from nodes.flow.run_log import RunLog

Progress = Callable[[FlowEvent], Awaitable[None] | None]
"""Called with each event, in order; may be sync or async.  It runs in the build's
task, so a slow hook slows the run: a node should hand events to a queue."""


async def emit(progress: Progress | None, event: FlowEvent, log: RunLog) -> None:
    """Give ``event`` to the caller's progress hook; a failing hook is logged, never
    fails the run."""
    if progress is None:
        return
    try:
        result = progress(event)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        log.write("engine", f"progress hook failed on {type(event).__name__}: "
                            f"{type(exc).__name__}: {exc}")
