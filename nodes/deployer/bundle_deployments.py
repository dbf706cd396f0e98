"""The Project Deployer: infrastructures and bundle deployments (desired state), rollback,
history, health.

Desired state is one KV record per deployment, changed only by compare-and-set: a
deploy that loses a race is refused (``conflict``), never silently overwritten.  Each
record keeps its update history.  What nodes actually run comes from their heartbeats
(via the registry), so a restarted Deployer recomputes every state from KV and the
fleet, and loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import nats.js.errors
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.deployer.health import combine, governance_verdict, runs_verdict
from nodes.deployer.host import DeskHost
from nodes.deployer.policy import GovernPolicy
from nodes.deployer.registry import Registry
from nodes.deployer.updates import UpdateCloser, announce_recent, close_last, judge
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import Entry, KVCache, read, snapshot
from nodes.runtime.loops import supervised
from nodes.runtime.node import handles
from protocol import subjects
from protocol.base import Request, encode, new_id
from protocol.bundles import BUNDLE_INFO, bundle_key, check_bundle_id
from protocol.deploy import (
    DEPLOYMENT_VALUE,
    INFRA_NAME,
    INFRA_VALUE,
    KINDS,
    PENDING,
    STAGES,
    SUPERSEDED,
    CreateInfra,
    DeployBundle,
    DeploymentFinished,
    DeploymentList,
    DeploymentRecord,
    DeploymentRequested,
    DeploymentView,
    GetHistory,
    History,
    Infra,
    InfraCreated,
    InfraCreatedEvent,
    InfraList,
    InfraUpdated,
    ListDeployments,
    ListInfras,
    NodeDeployment,
    RollbackBundle,
    SetInfra,
    Update,
    deployment_key,
    deployment_keys,
    infra_key,
    update_event_id,
)
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.govern import BUNDLE, check_policy
from protocol.health import check_webhooks
from protocol.registry import NodeInfo
from protocol.scenarios import RunSummary
from protocol.state import AutomationState, BundleState

HISTORY_LIMIT = 200
# Compare-and-set attempts when a desired-state write loses only to the Deployer's own
# record of an update's outcome (each attempt re-reads; a real conflict stops at once).
CAS_ATTEMPTS = 5


class ProjectDeployer:
    def __init__(self, host: DeskHost, registry: Registry, *,
                 api_views: Callable[[ListDeployments], list[DeploymentView]],
                 last_runs: Callable[[str, str], list[RunSummary]]) -> None:
        """``api_views``: the API deployments' views, listed beside the bundles';
        ``last_runs(infra, project)``: the last finished run of each of the project's
        scenarios, for its health."""
        self.host = host
        self.registry = registry
        self.api_views = api_views
        self.last_runs = last_runs
        self.log = host.log.bind(component="project-deployer")
        self._infra: KeyValue | None = None
        self._deploy: KeyValue | None = None
        self._bundles: KeyValue | None = None
        self._cache: KVCache[DeploymentRecord] | None = None
        self.policy = GovernPolicy(host)
        self.closer = UpdateCloser(self.view, self._finish,
                                   lambda: self.host.stopping_requested)

    # -- lifecycle -----------------------------------------------------------------------

    async def setup(self) -> None:
        js, r = self.host.js, self.host.settings.replicas
        self._infra = await ensure_kv(js, subjects.INFRA_BUCKET, replicas=r,
                                      description="shipyard infrastructures")
        self._deploy = await ensure_kv(js, subjects.DEPLOY_BUCKET, replicas=r,
                                       description="shipyard desired state")
        self._bundles = await ensure_kv(js, subjects.BUNDLE_BUCKET, replicas=r)
        await self.policy.setup()
        self._cache = KVCache(self._deploy, deployment_keys("bundle"), DEPLOYMENT_VALUE.decode,
                              on_change=self._changed)

    async def started(self, tg: TaskGroup) -> None:
        assert self._cache is not None
        await tg.start(self._cache.run)
        await self._announce_recent()
        tg.start_soon(partial(supervised, "pending updates", self.closer.run, self._cache,
                              log=self.log))

    def kick(self) -> None:
        """Something changed (a node's state, a record): re-judge pending updates."""
        self.closer.kick()

    async def _changed(self, key: str, entry: Entry[DeploymentRecord] | None) -> None:
        self.kick()

    def records(self) -> list[Entry[DeploymentRecord]]:
        """Every deployment record this desk holds (none before setup)."""
        return list(self._cache.entries.values()) if self._cache is not None else []

    @property
    def infra_kv(self) -> KeyValue:
        assert self._infra is not None
        return self._infra

    @property
    def deploy_kv(self) -> KeyValue:
        assert self._deploy is not None
        return self._deploy

    # -- infrastructures -----------------------------------------------------------------

    async def get_infra(self, name: str) -> Infra | None:
        try:
            entry = await self.infra_kv.get(infra_key(name))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return None
        return INFRA_VALUE.decode(entry.value) if entry.value else None

    async def require_infra(self, name: str, kind: str) -> Infra:
        infra = await self.get_infra(name)
        if infra is None:
            known = [i.name for i in await self._infras() if i.kind == kind]
            raise NotFound(f"unknown infra {name!r}"
                           + (f"; {kind} infras: {', '.join(known)}" if known else
                              f"; create it with: shipyard infra create {name} --kind {kind}"))
        if infra.kind != kind:
            raise BadRequest(f"infra {name!r} is an {infra.kind} infra; expected a {kind} infra")
        return infra

    async def _infras(self) -> list[Infra]:
        # A snapshot, not kv.keys(): nats-py's keys() can end before the replay does.
        keys = sorted(await snapshot(self.infra_kv, ">"))
        out = [i for k in keys if (i := await self.get_infra(k)) is not None]
        return sorted(out, key=lambda i: i.name)

    @handles(CreateInfra)
    async def create_infra(self, cmd: CreateInfra, req: Request[Any]) -> InfraCreated:
        if not INFRA_NAME.match(cmd.name):
            raise BadRequest(f"invalid infra name {cmd.name!r}: expected 1-64 letters, digits, "
                             "'_' or '-'")
        if cmd.kind not in KINDS:
            raise BadRequest(f"invalid kind {cmd.kind!r}: expected one of {', '.join(KINDS)}")
        if cmd.stage not in STAGES:
            raise BadRequest(f"invalid stage {cmd.stage!r}: expected one of {', '.join(STAGES)}")
        check_policy(cmd.govern)
        infra = Infra(name=cmd.name, kind=cmd.kind, stage=cmd.stage,
                      description=cmd.description, created_at=time.time(),
                      created_by=cmd.by or req.sender, govern=cmd.govern)
        try:
            await self.infra_kv.create(infra_key(cmd.name), encode(infra))
        except nats.js.errors.KeyWrongLastSequenceError:
            existing = await self.get_infra(cmd.name)
            if existing is not None and cmd.exist_ok and existing.kind == cmd.kind:
                return InfraCreated(infra=existing, created=False)
            what = f" ({existing.kind}, {existing.stage})" if existing else ""
            raise Conflict(f"infra {cmd.name!r} already exists{what}") from None
        await self.host.emit(InfraCreatedEvent(name=infra.name, kind=infra.kind,
                                               stage=infra.stage, by=infra.created_by))
        return InfraCreated(infra=infra, created=True)

    @handles(SetInfra)
    async def set_infra(self, cmd: SetInfra, req: Request[Any]) -> InfraUpdated:
        """Change an infra's settings by compare-and-set (a lost race is retried on
        what is stored now, so a repeated command is harmless)."""
        if cmd.govern is not None:
            check_policy(cmd.govern)
        webhooks = None if cmd.webhooks is None else check_webhooks(cmd.webhooks)
        for _ in range(8):
            try:
                entry = await self.infra_kv.get(infra_key(cmd.name))
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
                entry = None
            if entry is None or not entry.value:
                raise NotFound(f"unknown infra {cmd.name!r} (see: shipyard infra list)")
            infra = INFRA_VALUE.decode(entry.value)
            new = infra if cmd.govern is None else msgspec.structs.replace(
                infra, govern=cmd.govern)
            if webhooks is not None:
                new = msgspec.structs.replace(new, webhooks=webhooks)
            if new == infra:
                return InfraUpdated(infra=infra, changed=False)
            try:
                await self.infra_kv.update(infra_key(cmd.name), encode(new),
                                           last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self.log.info("infra changed", infra=cmd.name, govern=new.govern,
                          webhooks=len(new.webhooks), by=cmd.by or req.sender)
            return InfraUpdated(infra=new, changed=True)
        raise Conflict(f"infra {cmd.name!r} kept changing while this command was applied: "
                       "retry")

    @handles(ListInfras)
    async def list_infras(self, cmd: ListInfras, req: Request[Any]) -> InfraList:
        return InfraList(infras=await self._infras())

    # -- deployments ---------------------------------------------------------------------

    async def _require_bundle(self, project: str, bundle: str) -> None:
        assert self._bundles is not None
        try:
            subjects.token(project, "project")
            check_bundle_id(bundle)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        try:
            entry = await self._bundles.get(bundle_key(project, bundle))
            if entry.value:
                BUNDLE_INFO.decode(entry.value)
                return
        except nats.js.errors.KeyNotFoundError:
            pass
        raise NotFound(f"bundle {bundle!r} of project {project!r} not found "
                       f"(see: shipyard bundle list {project})")

    async def _read(self, key: str) -> tuple[DeploymentRecord | None, int]:
        return await read(self.deploy_kv, key, DEPLOYMENT_VALUE.decode)

    async def _write(self, key: str, record: DeploymentRecord, revision: int) -> int:
        """Compare-and-set: write only if the record is still at ``revision``."""
        data = encode(record)
        if revision == 0:
            written = int(await self.deploy_kv.create(key, data))
        else:
            written = int(await self.deploy_kv.update(key, data, last=revision))
        if self._cache is not None:
            await self._cache.written(key, written, data)
        return written

    async def _change_desired(self, *, project: str, infra: str, target: str, action: str,
                              by: str, expected_revision: int | None,
                              warnings: list[str], based_on: str | None = None,
                              ) -> DeploymentView:
        """Compare-and-set the desired bundle.  ``expected_revision`` is the caller's
        (strict: any change since is a conflict); ``based_on`` is the update a rollback
        derived its target from.  A write that lost only to this Deployer recording the
        outcome of the same update (``_finish``) is retried on the new revision: that is
        bookkeeping, not a concurrent change of what is wanted."""
        key = deployment_key("bundle", infra, project)
        for _ in range(CAS_ATTEMPTS):
            current, revision = await self._read(key)
            if expected_revision is not None and expected_revision != revision:
                raise Conflict(f"deployment of {project} on {infra} is at revision "
                               f"{revision}, not {expected_revision}: it changed since you "
                               "looked")
            if based_on is not None and (current is None or current.update_id != based_on):
                raise Conflict(f"deployment of {project} on {infra} changed while this "
                               f"{action} was prepared; it was not applied: retry")
            now = time.time()
            update = Update(id=new_id(), at=now, by=by, action=action,
                            from_bundle=current.desired if current else None,
                            to_bundle=target, warnings=warnings)
            history = list(current.history) if current else []
            if history and history[-1].result == PENDING:
                history[-1] = msgspec.structs.replace(
                    history[-1], result=SUPERSEDED, finished_at=now,
                    detail=f"superseded by {action} to {target}")
            history = [*history, update][-HISTORY_LIMIT:]
            previous = current.desired if current and current.desired != target else (
                current.previous if current else None)
            record = DeploymentRecord(project=project, infra=infra, desired=target,
                                      previous=previous, update_id=update.id,
                                      updated_at=now, updated_by=by, history=history)
            try:
                new_revision = await self._write(key, record, revision)
                break
            except nats.js.errors.KeyWrongLastSequenceError:
                latest, _ = await self._read(key)
                if (expected_revision is None and current is not None and latest is not None
                        and latest.update_id == current.update_id):
                    continue  # only the outcome of the same update was recorded meanwhile
                now_desired = latest.desired if latest else "nothing"
                raise Conflict(
                    f"deployment of {project} on {infra} was changed concurrently (it now "
                    f"wants {now_desired}); this {action} was not applied: check "
                    "'shipyard deployments' and retry") from None
        else:
            raise Conflict(f"deployment of {project} on {infra} kept changing during this "
                           f"{action}; it was not applied: retry")
        self.log.info("desired state changed", project=project, infra=infra, action=action,
                      to=target, revision=new_revision)
        await self.host.emit(_requested(record, update))
        self.kick()
        return self.view(record, new_revision)

    @handles(DeployBundle)
    async def deploy(self, cmd: DeployBundle, req: Request[Any]) -> DeploymentView:
        infra = await self.require_infra(cmd.infra, "automation")
        await self._require_bundle(cmd.project, cmd.bundle_id)
        warnings = await self.policy.check(infra, [(BUNDLE, cmd.project, cmd.bundle_id)])
        return await self._change_desired(project=cmd.project, infra=cmd.infra,
                                          target=cmd.bundle_id, action="deploy",
                                          by=cmd.by or req.sender,
                                          expected_revision=cmd.expected_revision,
                                          warnings=warnings)

    @handles(RollbackBundle)
    async def rollback(self, cmd: RollbackBundle, req: Request[Any]) -> DeploymentView:
        infra = await self.require_infra(cmd.infra, "automation")
        current, _ = await self._read(deployment_key("bundle", cmd.infra, cmd.project))
        if current is None:
            raise NotFound(f"project {cmd.project!r} is not deployed on {cmd.infra!r}")
        target = cmd.to or current.previous
        if target is None:
            raise BadRequest(f"{cmd.project} on {cmd.infra} has no previous bundle to roll "
                             "back to (use --to BUNDLE_ID)")
        await self._require_bundle(cmd.project, target)
        warnings = await self.policy.check(infra, [(BUNDLE, cmd.project, target)])
        return await self._change_desired(project=cmd.project, infra=cmd.infra, target=target,
                                          action="rollback", by=cmd.by or req.sender,
                                          expected_revision=None, warnings=warnings,
                                          based_on=current.update_id)

    def views(self, cmd: ListDeployments) -> list[DeploymentView]:
        """Bundle deployments (``project`` and ``infra`` filter)."""
        if self._cache is None:
            return []
        return [self.view(e.value, e.revision) for e in self._cache.entries.values()
                if (cmd.project is None or e.value.project == cmd.project)
                and (cmd.infra is None or e.value.infra == cmd.infra)]

    @handles(ListDeployments)
    async def list_deployments(self, cmd: ListDeployments, req: Request[Any]) -> DeploymentList:
        views = self.views(cmd) + self.api_views(cmd)  # API deployments (kind "api")
        return DeploymentList(deployments=sorted(views, key=lambda v: (v.project, v.infra)))

    @handles(GetHistory)
    async def history(self, cmd: GetHistory, req: Request[Any]) -> History:
        try:
            key = deployment_key("bundle", cmd.infra, cmd.project)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        record, _ = await self._read(key)
        if record is None:
            if await self.get_infra(cmd.infra) is None:
                raise NotFound(f"unknown infra {cmd.infra!r}")
            raise NotFound(f"project {cmd.project!r} has never been deployed on {cmd.infra!r}")
        return History(project=cmd.project, infra=cmd.infra, updates=record.history)

    # -- state and health ----------------------------------------------------------------

    def view(self, rec: DeploymentRecord, revision: int) -> DeploymentView:
        nodes = self.registry.query(role="automation", infra=rec.infra)
        per_node = [_node_deployment(n, rec) for n in nodes]
        state, health, reasons = judge(
            want=rec.desired, infra=rec.infra, role="automation",
            verbs=("runs", "running", "ran"),
            pending=bool(rec.history) and rec.history[-1].result == PENDING,
            per_node=per_node)
        health, reasons = combine(
            (health, reasons), runs_verdict(self.last_runs(rec.infra, rec.project)),
            governance_verdict(rec.history[-1] if rec.history else None))
        return DeploymentView(
            project=rec.project, infra=rec.infra, desired=rec.desired, previous=rec.previous,
            revision=revision, update_id=rec.update_id, updated_at=rec.updated_at,
            updated_by=rec.updated_by, state=state, health=health, reasons=reasons,
            nodes=per_node, last_update=rec.history[-1] if rec.history else None)

    async def _finish(self, entry: Entry[DeploymentRecord], result: str, detail: str) -> None:
        rec = entry.value
        new, last = close_last(rec, result, detail)
        key = deployment_key("bundle", rec.infra, rec.project)
        try:
            await self._write(key, new, entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # changed meanwhile (a new deploy): the cache will bring it back
        self.log.info("update finished", project=rec.project, infra=rec.infra,
                      bundle=rec.desired, result=result)
        await self.host.emit(_finished(new, last))

    async def _announce_recent(self) -> None:
        """Announce again the recent updates' events (``updates.recent_updates``)."""
        assert self._cache is not None
        await announce_recent((e.value for e in self._cache.entries.values()),
                              self.host.emit, _requested, _finished)


def _requested(rec: DeploymentRecord, update: Update) -> DeploymentRequested:
    return DeploymentRequested(id=update_event_id(update.id, "requested"), ts=update.at,
                               project=rec.project, infra=rec.infra, update_id=update.id,
                               action=update.action, from_bundle=update.from_bundle,
                               to_bundle=update.to_bundle, by=update.by)


def _finished(rec: DeploymentRecord, update: Update) -> DeploymentFinished:
    return DeploymentFinished(id=update_event_id(update.id, "finished"),
                              ts=update.finished_at or update.at, project=rec.project,
                              infra=rec.infra, update_id=update.id, bundle=update.to_bundle,
                              result=update.result, detail=update.detail)


def _node_deployment(n: NodeInfo, rec: DeploymentRecord) -> NodeDeployment:
    st = (n.state.bundles.get(rec.project) if isinstance(n.state, AutomationState) else None) \
        or BundleState()
    failed = st.failed
    error = ""
    if failed is not None and failed.bundle == rec.desired and failed.update == rec.update_id:
        error = failed.reason or "activation failed"
    return NodeDeployment(node=n.name, status=n.status, running=st.active, activity=st.stage,
                          error=error)
