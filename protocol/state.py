"""Role state: what each node reports about itself in every heartbeat.

The Deployer keeps the last state in the node's registry record (``NodeInfo.state``) and
reads it to build deployment views (which bundle or mapping each node runs, which update
it refused) and to place scenario runs (which node runs a project, how busy it is).

One tagged union, ``RoleState``, tagged by ``role``: each role's state is a frozen
Struct whose tag is the role's name, so ``{"role": "automation", "bundles": {...}}`` says
what it is on the wire.  Field names are the keys nodes of the previous release sent in
their untagged object, so that object, given the tag its heartbeat's role names, is a
valid state (``upgrade``).  Every field has a default.  A state this release cannot
read (a role it does not know) becomes ``NoState``: the node is still registered.

``StatedCodec`` is the one place a message carrying role state is decoded: heartbeats
and the registry records in ``sy_registry``.
"""

from __future__ import annotations

from typing import Any, TypeVar, get_args

import msgspec

from protocol import checks
from protocol.base import NESTED_TOO_DEEPLY, Codec, tag_of
from protocol.envs import EnvState
from protocol.errors import DecodeError, InvalidMessage

T = TypeVar("T")

# Entries per collection in a state.  A node runs a handful of projects, services and
# runs; 10,000 of any is a defect or a forgery, and the registry keeps every record.
MAX_ENTRIES = 10_000
# A refusal reason may carry a user-code traceback (as generation reports do).
MAX_REASON = 65536


class _State(msgspec.Struct, frozen=True, kw_only=True, tag_field="role"):
    """Base of every role's state."""

    def validate(self) -> None:
        """Raise ``InvalidMessage`` unless every collection and reason is in bounds."""

    def belongs_to(self, role: str) -> None:
        """Raise ``InvalidMessage`` unless this is the state of ``role`` (or none)."""
        tag = tag_of(type(self))
        if tag not in (role, "none"):
            raise InvalidMessage(f"a {role} node sent the state of a {tag} node: expected "
                                 f"state tagged {role!r} (or 'none')")


class BundleFailure(msgspec.Struct, frozen=True, kw_only=True):
    """An update an Automation node refused: retrying the same bundle cannot fix it."""

    bundle: str = ""
    update: str = ""
    reason: str = ""


class BundleState(msgspec.Struct, frozen=True, kw_only=True):
    """One project on an Automation node."""

    active: str | None = None  # the bundle running now
    previous: str | None = None  # the bundle a rollback returns to
    stage: str = ""  # idle, starting, fetching, unpacking, retrying, failed
    cached: list[str] = []  # bundles unpacked on the node
    target: str = ""  # the bundle being activated (or last activated)
    update: str = ""  # the update id the node last acted on
    failed: BundleFailure | None = None
    error: str = ""  # the last transient error (retried)


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    """A run a node is executing now."""

    project: str = ""
    scenario: str = ""
    trigger: str = ""
    started_at: float = 0.0


class MappingFailure(msgspec.Struct, frozen=True, kw_only=True):
    """An update an API node refused."""

    update: str = ""
    reason: str = ""


class ServiceState(msgspec.Struct, frozen=True, kw_only=True):
    """One API service on an API node."""

    mapping: str | None = None  # the mapping served now, described
    stage: str = ""  # idle, fetching, loading, serving, retrying, failed
    target: str = ""  # the mapping being switched to, described
    update: str = ""
    generations: dict[str, int] = {}  # generation -> weight of the mapping served
    shadow: str | None = None
    failed: MappingFailure | None = None
    error: str = ""


def _envs(envs: list[EnvState]) -> None:
    _entries(envs, "code environments")
    for env in envs:
        _entries(env.used_by, "environment users")
        checks.text(env.reason, "environment build failure", limit=MAX_REASON)


def _entries(value: dict[str, Any] | list[Any], what: str) -> None:
    if len(value) > MAX_ENTRIES:
        raise InvalidMessage(f"state has {len(value)} {what}: expected at most "
                             f"{MAX_ENTRIES}")


class AutomationState(_State, frozen=True, kw_only=True, tag="automation"):
    data_dir: str = ""
    bundles: dict[str, BundleState] = {}  # per project
    runs: dict[str, RunState] = {}  # per run id
    envs: list[EnvState] = []  # code environments on this node

    def validate(self) -> None:
        _entries(self.bundles, "projects")
        _entries(self.runs, "runs")
        _envs(self.envs)
        for st in self.bundles.values():
            _entries(st.cached, "cached bundles")
            if st.failed is not None:
                checks.text(st.failed.reason, "refusal reason", limit=MAX_REASON)
            checks.text(st.error, "error", limit=MAX_REASON)


