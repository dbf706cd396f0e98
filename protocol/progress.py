"""Progress of a long command, told to its requester while the node works on it.

A node that runs a command for a while (the Design node making a bundle or an API
package) publishes ``CommandProgress`` notices on ``<reply>.progress``
(``subjects.command_progress``) of that request: which stage it is in and how far it got,
a few times a second at most.  Only a requester that asked to hear them subscribes (the
CLI, to draw a progress bar on a terminal); nobody else receives them, and a notice lost
changes nothing but what a bar shows.
"""

from __future__ import annotations

from protocol import checks
from protocol.base import Codec, Message
from protocol.errors import InvalidMessage

UNITS = ("", "envs", "files", "bytes")  # what ``done`` and ``total`` count
MAX_STAGE = 64


class CommandProgress(Message, frozen=True, kw_only=True, tag="command.progress"):
    """``done`` of ``total`` (unknown: ``None``) ``unit`` in stage ``stage``."""

    stage: str
    done: int = 0
    total: int | None = None
    unit: str = ""

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless the stage is short text, the counts are in
        bounds (``done`` at most ``total`` when it is known) and the unit is known."""
        checks.text(self.stage, "stage", limit=MAX_STAGE)
        if self.total is not None:
            checks.count(self.total, "total")
        checks.count(self.done, "done",
                     limit=checks.MAX_COUNT if self.total is None else self.total)
        if self.unit not in UNITS:
            raise InvalidMessage(f"progress unit {self.unit[:20]!r} on {subject[:200]}: "
                                 f"expected one of {', '.join(map(repr, UNITS))}")


PROGRESS = Codec[CommandProgress](CommandProgress)
