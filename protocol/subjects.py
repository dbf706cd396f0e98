"""The subject space.  No other module spells a subject, stream or bucket name.

Namespace first, identifiers last, one token per level::

    sy.hb.<role>.<node>                 heartbeats, core NATS, every node, every interval
    sy.cmd.<role>.<verb>[.<verb>...]    commands to a role; the role's instances share them
                                        in queue group <role> (least privilege per verb later)
    sy.node.<node>.<verb>               commands to one node (ping, echo, status)
    sy.evt.<kind>.<...>                 events; the SY_EVENTS JetStream stream keeps them
        sy.evt.node.<node>                  node online / lost
        sy.evt.deploy.<infra>.<project>     project deployments: desired, activated, failed
        sy.evt.api.<infra>.<service>        API deployments
        sy.evt.run.<project>.<run>          scenario runs: started, step, finished
        sy.evt.govern.<item>                sign-offs and policy decisions
    sy.rpt.<kind>.<node>                reports from nodes to the Deployer (activation, metrics)
    sy.api.v1.<service>.<endpoint>      API service requests; nats.micro endpoints that the
                                        service's API nodes share in queue group <service>
    sy.api.v1.<service>.<endpoint>.hedge   a hedged copy of a request: the service's API
                                        nodes (not their workers) share it in queue group
                                        <service> and hand it to a worker that is not stalled
    <reply>.working                     "a worker runs this request" (empty body: from the
                                        API node whose worker runs it, while it runs) or
                                        "it is queued, starts within N s" (body N: from
                                        the worker or node that holds it, while it waits)
    <reply>.progress                    how a long command is getting on (stage, done, total:
                                        ``protocol.progress.CommandProgress``), from the
                                        node that runs it, for its requester to show
    sy.cap.<service>.<endpoint>         captured requests and answers of a service that
                                        opted in; the SY_CAPTURE JetStream stream keeps them
    $SRV.PING|INFO|STATS[.<svc>[.<id>]] nats.micro discovery (spelled by nats-py itself)

Tokens are ``[A-Za-z0-9_-]+``: names of nodes, roles, infras, projects and services are
validated with ``token`` before they reach a subject.
"""

from __future__ import annotations

import re

from protocol.errors import BadName

ROOT = "sy"
API_VERSION = "v1"

MAX_TOKEN = 128
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")  # \Z: "$" would let a final "\n" in


