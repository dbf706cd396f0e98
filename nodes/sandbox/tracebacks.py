"""Tracebacks of user code that start at the user's code.

A recipe's or an endpoint's error used to print shipyard's own frames first (the job
runner, the module loader, ``<frozen importlib._bootstrap>``): nine lines of noise above
the user's one line, in every run log.  ``user_traceback`` drops the leading frames that
are shipyard's or the import machinery's; frames after the first of the user's stay, so
a library the user called still shows in full.  A syntax error in the user's file keeps
no frame (the error names the file and line).  When no frame is the user's otherwise (an
error in shipyard itself), nothing is dropped.  Only the standard library is imported: this runs
inside job processes, under a code environment's interpreter too.
"""

from __future__ import annotations

import os
import traceback

_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the nodes package


def _machinery(filename: str) -> bool:
    return filename.startswith("<frozen ") or os.path.abspath(filename).startswith(
        _OURS + os.sep)


def _trim(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    frames = list(te.stack)
    first = next((i for i, f in enumerate(frames) if not _machinery(f.filename)), None)
    if first is None:
        # A syntax error in the user's file: every frame is the loader's, and the error
        # itself names the file and line (``filename`` is set for syntax errors only).
        where = getattr(te, "filename", None)
        if where and not _machinery(where):
            first = len(frames)
    if first:
        te.stack = traceback.StackSummary.from_list(frames[first:])
    for linked in (te.__cause__, te.__context__):
        if linked is not None:
            _trim(linked, seen)


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as ``traceback.format_exception`` prints it, from the first
    frame of the user's code on."""
    te = traceback.TracebackException.from_exception(exc)
    _trim(te, set())
    return "".join(te.format())
