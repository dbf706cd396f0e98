"""Signed artifacts: on a stack with identities, the Design node signs every bundle and
API package, and Automation and API nodes refuse one whose signature does not verify
against a trusted Design key, even when every digest matches; the old one keeps running."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nodes.api.node import ApiNode
from nodes.auth.artifacts import ArtifactTrust, bundle_bytes, sign_bundle
from nodes.auth.keys import Credentials, new_seed, public_key_of, read_credentials
from nodes.automation import AutomationNode
from nodes.runtime.calls import Caller
from protocol import subjects
from protocol.api import API_PACKAGE_INFO, CreateApiPackage, DeployApi, package_key
from protocol.auth import Identity
from protocol.base import encode
from protocol.bundles import BUNDLE_INFO, BundleInfo, CreateBundle, bundle_key
from protocol.deploy import CreateInfra, DeployBundle, DeploymentView, ListDeployments
from tests.apiproject import make_api_project
from tests.authstack import auth_stack, control_plane
from tests.helpers import wait_for
from tests.projects import make_project

HB = 0.2
UNTRUSTED = "signature does not verify against any trusted Design key"


def _sign_as(seed: str, data: bytes) -> str:
    kp = Credentials(name="x", kind="node", role="design", seed=seed).keypair()
    return base64.b64encode(kp.sign(data)).decode()


async def _view(admin: Caller, infra: str) -> DeploymentView:
    return (await admin.call(ListDeployments(infra=infra))).deployments[0]


async def _settled(admin: Caller, infra: str, update_id: str, result: str,
                   ) -> DeploymentView | None:
    v = await _view(admin, infra)
    last = v.last_update
    return v if last is not None and last.id == update_id and last.result == result else None


async def test_an_artifact_not_signed_by_a_design_key_is_refused_and_the_old_one_runs_on(
        tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn", version="1")
    make_api_project(tmp_path / "ws", version="1")
    with auth_stack(tmp_path) as stack:
        async with control_plane(stack, tmp_path, HB) as (admin, f):
            auto = await f.start(AutomationNode(
                name="automation-1", infra="automation",
                nats=stack.settings("automation-1"), data_dir=tmp_path / "a1",
                heartbeat_interval=HB, resync_interval=1.0))
            await f.start(ApiNode(name="api-1", infra="api", nats=stack.settings("api-1"),
                                  data_dir=tmp_path / "api1", http_port=0,
                                  http_host="127.0.0.1", heartbeat_interval=HB,
                                  resync_interval=1.0, metrics_interval=0.5, workers=1))
            await admin.call(CreateInfra(name="automation", kind="automation"))
            await admin.call(CreateInfra(name="api", kind="api"))
            for version in ("v1", "v2"):
                await admin.call(CreateBundle(project="churn", bundle_id=version),
                                 timeout=30)
                await admin.call(CreateApiPackage(project="churn", service="churn-api",
                                                  version=version), timeout=30)

            js = admin.nc.jetstream()
            bundles = await js.key_value(subjects.BUNDLE_BUCKET)
            packages = await js.key_value(subjects.API_PACKAGE_BUCKET)
            b2 = BUNDLE_INFO.decode((await bundles.get(bundle_key("churn", "v2"))).value)
            p2 = API_PACKAGE_INFO.decode(
                (await packages.get(package_key("churn-api", "v2"))).value)
            assert b2.signed_by == "design" and b2.signature
            assert p2.signed_by == "design" and p2.signature

            d1 = await admin.call(DeployBundle(project="churn", bundle_id="v1",
                                               infra="automation", by="admin"))
            a1 = await admin.call(DeployApi(service="churn-api", infra="api",
                                            generations={"v1": 100}))
            assert d1.last_update is not None and a1.last_update is not None
            await wait_for(lambda: _settled(admin, "automation", d1.last_update.id,
                                            "succeeded"), timeout=60, message="bundle v1")
            await wait_for(lambda: _settled(admin, "api", a1.last_update.id,
                                            "succeeded"), timeout=60, message="api v1")

            # The bundle's record re-signed by a key that is not a Design node's (the
            # admin's), every digest left as it is.
            admin_seed = read_credentials(stack.store.creds_path("admin")).seed
            resigned = msgspec.structs.replace(
                b2, signature=_sign_as(admin_seed, bundle_bytes(b2)), signed_by="admin")
            await bundles.put(bundle_key("churn", "v2"), encode(resigned))
            # The package's record claims the Design node with another record's
            # signature.
            tampered = msgspec.structs.replace(p2, signature=(
                API_PACKAGE_INFO.decode((await packages.get(
                    package_key("churn-api", "v1"))).value).signature))
            await packages.put(package_key("churn-api", "v2"), encode(tampered))

            d2 = await admin.call(DeployBundle(project="churn", bundle_id="v2",
                                               infra="automation", by="admin"))
            a2 = await admin.call(DeployApi(service="churn-api", infra="api",
                                            generations={"v2": 100}))
            assert d2.last_update is not None and a2.last_update is not None
            bad_bundle = await wait_for(
                lambda: _settled(admin, "automation", d2.last_update.id, "failed"),
                timeout=60, message="bundle v2 refused")
            bad_api = await wait_for(
                lambda: _settled(admin, "api", a2.last_update.id, "failed"),
                timeout=60, message="api v2 refused")

            reasons = " ".join(bad_bundle.reasons)
            assert f"bundle churn v2: {UNTRUSTED}" in reasons
            assert "'admin' is a user of role admin" in reasons
            assert [n.running for n in bad_bundle.nodes] == ["v1"]
            assert auto.store.active("churn") == "v1"
            reasons = " ".join(bad_api.reasons)
            assert f"API package churn-api v2: {UNTRUSTED}" in reasons
            assert "does not match the record" in reasons
            assert [n.running for n in bad_api.nodes] == ["v1"]


# -- the check itself ---------------------------------------------------------------------

def _trust(**identities: Identity) -> ArtifactTrust:
    return ArtifactTrust(identities.get)


def _design(name: str, seed: str, *, role: str = "design", kind: str = "node",
            revoked: bool = False) -> Identity:
    return Identity(name=name, kind=kind, role=role, public_key=public_key_of(seed),
                    revoked_at=1.0 if revoked else None)


class _Settings:
    def __init__(self, path: Path | None) -> None:
        self.creds_file = str(path) if path else None


def _signed(tmp_path: Path, seed: str, name: str = "design") -> BundleInfo:
    from nodes.auth.keys import write_credentials
    creds = write_credentials(tmp_path / f"{name}.creds", Credentials(
        name=name, kind="node", role="design", seed=seed))
    info = BundleInfo(id="v3", project="churn", created_at=1.0, created_by="x",
                      digest="d" * 64, archive_sha256="a" * 64)
    return sign_bundle(_Settings(creds), info)


def test_a_design_signature_verifies_and_any_change_to_what_it_covers_breaks_it(
        tmp_path: Path) -> None:
    seed = new_seed()
    info = _signed(tmp_path, seed)
    trust = _trust(design=_design("design", seed))
    assert trust.bundle_refusal(info) is None
    for change in ({"id": "v4"}, {"project": "other"}, {"digest": "e" * 64},
                   {"archive_sha256": "b" * 64}, {"signature": "not base64!"}):
        bad = msgspec.structs.replace(info, **change)
        reason = trust.bundle_refusal(bad)
        assert reason is not None and UNTRUSTED in reason, change


@pytest.mark.parametrize(("signer", "why"), [
    (None, "is not a known identity"),
    ("viewer", "not a Design node"),
    ("revoked", "was revoked"),
])
def test_only_a_current_design_identity_is_trusted(tmp_path: Path, signer: str | None,
                                                   why: str) -> None:
    seed = new_seed()
    info = _signed(tmp_path, seed)
    identities: dict[str, Any] = {}
    if signer == "viewer":
        identities["design"] = _design("design", seed, role="viewer", kind="user")
    elif signer == "revoked":
        identities["design"] = _design("design", seed, revoked=True)
    reason = _trust(**identities).bundle_refusal(info)
    assert reason is not None and reason.startswith(f"bundle churn v3: {UNTRUSTED}")
    assert why in reason


def test_unsigned_artifacts_run_on_an_insecure_stack_and_are_refused_with_trust_on(
        tmp_path: Path) -> None:
    info = sign_bundle(_Settings(None), BundleInfo(id="v3", project="churn", created_at=1.0,
                                                   created_by="x"))
    assert info.signature == "" and info.signed_by == ""
    assert ArtifactTrust(None).bundle_refusal(info) is None
    reason = _trust(design=_design("design", new_seed())).bundle_refusal(info)
    assert reason == f"bundle churn v3: {UNTRUSTED} (the record is not signed)"
