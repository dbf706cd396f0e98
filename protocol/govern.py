"""The Govern node's contract: sign-off reviews of bundles and API versions, and the
policy words an infrastructure uses to act on them.

A review is one record per artifact in the ``sy_govern`` KV bucket
(``bundle.<project>.<bundle id>`` or ``api.<service>.<version>``), written only by the
Govern node and only by compare-and-set.  The Deployer reads the same keys when it
judges a deployment under a ``prevent`` or ``warn`` policy: an approval is a fact in
JetStream, so a deployment never waits on the Govern node being up, and a restarted
Govern node loses nothing.

Who requested and who approved come from the verified identity of the signed command
(``Request.identity``, checked by ``Node._handle`` before the handler runs), never from
a name the caller typed.
"""

from __future__ import annotations

import msgspec

from protocol import subjects
from protocol.api import check_version
from protocol.base import Command, Family, Message
from protocol.bundles import check_bundle_id
from protocol.errors import BadName
from protocol.events import Event

# -- policies (an infra's ``govern`` field) ------------------------------------------------

PREVENT, WARN, NONE = "prevent", "warn", "none"
POLICIES = (PREVENT, WARN, NONE)

# -- artifacts and review states -----------------------------------------------------------

BUNDLE, API = "bundle", "api"
ARTIFACT_KINDS = (BUNDLE, API)
UNREVIEWED, PENDING, APPROVED, REJECTED = "unreviewed", "pending", "approved", "rejected"
APPROVE, REJECT = "approve", "reject"


def check_policy(value: str) -> str:
    if value not in POLICIES:
        raise BadName(f"invalid govern policy {value!r}: expected one of {', '.join(POLICIES)}")
    return value


def check_artifact(kind: str, name: str, version: str) -> None:
    """Raise ``BadName`` unless (kind, name, version) can name an artifact."""
    if kind not in ARTIFACT_KINDS:
        raise BadName(f"invalid artifact kind {kind!r}: expected one of "
                      f"{', '.join(ARTIFACT_KINDS)}")
    subjects.token(name, "project" if kind == BUNDLE else "service")
    if kind == BUNDLE:
        check_bundle_id(version)
    else:
        check_version(version)


def label(kind: str, name: str, version: str) -> str:
    """How messages name an artifact: ``bundle churn v3`` or ``API scoring 2``."""
    return f"{'bundle' if kind == BUNDLE else 'API'} {name} {version}"


# -- KV keys -------------------------------------------------------------------------------
# sy_govern: bundle.<project>.<bundle id> | api.<service>.<version>  (Review)

def review_key(kind: str, name: str, version: str) -> str:
    """KV key of an artifact's review in ``sy_govern``."""
    check_artifact(kind, name, version)
    return f"{kind}.{name}.{version}"


# -- records -------------------------------------------------------------------------------

class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One reviewer's answer."""

    by: str
    verdict: str  # approve | reject
    comment: str = ""
    at: float = 0.0


class Review(msgspec.Struct, frozen=True, kw_only=True):
    """Where the sign-off of one artifact stands (the KV value)."""

    kind: str
    name: str
    version: str
    status: str  # pending | approved | rejected
    requested_by: str
    requested_at: float
    required: int = 1  # approvals needed (the Govern node's setting when it was requested)
    comment: str = ""
    decisions: list[Decision] = []
    decided_at: float | None = None
    round: int = 1  # a rejected artifact may be requested again: a new round
    v: int = 1

    @property
    def approvals(self) -> int:
        return sum(1 for d in self.decisions if d.verdict == APPROVE)

    def standing(self) -> str:
        """Why it is not approved, in a few words (``review pending: 0/1 approvals``)."""
        if self.status == REJECTED:
            last = next((d for d in reversed(self.decisions) if d.verdict == REJECT), None)
            who = f" by {last.by}" if last else ""
            why = f": {last.comment}" if last and last.comment else ""
            return f"rejected{who}{why}"
        if self.status == APPROVED:
            return f"approved: {self.approvals}/{self.required} approvals"
        return f"review pending: {self.approvals}/{self.required} approvals"


REVIEW_VALUE = msgspec.json.Decoder(Review)


def approval_problem(kind: str, name: str, version: str, review: Review | None) -> str | None:
    """None if the artifact is approved, else the sentence a refusal or warning shows."""
    if review is not None and review.status == APPROVED:
        return None
    what = label(kind, name, version)
    if review is None:
        ask = (f"shipyard govern request {name} {version}" if kind == BUNDLE else
               f"shipyard govern request api {name} {version}")
        return f"{what} is not approved (not reviewed: request a review with '{ask}')"
    return f"{what} is not approved ({review.standing()})"


# -- commands and replies (sy.cmd.govern.<verb>) -------------------------------------------

class ArtifactRow(msgspec.Struct, frozen=True, kw_only=True):
    """One registry line: an artifact and where its sign-off stands."""

    kind: str
    name: str
    version: str
    created_at: float = 0.0
    created_by: str = ""
    status: str = UNREVIEWED  # unreviewed | pending | approved | rejected
    approvals: int = 0
    required: int = 0
    requested_by: str = ""


class ArtifactList(Message, frozen=True, kw_only=True, tag="artifact.list.reply"):
    projects: list[str] = []
    services: list[str] = []
    artifacts: list[ArtifactRow] = []


class ReviewView(Message, frozen=True, kw_only=True, tag="review.view"):
    """Where one artifact's sign-off stands (``review`` is None while unreviewed)."""

    kind: str
    name: str
    version: str
    status: str  # unreviewed | pending | approved | rejected
    review: Review | None = None
    changed: bool = False  # whether this command wrote anything


class ListArtifacts(Command[ArtifactList], frozen=True, kw_only=True, tag="artifact.list"):
    """Every project, bundle and API version the stack holds, with its review status."""

    kind: str | None = None
    name: str | None = None


class RequestReview(Command[ReviewView], frozen=True, kw_only=True, tag="review.request"):
    """Open a review of an artifact (the requester is the command's signed identity)."""

    kind: str
    name: str
    version: str
    comment: str = ""
    by: str = ""  # used only on a stack without identities


class ReviewArtifact(Command[ReviewView], frozen=True, kw_only=True, tag="review.answer"):
    """Approve or reject an artifact whose review is open."""

    kind: str
    name: str
    version: str
    approve: bool
    comment: str = ""
    by: str = ""  # used only on a stack without identities


class GetReview(Command[ReviewView], frozen=True, kw_only=True, tag="review.status"):
    """Where an artifact's review stands and who said what."""

    kind: str
    name: str
    version: str


# -- events --------------------------------------------------------------------------------

class ReviewChanged(Event, frozen=True, kw_only=True, tag="review.changed"):
    kind: str
    name: str
    version: str
    status: str
    by: str
    action: str  # requested | approve | reject
    comment: str = ""

    def subject(self) -> str:
        return subjects.event("govern", self.kind, self.name)

    def summary(self) -> str:
        note = f": {self.comment}" if self.comment else ""
        return (f"{label(self.kind, self.name, self.version)}: {self.action} by "
                f"{self.by or '?'} ({self.status}){note}")


GovernCommand = ListArtifacts | RequestReview | ReviewArtifact | GetReview
GovernReply = ArtifactList | ReviewView

GOVERN = Family("govern", GovernCommand, GovernReply)
