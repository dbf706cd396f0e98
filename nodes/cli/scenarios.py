"""Scenarios, runs and test builds: ``scenario run``, ``runs``, ``run logs|cancel``,
``build``."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import click
from rich.text import Text

from nodes.cli import progress
from nodes.cli.common import (
    EXIT_FAILED,
    FloatRange,
    call,
    check_names,
    connected,
    human_age,
    json_option,
    nats_option,
    out,
    print_json,
    run,
    styled,
    table,
    when,
    whoami,
)
from nodes.runtime.events import read_events
from protocol import subjects
from protocol.scenarios import (
    BuildDatasets,
    CancelRun,
    GetRunLog,
    ListRuns,
    RunAccepted,
    RunFinished,
    RunProgress,
    RunScenario,
    RunSummary,
)

OK_OUTCOMES = ("SUCCESS", "WARNING")


def parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; a value that is valid JSON (number, bool, list...) is decoded."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def param_option(fn: Any) -> Any:
    return click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
                        help="A run parameter (repeatable); JSON values are decoded.")(fn)


def wait_options(fn: Any) -> Any:
    fn = click.option("--timeout", type=FloatRange(min=0.1), default=3600.0,
                      show_default=True, help="Seconds to wait with --wait.")(fn)
    return click.option("--wait", is_flag=True,
                        help="Follow the run and exit 0 if it succeeds, 1 if not.")(fn)


@click.group()
def scenario() -> None:
    """Run scenarios by hand."""


@scenario.command("run")
@click.argument("project")
@click.argument("scenario_name", metavar="SCENARIO")
@click.option("--infra", required=True, help="Automation infrastructure.")
@param_option
@wait_options
@nats_option
@json_option
def scenario_run(project: str, scenario_name: str, infra: str, params: tuple[str, ...],
                 wait: bool, timeout: float, nats_url: str | None, as_json: bool) -> None:
    """Trigger SCENARIO of PROJECT on one node of an infrastructure."""
    check_names(project=project, scenario=scenario_name, infra=infra)
    cmd = RunScenario(project=project, scenario=scenario_name, infra=infra,
                      params=parse_params(params), by=whoami())
    accepted: RunAccepted = run(call, nats_url, cmd, 30.0)
    _accepted(accepted, project, wait, timeout, nats_url, as_json)


def _accepted(accepted: RunAccepted, project: str, wait: bool, timeout: float,
              nats_url: str | None, as_json: bool) -> None:
    if accepted.coalesced:
        if as_json:
            print_json(accepted)
        else:
            out.print(f"coalesced: {accepted.detail}")
        return
    if not wait:
        if as_json:
            print_json(accepted)
        else:
            out.print(f"run {accepted.run_id} started on {accepted.node}")
        return
    if not as_json:
        out.print(f"run {accepted.run_id} started on {accepted.node}")
    summary = run(follow_run, nats_url, project, accepted.run_id, timeout, not as_json)
    if summary is None:
        click.echo(f"shipyard: run {accepted.run_id} still running after {timeout:g}s "
                   "(it goes on; see 'shipyard runs')", err=True)
        raise SystemExit(EXIT_FAILED)
    if as_json:
        print_json(summary)
    else:
        show_run(summary)
    if summary.outcome not in OK_OUTCOMES:
        raise SystemExit(EXIT_FAILED)


async def follow_run(nats_url: str | None, project: str, run_id: str, timeout: float,
                     show: bool) -> RunSummary | None:
    """Follow a run's events (stored and live) until it finishes; None on timeout."""
    async with connected(nats_url) as nc:
        with anyio.move_on_after(timeout), \
                (progress.bar(f"run {run_id}: starting") if show else progress.Bar(
                    "", console=progress.QUIET)) as steps:
            subject = subjects.event("run", project, run_id)
            async for stored in read_events(nc, follow=True, subject=subject):
                ev = stored.event
                if isinstance(ev, RunProgress) and show:
                    steps.note(f"  {ev.summary()}")
                    steps.update(description=f"run {run_id}: {ev.kind} {ev.name} "
                                             f"{ev.status.lower()}")
                elif isinstance(ev, RunFinished):
                    return ev.run
    return None


