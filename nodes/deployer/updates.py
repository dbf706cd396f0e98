"""Closing a deployment's pending update once the fleet has answered.

Shared by the Project and API Deployers: a record's last update stays ``pending`` until
the deployment's view says every online node runs it (``succeeded``) or one refused it
(``failed``); the record is then rewritten by compare-and-set.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import anyio
import msgspec

from nodes.deployer.health import fleet_health
from nodes.runtime.jetstream import DEDUP_WINDOW_S
from nodes.runtime.kvcache import Entry, KVCache
from protocol.deploy import (
    FAILED,
    IN_SYNC,
    OUT_OF_SYNC,
    PENDING,
    SUCCEEDED,
    SUPERSEDED,
    UPDATING,
    DeploymentView,
    NodeDeployment,
    Update,
)
from protocol.registry import ONLINE

# A new active Deployer announces again the updates of the last this many seconds: their
# events may have been lost with the previous instance (killed between its write and
# its event).  Within the event stream's duplicate window, with a margin for clocks and
# the time to load, so an event that was stored is dropped as a duplicate.
REANNOUNCE_S = DEDUP_WINDOW_S - 30


class WithHistory(Protocol):
    @property
    def history(self) -> list[Update]: ...


R = TypeVar("R", bound=WithHistory)


def close_last(record: R, result: str, detail: str) -> tuple[R, Update]:
    """``record`` with its last update closed as ``result``; and that update."""
    done = msgspec.structs.replace(record.history[-1], result=result, detail=detail,
                                   finished_at=time.time())
    new: Any = msgspec.structs.replace(record, history=[*record.history[:-1], done])  # type: ignore[type-var]
    return new, done


class UpdateCloser(Generic[R]):
    """Watches the records in ``cache`` and calls ``finish(entry, result, detail)`` for
    each pending update the fleet has answered.  ``kick()`` re-judges at once."""

    def __init__(self, view: Callable[[R, int], DeploymentView],
                 finish: Callable[[Entry[R], str, str], Awaitable[None]],
                 stopping: Callable[[], bool]) -> None:
        self.view = view
        self.finish = finish
        self.stopping = stopping
        self._kick = anyio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def run(self, cache: KVCache[R]) -> None:
        while not self.stopping():
            self._kick = anyio.Event()
            for entry in list(cache.entries.values()):
                history = entry.value.history
                if not history or history[-1].result != PENDING:
                    continue
                view = self.view(entry.value, entry.revision)
                if view.state == IN_SYNC:
                    await self.finish(entry, SUCCEEDED, "")
                elif view.state == FAILED:
                    await self.finish(entry, FAILED, "; ".join(view.reasons))
            with anyio.move_on_after(1.0):
                await self._kick.wait()


BUSY_STAGES = ("starting", "fetching", "unpacking", "retrying", "loading")


def judge(*, want: str, infra: str, role: str, verbs: tuple[str, str, str], pending: bool,
          per_node: list[NodeDeployment],
          quiet: tuple[str, ...] = ("", "idle")) -> tuple[str, str, list[str]]:
    """(state, health, reasons) of a deployment from its nodes: the one rule both
    Deployers apply (its health half is ``nodes.deployer.health.fleet_health``).
    ``want`` is what every online node should run; ``verbs`` words it (("runs",
    "running", "ran") or ("serves", "serving", "served")); ``quiet`` are activities not
    worth a reason."""
    verb, doing, did = verbs
    if not per_node:
        reasons = [f"no {role} node has joined infra {infra}"]
        return OUT_OF_SYNC, fleet_health(OUT_OF_SYNC, False, reasons, has_nodes=False), reasons
    online = [d for d in per_node if d.status == ONLINE]
    failed = [d for d in online if d.error]
    behind = [d for d in online if d.running != want and not d.error]
    reasons = [f"{d.node}: refused {want}: {d.error} (still {doing} "
               f"{d.running or 'nothing'})" for d in failed]
    reasons += [f"{d.node} is lost (last {did} {d.running or 'nothing'})"
                for d in per_node if d.status != ONLINE]
    reasons += [f"{d.node} {verb} {d.running or 'nothing'}, not {want}"
                + (f" ({d.activity})" if d.activity not in quiet else "") for d in behind]
    degraded = [d for d in online if d.degraded and not d.error]
    reasons += [f"{d.node}: {d.degraded}" for d in degraded]
    if failed:
        state = FAILED
    elif not online:
        state = OUT_OF_SYNC
        reasons.insert(0, f"no online {role} node in infra {infra}")
    elif behind:
        working = any(d.activity in BUSY_STAGES for d in behind)
        state = UPDATING if pending or working else OUT_OF_SYNC
    else:
        state = IN_SYNC
    # A node that cannot serve what it runs counts as no node: all of them, ERROR.
    return state, fleet_health(state, len(online) > len(degraded), reasons), reasons


def recent_updates(history: list[Update], now: float) -> list[tuple[Update, bool, bool]]:
    """The updates of ``history`` whose events a new active Deployer announces again,
    each with whether to announce its ``requested`` event (it started within
    ``REANNOUNCE_S``) and its ``finished`` one (it ended within it with a result that
    has one: not pending, and not superseded, which has none)."""
    out = []
    for update in history:
        requested = now - update.at < REANNOUNCE_S
        finished = update.result not in (PENDING, SUPERSEDED) and \
            update.finished_at is not None and now - update.finished_at < REANNOUNCE_S
        if requested or finished:
            out.append((update, requested, finished))
    return out


async def announce_recent(records: Iterable[WithHistory], emit: Callable[[Any], Awaitable[None]],
                          requested: Callable[[Any, Update], Any],
                          finished: Callable[[Any, Update], Any]) -> None:
    """Emit again the ``requested`` and ``finished`` events of each record's recent
    updates (``recent_updates``), built by ``requested(record, update)`` and
    ``finished(record, update)``: a new active Deployer's catch-up, for bundle and API
    deployments alike."""
    now = time.time()
    for record in list(records):
        for update, was_requested, was_finished in recent_updates(record.history, now):
            if was_requested:
                await emit(requested(record, update))
            if was_finished:
                await emit(finished(record, update))
