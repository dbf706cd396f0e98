"""Scenario triggers on an Automation node: cron, bundle activation, upstream runs.

Every node of an infra sees the same triggers (its cron clock, the bundle activation it
performed, the upstream run it heard of, a manual request the Deployer forwards) and
turns each into a ``Firing`` with an id every node computes alike, so that ``claims``
lets exactly one of them run it.

Cron: each node keeps the schedule; the slot's time is the firing id, so every node
fires the same slot.  A mark (``cron.<infra>.<project>.<scenario>``, in ``sy_locks``)
remembers the last slot fired; slots missed while every node was down yield at most one
catch-up run (``catch_up = false`` turns it off), never a pile.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Protocol

import anyio
import nats.js.errors
from anyio.abc import TaskGroup
from croniter import croniter
from nats.js.kv import KeyValue

from nodes.automation.store import ActiveManifests
from nodes.runtime.hosts import Logs, SubscribesDecoded
from nodes.runtime.loops import supervised
from protocol import subjects
from protocol.errors import BadName, BadRequest, NotFound
from protocol.scenarios import (
    AFTER,
    CRON,
    ON_ACTIVATION,
    Firing,
    RunAccepted,
    RunFinished,
    cron_mark_key,
    validate_run_event,
)
from protocol.state import BundleState
from protocol.stream import EVENT, AnyEvent

# A cron slot is a wall-clock time; waiting for it in steps of at most this long keeps a
# clock step (NTP, a suspended VM) from delaying a slot by more than one step.
CRON_RECHECK_S = 30.0
SUCCESSFUL = ("SUCCESS", "WARNING")

Fire = Callable[[str, str, Firing], Awaitable[RunAccepted]]


class ScheduleHost(SubscribesDecoded, Logs, Protocol):
    """What the triggers need of their node: its infra, tasks and run events."""

    @property
    def infra(self) -> str: ...

    @property
    def tg(self) -> TaskGroup: ...


class Schedule:
    """``fire`` claims and runs a firing; ``marks`` is the KV holding the cron marks;
    ``active`` is the node's state per project (which bundle is active)."""

    def __init__(self, host: ScheduleHost, manifests: ActiveManifests,
                 active: Mapping[str, BundleState], *, fire: Fire,
                 marks: Callable[[], KeyValue]) -> None:
        self.host = host
        self.manifests = manifests
        self.active = active
        self.fire = fire
        self.marks = marks
        self.log = host.log.bind(component="schedule")
        self._schedules: dict[str, anyio.CancelScope] = {}

    async def started(self) -> None:
        await self.host.subscribe_decoded(
            subjects.RUN_EVENTS_ALL, EVENT, self._on_run_event, validate=validate_run_event,
            kind="run event", sender=lambda s: s.rsplit(".", 1)[0],
            pending_msgs_limit=10_000)

    def schedule_active(self) -> None:
        for project, st in list(self.active.items()):
            if st.active:
                self.schedule(project)

    def stopping(self) -> None:
        """Stop scheduling."""
        for scope in self._schedules.values():
            scope.cancel()

    def schedule(self, project: str) -> None:
        """(Re)start the cron schedules of ``project``'s active bundle."""
        old = self._schedules.pop(project, None)
        if old is not None:
            old.cancel()
        scope = anyio.CancelScope()
        self._schedules[project] = scope
        self.host.tg.start_soon(self._cron_project, project, scope)

    async def _cron_project(self, project: str, scope: anyio.CancelScope) -> None:
        with scope:
            await supervised(f"schedules of {project}", self._cron_schedules, project,
                             log=self.log)

    async def _cron_schedules(self, project: str) -> None:
        try:
            _, manifest = await self.manifests.get(project)
        except (NotFound, BadRequest) as exc:
            self.log.warning("no schedule", project=project, error=exc.message)
            return
        async with anyio.create_task_group() as tg:
            for name, sc in manifest.scenarios.items():
                for trig in sc.triggers:
                    if trig.cron is not None:
                        catch_up = sc.catch_up if trig.catch_up is None else trig.catch_up
                        # A NATS timeout in a KV call restarts the schedule (which re-reads
                        # its mark), after a backoff; it never ends it.
                        tg.start_soon(partial(
                            supervised, f"cron {project}/{name}", self._cron, project, name,
                            trig.cron, catch_up, log=self.log))

    async def _cron(self, project: str, scenario: str, expr: str, catch_up: bool) -> None:
        if not croniter.is_valid(expr):
            self.log.error("invalid cron expression", project=project, scenario=scenario,
                           cron=expr)
            return
        try:
            mark_key = cron_mark_key(self.host.infra, project, scenario)
        except BadName as exc:
            self.log.error("cannot schedule", project=project, scenario=scenario,
                           error=exc.message)
            return
        mark = await self._mark(mark_key)
        now = time.time()
        last_slot = croniter(expr, now).get_prev(float)
        if mark is None:
            await self._set_mark(mark_key, last_slot)  # new: wait for the next slot
        elif last_slot > mark:
            missed = _count_slots(expr, mark, now)
            await self._set_mark(mark_key, last_slot)
            if catch_up:
                await self._fire_quietly(project, scenario, Firing(
                    id=f"cron-{int(last_slot)}", trigger=CRON,
                    detail=f"{expr} (catch-up: {missed} slot(s) missed)"))
            else:
                self.log.info("missed cron slots skipped", project=project,
                              scenario=scenario, missed=missed)
        it = croniter(expr, max(now, last_slot))
        while True:
            slot = it.get_next(float)
            await _sleep_until(slot)
            await self._set_mark(mark_key, slot)
            await self._fire_quietly(project, scenario, Firing(
                id=f"cron-{int(slot)}", trigger=CRON, detail=expr))

    async def _mark(self, key: str) -> float | None:
        try:
            entry = await self.marks().get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            return float(entry.value or b"")
        except ValueError:
            return None

    async def _set_mark(self, key: str, slot: float) -> None:
        current = await self._mark(key)
        if current is None or slot > current:
            await self.marks().put(key, str(slot).encode())

    async def on_activated(self, project: str, bundle: str, update_id: str) -> None:
        """A bundle became active here: reschedule, and fire on_activation scenarios."""
        self.schedule(project)
        try:
            _, manifest = await self.manifests.get(project)
        except (NotFound, BadRequest):
            return
        for name, sc in manifest.scenarios.items():
            if any(t.on_activation for t in sc.triggers):
                await self._fire_quietly(project, name, Firing(
                    id=f"act-{update_id}", trigger=ON_ACTIVATION, detail=bundle))

    async def _on_run_event(self, event: AnyEvent) -> None:
        if not isinstance(event, RunFinished) or event.run.outcome not in SUCCESSFUL:
            return
        run = event.run
        if run.infra != self.host.infra or run.project not in self.active:
            return
        try:
            _, manifest = await self.manifests.get(run.project)
        except (NotFound, BadRequest):
            return
        for name, sc in manifest.scenarios.items():
            if any(t.after == run.scenario for t in sc.triggers):
                await self._fire_quietly(run.project, name, Firing(
                    id=f"after-{run.run_id}", trigger=AFTER, detail=run.run_id))

    async def _fire_quietly(self, project: str, scenario: str, firing: Firing) -> None:
        try:
            await self.fire(project, scenario, firing)
        except Exception as exc:  # a trigger must never take the node down
            self.log.warning("firing failed", project=project, scenario=scenario,
                             firing=firing.id, error=str(exc) or type(exc).__name__)


async def _sleep_until(when: float) -> None:
    """Sleep until wall-clock time ``when``, rechecking the clock every ``CRON_RECHECK_S``."""
    while (remaining := when - time.time()) > 0:  # noqa: ASYNC110 (no event: a clock)
        await anyio.sleep(min(remaining, CRON_RECHECK_S))


def _count_slots(expr: str, since: float, until: float, cap: int = 10_000) -> int:
    it = croniter(expr, since)
    n = 0
    while n < cap and it.get_next(float) <= until:
        n += 1
    return n
