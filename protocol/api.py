"""API services: packages, deployments, keys, metrics, and the request wire format.

A *package* is an immutable version ("generation") of one API service, made by the
Design node: the endpoints' code, their artifacts and a digest over every file.  Its
``ApiPackageInfo`` is in the ``sy_api_packages`` KV bucket (key ``<service>.<version>``),
the archive (the bundle tar layout) in the ``sy_api_package_data`` object store.

A *deployment* is one KV record per service and infra in ``sy_deploy``
(``api.<infra>.<service>``): the generations and their weights, an optional shadow
generation, the auth mode, the endpoints, and the previous mapping (rollback).  API nodes
converge on it; the Deployer changes it only by compare-and-set.

Requests travel on ``sy.api.v1.<service>.<endpoint>`` (queue group ``<service>``):

* prediction endpoints take ``{"features": {...}, "dispatch_key"?, "generation"?}`` and
  reply ``{"result": {...}, "generation": "v2"}``; with the header ``Sy-Op: multi`` they
  take ``{"items": [{"features": ...}, ...]}`` and reply ``{"results": [...], ...}``;
* function endpoints take any JSON and reply ``{"response": ..., "generation": ...}``;
  ``Sy-Dispatch-Key`` and ``Sy-Generation`` headers pick the generation.

Errors follow the nats.micro convention: headers ``Nats-Service-Error-Code`` (the HTTP
status) and ``Nats-Service-Error`` (the message), body ``{"error": {"code", "message"}}``,
so a gateway maps a reply to an HTTP response without decoding it.
"""

from __future__ import annotations

import re
import zlib

import msgspec

from protocol import checks, subjects
from protocol.base import Codec, Command, Message, encode
from protocol.bundles import FileEntry
from protocol.capture import CaptureSettings
from protocol.deploy import DeploymentView, Update
from protocol.envs import EnvLock, EnvSummary
from protocol.errors import BadName, InvalidMessage
from protocol.events import Event

AUTH_MODES = ("public", "api-key")
ENDPOINT_KINDS = ("prediction", "function")

# Request headers (NATS).
OP_HEADER = "Sy-Op"  # "multi" for predict-multi
GENERATION_HEADER = "Sy-Generation"  # force a generation (testing)
DISPATCH_HEADER = "Sy-Dispatch-Key"  # sticky dispatch for function endpoints
OP_MULTI = "multi"

# Reply headers (the nats.micro error convention).
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"

# Error code -> HTTP status: the one table every HTTP answer and every worker error reply
# takes its status from (README's error table is checked against it by a test).
HTTP_STATUS = {
    "bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
    "method_not_allowed": 405, "client_timeout": 408, "too_large": 413,
    "headers_too_large": 431, "user_code": 500, "bad_result": 500, "internal": 500,
    "unavailable": 503, "overloaded": 503, "timeout": 504,
}

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_SPLIT = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+)\s*$")


