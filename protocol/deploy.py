"""Infrastructures and project deployments (the Project Deployer).

Desired state lives in the ``sy_deploy`` KV bucket, one key per deployment
(``bundle.<infra>.<project>``), updated only by compare-and-set.  Automation nodes watch
their infra's keys, re-read them periodically and on reconnect, and report what they
run in their heartbeats (``AutomationState.bundles``) and as ``sy.rpt.activation.<node>``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from protocol import subjects
from protocol.base import Command, Message
from protocol.errors import BadName
from protocol.events import Event

KINDS = ("automation", "api")
STAGES = ("development", "test", "production")
INFRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

# Deployment states and health values users see.
IN_SYNC, UPDATING, OUT_OF_SYNC, FAILED = "in_sync", "updating", "out_of_sync", "failed"
HEALTHY, WARNING, ERROR, UNKNOWN = "HEALTHY", "WARNING", "ERROR", "UNKNOWN"

# Results of one update.
PENDING, SUCCEEDED, SUPERSEDED = "pending", "succeeded", "superseded"


# -- KV keys ------------------------------------------------------------------------------
# sy_deploy: bundle.<infra>.<project>  (DeploymentRecord), api.<infra>.<service>
#            (ApiDeploymentRecord)
# sy_infra:  <infra>                   (Infra)

DEPLOYMENT_KINDS = ("bundle", "api")


def _deployment_kind(kind: str) -> str:
    if kind not in DEPLOYMENT_KINDS:
        raise BadName(f"invalid deployment kind {kind!r}: expected one of "
                      f"{', '.join(DEPLOYMENT_KINDS)}")
    return kind


def deployment_key(kind: str, infra: str, name: str) -> str:
    """KV key of a deployment: ``bundle.<infra>.<project>`` or ``api.<infra>.<service>``."""
    return (f"{_deployment_kind(kind)}.{subjects.token(infra, 'infra')}."
            f"{subjects.token(name, 'name')}")


def deployment_keys(kind: str, infra: str | None = None) -> str:
    """The KV filter for every deployment of ``kind``, or of ``kind`` on ``infra``."""
    kind = _deployment_kind(kind)
    return f"{kind}.>" if infra is None else f"{kind}.{subjects.token(infra, 'infra')}.>"


def infra_key(name: str) -> str:
    """KV key of an infra record in ``sy_infra``."""
    return subjects.token(name, "infra name")


class Infra(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    stage: str = "development"
    description: str = ""
    created_at: float = 0.0
    created_by: str = ""
    govern: str = "none"  # prevent | warn | none: what an unapproved artifact meets here
    webhooks: list[str] = []  # where alerts about this infra are POSTed (protocol.health)
    v: int = 1


def update_event_id(update_id: str, stage: str) -> str:
    """The event id (the stream's ``Nats-Msg-Id``) of an update's ``requested`` or
    ``finished`` event, for bundle and API deployments alike: derived from the update,
    so announcing it again (a Deployer that took over) is deduplicated by the stream."""
    if stage not in ("requested", "finished"):
        raise ValueError(f"unknown update stage {stage!r}: expected requested or finished")
    return f"{stage}-{update_id}"


class Update(msgspec.Struct, frozen=True, kw_only=True):
    """One change of a deployment's desired state, and how it ended."""

    id: str
    at: float
    by: str
    action: str  # deploy | rollback
    from_bundle: str | None
    to_bundle: str
    result: str = PENDING  # pending | succeeded | failed | superseded
    detail: str = ""
    finished_at: float | None = None
    warnings: list[str] = []  # what the infra's ``warn`` policy let through


class DeploymentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The desired state of one project on one infra (the KV value)."""

    project: str
    infra: str
    desired: str
    previous: str | None = None
    update_id: str = ""
    updated_at: float = 0.0
    updated_by: str = ""
    history: list[Update] = []
    v: int = 1


class NodeDeployment(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    status: str  # node liveness: online | lost
    running: str | None  # the bundle it actually runs
    activity: str = ""  # idle | fetching | verifying | unpacking | failed
    error: str = ""
    degraded: str = ""  # why it runs the version but cannot serve it (API: no worker)


class DeploymentView(Message, frozen=True, kw_only=True, tag="deployment"):
    project: str
    infra: str
    desired: str
    previous: str | None
    revision: int
    update_id: str
    updated_at: float
    updated_by: str
    state: str
    health: str
    reasons: list[str] = []
    nodes: list[NodeDeployment] = []
    last_update: Update | None = None
    kind: str = "bundle"
    extra: dict[str, Any] = {}


class InfraList(Message, frozen=True, kw_only=True, tag="infra.list.reply"):
    infras: list[Infra] = []


class InfraCreated(Message, frozen=True, kw_only=True, tag="infra.created"):
    infra: Infra
    created: bool


class DeploymentList(Message, frozen=True, kw_only=True, tag="deploy.list.reply"):
    deployments: list[DeploymentView] = []


class History(Message, frozen=True, kw_only=True, tag="deploy.history.reply"):
    project: str
    infra: str
    updates: list[Update] = []


class CreateInfra(Command[InfraCreated], frozen=True, kw_only=True, tag="infra.create"):
    name: str
    kind: str
    stage: str = "development"
    description: str = ""
    exist_ok: bool = False
    by: str = ""
    govern: str = "none"  # prevent | warn | none (``protocol.govern.POLICIES``)


class InfraUpdated(Message, frozen=True, kw_only=True, tag="infra.updated"):
    infra: Infra
    changed: bool


class SetInfra(Command[InfraUpdated], frozen=True, kw_only=True, tag="infra.set"):
    """Change an infrastructure's settings; a field left ``None`` is kept."""

    name: str
    govern: str | None = None
    webhooks: list[str] | None = None  # replaces the list ([] clears it)
    by: str = ""


class ListInfras(Command[InfraList], frozen=True, kw_only=True, tag="infra.list"):
    pass


class DeployBundle(Command[DeploymentView], frozen=True, kw_only=True, tag="deploy.bundle"):
    """Make ``bundle_id`` the desired bundle of ``project`` on ``infra``.

    ``expected_revision``: only apply if the deployment is still at this KV revision
    (0: it must not exist yet); otherwise the Deployer refuses with ``conflict``.
    """

    project: str
    bundle_id: str
    infra: str
    by: str = ""
    expected_revision: int | None = None


class RollbackBundle(Command[DeploymentView], frozen=True, kw_only=True,
                     tag="deploy.rollback"):
    """Go back to the previous desired bundle, or to ``to``."""

    project: str
    infra: str
    to: str | None = None
    by: str = ""


class ListDeployments(Command[DeploymentList], frozen=True, kw_only=True, tag="deploy.list"):
    project: str | None = None
    infra: str | None = None


class GetHistory(Command[History], frozen=True, kw_only=True, tag="deploy.history"):
    project: str
    infra: str


# -- reports and events ------------------------------------------------------------------

class ActivationReport(Message, frozen=True, kw_only=True, tag="activation"):
    """Progress and outcome of one node activating one bundle."""

    node: str
    infra: str
    project: str
    bundle: str
    update_id: str
    stage: str  # fetching | verifying | unpacking | building | activated | failed
    env: str = ""  # the code environment being built (stage "building")
    bytes_done: int = 0
    bytes_total: int = 0
    transferred: int = 0  # bytes fetched over NATS (0: the bundle was already on disk)
    reason: str = ""
    duration_s: float = 0.0
    ts: float = 0.0

    def subject(self) -> str:
        return subjects.report("activation", self.node)


class DeploymentRequested(Event, frozen=True, kw_only=True, tag="deploy.requested"):
    project: str
    infra: str
    update_id: str
    action: str
    from_bundle: str | None
    to_bundle: str
    by: str

    def subject(self) -> str:
        return subjects.event("deploy", self.infra, self.project)

    def summary(self) -> str:
        return (f"{self.action} {self.project} on {self.infra}: "
                f"{self.from_bundle or '-'} -> {self.to_bundle} by {self.by or '?'}")


class BundleActivated(Event, frozen=True, kw_only=True, tag="deploy.activated"):
    project: str
    infra: str
    node: str
    bundle: str
    update_id: str
    duration_s: float
    transferred: int

    def subject(self) -> str:
        return subjects.event("deploy", self.infra, self.project)

    def summary(self) -> str:
        how = f"{self.transferred} bytes fetched" if self.transferred else "already on disk"
        return (f"{self.node} activated {self.project} {self.bundle} "
                f"in {self.duration_s * 1000:.0f} ms ({how})")


class BundleActivationFailed(Event, frozen=True, kw_only=True, tag="deploy.failed"):
    project: str
    infra: str
    node: str
    bundle: str
    update_id: str
    reason: str
    still_active: str | None

    def subject(self) -> str:
        return subjects.event("deploy", self.infra, self.project)

    def summary(self) -> str:
        return (f"{self.node} refused {self.project} {self.bundle}: {self.reason} "
                f"(still running {self.still_active or 'nothing'})")


class DeploymentFinished(Event, frozen=True, kw_only=True, tag="deploy.finished"):
    project: str
    infra: str
    update_id: str
    bundle: str
    result: str
    detail: str = ""

    def subject(self) -> str:
        return subjects.event("deploy", self.infra, self.project)

    def summary(self) -> str:
        return f"{self.project} {self.bundle} on {self.infra}: {self.result}" + (
            f" ({self.detail})" if self.detail else "")


class InfraCreatedEvent(Event, frozen=True, kw_only=True, tag="infra.created"):
    name: str
    kind: str
    stage: str
    by: str

    def subject(self) -> str:
        return subjects.event("infra", self.name)

    def summary(self) -> str:
        return f"infra {self.name} created ({self.kind}, {self.stage}) by {self.by or '?'}"


class BundleStored(Event, frozen=True, kw_only=True, tag="bundle.created"):
    project: str
    bundle: str
    by: str
    files: int
    size: int
    digest: str

    def subject(self) -> str:
        return subjects.event("bundle", self.project)

    def summary(self) -> str:
        return (f"bundle {self.project} {self.bundle} created by {self.by or '?'}: "
                f"{self.files} files, {self.size} bytes, digest {self.digest[:12]}")


INFRA_VALUE = msgspec.json.Decoder(Infra)
DEPLOYMENT_VALUE = msgspec.json.Decoder(DeploymentRecord)
