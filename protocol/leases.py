"""Leases: which instance of a control-plane role (Deployer, Govern) is the active one.

Several instances of a role may run; exactly one holds the role's key in the
``sy_leases`` bucket (``lease_key``) and acts, the others wait as standbys.  The record
says who holds it; the key's KV revision is the holder's fencing token (every renewal
is a compare-and-set on it).  ``nodes.runtime.lease`` explains the timing.
"""

from __future__ import annotations

import msgspec

from protocol import subjects
from protocol.base import Codec
from protocol.events import Event

ACTIVE = "active"
STANDBY = "standby"


def lease_key(role: str) -> str:
    """KV key of a control-plane role's lease (``LeaseRecord``) in ``sy_leases``."""
    return subjects.token(role, "role")


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a lease key: the instance that holds it."""

    role: str
    node: str
    instance: str
    host: str = ""
    pid: int = 0
    acquired_at: float = 0.0
    # How long the holder may act after sending its last renewal (its TTL): a standby
    # waits at least this long, seeing the key unchanged, before it takes the key.
    ttl_s: float = 0.0


LEASE_VALUE = Codec[LeaseRecord](LeaseRecord)


class LeaderChanged(Event, frozen=True, kw_only=True, tag="leader.changed"):
    """``node`` became the active instance of ``role`` (its lease revision ``term``);
    ``previous`` names the instance that held the lease before, when one did."""

    role: str
    node: str
    instance: str
    term: int
    previous: str = ""

    def subject(self) -> str:
        return subjects.event("leader", self.role)

    def summary(self) -> str:
        before = f" (was {self.previous})" if self.previous else ""
        return f"{self.role} {self.node} is active, term {self.term}{before}"
