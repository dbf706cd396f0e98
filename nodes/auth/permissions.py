"""What each identity may publish and subscribe to, enforced by nats-server.

Built from ``protocol.subjects`` (shipyard's subjects) and from the NATS system subjects
spelled below, the only place they are (JetStream API, KV and Object Store, inboxes).

Rules every role follows:

* Replies: ``allow_responses`` lets a responder answer the requests it received without
  a publish permission on anyone's inbox.  API nodes are the exception: a node and its
  workers are separate connections, and one answers what another received (a hedged or
  passed-on copy, the request of a worker that died), so their user may publish to any
  reply subject (``_INBOX.*.*.*``, not deeper).  The tokens of shipyard's reply subjects
  are random (``requests.Tokens``): a node cannot guess those of requests sent elsewhere.
  The reply subjects commands re-use (``<inbox>.p.<slot>``, ``subjects.reused_reply``) are
  one token deeper, out of that pattern's reach: only ``allow_responses`` opens them, to
  the responder of the request.
  Each identity subscribes only to its own inbox
  prefix (``_INBOX.<name>.>``, see ``keys.inbox_prefix``), so no one reads replies meant
  for another (for example the reply that carries a new API key's secret).
* Reading a bucket or a stream: stream info, message get and direct get, consumers
  (create, info, delete, next), their acks and flow control.  A role that may only read
  gets none of stream update, delete or purge, and no ``$KV.<bucket>`` / ``$O.<bucket>``
  publish.
* Reading part of a bucket: an Automation node reads only its infra's desired state.  Its
  user may watch those keys through a consumer whose filter is in the create subject
  (``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: shipyard's watches name their
  consumers, ``natscompat.kv_watch``), and get them by direct get where a bucket allows
  it (the key is in its subject); no message get and no unnamed consumer, whose key or
  filter is in the request body, where the server cannot check it; no stream info
  either, which with a subject filter lists every key's name (the node opens the bucket
  without it: ``jetstream.ensure_kv(read_info=False)``).
* Opening a bucket it uses: ``STREAM.CREATE.<stream>`` only.  The server refuses a create
  that differs from an existing stream's config, so this can create a missing bucket but
  never change one; updates, deletes and purges are the control plane's.
* Progress of a long command (``<reply>.progress``) goes to its requester's inbox: the
  Design node may publish it to any inbox (``_INBOX.*.*.*.progress``), and a requester
  receives it under its own inbox prefix, as it receives the reply.
* Heartbeats and reports carry the node's own name in the subject: a node may publish
  only its own (``sy.hb.<role>.<name>``, ``sy.rpt.*.<name>``).
* The nonces of accepted signed commands (``sy_nonces``) are the verifiers' alone:
  Deployer and Govern (control plane) create and write that bucket; no other role is
  given any of it, so none can read which nonces were used nor burn one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodes.auth.keys import inbox_prefix
from protocol import subjects
from protocol.auth import Identity, commands_for
from protocol.base import Family, tag_of
from protocol.deploy import deployment_keys

# -- NATS system subjects ---------------------------------------------------------------------

JS_API_INFO = "$JS.API.INFO"
ALL = ">"
SRV_ALL = "$SRV.>"  # nats.micro discovery (PING, INFO, STATS)
STREAM_DELETE_ALL = "$JS.API.STREAM.DELETE.>"


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def kv_writes(bucket: str) -> str:
    """KV put and delete are publishes to ``$KV.<bucket>.<key>``."""
    return f"$KV.{bucket}.>"


def object_writes(bucket: str) -> str:
    """Object Store chunks (``$O.<bucket>.C.<nuid>``) and metadata (``.M.<name>``)."""
    return f"$O.{bucket}.>"


def stream_create(stream: str) -> str:
    return f"$JS.API.STREAM.CREATE.{stream}"


def stream_purge(stream: str) -> str:
    return f"$JS.API.STREAM.PURGE.{stream}"


def stream_delete(stream: str) -> str:
    return f"$JS.API.STREAM.DELETE.{stream}"


def stream_update(stream: str) -> str:
    return f"$JS.API.STREAM.UPDATE.{stream}"


def ledger_guard() -> list[str]:
    """What no shipyard identity may publish, the admin included: the audit stream's
    delete and update (nats-server's ``deny_delete``/``deny_purge`` refuse a purge and a
    message delete, and an update that lifts them, but not the deletion of the whole
    stream nor an update that shrinks its limits), and entries (Deployer and Govern
    nodes append them; they are the only ones not given this deny on the subjects)."""
    return [stream_delete(subjects.AUDIT_STREAM), stream_update(subjects.AUDIT_STREAM)]


def stream_reads(stream: str) -> list[str]:
    """What reading a stream (a KV bucket, an object store) publishes."""
    api = "$JS.API"
    return [f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
            f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
            f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>", f"{api}.CONSUMER.INFO.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.>", f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


# The least human role that may send API requests itself (``shipyard api replay``); the
# admin may send anything.
REPLAY_ROLE = "deployer"

# Every request's reply subject is an inbox: "<prefix>.<nuid>.<token>" (nodes.runtime.requests).
ANY_REPLY_PREFIX = "_INBOX.*.*."

KV_BUCKETS = (subjects.REGISTRY_BUCKET, subjects.INFRA_BUCKET, subjects.DEPLOY_BUCKET,
              subjects.BUNDLE_BUCKET, subjects.API_PACKAGE_BUCKET, subjects.API_KEYS_BUCKET,
              subjects.FIRED_BUCKET, subjects.LOCKS_BUCKET, subjects.IDENTITIES_BUCKET,
              subjects.GOVERN_BUCKET, subjects.LEASES_BUCKET)
OBJECT_STORES = (subjects.BUNDLE_STORE, subjects.API_PACKAGE_STORE, subjects.WHEELS_STORE,
                 subjects.RUN_LOGS_STORE)


@dataclass
class Permissions:
    pub_allow: list[str] = field(default_factory=list)
    pub_deny: list[str] = field(default_factory=list)
    sub_allow: list[str] = field(default_factory=list)
    sub_deny: list[str] = field(default_factory=list)

    def read_kv(self, *buckets: str, create: bool = True) -> None:
        for b in buckets:
            self.pub_allow += stream_reads(kv_stream(b))
            if create:
                self.pub_allow.append(stream_create(kv_stream(b)))

    def read_kv_keys(self, bucket: str, keys: str) -> None:
        """Read only the keys of ``bucket`` matching ``keys`` (a key filter)."""
        stream, api, only = kv_stream(bucket), "$JS.API", f"$KV.{bucket}.{keys}"
        # No STREAM.INFO: with a subject filter it lists every key's name.
        self.pub_allow += [f"{api}.DIRECT.GET.{stream}.{only}",
                           f"{api}.CONSUMER.CREATE.{stream}.*.{only}",
                           f"{api}.CONSUMER.INFO.{stream}.>", f"{api}.CONSUMER.DELETE.{stream}.>",
                           f"$JS.FC.{stream}.>", stream_create(stream)]

    def write_kv(self, *buckets: str) -> None:
        self.read_kv(*buckets)
        self.pub_allow += [kv_writes(b) for b in buckets]

    def read_objects(self, *buckets: str, create: bool = True) -> None:
        for b in buckets:
            self.pub_allow += stream_reads(object_stream(b))
            if create:
                self.pub_allow.append(stream_create(object_stream(b)))

    def write_objects(self, *buckets: str) -> None:
        """Put (chunks, metadata) and replace (a put purges the old chunks)."""
        self.read_objects(*buckets)
        for b in buckets:
            self.pub_allow += [object_writes(b), stream_purge(object_stream(b))]

    def read_events(self) -> None:
        self.pub_allow += stream_reads(subjects.EVENTS_STREAM)
        self.pub_allow.append(stream_create(subjects.EVENTS_STREAM))
        self.sub_allow.append(subjects.EVENTS_ALL)

    def serve(self, role: str, node: str) -> None:
        """A node's own commands and its role's, and its heartbeats and reports."""
        self.sub_allow += [subjects.node_commands(node), subjects.role_commands(role)]
        self.pub_allow += [subjects.heartbeat(role, node), subjects.node_reports(node)]

    def to_config(self) -> dict[str, Any]:
        def part(allow: list[str], deny: list[str]) -> dict[str, list[str]]:
            out = {"allow": _unique(allow)}
            if deny:
                out["deny"] = _unique(deny)
            return out

        return {"publish": part(self.pub_allow, self.pub_deny),
                "subscribe": part(self.sub_allow, self.sub_deny),
                "allow_responses": True}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def command_subjects(role: str) -> list[str]:
    """The command subjects a human ``role`` may publish, one per verb it may send."""
    return [subjects.command(Family.of(cls).role, tag_of(cls)) for cls in commands_for(role)]


def _control_plane(p: Permissions) -> None:
    """Deployer and Govern nodes, and the admin: everything, except that nodes never
    rewrite identities nor delete a stream."""
    p.pub_allow.append(ALL)
    p.sub_allow.append(ALL)


def _reader(p: Permissions) -> None:
    """What every human identity may read: state, events, heartbeats."""
    p.read_kv(*KV_BUCKETS, create=False)
    p.read_objects(*OBJECT_STORES, create=False)
    p.read_events()
    p.sub_allow.append(subjects.HEARTBEATS_ALL)
    # The live view (``shipyard monitor``): API request counters and exit reports.
    p.sub_allow += [subjects.reports("metrics"), subjects.reports("exit")]
    p.pub_allow += stream_reads(subjects.AUDIT_STREAM)  # the audit ledger: read, never write
    p.pub_allow += stream_reads(subjects.CAPTURE_STREAM)  # captured calls: shipyard api queries


def permissions_for(identity: Identity) -> Permissions:
    """The NATS permissions of one identity."""
    p = Permissions(pub_allow=[JS_API_INFO], sub_allow=[inbox_prefix(identity.name) + ".>"])
    name, role = identity.name, identity.role
    infra = identity.infra or "default"
    if identity.kind == "user":
        if role == "admin":
            _control_plane(p)
            p.pub_deny += [*ledger_guard(), subjects.AUDIT_ALL]
        else:
            _reader(p)
            p.pub_allow += command_subjects(role)
            if role == REPLAY_ROLE:  # shipyard api replay sends captured requests again
                p.pub_allow.append(subjects.API_ALL)
        return p
    if role in ("deployer", "govern"):
        _control_plane(p)
        p.pub_deny += [kv_writes(subjects.IDENTITIES_BUCKET), STREAM_DELETE_ALL,
                       *ledger_guard()]
        return p
    p.serve(role, name)
    p.pub_deny += [subjects.COMMANDS_ALL, subjects.AUDIT_ALL, kv_writes(subjects.DEPLOY_BUCKET),
                   kv_writes(subjects.INFRA_BUCKET), kv_writes(subjects.IDENTITIES_BUCKET)]
    p.pub_allow.append(stream_create(subjects.EVENTS_STREAM))
    if role in ("automation", "api"):  # artifacts run only if signed by a Design key
        p.read_kv(subjects.IDENTITIES_BUCKET, create=False)
    if role == "automation":
        p.read_kv_keys(subjects.DEPLOY_BUCKET, deployment_keys("bundle", infra))
        p.read_kv(subjects.BUNDLE_BUCKET)
        p.write_kv(subjects.LOCKS_BUCKET, subjects.FIRED_BUCKET)
        p.read_objects(subjects.BUNDLE_STORE, subjects.WHEELS_STORE)
        p.write_objects(subjects.RUN_LOGS_STORE)
        p.pub_allow += [subjects.infra_events("deploy", infra), subjects.RUN_EVENTS_ALL]
        p.sub_allow.append(subjects.RUN_EVENTS_ALL)  # schedules follow other runs
    elif role == "api":
        p.read_kv(subjects.DEPLOY_BUCKET, subjects.API_PACKAGE_BUCKET, subjects.API_KEYS_BUCKET)
        p.read_objects(subjects.API_PACKAGE_STORE, subjects.WHEELS_STORE)
        p.sub_allow += [subjects.API_ALL, SRV_ALL]
        # Its HTTP server sends requests to the service's queue group like a gateway.
        p.pub_allow += [subjects.API_ALL, subjects.infra_events("api", infra),
                        subjects.api_working_all(ANY_REPLY_PREFIX), subjects.CAPTURE_ALL,
                        # Answers to requests another of its connections received: a
                        # hedged or passed-on copy a worker runs, a dead worker's request.
                        ANY_REPLY_PREFIX + "*"]
    elif role == "gateway":
        p.read_kv(subjects.DEPLOY_BUCKET, subjects.API_KEYS_BUCKET)
        p.pub_allow.append(subjects.API_ALL)
    elif role == "design":
        p.read_kv(subjects.DEPLOY_BUCKET)
        p.write_kv(subjects.BUNDLE_BUCKET, subjects.API_PACKAGE_BUCKET, subjects.LOCKS_BUCKET)
        p.write_objects(subjects.BUNDLE_STORE, subjects.API_PACKAGE_STORE,
                        subjects.WHEELS_STORE, subjects.RUN_LOGS_STORE)
        p.pub_allow += [subjects.events_of("bundle"), subjects.events_of("apipkg"),
                        subjects.RUN_EVENTS_ALL,
                        # How a bundle or package it makes is getting on, to its requester.
                        subjects.command_progress_all(ANY_REPLY_PREFIX)]
    return p


def server_users(identities: Iterable[Identity]) -> list[dict[str, Any]]:
    """The ``authorization.users`` entries of every identity that is not revoked."""
    return [{"nkey": i.public_key, "permissions": permissions_for(i).to_config()}
            for i in identities if not i.revoked]
