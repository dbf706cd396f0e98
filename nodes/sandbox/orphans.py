"""No orphans: ask Linux to signal a process when its parent dies.

Standard library only: the fork server, its jobs and the API's user-code hosts run it
inside user environments, and shipyard's own processes import it from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, *, parent: int | None = None) -> None:
    """Have ``sig`` sent to this process when its parent dies (Linux; a no-op elsewhere).

    With ``parent``, a parent that already died before the request took effect (the
    process was re-parented) is treated the same way: ``sig`` is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
