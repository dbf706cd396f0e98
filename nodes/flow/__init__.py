"""The flow engine: builds a project's datasets with its recipes, checks them, runs its
scenarios.  A library with no NATS in it, used by the Design node (test builds in the
project workspace) and Automation nodes (scenario runs from an unpacked bundle)::

    async with Pools() as pools:
        flow = Flow(manifest, code_dir=bundle_dir, data_dir=project_data, seed_dir=bundle_dir,
                    pool=pools, envs={"ml": "/data/envs/<digest>/bin/python"})
        result = await flow.run_scenario("nightly", log_path=run_dir / "run.log",
                                         progress=publish, cancel=stop_event)

Modules: ``graph`` (DAG validation, plans), ``build`` (scheduling, incremental skips,
atomic outputs), ``scenario`` (steps), ``metrics`` (metrics, sidecars, checks),
``run_log`` (the run log), ``jobs``/``pool`` (running user code in processes),
``context`` (the ``ctx`` user code sees), ``results`` (what comes back, as msgspec
Structs).  What runs in the user's interpreter -- the fork server, the job child, the
``ctx`` -- is in ``nodes.sandbox`` (standard library only).

Where user code runs, and why
-----------------------------
Every recipe and python step runs in its own OS process, never in the engine's event
loop or one of its threads: a recipe that raises, calls ``sys.exit``, loops forever or
eats all memory fails its run and nothing else.  The engine only awaits pipe reads, so
its loop stays responsive while a recipe burns a CPU.

Those processes are forked from a *fork server* (``forkserver``): one warm, idle,
single-threaded Python process per ``WorkerPool`` that has imported the job runner (and
any ``preload`` modules, e.g. pandas) once, and keeps one spare process forked ahead of
need.  A one-recipe build costs about 3-4 ms over calling ``run(ctx)`` directly, where
a fresh ``python`` per recipe costs 60-90 ms before importing anything
(``bench/flow.py``).  We chose this over a pool of reused worker processes because
reuse trades isolation for speed: a reused worker carries the previous recipe's
imports, globals, leaked threads, child processes and memory fragmentation into the
next one, and a memory limit that user code cannot lift (a lowered hard ``RLIMIT_AS``)
cannot be raised again for the next recipe either.  A forked job is fresh every time:

* it is the leader of its own session/process group, so a timeout or a cancel reaches
  everything it started (SIGTERM, then SIGKILL after ``kill_grace_s``), and whatever
  it leaves running when it exits is killed too;
* its memory limit is ``RLIMIT_AS`` set in the job itself (``Recipe.memory_mb``,
  default ``Limits.memory_mb``), so an allocation past it raises ``MemoryError``,
  reported as "memory limit exceeded";
* its timeout (``Recipe.timeout_s``) and the run's timeout and cancellation are
  enforced from the engine, which never depends on the job's cooperation;
* it dies with the fork server (``PR_SET_PDEATHSIG``), which dies with the engine;
  a fork server that dies is replaced on the next job, and the jobs it had end FAILED.

This package's public names are imported lazily (below), so importing it costs little.

Output files are written to temporary paths beside the real ones and renamed into place
only when ``run(ctx)`` returns; metrics persist in ``<data_dir>/.shipyard/metrics/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.flow.context import RecipeContext, RecipeLog, ScriptContext
    from nodes.flow.engine import Flow, Limits
    from nodes.flow.errors import FlowError
    from nodes.flow.graph import Graph
    from nodes.flow.metrics import evaluate, measure
    from nodes.flow.pool import Pools, WorkerPool
    from nodes.flow.progress import Progress
    from nodes.flow.results import (
        BuildResult,
        CheckResult,
        CheckStatus,
        FlowEvent,
        Metrics,
        Outcome,
        RecipeFinished,
        RecipeRun,
        RecipeSkipped,
        RecipeStarted,
        ScenarioResult,
        StepFinished,
        StepResult,
        StepStarted,
    )
    from nodes.flow.run_log import RunLog

__all__ = [
    "BuildResult",
    "CheckResult",
    "CheckStatus",
    "Flow",
    "FlowError",
    "FlowEvent",
    "Graph",
    "Limits",
    "Metrics",
    "Outcome",
    "Pools",
    "Progress",
    "RecipeContext",
    "RecipeFinished",
    "RecipeLog",
    "RecipeRun",
    "RecipeSkipped",
    "RecipeStarted",
    "RunLog",
    "ScenarioResult",
    "ScriptContext",
    "StepFinished",
    "StepResult",
    "StepStarted",
    "WorkerPool",
    "evaluate",
    "measure",
]

# Imported on first use.
_WHERE = {
    "RecipeContext": "context",
    "RecipeLog": "context",
    "ScriptContext": "context",
    "Flow": "engine",
    "Limits": "engine",
    "FlowError": "errors",
    "Graph": "graph",
    "evaluate": "metrics",
    "measure": "metrics",
    "Pools": "pool",
    "WorkerPool": "pool",
    "Progress": "progress",
    "BuildResult": "results",
    "CheckResult": "results",
    "CheckStatus": "results",
    "FlowEvent": "results",
    "Metrics": "results",
    "Outcome": "results",
    "RecipeFinished": "results",
    "RecipeRun": "results",
    "RecipeSkipped": "results",
    "RecipeStarted": "results",
    "ScenarioResult": "results",
    "StepFinished": "results",
    "StepResult": "results",
    "StepStarted": "results",
    "RunLog": "run_log",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nodes.flow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nodes.flow.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
