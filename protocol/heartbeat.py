"""Heartbeats: every node, every ``interval_s`` seconds, on ``sy.hb.<role>.<node>``.

A heartbeat carries the node's role state (``protocol.state.RoleState``), typed and
tagged by role, under the field name ``state`` that nodes of the previous release filled
with an untagged object.  Keeping one field, rather than adding a typed one beside the
old, keeps one shape on the wire and one decoding place: ``HEARTBEAT`` (a
``StatedCodec``) decodes a typed state in one pass, and gives an untagged state the tag
its heartbeat's ``role`` names, so a node of the previous release is registered and its
bundles show in deployment views during a rolling upgrade.  Registry records stored by
the previous release load the same way.
"""

from __future__ import annotations

from protocol import checks, subjects
from protocol.base import Message
from protocol.state import NoState, RoleState, StatedCodec

# The heartbeat intervals the registry accepts.  Below 50 ms a beat costs more than it
# tells; above 5 minutes a dead node would look alive for a quarter of an hour.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 300.0

# The names of beats already found valid, with their subject: a node sends the same ones
# every beat, and checking them again was 70% of the Deployer's cost per beat (measured:
# 40 -> ~15 µs per beat at 5,000 nodes).  Bounded, oldest first out.
VALID_NAMES_KEPT = 20_000
_VALID_NAMES: dict[tuple[object, ...], None] = {}


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    """A node's liveness and state.

    ``state`` is role specific (for example, the bundles an Automation node runs).
    ``interval_s`` lets the registry judge liveness per node: lost after 3 missed beats.
    ``seq`` counts beats since the process started; a reset means a restart.
    """

    node: str
    role: str
    infra: str
    version: str
    host: str
    pid: int
    uptime_s: float
    interval_s: float
    seq: int = 0
    ts: float = 0.0
    instance: str = ""  # unique per node object: tells a restart even with the same pid
    state: RoleState = NoState()
    dropped: int = 0  # inbound messages this node dropped as malformed, since it started
    # Resource use, for live views: CPU seconds (user + system) the process has used since
    # it started, and its resident memory now.  Cumulative CPU rather than a percentage,
    # so a viewer that misses beats still gets the right average between the two it saw.
    # 0 from nodes of the previous release (unknown).
    cpu_s: float = 0.0
    rss_bytes: int = 0

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless every name and number is in bounds and the
        node and role are the ones ``subject`` (``sy.hb.<role>.<node>``) names."""
        names = (subject, self.node, self.role, self.infra, self.version, self.host,
                 self.instance, type(self.state))
        if names not in _VALID_NAMES:
            checks.name(self.node, "node name")
            checks.name(self.role, "role")
            checks.name(self.infra, "infra name")
            checks.label(self.version, "version")
            checks.text(self.host, "host", limit=255)
            checks.label(self.instance, "instance", empty=True)
            checks.same_subject(subject, subjects.heartbeat(self.role, self.node),
                                "heartbeat")
            self.state.belongs_to(self.role)
            if len(_VALID_NAMES) >= VALID_NAMES_KEPT:
                _VALID_NAMES.pop(next(iter(_VALID_NAMES)))
            _VALID_NAMES[names] = None
        checks.count(self.pid, "pid")
        checks.count(self.seq, "seq")
        checks.count(self.dropped, "dropped")
        checks.number(self.cpu_s, "cpu_s", 0.0, 1e12)
        checks.count(self.rss_bytes, "rss_bytes")
        checks.number(self.interval_s, "interval_s", MIN_INTERVAL_S, MAX_INTERVAL_S)
        checks.number(self.uptime_s, "uptime_s", 0.0, 1e10)
        checks.finite(self.ts, "ts")
        self.state.validate()


HEARTBEAT = StatedCodec[Heartbeat](Heartbeat)
