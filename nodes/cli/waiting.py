"""``--wait``: follow a deployment until every online node runs it, or it fails.

Progress comes from the nodes' activation reports (``sy.rpt.activation.*``); the verdict
comes from the Deployer's view of the deployment, polled, so a lost report never
decides anything.  ``change_and_wait`` subscribes to the reports before it sends the
change, so a stage that passes quickly (an environment built in a third of a second)
is still shown.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
from nats.aio.msg import Msg
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from nodes.cli.common import connected, err
from nodes.runtime.calls import Caller
from protocol import subjects
from protocol.deploy import (
    FAILED,
    IN_SYNC,
    ActivationReport,
    DeploymentView,
    ListDeployments,
)
from protocol.errors import OperationError, Unavailable
from protocol.registry import ONLINE

REPORTS = msgspec.json.Decoder(ActivationReport)
POLL_S = 0.2
EARLY_REPORTS = 1000  # reports kept while the change is on its way
# While one Deployer hands over to a standby (nodes.runtime.lease: ~3.5 s after a
# SIGKILL, plus loading state), nothing answers: a change refused as "unavailable" was
# received by no one, so sending it again is safe.  A timeout is not retried (the
# change may have been made).
HANDOVER_S = 10.0


async def _send(change: Callable[[Caller], Awaitable[DeploymentView]],
                caller: Caller) -> DeploymentView:
    deadline = time.monotonic() + HANDOVER_S
    while True:
        try:
            return await change(caller)
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(POLL_S)


async def call_with(nats_url: str | None,
                    change: Callable[[Caller], Awaitable[DeploymentView]]) -> DeploymentView:
    """Make the change without waiting for it."""
    async with connected(nats_url) as nc:
        return await _send(change, Caller(nc, sender="cli"))


async def change_and_wait(nats_url: str | None,
                          change: Callable[[Caller], Awaitable[DeploymentView]],
                          timeout: float, show: bool
                          ) -> tuple[DeploymentView, bool, str]:
    """Subscribe to activation reports, make the change (``change(caller)`` returns the
    view it got back), then follow it; (last view, ok, why-not)."""
    async with connected(nats_url) as nc:
        caller = Caller(nc, sender="cli")
        progress = _Progress(show)
        early: deque[ActivationReport] = deque(maxlen=EARLY_REPORTS)
        asked: DeploymentView | None = None

        async def on_report(msg: Msg) -> None:
            try:
                r = REPORTS.decode(msg.data)
            except msgspec.DecodeError:
                return
            if asked is None:
                early.append(r)  # before the change's update id is known
            elif r.update_id == asked.update_id:
                progress.report(r)

        sub = await nc.subscribe(subjects.reports("activation"), cb=on_report)
        try:
            view = asked = await _send(change, caller)
        except BaseException:
            await sub.unsubscribe()
            raise
        deadline = time.monotonic() + timeout
        last = view
        try:
            with progress:
                for r in early:
                    if r.update_id == view.update_id:
                        progress.report(r)
                while True:
                    try:
                        reply = await caller.call(ListDeployments(project=view.project,
                                                                  infra=view.infra), timeout=5)
                        found = [v for v in reply.deployments if v.infra == view.infra]
                        last = found[0] if found else last
                    except OperationError as exc:
                        progress.note(f"deployer: {exc.message}")
                    verdict = _verdict(view, last)
                    if verdict is not None:
                        ok, why = verdict
                        return last, ok, why
                    if time.monotonic() > deadline:
                        why = "; ".join(last.reasons) or last.state
                        return last, False, f"timed out after {timeout:g}s: {why}"
                    await anyio.sleep(POLL_S)
        finally:
            await sub.unsubscribe()


def _verdict(asked: DeploymentView, now: DeploymentView) -> tuple[bool, str] | None:
    if now.update_id != asked.update_id:
        return False, (f"superseded: {now.project} on {now.infra} now wants {now.desired} "
                       f"(update {now.update_id} by {now.updated_by})")
    if now.state == IN_SYNC:
        return True, ""
    if now.state == FAILED:
        return False, f"deployment failed: {'; '.join(now.reasons)}"
    online = [n for n in now.nodes if n.status == ONLINE]
    if not online:
        return False, (f"no online automation node in infra {now.infra}; the bundle will be "
                       "activated when nodes join")
    return None


class _Progress:
    """Per-node progress bars on a terminal; one line per stage change otherwise."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.tty = err.is_terminal
        self.bars: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.stages: dict[str, tuple[str, str]] = {}
        self.totals: dict[str, int] = {}
        if show and self.tty:
            # Stages carry the nodes' reasons verbatim: no markup in them.
            self.bars = Progress(TextColumn("{task.fields[node]:<16}", markup=False),
                                 BarColumn(), DownloadColumn(),
                                 TextColumn("{task.fields[stage]}", markup=False),
                                 console=err, transient=False)

    def __enter__(self) -> _Progress:
        if self.bars is not None:
            self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.show:
            err.print(text)

    def report(self, r: ActivationReport) -> None:
        if not self.show:
            return
        stage = describe(r)
        if self.bars is not None:
            # Reports after the fetch may carry no size: the bar keeps the fetched one.
            total = self.totals[r.node] = r.bytes_total or self.totals.get(r.node) or 1
            task = self.tasks.get(r.node)
            if task is None:
                task = self.tasks[r.node] = self.bars.add_task(
                    "", total=total, node=r.node, stage=stage)
            done = r.bytes_done if r.stage == "fetching" else total
            self.bars.update(task, completed=done, total=total, stage=stage)
        elif self.stages.get(r.node) != (r.stage, r.env):
            self.stages[r.node] = (r.stage, r.env)
            err.print(f"  {r.node:<16} {stage}")


def describe(r: ActivationReport) -> str:
    """One node's stage as a person reads it: ``building env ml ...``, ``failed: why``."""
    return describe_stage(r.stage, r.env, r.reason)


def describe_stage(stage: str, env: str, reason: str) -> str:
    """A node's stage (of an activation or a generation switch) as a person reads it."""
    if stage == "building":
        return f"building env {env or '?'} ..."
    return stage + (f": {reason}" if reason else "")
