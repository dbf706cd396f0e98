"""The Deployer's health desk: the rollup on request, health-change events, alerts.

The judgement itself is ``nodes.deployer.health`` (pure); this desk feeds it what the
Deployer knows, answers ``GetHealth`` and, once a second, compares the new rollup with
the last (``HealthTracker``): each change is published as a ``HealthChanged`` event and
sent as an alert to the webhooks of the infra concerned (``nodes.deployer.alerts``).
A node lost and a failed run are alerted as they happen (the registry and the run
history call ``node_lost`` and ``run_failed``).  Nothing here waits for a webhook.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from nodes.deployer.alerts import Alerter, Delivery, Policy
from nodes.deployer.health import DEFAULT_HOLD_S, HealthTracker, rollup
from nodes.deployer.host import DeskHost
from nodes.deployer.registry import Registry
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import KVCache
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from protocol import subjects
from protocol.base import Request
from protocol.deploy import INFRA_VALUE, DeploymentView, Infra
from protocol.errors import BadRequest, NotFound
from protocol.events import HealthChanged, NodeLost
from protocol.health import (
    HEALTH_CHANGED,
    NODE_LOST,
    RUN_FAILED,
    TEST,
    Alert,
    AlertTested,
    GetHealth,
    HealthReport,
    SendTestAlert,
    WebhookResult,
)
from protocol.scenarios import RunSummary

WATCH_INTERVAL_S = 1.0
TEST_ATTEMPTS = 3  # a test alert is retried less: someone waits for its answer
TEST_WAIT_S = 20.0  # the CLI waits 30 s


class HealthDesk:
    def __init__(self, host: DeskHost, registry: Registry, *,
                 views: Callable[[], list[DeploymentView]],
                 get_infra: Callable[[str], Awaitable[Infra | None]],
                 hold_s: float = DEFAULT_HOLD_S, alert_policy: Policy | None = None,
                 interval_s: float = WATCH_INTERVAL_S) -> None:
        """``views()``: every deployment's view; ``get_infra(name)``: an infra record read
        now (a test alert goes to the webhooks just set)."""
        self.host = host
        self.registry = registry
        self.views = views
        self.get_infra = get_infra
        self.interval_s = interval_s
        self.log = host.log.bind(component="health")
        self.tracker = HealthTracker(hold_s=hold_s)
        self.alerter = Alerter(self.log, alert_policy)
        self._infras: KVCache[Infra] | None = None

    async def setup(self) -> None:
        kv = await ensure_kv(self.host.js, subjects.INFRA_BUCKET,
                             replicas=self.host.settings.replicas,
                             description="shipyard infrastructures")
        self._infras = KVCache(kv, ">", INFRA_VALUE.decode)

    async def started(self, tg: TaskGroup) -> None:
        assert self._infras is not None
        await tg.start(self._infras.run)
        await tg.start(self.alerter.run)
        tg.start_soon(partial(supervised, "health watch", self._watch, log=self.log))

    def infras(self) -> list[Infra]:
        return self._infras.values() if self._infras is not None else []

    def report(self, infra: str | None = None) -> HealthReport:
        """The health rollup now (``nodes.deployer.health.rollup`` over this Deployer's
        registry, infra records and deployment views)."""
        return rollup(self.infras(), self.registry.query(), self.views(), only=infra)

    # -- commands ------------------------------------------------------------------------

    @handles(GetHealth)
    async def get_health(self, cmd: GetHealth, req: Request[Any]) -> HealthReport:
        if cmd.infra is not None:
            subjects.token(cmd.infra, "infra")
        report = self.report(cmd.infra)
        if cmd.infra is not None and not report.infras:
            known = ", ".join(sorted(i.name for i in self.infras())) or "none"
            raise NotFound(f"unknown infra {cmd.infra!r} (infras: {known})")
        return report

    @handles(SendTestAlert)
    async def test_alert(self, cmd: SendTestAlert, req: Request[Any]) -> AlertTested:
        subjects.token(cmd.infra, "infra")
        infra = await self.get_infra(cmd.infra)
        if infra is None:
            raise NotFound(f"unknown infra {cmd.infra!r} (see: shipyard infra list)")
        if not infra.webhooks:
            raise BadRequest(f"infra {cmd.infra} has no webhook: add one with shipyard "
                             f"infra set {cmd.infra} --webhook URL")
        by = cmd.by or req.sender
        alert = Alert(kind=TEST, infra=infra.name, about="infra", name=infra.name,
                      ts=time.time(), summary=f"test alert for infra {infra.name} sent by "
                                              f"{by or '?'}")
        deliveries = self.alerter.send(alert, infra.webhooks, attempts=TEST_ATTEMPTS)
        with anyio.move_on_after(TEST_WAIT_S):
            for d in deliveries:
                await d.done.wait()
        return AlertTested(infra=infra.name, alert_id=alert.id,
                           results=[_result(d) for d in deliveries])

    # -- alerts --------------------------------------------------------------------------

    def alert(self, alert: Alert) -> list[Delivery]:
        """Send ``alert`` to the webhooks of its infra (none: nothing); never waits."""
        for infra in self.infras():
            if infra.name == alert.infra and infra.webhooks:
                return self.alerter.send(alert, infra.webhooks)
        return []

    def node_lost(self, event: NodeLost) -> None:
        why = event.reason or f"no heartbeat for {event.silent_s:.1f}s"
        self.alert(Alert(kind=NODE_LOST, infra=event.infra, about="node", name=event.node,
                         ts=event.ts, summary=event.summary(), health="ERROR",
                         reasons=[f"node {event.node} ({event.role}) lost: {why}"]))

    def run_failed(self, run: RunSummary) -> None:
        self.alert(Alert(kind=RUN_FAILED, infra=run.infra, about="run", name=run.run_id,
                         ts=run.finished_at or time.time(), health="ERROR",
                         summary=f"run {run.run_id} of {run.project} scenario {run.scenario} "
                                 f"on {run.infra} failed",
                         reasons=[run.error or "see its log: shipyard run logs "
                                  f"{run.run_id}"]))

    async def _watch(self) -> None:
        while not self.host.stopping_requested:
            for change in self.tracker.changes(self.report()):
                self.log.info("health changed", infra=change.infra, about=change.about,
                              name=change.name, health=change.health,
                              previous=change.previous)
                self.alert(_change_alert(change))
                await self.host.emit(change)
            await anyio.sleep(self.interval_s)


def _change_alert(change: HealthChanged) -> Alert:
    return Alert(id=change.id, kind=HEALTH_CHANGED, infra=change.infra, about=change.about,
                 name=change.name, ts=change.ts, summary=change.summary(),
                 health=change.health, previous=change.previous, reasons=change.reasons)


def _result(d: Delivery) -> WebhookResult:
    if d.result is not None:
        return d.result
    return WebhookResult(url=d.url, delivered=False, attempts=0,
                         error=f"still being retried after {TEST_WAIT_S:g}s")