def show_run(r: RunSummary) -> None:
    took = f" in {r.duration_s:.2f}s" if r.duration_s is not None else ""
    out.print(Text.assemble(f"run {r.run_id} ({r.project}/{r.scenario} on {r.node}): ",
                            styled(r.outcome), took))
    if r.steps:
        table(["#", "STEP", "KIND", "OUTCOME", "SECONDS", "MESSAGE"],
              [(s.index + 1, s.name, s.kind, s.outcome, f"{s.duration_s:.2f}", s.message)
               for s in r.steps])
    for dataset, metrics in sorted(r.metrics.items()):
        out.print(f"  metrics {dataset}: " + ", ".join(f"{k}={v}" for k, v in
                                                       sorted(metrics.items())))
    if r.error:
        out.print(Text.assemble(styled("error", "red"), f": {r.error}"))
    if r.outcome not in OK_OUTCOMES and r.log_tail:
        out.print("log tail:")
        for line in r.log_tail[-20:]:
            out.print(f"  {line}")


@click.command("runs")
@click.argument("project")
@click.option("--infra", default=None)
@click.option("--scenario", "scenario_name", default=None)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@nats_option
@json_option
def runs_cmd(project: str, infra: str | None, scenario_name: str | None, limit: int,
             nats_url: str | None, as_json: bool) -> None:
    """Runs of PROJECT, newest first (history survives restarts)."""
    check_names(project=project, infra=infra, scenario=scenario_name)
    reply = run(call, nats_url, ListRuns(project=project, infra=infra, scenario=scenario_name,
                                         limit=limit))
    if as_json:
        print_json(reply.runs)
        return
    if not reply.runs:
        out.print(f"no runs of {project} yet")
        return
    rows = []
    for r in reply.runs:
        took = (f"{r.duration_s:.2f}s" if r.duration_s is not None
                else human_age(max(0.0, time.time() - r.started_at)))
        rows.append((r.run_id, r.scenario, r.infra, r.node, r.trigger, when(r.started_at),
                     styled(r.outcome), took, r.error[:80]))
    table(["RUN", "SCENARIO", "INFRA", "NODE", "TRIGGER", "STARTED", "OUTCOME", "TIME",
           "ERROR"], rows)


@click.group("run")
def run_group() -> None:
    """One run: its log, or cancel it."""


@run_group.command("logs")
@click.argument("run_id")
@click.option("--max-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True)
@nats_option
def run_logs(run_id: str, max_bytes: int, nats_url: str | None) -> None:
    """Print RUN_ID's log."""
    check_names(run=run_id)
    reply = run(call, nats_url, GetRunLog(run_id=run_id, max_bytes=max_bytes), 30.0)
    if reply.truncated:
        click.echo(f"(showing the last {max_bytes} bytes)", err=True)
    click.echo(reply.text, nl=not reply.text.endswith("\n"))


@run_group.command("cancel")
@click.argument("run_id")
@nats_option
def run_cancel(run_id: str, nats_url: str | None) -> None:
    """Stop RUN_ID; its recipes are killed within seconds."""
    check_names(run=run_id)
    reply = run(call, nats_url, CancelRun(run_id=run_id, by=whoami()))
    if reply.was_running:
        out.print(f"run {run_id} on {reply.node}: cancelling")
    else:
        out.print(f"run {run_id} is not running (already finished)")


@click.command("build")
@click.argument("project")
@click.argument("datasets", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Rebuild even what is up to date.")
@param_option
@wait_options
@nats_option
@json_option
def build_cmd(project: str, datasets: tuple[str, ...], force: bool, params: tuple[str, ...],
              wait: bool, timeout: float, nats_url: str | None, as_json: bool) -> None:
    """Test-build DATASETS of PROJECT in the Design node's workspace."""
    check_names(project=project, dataset=datasets)
    cmd = BuildDatasets(project=project, datasets=list(datasets), force=force,
                        params=parse_params(params), by=whoami())
    accepted: RunAccepted = run(call, nats_url, cmd, 30.0)
    _accepted(accepted, project, wait, timeout, nats_url, as_json)
