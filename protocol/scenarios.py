"""Scenario runs: firings, claims, locks, history, and the commands around them.

A trigger firing has an id every node of the infra computes the same way (a cron slot,
a bundle activation, an upstream run, a manual request).  A node runs it only after
creating the firing's key in ``sy_fired`` (so each firing runs once per infra) and the
scenario's lock in ``sy_locks`` (so a scenario never runs twice at once); a firing that
finds the lock taken is parked on it as the one pending firing (coalesced).  Run
history is the ``sy.evt.run.<project>.<run>`` events; ``sy_runs`` keeps the last run
of each scenario for health.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from protocol import checks, subjects
from protocol.base import Command, Message
from protocol.errors import BadName
from protocol.events import Event

# Triggers
MANUAL, CRON, ON_ACTIVATION, AFTER, DESIGN_BUILD = (
    "manual", "cron", "on_activation", "after", "build")


# -- KV keys ------------------------------------------------------------------------------
# sy_fired:  <infra>.<project>.<scenario>.<firing>   one claim per firing and infra
# sy_locks:  lock.<infra>.<project>.<scenario>       who runs the scenario now (RunLock)
#            cron.<infra>.<project>.<scenario>       the last cron slot fired (a float)
# sy_run_logs (object store): <run>.log              the log of a finished run

MAX_FIRING_ID = 256
_FIRING_ID = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_FIRING_ID}}}\Z")


def _scenario_path(infra: str, project: str, scenario: str) -> str:
    return (f"{subjects.token(infra, 'infra')}.{subjects.token(project, 'project')}."
            f"{subjects.token(scenario, 'scenario')}")


def check_firing_id(value: str) -> str:
    """Return ``value`` if it can be a firing id (a KV key token); raise ``BadName``."""
    if not isinstance(value, str) or not _FIRING_ID.match(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise BadName(f"invalid firing id {shown}: expected letters, digits, '_' or '-' "
                      f"(at most {MAX_FIRING_ID})")
    return value


def fired_key(infra: str, project: str, scenario: str, firing: str) -> str:
    """The claim of one firing in ``sy_fired``: created once, by the node that runs it."""
    return f"{_scenario_path(infra, project, scenario)}.{check_firing_id(firing)}"


def lock_key(infra: str, project: str, scenario: str) -> str:
    """A scenario's lock in ``sy_locks`` (its value is a ``RunLock``)."""
    return f"lock.{_scenario_path(infra, project, scenario)}"


def lock_keys(infra: str | None = None) -> str:
    """The KV filter for every lock, or every lock of ``infra``."""
    return "lock.>" if infra is None else f"lock.{subjects.token(infra, 'infra')}.>"


def cron_mark_key(infra: str, project: str, scenario: str) -> str:
    """A scenario's cron mark in ``sy_locks``: the last slot fired, in epoch seconds."""
    return f"cron.{_scenario_path(infra, project, scenario)}"


def run_log_name(run_id: str) -> str:
    """The object name of a finished run's log in ``sy_run_logs``."""
    return f"{subjects.token(run_id, 'run id')}.log"


class Firing(msgspec.Struct, frozen=True, kw_only=True):
    """One reason to run a scenario."""

    id: str  # same on every node for the same trigger event: cron-<ts>, act-<update>...
    trigger: str
    params: dict[str, Any] = {}
    by: str = ""
    detail: str = ""  # cron expression, upstream run id, bundle...


