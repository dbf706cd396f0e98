"""The API Deployer: API service deployments, rollback, history, health and metrics.

Mirrors the Project Deployer: one KV record per service and infra (``api.<infra>.<service>``)
changed only by compare-and-set, with its update history; what nodes actually serve comes
from their heartbeats, and their request metrics from ``sy.rpt.metrics.<node>`` reports.
A service is served by one API infra per NATS account, because its subjects and queue
group carry no infra: a second infra is refused rather than silently sharing traffic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import partial
from typing import Any

import msgspec
import nats.js.errors
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.api.capture import ensure_capture_stream
from nodes.api.metrics import quantile
from nodes.deployer.bundle_deployments import CAS_ATTEMPTS, HISTORY_LIMIT
from nodes.deployer.health import TrafficWindow, combine, governance_verdict, traffic_verdict
from nodes.deployer.host import DeskHost, RequireInfra
from nodes.deployer.policy import GovernPolicy
from nodes.deployer.registry import Registry
from nodes.deployer.updates import UpdateCloser, announce_recent, close_last, judge
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache, read
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from protocol import subjects
from protocol.api import (
    API_DEPLOYMENT_VALUE,
    API_PACKAGE_INFO,
    AUTH_MODES,
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_MAX_P95_MS,
    GENERATION_REPORT,
    METRICS_REPORT,
    ApiDeploymentFinished,
    ApiDeploymentRecord,
    ApiDeploymentRequested,
    ApiMapping,
    ApiMetricsReport,
    ApiPackageInfo,
    DeployApi,
    GenerationReport,
    RollbackApi,
    check_version,
    package_key,
)
from protocol.base import Request, encode, new_id
from protocol.capture import CaptureSettings, capture_settings
from protocol.deploy import (
    PENDING,
    SUPERSEDED,
    DeploymentView,
    Infra,
    ListDeployments,
    NodeDeployment,
    Update,
    deployment_key,
    deployment_keys,
    update_event_id,
)
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.govern import API
from protocol.registry import ONLINE, NodeInfo
from protocol.state import ApiState, ServiceState

MAX_REPORTING_NODES = 10_000  # metrics kept for at most this many nodes (oldest dropped)


def _sender(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


# A node's last two metrics reports, each with the Deployer's monotonic time of arrival
# (rates are measured on the Deployer's clock, not on what the sender claims).
Reports = tuple[tuple[ApiMetricsReport, float], tuple[ApiMetricsReport, float] | None]


class ApiDeployer:
    def __init__(self, host: DeskHost, registry: Registry, *,
                 require_infra: RequireInfra) -> None:
        self.host = host
        self.registry = registry
        self.require_infra = require_infra
        self.log = host.log.bind(component="api-deployer")
        self._deploy: KeyValue | None = None
        self._packages: KeyValue | None = None
        self._cache: KVCache[ApiDeploymentRecord] | None = None
        self.policy = GovernPolicy(host)
        self.closer = UpdateCloser(self.view, self._finish,
                                   lambda: self.host.stopping_requested)
        self.reports: OrderedDict[str, Reports] = OrderedDict()
        self.traffic = TrafficWindow()  # the last minute of traffic, for health

    async def setup(self) -> None:
        js, r = self.host.js, self.host.settings.replicas
        self._deploy = await ensure_kv(js, subjects.DEPLOY_BUCKET, replicas=r,
                                       description="shipyard desired state")
        self._packages = await ensure_kv(js, subjects.API_PACKAGE_BUCKET, replicas=r,
                                         description="shipyard API package records")
        await self.policy.setup()
        await ensure_capture_stream(js, replicas=r)
        self._cache = KVCache(self._deploy, deployment_keys("api"), API_DEPLOYMENT_VALUE.decode,
                              on_change=self._changed)

    async def started(self, tg: TaskGroup) -> None:
        assert self._cache is not None
        await tg.start(self._cache.run)
        await self._announce_recent()
        await self.host.subscribe_decoded(
            subjects.reports("metrics"), METRICS_REPORT, self._on_metrics,
            validate=ApiMetricsReport.validate, kind="metrics report", sender=_sender)
        await self.host.subscribe_decoded(
            subjects.reports("apigen"), GENERATION_REPORT, self._on_progress,
            validate=GenerationReport.validate, kind="generation report", sender=_sender)
        tg.start_soon(partial(supervised, "pending updates", self.closer.run, self._cache,
                              log=self.log))

    def kick(self) -> None:
        self.closer.kick()

    async def _changed(self, key: str, entry: Entry[ApiDeploymentRecord] | None) -> None:
        self.kick()

    def records(self) -> list[Entry[ApiDeploymentRecord]]:
        """Every deployment record this desk holds (none before setup)."""
        return list(self._cache.entries.values()) if self._cache is not None else []

    async def _on_metrics(self, report: ApiMetricsReport) -> None:
        last = self.reports.pop(report.node, None)
        self.reports[report.node] = ((report, time.monotonic()), last[0] if last else None)
        self.traffic.add(report)
        while len(self.reports) > MAX_REPORTING_NODES:
            self.traffic.forget(self.reports.popitem(last=False)[0])

    async def _on_progress(self, report: GenerationReport) -> None:
        self.kick()

    def forget(self, node: str) -> None:
        """``node`` left the registry: its metrics leave the rollup."""
        self.reports.pop(node, None)
        self.traffic.forget(node)

    @property
    def kv(self) -> KeyValue:
        assert self._deploy is not None
        return self._deploy

    # -- deployments ---------------------------------------------------------------------

    async def _package(self, service: str, version: str) -> ApiPackageInfo:
        assert self._packages is not None
        try:
            key = package_key(service, check_version(version))
            entry = await self._packages.get(key)
            if entry.value:
                return API_PACKAGE_INFO.decode(entry.value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except nats.js.errors.KeyNotFoundError:
            pass
        raise NotFound(f"API package {service} {version} not found (see: shipyard api "
                       f"versions {service})")

    async def _read(self, key: str) -> tuple[ApiDeploymentRecord | None, int]:
        return await read(self.kv, key, API_DEPLOYMENT_VALUE.decode)

    async def _endpoints(self, service: str, mapping: ApiMapping) -> tuple[dict[str, str], str]:
        endpoints: dict[str, str] = {}
        description = ""
        for version in sorted({*mapping.generations, *([mapping.shadow] if mapping.shadow
                                                         else [])}):
            info = await self._package(service, version)
            description = description or info.description
            for name, spec in info.endpoints.items():
                if endpoints.setdefault(name, spec.kind) != spec.kind:
                    raise BadRequest(f"endpoint {name} is a {endpoints[name]} endpoint in one "
                                     f"version and a {spec.kind} endpoint in {version}: "
                                     "versions served together must agree")
        return endpoints, description

    async def _change(self, *, service: str, infra: str, rules: Infra, mapping: ApiMapping,
                      action: str, by: str, expected_revision: int | None,
                      capture: CaptureSettings | None = None,
                      max_error_rate: float | None = None, max_p95_ms: float | None = None,
                      based_on: str | None = None) -> DeploymentView:
        """Write ``mapping`` as the desired state once it is valid (every version exists)
        and every version in it, the shadow too, passes the infra's govern policy.  A
        health threshold left None keeps the current one (the default when new)."""
        assert self._cache is not None
        for entry in self._cache.entries.values():
            other = entry.value
            if other.service == service and other.infra != infra:
                raise Conflict(f"API service {service} is already served by infra "
                               f"{other.infra}; a service is served by one API infra per "
                               "NATS account (its subjects carry no infra)")
        endpoints, description = await self._endpoints(service, mapping)
        versions = sorted({*mapping.generations, *([mapping.shadow] if mapping.shadow
                                                    else [])})
        warnings = await self.policy.check(rules, [(API, service, v) for v in versions])
        key = deployment_key("api", infra, service)
        for _ in range(CAS_ATTEMPTS):
            current, revision = await self._read(key)
            if expected_revision is not None and expected_revision != revision:
                raise Conflict(f"deployment of {service} on {infra} is at revision "
                               f"{revision}, not {expected_revision}: it changed since you "
                               "looked")
            if based_on is not None and (current is None or current.update_id != based_on):
                raise Conflict(f"deployment of {service} on {infra} changed while this "
                               f"{action} was prepared; it was not applied: retry")
            now = time.time()
            before = current.mapping.describe() if current else None
            update = Update(id=new_id(), at=now, by=by, action=action, from_bundle=before,
                            to_bundle=mapping.describe(), warnings=warnings)
            history = list(current.history) if current else []
            if history and history[-1].result == PENDING:
                history[-1] = msgspec.structs.replace(
                    history[-1], result=SUPERSEDED, finished_at=now,
                    detail=f"superseded by {action} to {mapping.describe()}")
            history = [*history, update][-HISTORY_LIMIT:]
            previous = current.mapping if current and current.mapping != mapping else (
                current.previous if current else None)
            error_rate = max_error_rate if max_error_rate is not None else (
                current.max_error_rate if current else DEFAULT_MAX_ERROR_RATE)
            p95_ms = max_p95_ms if max_p95_ms is not None else (
                current.max_p95_ms if current else DEFAULT_MAX_P95_MS)
            record = ApiDeploymentRecord(service=service, infra=infra, mapping=mapping,
                                         endpoints=endpoints, description=description,
                                         previous=previous, update_id=update.id,
                                         updated_at=now, updated_by=by, history=history,
                                         capture=capture, max_error_rate=error_rate,
                                         max_p95_ms=p95_ms)
            data = encode(record)
            try:
                new_revision = int(await self.kv.create(key, data) if revision == 0 else
                                   await self.kv.update(key, data, last=revision))
                break
            except nats.js.errors.KeyWrongLastSequenceError:
                latest, _ = await self._read(key)
                if (expected_revision is None and current is not None and latest is not None
                        and latest.update_id == current.update_id):
                    continue  # only the outcome of the same update was recorded meanwhile
                raise Conflict(f"deployment of {service} on {infra} was changed "
                               f"concurrently; this {action} was not applied: check "
                               "'shipyard deployments' and retry") from None
        else:
            raise Conflict(f"deployment of {service} on {infra} kept changing during this "
                           f"{action}; it was not applied: retry")
        if self._cache is not None:
            await self._cache.written(key, new_revision, data)
        self.log.info("desired API mapping changed", service=service, infra=infra,
                      action=action, to=mapping.describe(), revision=new_revision)
        await self.host.emit(_requested(record, update))
        self.kick()
        return self.view(record, new_revision)

    @handles(DeployApi)
    async def deploy(self, cmd: DeployApi, req: Request[Any]) -> DeploymentView:
        try:
            subjects.token(cmd.service, "service")
            for version in cmd.generations:
                check_version(version)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        infra = await self.require_infra(cmd.infra, "api")
        if not cmd.generations or not any(w > 0 for w in cmd.generations.values()):
            raise BadRequest("name at least one version with a weight above 0")
        if any(w < 0 for w in cmd.generations.values()):
            raise BadRequest("weights must be 0 or more")
        if cmd.shadow is not None and cmd.generations.get(cmd.shadow, 0) > 0:
            raise BadRequest(f"{cmd.shadow} cannot be both live and the shadow")
        if cmd.auth is not None and cmd.auth not in AUTH_MODES:
            raise BadRequest(f"invalid auth {cmd.auth!r}: expected one of "
                             f"{', '.join(AUTH_MODES)}")
        _check_thresholds(cmd.max_error_rate, cmd.max_p95_ms)
        current, _ = await self._read(deployment_key("api", cmd.infra, cmd.service))
        auth = cmd.auth or (current.mapping.auth if current else "public")
        try:
            capture = capture_settings(current.capture if current else None, cmd.capture,
                                       cmd.redact)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        mapping = ApiMapping(generations=dict(sorted(cmd.generations.items())),
                             shadow=cmd.shadow, auth=auth)
        return await self._change(service=cmd.service, infra=cmd.infra, rules=infra,
                                  mapping=mapping,
                                  action="deploy", by=cmd.by or req.sender,
                                  expected_revision=cmd.expected_revision, capture=capture,
                                  max_error_rate=cmd.max_error_rate,
                                  max_p95_ms=cmd.max_p95_ms)

    @handles(RollbackApi)
    async def rollback(self, cmd: RollbackApi, req: Request[Any]) -> DeploymentView:
        infra = await self.require_infra(cmd.infra, "api")
        try:
            key = deployment_key("api", cmd.infra, cmd.service)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        current, _ = await self._read(key)
        if current is None:
            raise NotFound(f"API service {cmd.service!r} is not deployed on {cmd.infra!r}")
        if current.previous is None:
            raise BadRequest(f"{cmd.service} on {cmd.infra} has no previous mapping to roll "
                             "back to")
        return await self._change(service=cmd.service, infra=cmd.infra, rules=infra,
                                  mapping=current.previous, action="rollback",
                                  by=cmd.by or req.sender, expected_revision=None,
                                  capture=current.capture, based_on=current.update_id)

    def views(self, cmd: ListDeployments) -> list[DeploymentView]:
        """API deployments for ``shipyard deployments`` (``project`` filters by service)."""
        if self._cache is None:
            return []
        return [self.view(e.value, e.revision) for e in self._cache.entries.values()
                if (cmd.project is None or e.value.service == cmd.project)
                and (cmd.infra is None or e.value.infra == cmd.infra)]

    # -- state, health, metrics ----------------------------------------------------------

    def view(self, rec: ApiDeploymentRecord, revision: int) -> DeploymentView:
        nodes = self.registry.query(role="api", infra=rec.infra)
        per_node = [_node_deployment(n, rec) for n in nodes]
        state, health, reasons = judge(
            want=rec.mapping.describe(), infra=rec.infra, role="API",
            verbs=("serves", "serving", "served"),
            pending=bool(rec.history) and rec.history[-1].result == PENDING,
            per_node=per_node, quiet=("", "idle", "serving"))
        online = {n.name for n in nodes if n.status == ONLINE}
        health, reasons = combine(
            (health, reasons),
            traffic_verdict(self.traffic.traffic(rec.service, online),
                            max_error_rate=rec.max_error_rate, max_p95_ms=rec.max_p95_ms),
            governance_verdict(rec.history[-1] if rec.history else None))
        return DeploymentView(
            project=rec.service, infra=rec.infra, desired=rec.mapping.describe(),
            previous=rec.previous.describe() if rec.previous else None, revision=revision,
            update_id=rec.update_id, updated_at=rec.updated_at, updated_by=rec.updated_by,
            state=state, health=health, reasons=reasons, nodes=per_node,
            last_update=rec.history[-1] if rec.history else None, kind="api",
            extra={"generations": rec.mapping.generations, "shadow": rec.mapping.shadow,
                   "auth": rec.mapping.auth, "endpoints": rec.endpoints,
                   "max_error_rate": rec.max_error_rate, "max_p95_ms": rec.max_p95_ms,
                   "metrics": self._metrics(rec.service, online),
                   "capture": rec.capture.fraction if rec.capture else 0.0,
                   "redact": rec.capture.redact if rec.capture else []})

    def _metrics(self, service: str, online: set[str]) -> list[dict[str, Any]]:
        """``service``'s traffic per endpoint, generation and shadow on the online nodes:
        counts and p50/p95 since each node started, and between each node's last two
        reports ``rps``, ``recent_requests``, ``recent_errors`` and ``recent_p95_ms`` (a
        row the earlier report lacks, a generation's first traffic, counts from zero)."""
        rows: dict[tuple[str, str, bool], dict[str, Any]] = {}
        for node, ((report, at), earlier) in self.reports.items():
            if node not in online:
                continue
            prev, prev_at = earlier if earlier else (None, at)
            before = {(m.endpoint, m.generation, m.shadow): m for m in prev.endpoints
                      if m.service == service} if prev else {}
            span = max(at - prev_at, 0.1) if prev else 0.0  # two queued reports: no spike
            for m in report.endpoints:
                if m.service != service:
                    continue
                key = (m.endpoint, m.generation, m.shadow)
                row = rows.setdefault(key, {"endpoint": m.endpoint, "generation": m.generation,
                                            "shadow": m.shadow, "requests": 0, "errors": 0,
                                            "inflight": 0, "rps": 0.0, "nodes": 0,
                                            "recent_requests": 0, "recent_errors": 0,
                                            "buckets": [0] * len(m.buckets),
                                            "recent_buckets": [0] * len(m.buckets)})
                row["requests"] += m.requests
                row["errors"] += m.errors
                row["inflight"] += m.inflight
                row["nodes"] += 1
                row["buckets"] = [a + b for a, b in zip(row["buckets"], m.buckets, strict=False)]
                if not span:
                    continue
                old = before.get(key)
                if old is None or old.requests > m.requests:  # new row, or the node restarted
                    req0, err0, buckets0 = 0, 0, [0] * len(m.buckets)
                else:
                    req0, err0, buckets0 = old.requests, old.errors, old.buckets
                row["rps"] += (m.requests - req0) / span
                row["recent_requests"] += m.requests - req0
                row["recent_errors"] += max(0, m.errors - err0)
                row["recent_buckets"] = [a + max(0, b - c) for a, b, c in zip(
                    row["recent_buckets"], m.buckets, buckets0, strict=False)]
        out = []
        for row in rows.values():
            buckets, recent = row.pop("buckets"), row.pop("recent_buckets")
            p50, p95 = quantile(buckets, 0.5), quantile(buckets, 0.95)
            row["p50_ms"] = None if p50 is None else round(p50 * 1000, 2)
            row["p95_ms"] = None if p95 is None else round(p95 * 1000, 2)
            recent_p95 = quantile(recent, 0.95)
            row["recent_p95_ms"] = None if recent_p95 is None else round(recent_p95 * 1000, 2)
            row["rps"] = round(row["rps"], 1)
            out.append(row)
        return sorted(out, key=lambda r: (r["endpoint"], r["generation"]))

    async def _finish(self, entry: Entry[ApiDeploymentRecord], result: str, detail: str) -> None:
        rec = entry.value
        new, last = close_last(rec, result, detail)
        key, data = deployment_key("api", rec.infra, rec.service), encode(new)
        try:
            revision = int(await self.kv.update(key, data, last=entry.revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return
        if self._cache is not None:
            await self._cache.written(key, revision, data)
        self.log.info("API update finished", service=rec.service, infra=rec.infra,
                      mapping=rec.mapping.describe(), result=result)
        await self.host.emit(_finished(new, last))

    async def _announce_recent(self) -> None:
        """Announce again the recent updates' events (``updates.recent_updates``)."""
        assert self._cache is not None
        await announce_recent((e.value for e in self._cache.entries.values()),
                              self.host.emit, _requested, _finished)


def _requested(rec: ApiDeploymentRecord, update: Update) -> ApiDeploymentRequested:
    return ApiDeploymentRequested(id=update_event_id(update.id, "requested"), ts=update.at,
                                  service=rec.service, infra=rec.infra, update_id=update.id,
                                  action=update.action, from_mapping=update.from_bundle,
                                  to_mapping=update.to_bundle, by=update.by)


def _finished(rec: ApiDeploymentRecord, update: Update) -> ApiDeploymentFinished:
    return ApiDeploymentFinished(id=update_event_id(update.id, "finished"),
                                 ts=update.finished_at or update.at, service=rec.service,
                                 infra=rec.infra, update_id=update.id,
                                 mapping=update.to_bundle, result=update.result,
                                 detail=update.detail)


def _node_deployment(n: NodeInfo, rec: ApiDeploymentRecord) -> NodeDeployment:
    st = (n.state.services.get(rec.service) if isinstance(n.state, ApiState) else None) \
        or ServiceState()
    failed = st.failed
    error = ""
    if failed is not None and failed.update == rec.update_id:
        error = failed.reason or "refused"
    degraded = ""
    if isinstance(n.state, ApiState) and n.state.ready_workers == 0 and n.state.workers > 0 \
            and st.stage == "serving":
        degraded = (f"no worker process is ready to serve ({n.state.worker_crashes} crashed "
                    f"since the node started; see its log)")
    return NodeDeployment(node=n.name, status=n.status, running=st.mapping,
                          activity=st.stage, error=error, degraded=degraded)


def _check_thresholds(max_error_rate: float | None, max_p95_ms: float | None) -> None:
    if max_error_rate is not None and not 0.0 <= max_error_rate <= 1.0:
        raise BadRequest(f"invalid max_error_rate {max_error_rate!r}: expected a fraction "
                         "from 0 to 1 (0.01 is 1%)")
    if max_p95_ms is not None and not 0.0 < max_p95_ms <= 3_600_000.0:
        raise BadRequest(f"invalid max_p95_ms {max_p95_ms!r}: expected milliseconds above 0 "
                         "(at most an hour)")