class ApiState(_State, frozen=True, kw_only=True, tag="api"):
    data_dir: str = ""
    workers: int = 0  # worker processes kept now
    min_workers: int = 0  # the bounds it scales between (0: a node that does not say)
    max_workers: int = 0
    worker_pids: list[int] = []
    worker_crashes: int = 0
    ready_workers: int | None = None  # workers taking traffic now (None: not said)
    http: str | None = None  # the URL it serves HTTP on
    http_error: str = ""  # why HTTP is not served
    services: dict[str, ServiceState] = {}  # per service
    envs: list[EnvState] = []  # code environments on this node

    def validate(self) -> None:
        _entries(self.services, "services")
        _entries(self.worker_pids, "worker pids")
        _envs(self.envs)
        for st in self.services.values():
            _entries(st.generations, "generations")
            if st.failed is not None:
                checks.text(st.failed.reason, "refusal reason", limit=MAX_REASON)
            checks.text(st.error, "error", limit=MAX_REASON)


class GatewayState(_State, frozen=True, kw_only=True, tag="gateway"):
    http: str | None = None
    services: list[str] = []  # the services it routes

    def validate(self) -> None:
        _entries(self.services, "services")


class DesignState(_State, frozen=True, kw_only=True, tag="design"):
    workspace: str = ""
    runs: dict[str, RunState] = {}  # test builds running now
    envs: list[EnvState] = []  # code environments test builds use

    def validate(self) -> None:
        _entries(self.runs, "runs")
        _envs(self.envs)


class DeployerState(_State, frozen=True, kw_only=True, tag="deployer"):
    nodes: int = 0  # nodes in its registry
    heartbeats: int = 0  # heartbeats seen since it started
    lease: str = ""  # "active" or "standby" (protocol.leases); "" from older releases


class GovernState(_State, frozen=True, kw_only=True, tag="govern"):
    lease: str = ""  # "active" or "standby" (protocol.leases); "" from older releases


class NoState(_State, frozen=True, kw_only=True, tag="none"):
    """A role without state, or a state this release cannot read (a newer role)."""


RoleState = (AutomationState | ApiState | GatewayState | DesignState | DeployerState
             | GovernState | NoState)

_KNOWN = frozenset(tag_of(m) for m in get_args(RoleState))


def upgrade(role: object, state: object) -> object:
    """``state`` as this release's tagged form, ready for decoding into ``RoleState``.

    A previous release's untagged object takes the tag its sender's ``role`` names; a
    tag (or a role) this release does not know becomes ``NoState``.  Anything else is
    returned as it is, for decoding to refuse.
    """
    if not isinstance(state, dict):
        return state
    tag = state.get("role", role)
    if not isinstance(tag, str) or tag not in _KNOWN:
        return {"role": "none"}
    return state if "role" in state else {**state, "role": tag}


class StatedCodec(Codec[T]):
    """The decoder of a message with ``role`` and ``state`` (heartbeats, registry records).

    A typed state decodes in one pass.  When that fails, the message is decoded again
    with its state passed through ``upgrade`` (a node of the previous release, or of a
    newer role), and whatever still does not fit is a ``DecodeError``.  Measured on an
    Automation node's beat of two projects and a run (~650 bytes): 2 µs typed, 6 µs for
    the previous release's form, which only nodes not yet upgraded pay.
    """

    def __init__(self, kind: type[T]) -> None:
        super().__init__(kind)
        self._kind = kind

    def decode(self, data: bytes, subject: str = "?") -> T:
        try:
            try:
                return self._decoder.decode(data)
            except msgspec.ValidationError:
                obj = msgspec.json.decode(data)
                if isinstance(obj, dict) and "state" in obj:
                    obj["state"] = upgrade(obj.get("role"), obj["state"])
                return msgspec.convert(obj, self._kind)
        except msgspec.DecodeError as exc:
            raise DecodeError(subject, bytes(data[:512]), str(exc)) from exc
        except RecursionError as exc:
            raise DecodeError(subject, bytes(data[:512]), NESTED_TOO_DEEPLY) from exc
