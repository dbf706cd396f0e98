"""Signed commands: the Deployer acts only on a command signed by a known identity whose
role allows it, fresh and never seen before; everything else is a typed ``forbidden``."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from nodes.api.gateway import Gateway
from nodes.api.metrics import Metrics
from nodes.auth.guard import CommandGuard, Refusal
from nodes.auth.keys import Credentials, new_seed, public_key_of
from nodes.auth.registry import publish_identities
from nodes.auth.signing import Signer
from nodes.deployer import DeployerNode
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect, denials_of
from nodes.runtime.requests import pending_count, requester
from protocol import auth, subjects
from protocol.api import HTTP_STATUS, ApiDeploymentRecord, ApiMapping
from protocol.auth import Identity
from protocol.base import Reply, make_request, tag_of
from protocol.deploy import CreateInfra, DeployBundle, ListInfras
from protocol.errors import Forbidden
from protocol.registry import ListNodes
from tests.authstack import AuthStack, auth_stack
from tests.helpers import running, wait_for

SUBJECT = subjects.command("deployer", tag_of(DeployBundle))
CMD = DeployBundle(project="churn", bundle_id="v1", infra="prod", by="alice")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def identity(name: str, role: str, seed: str, *, revoked: bool = False) -> Identity:
    return Identity(name=name, kind="user", role=role, public_key=public_key_of(seed),
                    revoked_at=1.0 if revoked else None)


class World:
    """A guard with three identities and a clock the test moves."""

    def __init__(self) -> None:
        self.seeds = {name: new_seed() for name in ("alice", "vera", "rex")}
        self.ids = {"alice": identity("alice", "deployer", self.seeds["alice"]),
                    "vera": identity("vera", "viewer", self.seeds["vera"]),
                    "rex": identity("rex", "admin", self.seeds["rex"], revoked=True)}
        self.clock = Clock(time.time())  # envelopes carry the real time
        self.refusals: list[Refusal] = []
        self.guard = CommandGuard(self.ids.get, clock=self.clock,
                                  on_refusal=self.refusals.append)

    def signed(self, name: str, cmd: Any = CMD, subject: str = SUBJECT,
               seed: str | None = None) -> bytes:
        creds = Credentials(name=name, kind="user", role="x", seed=seed or self.seeds[name])
        return Signer(creds).request(subject, cmd)

    def refused(self, data: bytes, command: type[Any] = DeployBundle) -> str:
        with pytest.raises(Forbidden) as info:
            self.guard.check(SUBJECT, data, command)
        reason = info.value.details["reason"]
        assert self.refusals[-1].reason == reason  # every refusal reaches the audit seam
        return str(reason)


@pytest.fixture
def world() -> World:
    return World()


def test_a_signed_command_from_a_known_identity_with_the_role_is_accepted(world: World) -> None:
    assert world.guard.check(SUBJECT, world.signed("alice"), DeployBundle).name == "alice"
    assert world.refusals == []


def test_a_forged_or_altered_command_is_refused(world: World) -> None:
    forged = world.signed("alice", seed=new_seed())  # someone else's key, alice's name
    assert world.refused(forged) == auth.BAD_SIGNATURE
    good = world.signed("alice")
    altered = good.replace(b'"bundle_id":"v1"', b'"bundle_id":"v6"')
    assert altered != good
    assert world.refused(altered) == auth.BAD_SIGNATURE
    # Signed for another subject (say, a read command), replayed on this one.
    other = world.signed("alice", subject=subjects.command("deployer", "deploy.list"))
    assert world.refused(other) == auth.BAD_SIGNATURE


def test_unsigned_unknown_and_revoked_identities_are_refused(world: World) -> None:
    assert world.refused(make_request(CMD)) == auth.UNSIGNED
    stranger = Credentials(name="mallory", kind="user", role="admin", seed=new_seed())
    assert world.refused(Signer(stranger).request(SUBJECT, CMD)) == auth.UNKNOWN_IDENTITY
    assert world.refused(world.signed("rex")) == auth.REVOKED


def test_a_stale_command_is_refused_and_a_replayed_one_too(world: World) -> None:
    data = world.signed("alice")
    world.guard.check(SUBJECT, data, DeployBundle)
    assert world.refused(data) == auth.REPLAYED
    late = world.signed("alice")
    world.clock.now += auth.MAX_AGE_S + 1
    assert world.refused(late) == auth.STALE
    world.clock.now -= 2 * auth.MAX_AGE_S + 5  # the sender's clock runs far ahead
    assert world.refused(world.signed("alice")) == auth.STALE


def test_the_replay_cache_forgets_nonces_once_their_commands_are_too_old(world: World) -> None:
    for _ in range(50):
        world.guard.check(SUBJECT, world.signed("alice"), DeployBundle)
    assert world.guard.remembered == 50
    world.clock.now += auth.MAX_AGE_S + 1
    with pytest.raises(Forbidden):  # stale anyway, and the cache is emptied on the way
        world.guard.check(SUBJECT, world.signed("alice"), DeployBundle)
    assert world.guard.remembered == 0


def test_a_full_replay_cache_refuses_instead_of_forgetting(world: World) -> None:
    world.guard.cache_max = 3
    for _ in range(3):
        world.guard.check(SUBJECT, world.signed("alice"), DeployBundle)
    assert world.refused(world.signed("alice")) == auth.REPLAY_CACHE_FULL


def test_a_role_may_send_only_its_commands(world: World) -> None:
    listing = subjects.command("deployer", tag_of(ListInfras))
    assert world.guard.check(listing, world.signed("vera", ListInfras(), listing),
                             ListInfras).name == "vera"
    assert world.refused(world.signed("vera")) == auth.ROLE
    # A node identity whose role is spelled like a human one is still a node.
    world.ids["deployer"] = Identity(name="deployer", kind="node", role="deployer",
                                     public_key=public_key_of(world.seeds["alice"]))
    assert world.refused(world.signed("deployer", seed=world.seeds["alice"])) == auth.ROLE
    infra = subjects.command("deployer", tag_of(CreateInfra))
    with pytest.raises(Forbidden, match="needs role admin"):
        world.guard.check(infra, world.signed("alice", CreateInfra(name="x", kind="automation"),
                                              infra), CreateInfra)


def test_every_command_a_role_answers_has_a_required_role_and_forbidden_is_403() -> None:
    from protocol.families import ALL
    for family in ALL:
        if family.direct:
            continue  # node-direct commands: only the control plane may publish them
        for verb, cls in family.verbs.items():
            assert cls in auth.REQUIRED_ROLE, f"{family.role} {verb} has no required role"
    assert HTTP_STATUS[Forbidden.code] == 403


# -- against a real Deployer on a server with auth ----------------------------------------

@pytest.fixture
def stack(tmp_path: Path) -> Iterator[AuthStack]:
    with auth_stack(tmp_path, ("dora", "user", "deployer", None),
                    ("vera", "user", "viewer", None)) as s:
        yield s


async def _publish(stack: AuthStack) -> None:
    nc = await connect(stack.settings("admin"), name="test-admin")
    try:
        await publish_identities(nc, stack.store.identities())
    finally:
        await close(nc)


async def test_the_deployer_refuses_forged_revoked_unsigned_and_replayed_commands(
        stack: AuthStack) -> None:
    await _publish(stack)
    deployer = DeployerNode(name="deployer", nats=stack.settings("deployer"),
                            heartbeat_interval=0.2)
    async with running(deployer):
        admin_nc = await connect(stack.settings("admin"), name="admin")
        dora_nc = await connect(stack.settings("dora"), name="dora")
        vera_nc = await connect(stack.settings("vera"), name="vera")
        govern_nc = await connect(stack.settings("govern"), name="govern")
        try:
            admin, dora = Caller(admin_nc), Caller(dora_nc)
            await admin.call(CreateInfra(name="prod", kind="automation"), timeout=5)
            assert [i.name for i in (await dora.call(ListInfras(), timeout=5)).infras] == ["prod"]
            assert (await Caller(vera_nc).call(ListNodes(), timeout=5)).nodes is not None

            # Refused by nats-server (a deployer may not publish infra.create), at once.
            started = time.monotonic()
            with pytest.raises(Forbidden) as info:
                await dora.call(CreateInfra(name="stage", kind="automation"), timeout=30)
            assert info.value.details["reason"] == "nats_permission"
            assert time.monotonic() - started < 10  # not the request's timeout
            assert denials_of(dora_nc) is not None
            assert pending_count(dora_nc) == 0  # nothing left behind
            # Refused by the Deployer: a node identity sends no admin command.
            with pytest.raises(Forbidden, match="may not send this command"):
                await Caller(govern_nc).call(CreateInfra(name="stage", kind="automation"),
                                             timeout=5)

            # Unsigned, on a connection that may publish the subject.
            subject = subjects.command("deployer", tag_of(ListInfras))
            reply = await admin_nc.request(subject, make_request(ListInfras()), timeout=5)
            error = msgspec.json.decode(reply.data, type=Reply[Any]).error
            assert error is not None and error.code == "forbidden"
            assert error.details["reason"] == auth.UNSIGNED

            # A command captured from the wire and sent again.
            signer = Signer(Credentials(name="admin", kind="user", role="admin",
                                        seed=_seed(stack, "admin")))
            captured = signer.request(subject, ListInfras())
            first = await admin_nc.request(subject, captured, timeout=5)
            assert msgspec.json.decode(first.data, type=Reply[Any]).error is None
            again = await admin_nc.request(subject, captured, timeout=5)
            error = msgspec.json.decode(again.data, type=Reply[Any]).error
            assert error is not None and error.details["reason"] == auth.REPLAYED

            # A forged signature: the admin's name, another key.
            forged = Signer(Credentials(name="admin", kind="user", role="admin",
                                        seed=new_seed())).request(subject, ListInfras())
            bad = await admin_nc.request(subject, forged, timeout=5)
            error = msgspec.json.decode(bad.data, type=Reply[Any]).error
            assert error is not None and error.details["reason"] == auth.BAD_SIGNATURE

            # Revoked: refused as soon as verifiers hear of it, before any server reload.
            stack.store.revoke("dora")
            await _publish(stack)
            async def dora_refused() -> bool:
                try:
                    await dora.call(ListInfras(), timeout=5)
                except Forbidden as exc:
                    return bool(exc.details.get("reason") == auth.REVOKED)
                return False

            await wait_for(dora_refused, message="the revoked identity refused")
            assert deployer.requests_failed >= 5
        finally:
            for nc in (admin_nc, dora_nc, vera_nc, govern_nc):
                await close(nc)


def _seed(stack: AuthStack, name: str) -> str:
    from nodes.auth.keys import read_credentials
    return read_credentials(stack.store.creds_path(name)).seed


async def test_a_refused_publish_fails_only_the_requests_sent_to_that_subject(
        stack: AuthStack) -> None:
    """The server's refusal of one subject fails that call at once; a request to a
    subject the identity may publish, in flight on the same connection, gets its reply."""
    await _publish(stack)
    allowed = subjects.command("deployer", tag_of(ListInfras))
    admin_nc = await connect(stack.settings("admin"), name="admin")
    dora_nc = await connect(stack.settings("dora"), name="dora")
    try:
        release = anyio.Event()
        received = anyio.Event()

        async def slow_answer(msg: Msg) -> None:
            received.set()
            await release.wait()
            await msg.respond(b"late but allowed")

        await admin_nc.subscribe(allowed, cb=slow_answer)
        await admin_nc.flush()
        replies: list[bytes] = []

        async def allowed_request() -> None:
            msg = await requester(dora_nc).request(allowed, b"{}", timeout=30,
                                                  accept=lambda _: True)
            replies.append(msg.data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(allowed_request)
            with anyio.fail_after(10):
                await received.wait()
            with anyio.fail_after(10), pytest.raises(Forbidden) as info:
                await Caller(dora_nc).call(CreateInfra(name="stage", kind="automation"),
                                           timeout=30)
            assert info.value.details["reason"] == "nats_permission"
            assert pending_count(dora_nc) == 1 and not replies  # still waiting
            release.set()
        assert replies == [b"late but allowed"]
        assert pending_count(dora_nc) == 0
    finally:
        await close(dora_nc)
        await close(admin_nc)


@pytest.mark.parametrize(("endpoint", "action"), [("predict", "predict"), ("score", "run")])
async def test_a_gateway_whose_identity_may_not_request_apis_answers_503_at_once(
        stack: AuthStack, endpoint: str, action: str) -> None:
    """A prediction (hedged) or a function call through a gateway running with a
    viewer's credentials: the server refuses the publish, and the HTTP answer says so
    at once instead of after the gateway's timeout."""
    await _publish(stack)
    vera_nc = await connect(stack.settings("vera"), name="vera")
    try:
        gateway = Gateway(vera_nc, Metrics("gw", "gateway"), timeout=30.0)
        kind = "prediction" if action == "predict" else "function"
        gateway.services = {"svc": ApiDeploymentRecord(
            service="svc", infra="api", mapping=ApiMapping(generations={"v1": 100}),
            endpoints={endpoint: kind})}
        with anyio.fail_after(10):
            status, body = await gateway.handle("svc", endpoint, action, b"{}", None, None,
                                                None)
        assert status == 503
        error = msgspec.json.decode(body)["error"]
        assert error["code"] == "unavailable"
        assert f"send requests to {subjects.api_endpoint('svc', endpoint)}" in error["message"]
        assert "gateway or api credentials" in error["message"]
        assert pending_count(vera_nc) == 0
    finally:
        await close(vera_nc)


def test_signing_leaves_the_signature_verifiable_by_the_public_key_alone() -> None:
    seed = new_seed()
    data = Signer(Credentials(name="a", kind="user", role="admin", seed=seed)).request(
        SUBJECT, CMD)
    part = auth.SIGNED_PART.decode(data)
    assert part.identity == "a" and part.nonce and part.signature
    signed = auth.signed_bytes(SUBJECT, part.id, part.ts, part.nonce, "a", part.body)
    from nodes.auth.keys import verify
    assert verify(public_key_of(seed), signed, base64.b64decode(part.signature))
