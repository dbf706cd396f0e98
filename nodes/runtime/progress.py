"""Telling a requester how its long command is getting on (``protocol.progress``).

A handler asks its node for the request's notices (``Node.progress(req)``) and calls them
as it works: ``await notices("storing", sent, size, "bytes")``.  They go to
``<reply>.progress`` of that request, at most ``MAX_PER_S`` a second, the first and the
last of each stage always; a request without a reply subject gets none.  A notice that
cannot be sent is logged at debug and forgotten: progress never fails a command.
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client as NATS

from protocol import subjects
from protocol.base import encode
from protocol.progress import CommandProgress

MAX_PER_S = 5

# The stages of making a bundle or an API package, as a requester shows them.
LOCKING = "locking code environments"
PACKING = "packing files"
STORING = "storing"


class ProgressNotices:
    """The progress notices of one request."""

    def __init__(self, nc: NATS, reply: str, log: Any) -> None:
        self.nc = nc
        self.subject = (subjects.command_progress(reply)
                        if reply and subjects.hears_notices(reply) else "")
        self.log = log
        self.sent = 0
        self._stage: str | None = None
        self._last = 0.0

    async def __call__(self, stage: str, done: int = 0, total: int | None = None,
                      unit: str = "") -> None:
        """Say that the command is in ``stage``, ``done`` of ``total`` ``unit`` (unknown:
        ``None``); skipped when the last notice of the same stage went out less than
        1/``MAX_PER_S`` s ago and this one does not end the stage."""
        if not self.subject:
            return
        now = time.monotonic()
        if (stage == self._stage and (total is None or done < total)
                and now - self._last < 1 / MAX_PER_S):
            return
        self._stage, self._last = stage, now
        try:
            await self.nc.publish(self.subject, encode(CommandProgress(
                stage=stage, done=done, total=total, unit=unit)))
            self.sent += 1
        except Exception as exc:  # offline, or the connection closed: progress is optional
            self.log.debug("progress notice not sent", stage=stage, error=str(exc))