class RunLock(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a scenario's lock: who runs it now, and what waits."""

    run_id: str
    project: str
    scenario: str
    infra: str
    node: str
    instance: str
    bundle: str
    firing: Firing
    started_at: float
    pending: Firing | None = None
    v: int = 1


class StepSummary(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    kind: str
    name: str
    outcome: str
    message: str = ""
    duration_s: float = 0.0


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A run, as ``shipyard runs`` shows it."""

    run_id: str
    project: str
    scenario: str
    infra: str
    node: str
    bundle: str
    trigger: str
    params: dict[str, Any] = {}
    started_at: float = 0.0
    finished_at: float | None = None
    outcome: str = "RUNNING"  # RUNNING | SUCCESS | WARNING | FAILED | CANCELLED
    duration_s: float | None = None
    error: str = ""
    metrics: dict[str, Any] = {}
    steps: list[StepSummary] = []
    log_tail: list[str] = []
    v: int = 1


# -- events ------------------------------------------------------------------------------

class RunStarted(Event, frozen=True, kw_only=True, tag="run.started"):
    run_id: str
    project: str
    scenario: str
    infra: str
    node: str
    bundle: str
    trigger: str
    firing: str
    params: dict[str, Any] = {}

    def subject(self) -> str:
        return subjects.event("run", self.project, self.run_id)

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless the names are valid and match ``subject``."""
        _check_run(self.project, self.scenario, self.node, self.run_id, self.infra)
        checks.same_subject(subject, self.subject(), "run event")

    def summary(self) -> str:
        return (f"run {self.run_id} of {self.project}/{self.scenario} started on {self.node} "
                f"({self.trigger}, bundle {self.bundle or '-'})")


class RunProgress(Event, frozen=True, kw_only=True, tag="run.step"):
    run_id: str
    project: str
    scenario: str
    node: str
    step: int
    kind: str
    name: str
    status: str  # STARTED, or the step's outcome
    message: str = ""
    duration_s: float = 0.0

    def subject(self) -> str:
        return subjects.event("run", self.project, self.run_id)

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless the names are valid and match ``subject``."""
        _check_run(self.project, self.scenario, self.node, self.run_id)
        checks.same_subject(subject, self.subject(), "run event")

    def summary(self) -> str:
        done = f" in {self.duration_s:.2f}s" if self.status != "STARTED" else ""
        why = f": {self.message}" if self.message else ""
        what = f"step {self.step + 1} ({self.name})" if self.step >= 0 else \
            f"{self.kind} {self.name}"
        return f"run {self.run_id} {what} {self.status}{done}{why}"


class RunFinished(Event, frozen=True, kw_only=True, tag="run.finished"):
    run: RunSummary

    def subject(self) -> str:
        return subjects.event("run", self.run.project, self.run.run_id)

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless the run's names are valid (its id becomes part
        of downstream firing ids and KV keys) and match ``subject``."""
        r = self.run
        _check_run(r.project, r.scenario, r.node, r.run_id, r.infra)
        checks.same_subject(subject, self.subject(), "run event")

    def summary(self) -> str:
        r = self.run
        why = f": {r.error}" if r.error else ""
        return (f"run {r.run_id} of {r.project}/{r.scenario} on {r.node} {r.outcome} "
                f"in {r.duration_s or 0:.2f}s{why}")


def _check_run(project: str, scenario: str, node: str, run_id: str,
               infra: str = "-") -> None:
    checks.name(project, "project")
    checks.text(scenario, "scenario")  # free text for builds: "build a,b"
    checks.name(infra, "infra name")
    checks.name(node, "node name")
    checks.name(run_id, "run id")


def validate_run_event(event: object, subject: str) -> None:
    """The rule for events on ``sy.evt.run.>``: their names reach subjects, KV keys
    and object names (a run's log), so they are checked before use."""
    if isinstance(event, RunStarted | RunProgress | RunFinished):
        event.validate(subject)


# -- commands ----------------------------------------------------------------------------

class RunAccepted(Message, frozen=True, kw_only=True, tag="run.accepted"):
    """``run_id`` is the run that will carry this firing: a new one, or the running one
    it was coalesced into (``coalesced``)."""

    run_id: str
    node: str
    coalesced: bool = False
    detail: str = ""


class RunList(Message, frozen=True, kw_only=True, tag="run.list.reply"):
    runs: list[RunSummary] = []


class RunLog(Message, frozen=True, kw_only=True, tag="run.log.reply"):
    run_id: str
    text: str
    truncated: bool = False
    running: bool = False


class RunCancelled(Message, frozen=True, kw_only=True, tag="run.cancelled"):
    run_id: str
    node: str
    was_running: bool


class RunScenario(Command[RunAccepted], frozen=True, kw_only=True, tag="scenario.run"):
    """Manual trigger (to the Deployer, which picks a node of the infra)."""

    project: str
    scenario: str
    infra: str
    params: dict[str, Any] = {}
    by: str = ""


class ListRuns(Command[RunList], frozen=True, kw_only=True, tag="run.list"):
    project: str
    infra: str | None = None
    scenario: str | None = None
    limit: int = 50


class GetRunLog(Command[RunLog], frozen=True, kw_only=True, tag="run.logs"):
    run_id: str
    max_bytes: int = 1 << 20


class CancelRun(Command[RunCancelled], frozen=True, kw_only=True, tag="run.cancel"):
    run_id: str
    by: str = ""


# Node-direct (sy.node.<node>.<verb>): what the Deployer asks one Automation node.

class FireScenario(Command[RunAccepted], frozen=True, kw_only=True, tag="scenario.fire"):
    project: str
    scenario: str
    firing: Firing


class NodeRunLog(Command[RunLog], frozen=True, kw_only=True, tag="node.run.logs"):
    run_id: str
    max_bytes: int = 1 << 20


class NodeCancelRun(Command[RunCancelled], frozen=True, kw_only=True, tag="node.run.cancel"):
    run_id: str


# Design node: test builds in the workspace, reported like runs.

class BuildDatasets(Command[RunAccepted], frozen=True, kw_only=True, tag="build"):
    project: str
    datasets: list[str]
    force: bool = False
    params: dict[str, Any] = {}
    by: str = ""


RUN_LOCK = msgspec.json.Decoder(RunLock)
RUN_SUMMARY = msgspec.json.Decoder(RunSummary)
