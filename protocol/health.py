"""Health verdicts and alerts: the rollup the Deployer answers, and what its webhooks get.

One health value per deployment, per infrastructure and for the whole fleet, each with
the reasons that made it.  Values order from best to worst ``HEALTHY < UNKNOWN <
WARNING < ERROR`` (``worst``): a fleet with one unknown deployment is not healthy, but an
unknown is no warning.  ``HEALTH_VALUE`` is the number Prometheus exporters publish
(-1 unknown, 0 healthy, 1 warning, 2 error).

An alert (``Alert``) is the JSON body the Deployer POSTs to each webhook of an infra.
Its ``id`` is also sent in the ``Idempotency-Key`` header (``IDEMPOTENCY_HEADER``) and
stays the same across retries, so a receiver that saw it already can drop the copy.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec

from protocol.base import Command, Message, new_id
from protocol.deploy import ERROR, HEALTHY, UNKNOWN, WARNING
from protocol.errors import BadRequest

HEALTH_RANK = {HEALTHY: 0, UNKNOWN: 1, WARNING: 2, ERROR: 3}
HEALTH_VALUE = {UNKNOWN: -1, HEALTHY: 0, WARNING: 1, ERROR: 2}


def worst(*values: str) -> str:
    """The worst of ``values`` (``HEALTHY`` when there are none)."""
    return max(values, key=lambda v: HEALTH_RANK.get(v, HEALTH_RANK[UNKNOWN]),
               default=HEALTHY)


# -- the rollup ------------------------------------------------------------------------

class NodeHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One node of an infra: ``online`` is HEALTHY, ``lost`` is ERROR."""

    name: str
    role: str
    status: str
    health: str
    last_seen_s: float = 0.0
    reasons: list[str] = []


class DeploymentHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One deployment: ``kind`` ``bundle`` (``name`` is the project) or ``api`` (the
    service); ``state`` is the deployment state (in_sync, updating, ...)."""

    kind: str
    name: str
    infra: str
    desired: str
    state: str
    health: str
    reasons: list[str] = []


class InfraHealth(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    stage: str
    health: str
    reasons: list[str] = []
    nodes: list[NodeHealth] = []
    deployments: list[DeploymentHealth] = []


class HealthReport(Message, frozen=True, kw_only=True, tag="health.report"):
    """The whole rollup: ``health`` is the worst of every listed infra's."""

    health: str
    ts: float
    infras: list[InfraHealth] = []

    def deployments(self) -> list[DeploymentHealth]:
        return [d for i in self.infras for d in i.deployments]


class GetHealth(Command[HealthReport], frozen=True, kw_only=True, tag="health.get"):
    """The health rollup of every infra, or of ``infra`` only (``not_found`` if unknown)."""

    infra: str | None = None


# -- alerts ----------------------------------------------------------------------------

HEALTH_CHANGED, NODE_LOST, RUN_FAILED, TEST = ("health_changed", "node_lost", "run_failed",
                                               "test")
ALERT_KINDS = (HEALTH_CHANGED, NODE_LOST, RUN_FAILED, TEST)
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_WEBHOOKS = 10
MAX_WEBHOOK_URL = 2048


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON body POSTed to every webhook of ``infra``.

    ``kind``: ``health_changed`` (``about`` is ``deployment`` or ``infra``; ``health``
    and ``previous`` are the new and old values), ``node_lost`` (``about`` is ``node``),
    ``run_failed`` (``about`` is ``run``, ``name`` the run id) or ``test``.
    ``summary`` is one human line; ``reasons`` say why."""

    id: str = msgspec.field(default_factory=new_id)
    kind: str
    infra: str
    about: str
    name: str
    summary: str
    ts: float
    health: str = ""
    previous: str = ""
    reasons: list[str] = []
    v: int = 1


class WebhookResult(msgspec.Struct, frozen=True, kw_only=True):
    """How delivering one alert to one webhook ended."""

    url: str
    delivered: bool
    attempts: int
    status: int | None = None  # the last HTTP status, None if no answer came
    error: str = ""


class AlertTested(Message, frozen=True, kw_only=True, tag="alerts.test.reply"):
    infra: str
    alert_id: str
    results: list[WebhookResult] = []


class SendTestAlert(Command[AlertTested], frozen=True, kw_only=True, tag="alerts.test"):
    """Send a ``test`` alert to every webhook of ``infra`` through the delivery path real
    alerts take, and answer once each delivery ended (delivered, or retries exhausted)."""

    infra: str
    by: str = ""


def check_webhook(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ``BadRequest`` otherwise."""
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL:
        raise BadRequest(f"invalid webhook URL: expected at most {MAX_WEBHOOK_URL} characters")
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError as exc:
        raise BadRequest(f"invalid webhook URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok \
            or any(c.isspace() for c in url):
        raise BadRequest(f"invalid webhook URL {url!r}: expected http://HOST[:PORT]/PATH "
                         "or https://...")
    return url


def check_webhooks(urls: list[str]) -> list[str]:
    """Validated, de-duplicated (order kept) webhook URLs; ``BadRequest`` if any is bad
    or there are more than ``MAX_WEBHOOKS``."""
    out = list(dict.fromkeys(check_webhook(u) for u in urls))
    if len(out) > MAX_WEBHOOKS:
        raise BadRequest(f"{len(out)} webhooks: an infra has at most {MAX_WEBHOOKS}")
    return out