def token(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid subject token; raise ``BadName`` otherwise.

    The length bound matters as much as the characters: a name travels into subjects and
    KV keys, and nats-server closes a connection whose control line exceeds 4 KiB, so one
    unchecked long name could disconnect the node that used it.
    """
    if not isinstance(value, str) or not _TOKEN.match(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise BadName(
            f"invalid {what} {shown}: expected letters, digits, '_' or '-' "
            f"(at most {MAX_TOKEN}; no dots, spaces or wildcards)"
        )
    return value


def _verb(verb: str) -> str:
    for part in verb.split("."):
        token(part, "verb")
    return verb


# -- heartbeats ---------------------------------------------------------------------------

def heartbeat(role: str, node: str) -> str:
    """Heartbeats: name, role, infra, version, host, pid, uptime, interval, role state,
    messages dropped."""
    return f"{ROOT}.hb.{token(role, 'role')}.{token(node, 'node name')}"


HEARTBEATS_ALL = f"{ROOT}.hb.>"


# -- commands -----------------------------------------------------------------------------

def command(role: str, verb: str) -> str:
    """Commands to a role, shared by its instances in queue group ``<role>``."""
    return f"{ROOT}.cmd.{token(role, 'role')}.{_verb(verb)}"


def node_command(node: str, verb: str) -> str:
    """Commands to one node (``ping``, ``echo``)."""
    return f"{ROOT}.node.{token(node, 'node name')}.{_verb(verb)}"


def role_commands(role: str) -> str:
    """Every command to ``role`` (what its instances subscribe to)."""
    return f"{ROOT}.cmd.{token(role, 'role')}.>"


def node_commands(node: str) -> str:
    """Every command to one node."""
    return f"{ROOT}.node.{token(node, 'node name')}.>"


# -- events -------------------------------------------------------------------------------

EVENTS_ALL = f"{ROOT}.evt.>"


def event(kind: str, *ids: str) -> str:
    """Events, kept by the ``SY_EVENTS`` stream (``node``, ``deploy``, ``api``, ``run``,
    ``govern``)."""
    parts = [token(kind, "event kind"), *(token(i, "identifier") for i in ids)]
    return f"{ROOT}.evt." + ".".join(parts)


def node_event(node: str) -> str:
    """Node events: online, lost, forgotten."""
    return event("node", node)


# -- reports ------------------------------------------------------------------------------

def report(kind: str, node: str) -> str:
    """Reports from nodes and the supervisor to the Deployer (``exit``, activation,
    metrics)."""
    return f"{ROOT}.rpt.{token(kind, 'report kind')}.{token(node, 'node name')}"


def reports(kind: str) -> str:
    """Every report of one kind (what the Deployer subscribes to)."""
    return f"{ROOT}.rpt.{token(kind, 'report kind')}.*"


# -- API services -------------------------------------------------------------------------

def api_endpoint(service: str, endpoint: str) -> str:
    """API requests; nats.micro endpoints in queue group ``<service>``."""
    return f"{ROOT}.api.{API_VERSION}.{token(service, 'service')}.{token(endpoint, 'endpoint')}"


def api_service_prefix(service: str) -> str:
    """The nats.micro group prefix of one API service's endpoints."""
    return f"{ROOT}.api.{API_VERSION}.{token(service, 'service')}"


HEDGE_TOKEN = "hedge"
WORKING_TOKEN = "working"


def api_hedge(service: str, endpoint: str) -> str:
    """Where a hedged copy of a request to ``endpoint`` goes."""
    return f"{api_endpoint(service, endpoint)}.{HEDGE_TOKEN}"


def api_hedges(service: str) -> str:
    """Every endpoint's hedged copies, for an API node serving ``service``."""
    return f"{api_service_prefix(service)}.*.{HEDGE_TOKEN}"


def api_working(reply: str) -> str:
    """Where an API node or worker says that it runs, or queues, the request with reply
    subject ``reply``."""
    return f"{reply}.{WORKING_TOKEN}"


def api_working_all(reply_prefix: str) -> str:
    """Every such notice for the requests whose reply subjects are ``reply_prefix`` + one
    token."""
    return f"{reply_prefix}*.{WORKING_TOKEN}"


# -- progress of long commands -----------------------------------------------------------

PROGRESS_TOKEN = "progress"


def command_progress(reply: str) -> str:
    """Where the node that runs the command with reply subject ``reply`` tells how it is
    getting on (``protocol.progress.CommandProgress``)."""
    return f"{reply}.{PROGRESS_TOKEN}"


def command_progress_all(reply_prefix: str) -> str:
    """Every progress notice for the commands whose reply subjects are ``reply_prefix`` +
    one token."""
    return f"{reply_prefix}*.{PROGRESS_TOKEN}"


# -- reply subjects re-used one request at a time -----------------------------------------

REUSED_REPLY_TOKEN = "p"


def reused_reply(inbox: str, slot: str) -> str:
    """A reply subject its requester re-uses, one request at a time
    (``nodes.runtime.requests``): it hears only the reply, no notices."""
    return f"{inbox}.{REUSED_REPLY_TOKEN}.{slot}"


def hears_notices(reply: str) -> bool:
    """Whether the requester of ``reply`` may listen for its notices (``.progress``): not
    on a re-used reply subject."""
    head, _, _slot = reply.rpartition(".")
    return not head.endswith("." + REUSED_REPLY_TOKEN)


# -- prediction capture -------------------------------------------------------------------

CAPTURE_STREAM = "SY_CAPTURE"  # captured requests and answers, bounded by size and age
CAPTURE_ALL = f"{ROOT}.cap.>"


def capture(service: str, endpoint: str) -> str:
    """A captured request and its answer (``protocol.capture.CapturedCall``), published by
    the API worker that answered it."""
    return f"{ROOT}.cap.{token(service, 'service')}.{token(endpoint, 'endpoint')}"


def captures_of(service: str) -> str:
    """Every captured call of one service (what ``shipyard api queries`` reads)."""
    return f"{ROOT}.cap.{token(service, 'service')}.>"


# -- JetStream resources ------------------------------------------------------------------
# Streams, KV buckets and object stores are part of the contract too.

EVENTS_STREAM = "SY_EVENTS"
REGISTRY_BUCKET = "sy_registry"
INFRA_BUCKET = "sy_infra"
DEPLOY_BUCKET = "sy_deploy"
BUNDLE_BUCKET = "sy_bundles"  # KV: bundle records
BUNDLE_STORE = "sy_bundle_data"  # Object Store: bundle archives
API_PACKAGE_BUCKET = "sy_api_packages"  # KV: API package records, <service>.<version>
API_PACKAGE_STORE = "sy_api_package_data"  # Object Store: API package archives
API_KEYS_BUCKET = "sy_api_keys"  # KV: API key hashes, <service>.<key id>
WHEELS_STORE = "sy_wheels"  # Object Store: locked wheels, by SHA-256 (``envs.wheel_key``)


def api_queue_group(service: str) -> str:
    """The queue group every API node serving ``service`` joins."""
    return token(service, "service")
FIRED_BUCKET = "sy_fired"  # KV: trigger firings already claimed (expire after a week)
LOCKS_BUCKET = "sy_locks"  # KV: lock.<infra>.<project>.<scenario>, cron.<...> marks
RUN_LOGS_STORE = "sy_run_logs"  # Object Store: logs of finished runs


def events_of(kind: str) -> str:
    """Every event of one kind (``api``, ``deploy``, ``node``, ...)."""
    return f"{ROOT}.evt.{token(kind, 'event kind')}.>"


def runs_of(project: str) -> str:
    """Every run event of one project."""
    return f"{ROOT}.evt.run.{token(project, 'project')}.>"


RUN_EVENTS_ALL = f"{ROOT}.evt.run.>"

# -- the audit ledger ---------------------------------------------------------------------

AUDIT_STREAM = "SY_AUDIT"  # every command Deployer and Govern received, with its outcome
AUDIT_ALL = f"{ROOT}.audit.>"


def audit(role: str, node: str) -> str:
    """Audit entries appended by one node of a verifying role (Deployer, Govern)."""
    return f"{ROOT}.audit.{token(role, 'role')}.{token(node, 'node name')}"


# -- patterns for NATS permissions (nodes.auth.permissions) ----------------------------------

IDENTITIES_BUCKET = "sy_identities"  # KV: identities that may connect and sign, by name
GOVERN_BUCKET = "sy_govern"  # KV: sign-off reviews, <kind>.<name>.<version> (Govern node)
NONCES_BUCKET = "sy_nonces"  # KV: signed commands' nonces already used, stack-wide (TTL)
LEASES_BUCKET = "sy_leases"  # KV: <role>, which instance of a control-plane role is active
API_ALL = f"{ROOT}.api.{API_VERSION}.>"
COMMANDS_ALL = f"{ROOT}.cmd.>"


def node_reports(node: str) -> str:
    """Every report one node may send (the node name is the last token)."""
    return f"{ROOT}.rpt.*.{token(node, 'node name')}"


def infra_events(kind: str, infra: str) -> str:
    """Every event of one kind about one infra (``deploy``, ``api``)."""
    return f"{ROOT}.evt.{token(kind, 'event kind')}.{token(infra, 'infra')}.>"
