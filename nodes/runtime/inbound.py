"""Bookkeeping for inbound messages a node drops: counts, and one log line per sender.

Heartbeats, reports and events arrive on plain subscriptions, from any process on the
bus.  A malformed one is dropped and counted; its sender is logged once, not once per
message, since a broken node repeats its mistake every interval.  The set of senders
already logged is bounded (least recently logged forgotten first), so a flood of
messages from made-up senders costs bounded memory; and new-sender lines are capped per
minute, with the number suppressed said when logging resumes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

MAX_SENDERS = 4096
LOGS_PER_MINUTE = 60


class Drops:
    """Counters of dropped inbound messages by kind, and the once-per-sender log."""

    def __init__(self, log: Any, *, max_senders: int = MAX_SENDERS,
                 logs_per_minute: int = LOGS_PER_MINUTE) -> None:
        self.log = log
        self.by_kind: dict[str, int] = {}
        self.total = 0
        self.max_senders = max_senders
        self.logs_per_minute = logs_per_minute
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._window = 0.0
        self._logged = 0
        self._suppressed = 0

    def count(self, kind: str) -> int:
        return self.by_kind.get(kind, 0)

    @property
    def remembered(self) -> int:
        """Senders currently remembered as already logged (at most ``max_senders``)."""
        return len(self._seen)

    def drop(self, kind: str, sender: str, subject: str, reason: str) -> None:
        """Count one dropped message; log it if ``sender`` has not been logged yet."""
        self.total += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        key = (kind, sender)
        if key in self._seen:
            return
        self._seen[key] = None
        while len(self._seen) > self.max_senders:
            self._seen.popitem(last=False)
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._window, self._logged = now, 0
        if self._logged >= self.logs_per_minute:
            self._suppressed += 1
            return
        self._logged += 1
        extra = {"suppressed": self._suppressed} if self._suppressed else {}
        self._suppressed = 0
        self.log.warning(f"malformed {kind} dropped (further ones from this sender are "
                         "only counted)", subject=_short(subject), sender=_short(sender),
                         error=_short(reason, 300), **extra)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