def check_version(value: str) -> str:
    if not _VERSION.match(value):
        raise BadName(f"invalid version {value!r}: expected 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return value


def parse_split(text: str) -> dict[str, int]:
    """``"v1=90,v2=10"`` -> ``{"v1": 90, "v2": 10}``.  Raises ``ValueError``."""
    out: dict[str, int] = {}
    for part in text.split(","):
        m = _SPLIT.match(part)
        if not m:
            raise ValueError(f"invalid split {text!r}: expected VERSION=WEIGHT[,...], "
                             "e.g. v1=90,v2=10")
        version, weight = check_version(m.group(1)), int(m.group(2))
        if version in out:
            raise ValueError(f"version {version} appears twice in split {text!r}")
        out[version] = weight
    if not any(out.values()):
        raise ValueError(f"split {text!r} gives no traffic to any version")
    return out


def describe_mapping(generations: dict[str, int], shadow: str | None = None) -> str:
    """A mapping as people read it: ``v2``, ``v1=90,v2=10``, ``v1=100,v2=0``, ``v2
    (+shadow v3)``.  Every generation is named, weight 0 too: nodes and the Deployer
    compare these texts, and a version loaded without traffic must change them."""
    live = {g: w for g, w in generations.items() if w > 0}
    text = next(iter(live)) if len(live) == 1 == len(generations) else ",".join(
        f"{g}={w}" for g, w in sorted(generations.items()))
    return text + (f" (+shadow {shadow})" if shadow else "")


def pick_generation(weights: list[tuple[str, int]], key: str | None, rand: float) -> str:
    """The generation for one request: by ``key`` when given (sticky: the same key and
    weights give the same generation on every node), else by ``rand`` in [0, 1).

    ``weights`` is sorted by generation name, every weight > 0."""
    total = sum(w for _, w in weights)
    point = (zlib.crc32(key.encode()) % total) if key is not None else int(rand * total)
    for generation, weight in weights:
        if point < weight:
            return generation
        point -= weight
    return weights[-1][0]


def http_status(code: str) -> int:
    """The HTTP status of an error code (500 for a code this table does not know)."""
    return HTTP_STATUS.get(code, 500)


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """``{"error": {"code", "message"}}``: the body of every error an API answers, over
    HTTP and in worker replies (beside the nats.micro error headers)."""

    error: ErrorDetail


def error_body(code: str, message: str) -> bytes:
    """The JSON error body for ``code`` (a key of ``HTTP_STATUS``) and a human message."""
    return encode(ErrorBody(error=ErrorDetail(code=code, message=message)))


def error_reply(code: str, message: str) -> tuple[int, bytes]:
    """``(HTTP status, JSON error body)`` for ``code``, the status from ``HTTP_STATUS``."""
    return http_status(code), error_body(code, message)


def micro_error(code: str, message: str) -> tuple[bytes, dict[str, str]]:
    """An error answered over NATS by an API worker (or its node): the JSON error body
    and the nats.micro error headers, which carry the HTTP status so a gateway passes
    the reply through without decoding it."""
    return error_body(code, message), {ERROR_CODE_HEADER: str(http_status(code)),
                                       ERROR_HEADER: message.split("\n")[0][:200]}


# -- notices on "<reply>.working" (``subjects.api_working``) -----------------------------
# They hold back a requester's hedged copy: a request that someone is running, or that
# waits in a live worker's queue, is not sent again.  An empty body: a worker runs the
# request now (its API node says so while it runs).  A body of decimal seconds: the
# request is queued (in a worker, or at its node while workers start) and should start
# within that long; it is said again while the request waits.

MAX_NOTICE_WAIT_S = 300.0  # a longer promised wait is read as this


def queued_notice(wait_s: float) -> bytes:
    """The body of a "queued" notice: start expected within ``wait_s`` seconds."""
    return f"{min(max(0.0, wait_s), MAX_NOTICE_WAIT_S):.3f}".encode()


def notice_wait(body: bytes) -> float:
    """Seconds before the request starts, as a notice says: 0 for "running now" (an
    empty body) and for a body this version does not understand."""
    if not body:
        return 0.0
    try:
        wait = float(body)
    except ValueError:
        return 0.0
    return min(wait, MAX_NOTICE_WAIT_S) if wait > 0 else 0.0  # NaN compares False


# -- packages ----------------------------------------------------------------------------

class EndpointSpec(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    code: str  # module path inside the package
    function: str  # the callable's name: "predict" for predictions
    artifacts: list[str] = []
    description: str = ""


class ApiPackageInfo(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    version: str
    project: str
    created_at: float
    created_by: str
    notes: str = ""
    description: str = ""
    endpoints: dict[str, EndpointSpec] = {}
    files: list[FileEntry] = []
    digest: str = ""
    size: int = 0
    archive: str = ""
    archive_size: int = 0
    archive_sha256: str = ""
    archive_blake3: str = ""  # empty in records made before it was kept
    env: EnvLock | None = None  # the code environment its endpoints run in (None: builtin)
    # The Design node's signature over the record's digests (protocol.artifacts), base64,
    # and the name of the identity that signed; empty on a stack without identities.
    signature: str = ""
    signed_by: str = ""
    v: int = 1


class ApiPackageSummary(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    version: str
    project: str
    created_at: float
    created_by: str
    notes: str
    endpoints: dict[str, str]  # name -> kind
    files: int
    size: int
    digest: str
    env: EnvSummary | None = None

    @classmethod
    def of(cls, p: ApiPackageInfo) -> ApiPackageSummary:
        return cls(service=p.service, version=p.version, project=p.project,
                   created_at=p.created_at, created_by=p.created_by, notes=p.notes,
                   endpoints={n: e.kind for n, e in p.endpoints.items()},
                   files=len(p.files), size=p.size, digest=p.digest,
                   env=EnvSummary.of(p.env) if p.env is not None else None)


def package_key(service: str, version: str) -> str:
    """KV key of an API package record in ``sy_api_packages``."""
    return f"{subjects.token(service, 'service')}.{check_version(version)}"


def package_keys(service: str) -> str:
    """The KV filter for every package record of ``service``."""
    return f"{subjects.token(service, 'service')}.>"


class ApiPackageCreated(Message, frozen=True, kw_only=True, tag="api.package.created"):
    package: ApiPackageSummary
    previous: str | None = None
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    packages: list[str] = []  # changed locked packages (``protocol.envs.diff_envs``)


class ApiPackageList(Message, frozen=True, kw_only=True, tag="api.package.list.reply"):
    service: str
    packages: list[ApiPackageSummary] = []


class CreateApiPackage(Command[ApiPackageCreated], frozen=True, kw_only=True,
                       tag="api.package.create"):
    """Package ``service`` of workspace project ``project`` as ``version`` (immutable)."""

    project: str
    service: str
    version: str
    notes: str = ""
    created_by: str = ""
    wheels: bool = False  # also store every locked wheel in sy_wheels


class ListApiPackages(Command[ApiPackageList], frozen=True, kw_only=True,
                      tag="api.package.list"):
    service: str


# -- deployments -------------------------------------------------------------------------

class ApiMapping(msgspec.Struct, frozen=True, kw_only=True):
    """Which generations serve a service, with what weight, and the shadow."""

    generations: dict[str, int]
    shadow: str | None = None
    auth: str = "public"

    def describe(self) -> str:
        return describe_mapping(self.generations, self.shadow)


# An API deployment is WARNING above these (``deploy api --max-error-rate/--max-p95-ms``).
DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_MAX_P95_MS = 1000.0


class ApiDeploymentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The desired state of one service on one API infra (the KV value)."""

    service: str
    infra: str
    mapping: ApiMapping
    endpoints: dict[str, str] = {}  # name -> kind, over the mapping's generations
    description: str = ""
    previous: ApiMapping | None = None
    update_id: str = ""
    updated_at: float = 0.0
    updated_by: str = ""
    history: list[Update] = []
    capture: CaptureSettings | None = None  # prediction capture (None: off)
    # Health thresholds over the last minute of traffic (nodes.deployer.health).
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    max_p95_ms: float = DEFAULT_MAX_P95_MS
    v: int = 1


class DeployApi(Command[DeploymentView], frozen=True, kw_only=True, tag="api.deploy"):
    """Serve ``service`` on ``infra`` with ``generations`` (version -> weight).

    ``auth`` None keeps the current mode (``public`` for a new deployment).
    ``expected_revision``: refuse with ``conflict`` unless the record is at it.
    ``capture`` (the fraction of requests captured, 0 off) and ``redact`` (fields removed
    from what is captured): None keeps the current setting (off for a new deployment)."""

    service: str
    infra: str
    generations: dict[str, int]
    shadow: str | None = None
    auth: str | None = None
    by: str = ""
    expected_revision: int | None = None
    capture: float | None = None
    redact: list[str] | None = None
    # Health thresholds; None keeps the current ones (the defaults for a new deployment).
    max_error_rate: float | None = None
    max_p95_ms: float | None = None


class RollbackApi(Command[DeploymentView], frozen=True, kw_only=True, tag="api.rollback"):
    """Go back to the previous mapping of ``service`` on ``infra``."""

    service: str
    infra: str
    by: str = ""


# -- keys --------------------------------------------------------------------------------

KEY_PREFIX = "sy"


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One API key of a service: only the SHA-256 of its secret is stored."""

    service: str
    id: str
    sha256: str
    created_at: float
    created_by: str = ""
    name: str = ""
    v: int = 1


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    id: str
    name: str
    created_at: float
    created_by: str


class ApiKeyCreated(Message, frozen=True, kw_only=True, tag="api.key.created"):
    key: ApiKeyInfo
    secret: str  # the whole key, shown once: "sy_<id>_<secret>"


class ApiKeyList(Message, frozen=True, kw_only=True, tag="api.key.list.reply"):
    service: str
    keys: list[ApiKeyInfo] = []


class ApiKeyRevoked(Message, frozen=True, kw_only=True, tag="api.key.revoked"):
    service: str
    id: str


class CreateApiKey(Command[ApiKeyCreated], frozen=True, kw_only=True, tag="api.key.create"):
    service: str
    name: str = ""
    by: str = ""


class ListApiKeys(Command[ApiKeyList], frozen=True, kw_only=True, tag="api.key.list"):
    service: str


class RevokeApiKey(Command[ApiKeyRevoked], frozen=True, kw_only=True, tag="api.key.revoke"):
    service: str
    id: str
    by: str = ""


def key_record_key(service: str, key_id: str) -> str:
    """KV key of an API key record in ``sy_api_keys``."""
    return f"{subjects.token(service, 'service')}.{subjects.token(key_id, 'key id')}"


def key_record_keys(service: str | None = None) -> str:
    """The KV filter for every API key record, or every one of ``service``."""
    return ">" if service is None else f"{subjects.token(service, 'service')}.>"


# -- reports, metrics, events ----------------------------------------------------------

class EndpointMetrics(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Counters of one (service, endpoint, generation) on one node since it started.

    ``buckets`` counts latencies up to each bound of ``LATENCY_BUCKETS_S`` (not
    cumulative; the last slot is everything above)."""

    service: str
    endpoint: str
    generation: str
    shadow: bool
    requests: int
    errors: int
    inflight: int
    latency_sum_s: float
    buckets: list[int]

    def validate(self) -> None:
        checks.name(self.service, "service")
        checks.name(self.endpoint, "endpoint")
        if self.generation != ANY_GENERATION:
            try:
                check_version(self.generation)
            except BadName as exc:
                raise InvalidMessage(str(exc)) from None
        checks.count(self.requests, "requests")
        checks.count(self.errors, "errors", limit=self.requests)
        checks.count(self.inflight, "inflight", limit=MAX_INFLIGHT)
        checks.number(self.latency_sum_s, "latency_sum_s", 0.0, 1e15)
        if len(self.buckets) > len(LATENCY_BUCKETS_S) + 1:
            raise InvalidMessage(f"{len(self.buckets)} latency buckets: expected at most "
                                 f"{len(LATENCY_BUCKETS_S) + 1}")
        for n in self.buckets:
            checks.count(n, "latency bucket", limit=self.requests)


ANY_GENERATION = "*"  # in-flight requests not yet given a generation
MAX_INFLIGHT = 10**7
MAX_METRICS_ROWS = 10_000  # (service, endpoint, generation) rows in one report
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)


class ApiMetricsReport(Message, frozen=True, kw_only=True, tag="api.metrics"):
    """Sent by every API node every few seconds on ``sy.rpt.metrics.<node>``."""

    node: str
    infra: str
    ts: float
    interval_s: float
    endpoints: list[EndpointMetrics] = []
    overloaded: int = 0
    workers: int = 0
    workers_busy: int = 0

    def subject(self) -> str:
        return subjects.report("metrics", self.node)

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless every name and counter is in bounds (a report
        claiming 10**15 requests never reaches the health rollup) and the node is the one
        ``subject`` names."""
        checks.name(self.node, "node name")
        checks.name(self.infra, "infra name")
        checks.finite(self.ts, "ts")
        checks.number(self.interval_s, "interval_s", 0.0, 86400.0)
        for what, n in (("overloaded", self.overloaded), ("workers", self.workers),
                        ("workers_busy", self.workers_busy)):
            checks.count(n, what)
        if len(self.endpoints) > MAX_METRICS_ROWS:
            raise InvalidMessage(f"{len(self.endpoints)} endpoint rows: expected at most "
                                 f"{MAX_METRICS_ROWS}")
        for row in self.endpoints:
            row.validate()
        checks.same_subject(subject, self.subject(), "metrics report")


class GenerationReport(Message, frozen=True, kw_only=True, tag="api.generation"):
    """Progress and outcome of one node switching one service to a mapping."""

    node: str
    infra: str
    service: str
    update_id: str
    stage: str  # fetching | building | loading | serving | failed
    generations: list[str] = []
    env: str = ""  # the code environment being built (stage "building")
    reason: str = ""
    duration_s: float = 0.0
    ts: float = 0.0

    def subject(self) -> str:
        return subjects.report("apigen", self.node)

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless names are in bounds and the node is the one
        ``subject`` names."""
        checks.name(self.node, "node name")
        checks.name(self.infra, "infra name")
        checks.name(self.service, "service")
        checks.text(self.update_id, "update_id", limit=128)
        checks.text(self.stage, "stage", limit=64)
        checks.text(self.reason, "reason", limit=65536)  # may carry a user-code traceback
        for g in self.generations:
            checks.label(g, "generation")
        checks.finite(self.duration_s, "duration_s")
        checks.finite(self.ts, "ts")
        checks.same_subject(subject, self.subject(), "generation report")


class ApiPackageStored(Event, frozen=True, kw_only=True, tag="api.package.stored"):
    service: str
    version: str
    project: str
    by: str
    files: int
    size: int
    digest: str

    def subject(self) -> str:
        return subjects.event("apipkg", self.service)

    def summary(self) -> str:
        return (f"API package {self.service} {self.version} created from {self.project} by "
                f"{self.by or '?'}: {self.files} files, {self.size} bytes")


class ApiDeploymentRequested(Event, frozen=True, kw_only=True, tag="api.deploy.requested"):
    service: str
    infra: str
    update_id: str
    action: str
    from_mapping: str | None
    to_mapping: str
    by: str

    def subject(self) -> str:
        return subjects.event("api", self.infra, self.service)

    def summary(self) -> str:
        return (f"{self.action} API {self.service} on {self.infra}: "
                f"{self.from_mapping or '-'} -> {self.to_mapping} by {self.by or '?'}")


class GenerationsServing(Event, frozen=True, kw_only=True, tag="api.generation.serving"):
    service: str
    infra: str
    node: str
    update_id: str
    mapping: str
    duration_s: float

    def subject(self) -> str:
        return subjects.event("api", self.infra, self.service)

    def summary(self) -> str:
        return (f"{self.node} serves {self.service} {self.mapping} "
                f"(switched in {self.duration_s * 1000:.0f} ms)")


class GenerationFailed(Event, frozen=True, kw_only=True, tag="api.generation.failed"):
    service: str
    infra: str
    node: str
    update_id: str
    mapping: str
    reason: str
    still_serving: str | None

    def subject(self) -> str:
        return subjects.event("api", self.infra, self.service)

    def summary(self) -> str:
        return (f"{self.node} refused {self.service} {self.mapping}: {self.reason} "
                f"(still serving {self.still_serving or 'nothing'})")


class ApiDeploymentFinished(Event, frozen=True, kw_only=True, tag="api.deploy.finished"):
    service: str
    infra: str
    update_id: str
    mapping: str
    result: str
    detail: str = ""

    def subject(self) -> str:
        return subjects.event("api", self.infra, self.service)

    def summary(self) -> str:
        return f"API {self.service} {self.mapping} on {self.infra}: {self.result}" + (
            f" ({self.detail})" if self.detail else "")


class ApiKeyIssued(Event, frozen=True, kw_only=True, tag="api.key.issued"):
    service: str
    id: str
    by: str
    revoked: bool = False

    def subject(self) -> str:
        return subjects.event("apikey", self.service)

    def summary(self) -> str:
        verb = "revoked" if self.revoked else "created"
        return f"API key {self.id} of {self.service} {verb} by {self.by or '?'}"


API_PACKAGE_INFO = msgspec.json.Decoder(ApiPackageInfo)
API_DEPLOYMENT_VALUE = msgspec.json.Decoder(ApiDeploymentRecord)
API_KEY_VALUE = msgspec.json.Decoder(ApiKeyRecord)
METRICS_REPORT = Codec[ApiMetricsReport](ApiMetricsReport)
GENERATION_REPORT = Codec[GenerationReport](GenerationReport)
