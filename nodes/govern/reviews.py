"""The sign-off rules, as a pure state machine over ``protocol.govern.Review``.

``open_review`` and ``answer`` take the current record (or None) and return the next one,
or raise the typed error a caller sees; they do no I/O and read the time from the clock
they are given, so every rule is tested without NATS.  The node applies them inside a
compare-and-set loop: when two reviewers answer at once, the loser re-reads and the rule
is applied again to what is now stored, so a retried command is judged on fresh state.

A repeated command is harmless: the same requester asking again for an open review, or
the same reviewer giving the same answer again, changes nothing (``None`` is returned:
nothing to write).
"""

from __future__ import annotations

import msgspec

from protocol.errors import Conflict, Forbidden
from protocol.govern import (
    API,
    APPROVE,
    APPROVED,
    PENDING,
    REJECT,
    REJECTED,
    Decision,
    Review,
    label,
)

SELF_APPROVAL = "self_approval"  # the ``reason`` of the forbidden error


def _ask(kind: str, name: str, version: str) -> str:
    return f"shipyard govern request {'api ' if kind == API else ''}{name} {version}"


def open_review(current: Review | None, *, kind: str, name: str, version: str, who: str,
                comment: str, required: int, now: float) -> Review | None:
    """The review a request opens; None if this requester already has it open."""
    what = label(kind, name, version)
    if current is not None and current.status == PENDING:
        if current.requested_by == who:
            return None
        raise Conflict(f"a review of {what} is already open (requested by "
                       f"{current.requested_by}; {current.standing()})")
    if current is not None and current.status == APPROVED:
        raise Conflict(f"{what} is already approved ({current.standing()})")
    return Review(kind=kind, name=name, version=version, status=PENDING, requested_by=who,
                  requested_at=now, required=required, comment=comment,
                  round=current.round + 1 if current is not None else 1)


def answer(current: Review | None, *, kind: str, name: str, version: str, who: str,
           approve: bool, comment: str, now: float) -> Review | None:
    """The review after ``who`` approves or rejects it; None if ``who`` already gave
    this answer in this round."""
    what = label(kind, name, version)
    verdict = APPROVE if approve else REJECT
    if current is None:
        raise Conflict(f"no review of {what} is open: request one with "
                       f"'{_ask(kind, name, version)}'")
    mine = [d for d in current.decisions if d.by == who]
    if mine and mine[-1].verdict == verdict:
        return None  # the same answer again (a retry)
    if current.status != PENDING:
        again = (f"; request a new review with '{_ask(kind, name, version)}'"
                 if current.status == REJECTED else "")
        raise Conflict(f"the review of {what} is closed ({current.standing()}){again}")
    if approve and who == current.requested_by:
        raise Forbidden(f"{who} requested the review of {what} and cannot approve it: "
                        "another identity must", details={"reason": SELF_APPROVAL})
    if mine:
        raise Conflict(f"{who} already answered the review of {what} "
                       f"({mine[-1].verdict}); an answer is final")
    decisions = [*current.decisions, Decision(by=who, verdict=verdict, comment=comment,
                                              at=now)]
    status = PENDING
    if not approve:
        status = REJECTED
    elif sum(1 for d in decisions if d.verdict == APPROVE) >= current.required:
        status = APPROVED
    return msgspec.structs.replace(current, decisions=decisions, status=status,
                                   decided_at=now if status != PENDING else None)
