"""What the engine reports: results of builds, checks and scenario runs, and progress
events.  All frozen msgspec Structs, so a node can put them on the wire as they are.
"""

from __future__ import annotations

import enum

import msgspec

from nodes.project.manifest import Check

Number = int | float
Metrics = dict[str, Number]


class Outcome(enum.StrEnum):
    """How a recipe, a step or a whole scenario run ended."""

    SUCCESS = "SUCCESS"
    WARNING = "WARNING"      # ran; a soft check bound (or an EMPTY check) was recorded
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"      # not run: up to date, upstream failed, or an earlier step failed
    CANCELLED = "CANCELLED"


class CheckStatus(enum.StrEnum):
    OK = "OK"
    WARNING = "WARNING"      # a soft bound (soft_min / soft_max) is violated
    ERROR = "ERROR"          # a hard bound (min / max) is violated
    EMPTY = "EMPTY"          # the metric has no value (dataset missing, never recorded)


class RecipeRun(msgspec.Struct, frozen=True, kw_only=True):
    """One recipe in a build.  ``reason`` says why it failed or was skipped
    ("up to date", "upstream failed: clean", "ValueError: bad row", "killed: timeout
    after 5s", "memory limit exceeded (512 MB)")."""

    recipe: str
    outcome: Outcome
    reason: str = ""
    duration_s: float = 0.0
    outputs: list[str] = []
    metrics: dict[str, Metrics] = {}     # output dataset -> metrics
    exit_code: int | None = None
    pid: int | None = None
    peak_rss_mb: float | None = None
    log_tail: list[str] = []             # the recipe's last log lines, on failure


class BuildResult(msgspec.Struct, frozen=True, kw_only=True):
    targets: list[str]
    outcome: Outcome
    message: str = ""
    duration_s: float = 0.0
    recipes: list[RecipeRun] = []        # the needed recipes, in dependency order
    metrics: dict[str, Metrics] = {}     # every target and built dataset -> metrics

    def recipe(self, name: str) -> RecipeRun:
        """The run of recipe ``name``; raises ``KeyError`` if it was not needed."""
        for r in self.recipes:
            if r.recipe == name:
                return r
        raise KeyError(name)


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    dataset: str
    metric: str
    status: CheckStatus
    value: Number | None = None
    message: str = ""
    check: Check | None = None


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    kind: str                            # "build", "check" or "python"
    name: str                            # the step's name, or a readable default
    outcome: Outcome
    message: str = ""
    duration_s: float = 0.0
    metrics: dict[str, Metrics] = {}     # dataset (or python step name) -> metrics
    checks: list[CheckResult] = []
    recipes: list[RecipeRun] = []


class ScenarioResult(msgspec.Struct, frozen=True, kw_only=True):
    scenario: str
    outcome: Outcome
    message: str = ""
    started_at: float = 0.0              # Unix time
    duration_s: float = 0.0
    steps: list[StepResult] = []
    log_path: str | None = None
    log_tail: list[str] = []             # the run log's last lines, for failure reports


# -- progress events --------------------------------------------------------------------
# ``step`` is the scenario step index, None for a build outside a scenario.

class StepStarted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    scenario: str
    step: int
    kind: str
    name: str


class StepFinished(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    scenario: str
    step: int
    kind: str
    name: str
    outcome: Outcome
    duration_s: float
    message: str = ""


class RecipeStarted(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    recipe: str
    pid: int | None = None
    step: int | None = None


class RecipeFinished(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    recipe: str
    outcome: Outcome
    duration_s: float
    reason: str = ""
    step: int | None = None


class RecipeSkipped(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    recipe: str
    reason: str
    step: int | None = None


FlowEvent = StepStarted | StepFinished | RecipeStarted | RecipeFinished | RecipeSkipped
