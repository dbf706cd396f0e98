"""The Govern node: serves the registry and sign-off reviews on ``sy.cmd.govern.<verb>``.

State lives in JetStream only, so a restarted Govern node loses nothing:

* reviews: the ``sy_govern`` KV bucket, one record per artifact, written by
  compare-and-set (``nodes.govern.reviews`` decides each change);
* the registry of projects, bundles and API versions: the ``sy_bundles`` and
  ``sy_api_packages`` records the Design node writes when it publishes (beside its
  ``bundle.created`` and ``api.package.stored`` events).  The node follows them with a
  ``KVCache`` (a watch plus a periodic re-read), so the registry is current within
  milliseconds of a publish and converges even if a watch goes quiet; reading the
  records rather than the events means a fresh Govern node starts complete.

Who requested or answered a review is the command's verified identity: ``Node._handle``
checks the signature of ``Request.identity`` before the handler runs.  On a stack started
with ``--insecure`` nobody signs, and the name the caller gave is all there is.

The Deployer does not call this node: it reads ``sy_govern`` itself when an infra's policy
asks (``nodes.deployer.policy``), so deployments never wait on the Govern node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
import nats.js.errors
from anyio.abc import TaskGroup
from nats.js.kv import KeyValue

from nodes.govern.reviews import answer, open_review
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import KVCache, read
from nodes.runtime.node import Node, handles
from protocol import subjects
from protocol.api import package_key
from protocol.base import Family, Request, encode
from protocol.bundles import bundle_key
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.govern import (
    API,
    ARTIFACT_KINDS,
    BUNDLE,
    GOVERN,
    REVIEW_VALUE,
    UNREVIEWED,
    ArtifactList,
    ArtifactRow,
    GetReview,
    ListArtifacts,
    RequestReview,
    Review,
    ReviewArtifact,
    ReviewChanged,
    ReviewView,
    check_artifact,
    label,
    review_key,
)
from protocol.state import GovernState

CAS_ATTEMPTS = 8  # compare-and-set retries before a busy review is reported as a conflict


class _Published(msgspec.Struct, frozen=True, kw_only=True):
    """What the registry needs of a bundle or package record (the rest is skipped)."""

    project: str = ""
    service: str = ""
    id: str = ""
    version: str = ""
    created_at: float = 0.0
    created_by: str = ""


_PUBLISHED = msgspec.json.Decoder(_Published)


class GovernNode(Node):
    role: ClassVar[str] = "govern"
    family: ClassVar[Family | None] = GOVERN
    verifies_commands: ClassVar[bool] = True
    leased: ClassVar[bool] = True  # one active Govern node; the others are standbys

    def __init__(self, *, approvals: int = 1, clock: Callable[[], float] = time.time,
                 **kw: Any) -> None:
        """``approvals``: how many approvals a review needs (fixed when it is requested)."""
        if approvals < 1:
            raise ValueError(f"approvals must be 1 or more, not {approvals}")
        super().__init__(**kw)
        self.approvals = approvals
        self.clock = clock
        self._kv: KeyValue | None = None
        self._bundle_kv: KeyValue | None = None
        self._package_kv: KeyValue | None = None
        self._caches: list[KVCache[Any]] = []

    async def setup(self) -> None:
        js, r = self.js, self.settings.replicas
        self._kv = await ensure_kv(js, subjects.GOVERN_BUCKET, replicas=r,
                                   description="shipyard sign-off reviews")
        self._bundle_kv = await ensure_kv(js, subjects.BUNDLE_BUCKET, replicas=r)
        self._package_kv = await ensure_kv(js, subjects.API_PACKAGE_BUCKET, replicas=r,
                                           description="shipyard API package records")
        self.reviews: KVCache[Review] = KVCache(self._kv, ">", REVIEW_VALUE.decode)
        self.bundles: KVCache[_Published] = KVCache(self._bundle_kv, ">", _PUBLISHED.decode)
        self.packages: KVCache[_Published] = KVCache(self._package_kv, ">",
                                                     _PUBLISHED.decode)
        self._caches = [self.reviews, self.bundles, self.packages]

    async def started(self, tg: TaskGroup) -> None:
        for cache in self._caches:
            await tg.start(cache.run)

    async def reconnected(self) -> None:
        for cache in self._caches:
            cache.resync()

    def state(self) -> GovernState:
        return GovernState(lease=self.lease_state)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None
        return self._kv

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _who(by: str, req: Request[Any]) -> str:
        """The verified signer; on an unsigned (insecure) stack, the name given."""
        return req.identity or by or req.sender or "anonymous"

    @staticmethod
    def _key(kind: str, name: str, version: str) -> str:
        try:
            return review_key(kind, name, version)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    async def _require_artifact(self, kind: str, name: str, version: str) -> None:
        """NotFound unless the artifact was published (read from KV, not the cache, so a
        bundle created a moment ago is found)."""
        kv = self._bundle_kv if kind == BUNDLE else self._package_kv
        assert kv is not None
        key = bundle_key(name, version) if kind == BUNDLE else package_key(name, version)
        try:
            entry = await kv.get(key)
            if entry.value:
                return
        except nats.js.errors.KeyNotFoundError:
            pass
        where = (f"shipyard bundle list {name}" if kind == BUNDLE else
                 f"shipyard api versions {name}")
        raise NotFound(f"{label(kind, name, version)} not found (see: {where})")

    async def _read(self, key: str) -> tuple[Review | None, int]:
        """The stored review and its revision; an unreadable record (written by hand) is
        logged and read as no review, so a new request replaces it."""
        try:
            return await read(self.kv, key, REVIEW_VALUE.decode)
        except msgspec.DecodeError as exc:
            self.log.warning("unreadable review record ignored", key=key, error=str(exc))
            entry = await self.kv.get(key)
            return None, entry.revision or 0

    async def _change(self, key: str,
                      change: Callable[[Review | None], Review | None]) -> tuple[Review, bool]:
        """Apply ``change`` to the stored review by compare-and-set, re-reading on a lost
        race.  Returns the review and whether anything was written."""
        for _ in range(CAS_ATTEMPTS):
            current, revision = await self._read(key)
            new = change(current)
            if new is None:
                assert current is not None
                return current, False
            try:
                if revision == 0:
                    await self.kv.create(key, encode(new))
                else:
                    await self.kv.update(key, encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return new, True
        raise Conflict(f"the review at {key} kept changing while this command was applied: "
                       "retry")

    async def _announce(self, review: Review, by: str, action: str, comment: str) -> None:
        self.log.info("review changed", artifact=label(review.kind, review.name,
                                                       review.version),
                      action=action, by=by, status=review.status)
        await self.emit(ReviewChanged(kind=review.kind, name=review.name,
                                      version=review.version, status=review.status, by=by,
                                      action=action, comment=comment))

    # -- commands ------------------------------------------------------------------------

    @handles(RequestReview)
    async def request_review(self, cmd: RequestReview, req: Request[Any]) -> ReviewView:
        key = self._key(cmd.kind, cmd.name, cmd.version)
        await self._require_artifact(cmd.kind, cmd.name, cmd.version)
        who = self._who(cmd.by, req)
        review, changed = await self._change(key, lambda cur: open_review(
            cur, kind=cmd.kind, name=cmd.name, version=cmd.version, who=who,
            comment=cmd.comment, required=self.approvals, now=self.clock()))
        if changed:
            await self._announce(review, who, "requested", cmd.comment)
        return ReviewView(kind=review.kind, name=review.name, version=review.version,
                          status=review.status, review=review, changed=changed)

    @handles(ReviewArtifact)
    async def review_artifact(self, cmd: ReviewArtifact, req: Request[Any]) -> ReviewView:
        key = self._key(cmd.kind, cmd.name, cmd.version)
        who = self._who(cmd.by, req)
        review, changed = await self._change(key, lambda cur: answer(
            cur, kind=cmd.kind, name=cmd.name, version=cmd.version, who=who,
            approve=cmd.approve, comment=cmd.comment, now=self.clock()))
        if changed:
            await self._announce(review, who, "approve" if cmd.approve else "reject",
                                 cmd.comment)
        return ReviewView(kind=review.kind, name=review.name, version=review.version,
                          status=review.status, review=review, changed=changed)

    @handles(GetReview)
    async def get_review(self, cmd: GetReview, req: Request[Any]) -> ReviewView:
        key = self._key(cmd.kind, cmd.name, cmd.version)
        review, _ = await self._read(key)
        if review is None:
            await self._require_artifact(cmd.kind, cmd.name, cmd.version)
            return ReviewView(kind=cmd.kind, name=cmd.name, version=cmd.version,
                              status=UNREVIEWED, changed=False)
        return ReviewView(kind=review.kind, name=review.name, version=review.version,
                          status=review.status, review=review, changed=False)

    @handles(ListArtifacts)
    async def list_artifacts(self, cmd: ListArtifacts, req: Request[Any]) -> ArtifactList:
        if cmd.kind is not None and cmd.kind not in ARTIFACT_KINDS:
            raise BadRequest(f"invalid artifact kind {cmd.kind!r}: expected one of "
                             f"{', '.join(ARTIFACT_KINDS)}")
        rows: list[ArtifactRow] = []
        for kind, cache in ((BUNDLE, self.bundles), (API, self.packages)):
            if cmd.kind not in (None, kind):
                continue
            for rec in cache.values():
                name = rec.project if kind == BUNDLE else rec.service
                version = rec.id if kind == BUNDLE else rec.version
                if cmd.name not in (None, name):
                    continue
                try:
                    check_artifact(kind, name, version)
                except ValueError:
                    continue  # a record no review could name (written by hand)
                entry = self.reviews.get(review_key(kind, name, version))
                review = entry.value if entry is not None else None
                rows.append(ArtifactRow(
                    kind=kind, name=name, version=version, created_at=rec.created_at,
                    created_by=rec.created_by,
                    status=review.status if review else UNREVIEWED,
                    approvals=review.approvals if review else 0,
                    required=review.required if review else 0,
                    requested_by=review.requested_by if review else ""))
        rows.sort(key=lambda r: (r.kind, r.name, r.created_at, r.version))
        return ArtifactList(
            projects=sorted({r.name for r in rows if r.kind == BUNDLE}),
            services=sorted({r.name for r in rows if r.kind == API}),
            artifacts=rows)
