"""The Govern node against a real nats-server with identities: sign-off reviews, who may
say what, and the per-infra policy the Deployer applies to deploys and rollbacks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from nodes.govern.reviews import SELF_APPROVAL, answer, open_review
from nodes.runtime.jetstream import ensure_kv
from protocol import subjects
from protocol.api import DeployApi, RollbackApi
from protocol.deploy import (
    WARNING,
    CreateInfra,
    DeployBundle,
    DeploymentView,
    ListDeployments,
    RollbackBundle,
    SetInfra,
)
from protocol.errors import BadRequest, Conflict, Forbidden, NotApproved, NotFound
from protocol.govern import (
    API,
    APPROVED,
    BUNDLE,
    PENDING,
    REJECTED,
    UNREVIEWED,
    GetReview,
    ListArtifacts,
    RequestReview,
    ReviewArtifact,
    review_key,
)
from tests.authstack import auth_stack
from tests.govstack import GovStack, gov_stack, people
from tests.helpers import fleet, wait_for

# -- the rules, without NATS -----------------------------------------------------------------


def test_a_requester_cannot_approve_their_own_request_but_may_withdraw_it() -> None:
    review = open_review(None, kind=BUNDLE, name="churn", version="v1", who="dora",
                         comment="", required=1, now=1.0)
    assert review is not None and review.status == PENDING
    with pytest.raises(Forbidden, match="dora requested the review of bundle churn v1 and "
                                        "cannot approve it") as info:
        answer(review, kind=BUNDLE, name="churn", version="v1", who="dora", approve=True,
               comment="", now=2.0)
    assert info.value.details["reason"] == SELF_APPROVAL
    withdrawn = answer(review, kind=BUNDLE, name="churn", version="v1", who="dora",
                       approve=False, comment="not ready", now=2.0)
    assert withdrawn is not None and withdrawn.status == REJECTED


def test_final_approval_needs_the_configured_number_and_one_rejection_rejects() -> None:
    kw = {"kind": BUNDLE, "name": "churn", "version": "v1"}
    review = open_review(None, who="dora", comment="", required=2, now=1.0, **kw)
    assert review is not None
    one = answer(review, who="rita", approve=True, comment="ok", now=2.0, **kw)
    assert one is not None and one.status == PENDING and one.standing() == (
        "review pending: 1/2 approvals")
    # The same answer again changes nothing (a retried command); another one is refused.
    assert answer(one, who="rita", approve=True, comment="ok", now=3.0, **kw) is None
    with pytest.raises(Conflict, match="rita already answered"):
        answer(one, who="rita", approve=False, comment="", now=3.0, **kw)
    two = answer(one, who="rob", approve=True, comment="", now=4.0, **kw)
    assert two is not None and two.status == APPROVED and two.decided_at == 4.0
    with pytest.raises(Conflict, match="already approved"):
        open_review(two, who="dan", comment="", required=1, now=5.0, **kw)

    rejected = answer(one, who="rob", approve=False, comment="no tests", now=4.0, **kw)
    assert rejected is not None and rejected.status == REJECTED
    assert rejected.standing() == "rejected by rob: no tests"
    with pytest.raises(Conflict, match=r"closed .*request a new review"):
        answer(rejected, who="roy", approve=True, comment="", now=5.0, **kw)
    again = open_review(rejected, who="dan", comment="tests added", required=2, now=6.0, **kw)
    assert again is not None and again.round == 2 and again.decisions == []
    with pytest.raises(Conflict, match="no review of bundle churn v2 is open"):
        answer(None, kind=BUNDLE, name="churn", version="v2", who="rita", approve=True,
               comment="", now=1.0)


# -- on a real stack ----------------------------------------------------------------------------


@asynccontextmanager
async def govstack(tmp_path: Path, approvals: int = 1) -> AsyncIterator[GovStack]:
    """(Task groups cannot live in an async fixture: it is set up in another task.)"""
    with auth_stack(tmp_path, *people()) as auth:
        async with fleet() as f, gov_stack(auth, f, approvals=approvals) as stack:
            yield stack


async def _approve(s: GovStack, kind: str, name: str, version: str) -> None:
    await s.as_("dora").call(RequestReview(kind=kind, name=name, version=version), timeout=5)
    view = await s.as_("rita").call(ReviewArtifact(kind=kind, name=name, version=version,
                                                   approve=True, comment="fine"), timeout=5)
    assert view.status == APPROVED


async def _reject(s: GovStack, kind: str, name: str, version: str) -> None:
    await s.as_("dora").call(RequestReview(kind=kind, name=name, version=version), timeout=5)
    view = await s.as_("rita").call(ReviewArtifact(kind=kind, name=name, version=version,
                                                   approve=False, comment="no tests"),
                                    timeout=5)
    assert view.status == REJECTED


async def test_the_policy_matrix_for_bundles_and_a_rollback_to_an_unapproved_bundle(
        tmp_path: Path) -> None:
    async with govstack(tmp_path) as gov:
        admin, dora = gov.as_("admin"), gov.as_("dora")
        for version in ("v1", "v2", "v3", "v4"):
            await gov.publish_bundle("churn", version)
        await _approve(gov, BUNDLE, "churn", "v1")
        await _reject(gov, BUNDLE, "churn", "v2")  # v3: never reviewed
        await dora.call(RequestReview(kind=BUNDLE, name="churn", version="v4"), timeout=5)
        for name, policy in (("p", "prevent"), ("w", "warn"), ("n", "none")):
            made = await admin.call(CreateInfra(name=name, kind="automation", govern=policy),
                                    timeout=5)
            assert made.infra.govern == policy

        missing = {
            "v2": "bundle churn v2 is not approved (rejected by rita: no tests)",
            "v3": "bundle churn v3 is not approved (not reviewed: request a review with "
                  "'shipyard govern request churn v3')",
            "v4": "bundle churn v4 is not approved (review pending: 0/1 approvals)",
        }
        for version in ("v1", "v2", "v3", "v4"):
            for infra in ("p", "w", "n"):
                cmd = DeployBundle(project="churn", bundle_id=version, infra=infra)
                if infra == "p" and version != "v1":
                    with pytest.raises(NotApproved) as info:
                        await dora.call(cmd, timeout=5)
                    assert info.value.message.startswith(missing[version])
                    assert "infra p deploys only approved artifacts" in info.value.message
                    assert info.value.details["missing"] == [missing[version]]
                    continue
                view: DeploymentView = await dora.call(cmd, timeout=5)
                assert view.desired == version
                assert view.last_update is not None
                expected = [missing[version]] if infra == "w" and version != "v1" else []
                assert view.last_update.warnings == expected
                assert [r for r in view.reasons if r.startswith("govern")] == [
                    f"govern warning: {w}" for w in expected]
                if expected:
                    assert view.health == WARNING

        # The prevent infra still runs the approved v1; the others the last deployed v4.
        listed = await dora.call(ListDeployments(project="churn"), timeout=5)
        by_infra = {d.infra: d for d in listed.deployments}
        assert {i: d.desired for i, d in by_infra.items()} == {"p": "v1", "w": "v4", "n": "v4"}
        assert by_infra["w"].health == WARNING
        assert f"govern warning: {missing['v4']}" in by_infra["w"].reasons
        assert not any(r.startswith("govern") for r in by_infra["n"].reasons)

        # A rollback to an unapproved bundle meets the policy too: v3 goes in under none ...
        await admin.call(SetInfra(name="p", govern="none"), timeout=5)
        await dora.call(DeployBundle(project="churn", bundle_id="v3", infra="p"), timeout=5)
        await dora.call(DeployBundle(project="churn", bundle_id="v1", infra="p"), timeout=5)
        updated = await admin.call(SetInfra(name="p", govern="prevent"), timeout=5)
        assert updated.changed and updated.infra.govern == "prevent"
        # ... and rolling back to it under prevent is refused, naming it.
        with pytest.raises(NotApproved, match="bundle churn v3 is not approved"):
            await dora.call(RollbackBundle(project="churn", infra="p"), timeout=5)
        with pytest.raises(NotApproved, match="bundle churn v2 is not approved"):
            await dora.call(RollbackBundle(project="churn", infra="p", to="v2"), timeout=5)
        # Under warn the rollback goes through, with its warning.
        back = await dora.call(RollbackBundle(project="churn", infra="w", to="v3"), timeout=5)
        assert back.desired == "v3" and back.last_update.warnings == [missing["v3"]]
        # Once approved, the rollback under prevent goes through.
        await _approve(gov, BUNDLE, "churn", "v3")
        done = await dora.call(RollbackBundle(project="churn", infra="p"), timeout=5)
        assert done.desired == "v3" and done.last_update.warnings == []


async def test_the_policy_matrix_for_api_versions_including_the_shadow_and_a_rollback(
        tmp_path: Path) -> None:
    async with govstack(tmp_path) as gov:
        admin, dora = gov.as_("admin"), gov.as_("dora")
        for version in ("1", "2", "3"):
            await gov.publish_api("score", version)
        await _approve(gov, API, "score", "1")
        await _reject(gov, API, "score", "2")  # 3: never reviewed
        await admin.call(CreateInfra(name="web", kind="api", govern="prevent"), timeout=5)
        rejected = "API score 2 is not approved (rejected by rita: no tests)"
        unreviewed = ("API score 3 is not approved (not reviewed: request a review with "
                      "'shipyard govern request api score 3')")

        first = await dora.call(DeployApi(service="score", infra="web", generations={"1": 100}),
                                timeout=5)
        assert first.last_update.warnings == []
        with pytest.raises(NotApproved) as info:
            await dora.call(DeployApi(service="score", infra="web",
                                      generations={"1": 90, "2": 10}, shadow="3"), timeout=5)
        assert info.value.details["missing"] == [rejected, unreviewed]
        with pytest.raises(NotApproved, match="API score 3 is not approved"):  # the shadow alone
            await dora.call(DeployApi(service="score", infra="web", generations={"1": 100},
                                      shadow="3"), timeout=5)
        with pytest.raises(NotApproved, match="API score 2 is not approved"):  # weight 0 too
            await dora.call(DeployApi(service="score", infra="web",
                                      generations={"1": 100, "2": 0}), timeout=5)

        with pytest.raises(NotFound, match="API package score 9 not found"):  # not "unapproved"
            await dora.call(DeployApi(service="score", infra="web", generations={"9": 100}),
                            timeout=5)

        await admin.call(SetInfra(name="web", govern="warn"), timeout=5)
        warned = await dora.call(DeployApi(service="score", infra="web",
                                           generations={"1": 50, "3": 50}, shadow="2"), timeout=5)
        assert warned.last_update.warnings == [rejected, unreviewed]
        assert warned.health == WARNING and f"govern warning: {unreviewed}" in warned.reasons

        await admin.call(SetInfra(name="web", govern="none"), timeout=5)
        plain = await dora.call(DeployApi(service="score", infra="web", generations={"3": 100}),
                                timeout=5)
        assert plain.last_update.warnings == []
        assert not any(r.startswith("govern") for r in plain.reasons)

        # Rolling back to the mapping before (1 and 3, shadow 2) under prevent: refused.
        await admin.call(SetInfra(name="web", govern="prevent"), timeout=5)
        with pytest.raises(NotApproved) as info:
            await dora.call(RollbackApi(service="score", infra="web"), timeout=5)
        assert info.value.details["missing"] == [rejected, unreviewed]


async def test_who_may_request_and_review_comes_from_the_signed_identity(
        tmp_path: Path) -> None:
    async with govstack(tmp_path) as gov:
        await gov.publish_bundle("churn", "v1")
        opened = await gov.as_("dora").call(
            RequestReview(kind=BUNDLE, name="churn", version="v1", by="rita"), timeout=5)
        # The name typed in ``by`` is not who signed: the verified identity is.
        assert opened.review.requested_by == "dora" and opened.changed
        with pytest.raises(Forbidden, match="dora requested the review of bundle churn v1 and "
                                            "cannot approve it"):
            await gov.as_("dora").call(ReviewArtifact(kind=BUNDLE, name="churn", version="v1",
                                                      approve=True, by="rob"), timeout=5)
        # A viewer may read, but not request or review (refused by the server itself).
        assert (await gov.as_("vera").call(GetReview(kind=BUNDLE, name="churn", version="v1"),
                                           timeout=5)).status == PENDING
        for cmd in (RequestReview(kind=BUNDLE, name="churn", version="v1"),
                    ReviewArtifact(kind=BUNDLE, name="churn", version="v1", approve=True)):
            with pytest.raises(Forbidden) as info:
                await gov.as_("vera").call(cmd, timeout=5)
            assert info.value.details["reason"] == "nats_permission"
        # A reviewer may not open a review (it needs a deployer).
        with pytest.raises(Forbidden):
            await gov.as_("rita").call(RequestReview(kind=BUNDLE, name="churn", version="v1"),
                                       timeout=5)
        # Unknown artifacts and malformed names are refused with what was expected.
        with pytest.raises(NotFound, match="bundle churn v9 not found"):
            await gov.as_("dora").call(RequestReview(kind=BUNDLE, name="churn", version="v9"),
                                       timeout=5)
        with pytest.raises(BadRequest, match="invalid artifact kind 'model'"):
            await gov.as_("dora").call(RequestReview(kind="model", name="churn", version="v1"),
                                       timeout=5)
        with pytest.raises(BadRequest, match="invalid govern policy 'maybe'"):
            await gov.as_("admin").call(CreateInfra(name="q", kind="automation", govern="maybe"),
                                        timeout=5)
        with pytest.raises(NotFound, match="unknown infra 'nope'"):
            await gov.as_("admin").call(SetInfra(name="nope", govern="warn"), timeout=5)
        approved = await gov.as_("rob").call(ReviewArtifact(kind=BUNDLE, name="churn",
                                                            version="v1", approve=True,
                                                            comment="lgtm"), timeout=5)
        assert approved.status == APPROVED
        assert [(d.by, d.verdict, d.comment) for d in approved.review.decisions] == [
            ("rob", "approve", "lgtm")]


async def test_the_registry_lists_every_bundle_and_api_version_with_its_review(
        tmp_path: Path) -> None:
    async with govstack(tmp_path) as gov:
        await gov.publish_bundle("churn", "v1")
        await gov.publish_api("score", "1.0")
        await _approve(gov, BUNDLE, "churn", "v1")
        await gov.publish_bundle("churn", "v2")  # published while the node runs

        async def listed() -> list[tuple[str, str, str, str]]:
            reply = await gov.as_("vera").call(ListArtifacts(), timeout=5)
            return [(r.kind, r.name, r.version, r.status) for r in reply.artifacts]

        want = [("api", "score", "1.0", UNREVIEWED), ("bundle", "churn", "v1", APPROVED),
                ("bundle", "churn", "v2", UNREVIEWED)]
        async def up_to_date() -> bool:
            return await listed() == want

        await wait_for(up_to_date, message="the registry up to date")
        reply = await gov.as_("vera").call(ListArtifacts(kind=BUNDLE), timeout=5)
        assert reply.projects == ["churn"] and reply.services == []
        assert [(r.version, r.approvals, r.required, r.requested_by) for r in reply.artifacts] == [
            ("v1", 1, 1, "dora"), ("v2", 0, 0, "")]


async def test_two_approvals_a_govern_restart_loses_nothing_and_deploys_need_no_govern_node(
        tmp_path: Path) -> None:
    with auth_stack(tmp_path, *people()) as auth:
        async with fleet() as f, gov_stack(auth, f, approvals=2) as gov:
            admin, dora = gov.as_("admin"), gov.as_("dora")
            await gov.publish_bundle("churn", "v1")
            await admin.call(CreateInfra(name="p", kind="automation", govern="prevent"),
                             timeout=5)
            await dora.call(RequestReview(kind=BUNDLE, name="churn", version="v1"), timeout=5)
            one = await gov.as_("rita").call(ReviewArtifact(
                kind=BUNDLE, name="churn", version="v1", approve=True, comment="ok"),
                timeout=5)
            assert one.status == PENDING and one.review.required == 2
            deploy = DeployBundle(project="churn", bundle_id="v1", infra="p")
            with pytest.raises(NotApproved, match=r"review pending: 1/2 approvals"):
                await dora.call(deploy, timeout=5)

            assert gov.govern is not None
            await f.stop(gov.govern)
            # With the Govern node down, the Deployer still answers at once from KV.
            with pytest.raises(NotApproved, match=r"review pending: 1/2 approvals"):
                await dora.call(deploy, timeout=5)

            await gov.start_govern(approvals=2)
            status = await gov.as_("vera").call(GetReview(kind=BUNDLE, name="churn",
                                                          version="v1"), timeout=5)
            assert status.status == PENDING
            assert status.review.requested_by == "dora"
            assert [(d.by, d.verdict, d.comment) for d in status.review.decisions] == [
                ("rita", "approve", "ok")]
            two = await gov.as_("rob").call(ReviewArtifact(
                kind=BUNDLE, name="churn", version="v1", approve=True), timeout=5)
            assert two.status == APPROVED

            await f.stop(gov.govern)  # an approval stands without the Govern node
            view = await dora.call(deploy, timeout=5)
            assert view.desired == "v1" and view.last_update.warnings == []


async def test_an_unreadable_review_record_is_no_approval_and_a_new_request_replaces_it(
        tmp_path: Path) -> None:
    async with govstack(tmp_path) as gov:
        admin, dora = gov.as_("admin"), gov.as_("dora")
        await gov.publish_bundle("churn", "v1")
        kv = await ensure_kv(gov.conns["admin"].jetstream(), subjects.GOVERN_BUCKET)
        await kv.put(review_key(BUNDLE, "churn", "v1"), b'{"status": "approved"')
        await admin.call(CreateInfra(name="p", kind="automation", govern="prevent"),
                         timeout=5)
        await admin.call(CreateInfra(name="w", kind="automation", govern="warn"), timeout=5)
        unreadable = "bundle churn v1 is not approved (its review record is unreadable)"
        with pytest.raises(NotApproved) as info:
            await dora.call(DeployBundle(project="churn", bundle_id="v1", infra="p"),
                            timeout=5)
        assert info.value.details["missing"] == [unreadable]
        warned = await dora.call(DeployBundle(project="churn", bundle_id="v1", infra="w"),
                                 timeout=5)
        assert warned.last_update.warnings == [unreadable]

        status = await gov.as_("vera").call(GetReview(kind=BUNDLE, name="churn",
                                                      version="v1"), timeout=5)
        assert status.status == UNREVIEWED and status.review is None
        await _approve(gov, BUNDLE, "churn", "v1")
        done = await dora.call(DeployBundle(project="churn", bundle_id="v1", infra="p"),
                               timeout=5)
        assert done.desired == "v1" and done.last_update.warnings == []
