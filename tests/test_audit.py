"""The audit ledger: every command the Deployer receives, accepted or refused, is appended
with who sent it and what came of it; nobody can remove an entry; and ``audit at T``
answers what was deployed at a time, across deploys and a rollback."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import pytest

from nodes.auth.keys import Credentials, new_seed, read_credentials
from nodes.auth.registry import publish_identities
from nodes.auth.signing import Signer
from nodes.deployer import DeployerNode
from nodes.design import DesignNode
from nodes.runtime.audit import AuditRecorder, deployed_at, read_audit
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.logs import get_logger
from nodes.runtime.settings import NatsSettings
from protocol import auth, subjects
from protocol.api import CreateApiPackage, DeployApi, RollbackApi
from protocol.audit import ERROR, OK, AuditEntry
from protocol.base import Reply, Request, encode, make_request, new_id, tag_of
from protocol.bundles import CreateBundle
from protocol.deploy import CreateInfra, DeployBundle, ListInfras, RollbackBundle
from protocol.errors import Forbidden
from tests.apiproject import make_api_project
from tests.authstack import AuthStack, auth_stack
from tests.helpers import (
    Background,
    ashipyard,
    fleet,
    gather,
    running,
    shipyard_argv,
    wait_for,
)
from tests.projects import make_project

HB = 0.2
LIST = subjects.command("deployer", tag_of(ListInfras))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[AuthStack]:
    with auth_stack(tmp_path, ("dora", "user", "deployer", None),
                    ("vera", "user", "viewer", None),
                    ("a1", "node", "automation", "prod")) as s:
        yield s


async def _publish(stack: AuthStack) -> None:
    nc = await connect(stack.settings("admin"), name="test-admin")
    try:
        await publish_identities(nc, stack.store.identities())
    finally:
        await close(nc)


def _seed(stack: AuthStack, name: str) -> str:
    return read_credentials(stack.store.creds_path(name)).seed


def _signed(seed: str, name: str, cmd: Any, *, ts: float, request_id: str) -> bytes:
    """A command signed by ``name`` as if sent at ``ts``."""
    raw = encode(cmd)
    nonce = base64.urlsafe_b64encode(os.urandom(12)).decode()
    signer = Signer(Credentials(name=name, kind="user", role="x", seed=seed))
    sig = signer.sign(auth.signed_bytes(LIST, request_id, ts, nonce, name, raw))
    return encode(Request(body=msgspec.Raw(raw), id=request_id, ts=ts, identity=name,
                          signature=sig, nonce=nonce))


async def _error_of(nc: Any, data: bytes) -> Any:
    reply = await nc.request(LIST, data, timeout=5)
    return msgspec.json.decode(reply.data, type=Reply[Any]).error


async def _ledger(nc: Any) -> list[AuditEntry]:
    return [e async for _, e, _ in read_audit(nc) if e is not None]


async def test_every_accepted_and_refused_command_is_in_the_ledger_with_identity_and_outcome(
        stack: AuthStack) -> None:
    await _publish(stack)
    deployer = DeployerNode(name="deployer", nats=stack.settings("deployer"),
                            heartbeat_interval=HB)
    async with running(deployer):
        conns = {name: await connect(stack.settings(name), name=name)
                 for name in ("admin", "dora", "vera", "govern")}
        try:
            admin_nc = conns["admin"]
            admin, dora = Caller(admin_nc), Caller(conns["dora"])
            await admin.call(CreateInfra(name="prod", kind="automation"), timeout=5)
            await dora.call(ListInfras(), timeout=5)
            with pytest.raises(Forbidden):  # a viewer may read, not create
                await Caller(conns["vera"]).call(
                    CreateInfra(name="x", kind="automation"), timeout=5)

            with pytest.raises(Forbidden, match="may not send this command"):
                await Caller(conns["govern"]).call(
                    CreateInfra(name="x", kind="automation"), timeout=5)

            seed = _seed(stack, "admin")
            unsigned = make_request(ListInfras())
            assert (await _error_of(admin_nc, unsigned)).details["reason"] == auth.UNSIGNED
            captured = _signed(seed, "admin", ListInfras(), ts=time.time(),
                               request_id="captured")
            assert await _error_of(admin_nc, captured) is None
            assert (await _error_of(admin_nc, captured)).details["reason"] == auth.REPLAYED
            forged = _signed(new_seed(), "admin", ListInfras(), ts=time.time(),
                             request_id="forged")
            assert (await _error_of(admin_nc, forged)).details["reason"] == auth.BAD_SIGNATURE
            stale = _signed(seed, "admin", ListInfras(), ts=time.time() - 120,
                            request_id="stale")
            assert (await _error_of(admin_nc, stale)).details["reason"] == auth.STALE

            stack.store.revoke("dora")
            await _publish(stack)

            async def dora_refused() -> bool:
                try:
                    await dora.call(ListInfras(), timeout=5)
                except Forbidden as exc:
                    return bool(exc.details.get("reason") == auth.REVOKED)
                return False

            await wait_for(dora_refused, message="the revoked identity refused")

            # A viewer reads the ledger (its NATS user may read the stream, not write it).
            vera = conns["vera"]

            async def complete() -> list[AuditEntry] | None:
                entries = await _ledger(vera)
                reasons = {e.reason for e in entries}
                wanted = {auth.UNSIGNED, auth.REPLAYED, auth.BAD_SIGNATURE, auth.STALE,
                          auth.REVOKED, auth.ROLE}
                return entries if wanted <= reasons else None

            entries = await wait_for(complete, message="every refusal in the ledger")
            by_request = {e.request_id: e for e in entries}
            create = next(e for e in entries if e.command == tag_of(CreateInfra)
                          and e.outcome == OK)
            assert (create.identity, create.verified, create.node, create.role) == (
                "admin", True, "deployer", "deployer")
            assert msgspec.json.decode(create.args)["name"] == "prod"
            assert create.subject == subjects.command("deployer", tag_of(CreateInfra))
            assert abs(create.ts - time.time()) < 60
            assert any(e.identity == "dora" and e.verified and e.outcome == OK
                       and e.command == tag_of(ListInfras) for e in entries)
            # nats-server refused the viewer's publish: the Deployer never saw it.
            assert not any(e.identity == "vera" for e in entries)
            role = next(e for e in entries if e.reason == auth.ROLE)
            assert (role.identity, role.command, role.error_code) == (
                "govern", tag_of(CreateInfra), "forbidden")

            ok_once = [e for e in entries if e.request_id == "captured"]
            assert [(e.outcome, e.reason) for e in ok_once] == [
                (OK, None), (ERROR, auth.REPLAYED)]
            assert ok_once[1].identity == "admin" and not ok_once[1].verified
            for rid, reason in (("forged", auth.BAD_SIGNATURE), ("stale", auth.STALE)):
                e = by_request[rid]
                assert (e.identity, e.verified, e.outcome, e.error_code, e.reason) == (
                    "admin", False, ERROR, "forbidden", reason)
                assert e.error and msgspec.json.decode(e.args)["type"] == tag_of(ListInfras)
            unsigned_entry = next(e for e in entries if e.reason == auth.UNSIGNED)
            assert unsigned_entry.identity is None and unsigned_entry.error_code == "forbidden"
            revoked = next(e for e in entries if e.reason == auth.REVOKED)
            assert revoked.identity == "dora" and not revoked.verified
            assert "revoked" in (revoked.error or "")
            assert deployer.audit is not None and deployer.audit.dropped == 0

            # The CLI, as the viewer: --who filters, --json carries the typed entry.
            env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
            env["SHIPYARD_IDENTITY"] = str(stack.store.creds_path("vera"))
            proc = await ashipyard("audit", "--who", "dora", "--since", "10m", "--json",
                            "--nats", stack.server.url, env=env, check=True)
            listed = json.loads(proc.stdout)
            assert listed and {e["identity"] for e in listed} == {"dora"}
            assert {e["reason"] for e in listed} >= {None, auth.REVOKED}
            table = await ashipyard("audit", "--nats", stack.server.url, env=env, check=True)
            assert "replayed" in table.stdout and "admin (claimed)" in table.stdout
        finally:
            for nc in conns.values():
                await close(nc)


async def test_nobody_can_delete_purge_shrink_or_write_the_audit_stream(
        stack: AuthStack) -> None:
    await _publish(stack)
    deployer = DeployerNode(name="deployer", nats=stack.settings("deployer"),
                            heartbeat_interval=HB)
    async with running(deployer):
        async with stack.connect("admin") as admin:
            with pytest.raises(Forbidden):  # a plain connection signs nothing: refused
                await Caller(admin.nc).call(ListInfras(), timeout=5)
            await wait_for(lambda: _count(admin.nc), message="one entry")
            # A refused publish gets no answer: 1 s is plenty to wait for one that would.
            js = admin.nc.jetstream(timeout=1)
            # Refused by the stream itself (deny_purge, deny_delete), whoever asks.
            with pytest.raises(nats.js.errors.ServerError, match="purge not permitted"):
                await js.purge_stream(subjects.AUDIT_STREAM)
            with pytest.raises(nats.js.errors.ServerError, match="delete not permitted"):
                await js.delete_msg(subjects.AUDIT_STREAM, 1)
            # Refused by nats-server's permissions, the admin's included: the flags do
            # not cover deleting the whole stream or shrinking its limits.
            with pytest.raises(nats.errors.Error):
                await js.delete_stream(subjects.AUDIT_STREAM)
            await admin.denied(f"$JS.API.STREAM.DELETE.{subjects.AUDIT_STREAM}")
            info = await js.stream_info(subjects.AUDIT_STREAM)
            shrunk = info.config
            shrunk.max_msgs = 1
            with pytest.raises(nats.errors.Error):
                await js.update_stream(shrunk)
            await admin.denied(f"$JS.API.STREAM.UPDATE.{subjects.AUDIT_STREAM}")
            await admin.nc.publish(subjects.audit("deployer", "deployer"), b"{}")
            await admin.denied(subjects.audit("deployer", "deployer"))
        async with stack.connect("deployer") as node:  # the Deployer's own user neither
            with pytest.raises(nats.errors.Error):
                await node.nc.jetstream(timeout=1).delete_stream(subjects.AUDIT_STREAM)
            await node.denied(f"$JS.API.STREAM.DELETE.{subjects.AUDIT_STREAM}")
        for name in ("vera", "a1"):
            async with stack.connect(name) as other:
                await other.nc.publish(subjects.audit("deployer", "deployer"), b"{}")
                await other.denied(subjects.audit("deployer", "deployer"))
        async with stack.connect("admin") as admin:
            info = await admin.nc.jetstream().stream_info(subjects.AUDIT_STREAM)
            assert info.config.deny_delete and info.config.deny_purge
            assert info.config.max_msgs != 1
            entries = await _ledger(admin.nc)
            assert entries and all(e.node == "deployer" for e in entries)  # nothing forged


async def test_a_command_replayed_to_a_restarted_deployer_is_refused_and_audited(
        stack: AuthStack) -> None:
    """The nonce is claimed stack-wide (``sy_nonces``), not only in the process that saw
    it: a Deployer started after the first one stopped refuses the replay."""
    await _publish(stack)
    seed = _seed(stack, "admin")
    captured = _signed(seed, "admin", ListInfras(), ts=time.time(), request_id="wire")
    async with stack.connect("admin") as admin:
        first = DeployerNode(name="deployer", nats=stack.settings("deployer"),
                             heartbeat_interval=HB)
        async with running(first):
            assert await _error_of(admin.nc, captured) is None
        restarted = DeployerNode(name="deployer", nats=stack.settings("deployer"),
                                 heartbeat_interval=HB)
        async with running(restarted):
            error = await _error_of(admin.nc, captured)
            assert error is not None and error.code == "forbidden"
            assert error.details["reason"] == auth.REPLAYED
            # A fresh command from the same identity is still accepted.
            fresh = _signed(seed, "admin", ListInfras(), ts=time.time(), request_id="new")
            assert await _error_of(admin.nc, fresh) is None

            async def both() -> list[AuditEntry] | None:
                wire = [e for e in await _ledger(admin.nc) if e.request_id == "wire"]
                return wire if len(wire) == 2 else None

            wire = await wait_for(both, message="both fates of the captured command")
        assert [(e.outcome, e.reason, e.identity) for e in wire] == [
            (OK, None, "admin"), (ERROR, auth.REPLAYED, "admin")]
        assert wire[0].node == wire[1].node == "deployer"
        # Nobody but the control plane may write a nonce (nor so burn another's).
        async with stack.connect("a1") as node:
            key = auth.nonce_key("admin", auth.nonce_digest("x"))
            await node.nc.publish(f"$KV.{subjects.NONCES_BUCKET}.{key}", b"")
            await node.denied(f"$KV.{subjects.NONCES_BUCKET}")


async def test_entries_of_commands_answered_just_before_sigterm_reach_the_ledger(
        stack: AuthStack, cli_env: dict[str, str], tmp_path: Path) -> None:
    """A graceful stop appends what the recorder still buffers (bounded by a timeout)."""
    await _publish(stack)
    deployer = Background(shipyard_argv(
        "node", "start", "deployer", "--name", "deployer", "--nats", stack.server.url,
        "--creds", str(stack.store.creds_path("deployer")), "--heartbeat-interval", "0.5"),
        env={**cli_env, "SHIPYARD_LOG_FORMAT": "json"}, cwd=tmp_path)
    try:
        deployer.wait_line("node ready", timeout=30)
        nc = await connect(stack.settings("admin"), name="test-admin")
        try:
            caller = Caller(nc, sender="test")
            ids = [f"burst-{i}" for i in range(150)]
            # Answered at once; their entries are appended one JetStream publish at a
            # time behind the replies, so most are still buffered when SIGTERM comes.
            await gather(*(caller.call(ListInfras(), request_id=rid, timeout=20)
                           for rid in ids))
            assert deployer.stop(signal.SIGTERM, timeout=30) == 0, deployer.output()
            entries = {e.request_id: e for e in await _ledger(nc)}
        finally:
            await close(nc)
    finally:
        if deployer.proc.poll() is None:
            deployer.stop(signal.SIGKILL)
    missing = [rid for rid in ids if rid not in entries]
    assert missing == [], f"{len(missing)} entries lost:\n{deployer.output()[-2000:]}"
    assert all(entries[rid].outcome == OK for rid in ids)
    assert "audit entries not appended" not in deployer.output()


async def _count(nc: Any) -> int:
    return len(await _ledger(nc))


def test_a_full_ledger_buffer_drops_and_counts_instead_of_waiting() -> None:
    recorder = AuditRecorder("deployer", "deployer", get_logger(), buffer=2)
    entry = AuditEntry(id=new_id(), ts=1.0, node="deployer", role="deployer",
                       subject=LIST, command=tag_of(ListInfras))
    assert [recorder.record(entry) for _ in range(3)] == [True, True, False]
    assert (recorder.recorded, recorder.dropped, recorder.backlog) == (2, 1, 2)
    recorder.close()


async def test_audit_at_answers_what_was_deployed_across_deploys_and_a_rollback(
        settings: NatsSettings, tmp_path: Path, cli_env: dict[str, str]) -> None:
    make_project(tmp_path / "ws", "churn", version="1")
    make_api_project(tmp_path / "ws", version="1")
    async with fleet() as f:
        await f.start(DeployerNode(name="deployer", nats=settings, heartbeat_interval=HB))
        await f.start(DesignNode(name="design", nats=settings, workspace=tmp_path / "ws",
                                 heartbeat_interval=HB))
        nc = await connect(settings, name="test")
        try:
            c = Caller(nc, sender="test")
            await c.call(CreateInfra(name="prod", kind="automation"))
            await c.call(CreateInfra(name="api", kind="api"))
            for bundle in ("v1", "v2"):
                await c.call(CreateBundle(project="churn", bundle_id=bundle), timeout=30)
                await c.call(CreateApiPackage(project="churn", service="churn-api",
                                              version=bundle), timeout=30)
            before = time.time()
            marks: list[float] = []

            async def step(*cmds: Any) -> None:
                for cmd in cmds:
                    await c.call(cmd)
                marks.append(time.time())

            await step(DeployBundle(project="churn", bundle_id="v1", infra="prod", by="alice"),
                       DeployApi(service="churn-api", infra="api", generations={"v1": 100},
                                 by="alice"))
            await step(DeployBundle(project="churn", bundle_id="v2", infra="prod", by="bob"),
                       DeployApi(service="churn-api", infra="api",
                                 generations={"v1": 50, "v2": 50}, by="bob"))
            await step(RollbackBundle(project="churn", infra="prod", by="carol"),
                       RollbackApi(service="churn-api", infra="api", by="carol"))

            def seen(ds: list[Any]) -> list[tuple[str, str, str, str, str]]:
                return [(d.infra, d.kind, d.name, d.deployed, d.by) for d in ds]

            assert await deployed_at(nc, before) == []
            assert seen(await deployed_at(nc, marks[0])) == [
                ("api", "api", "churn-api", "v1", "alice"),
                ("prod", "bundle", "churn", "v1", "alice")]
            assert seen(await deployed_at(nc, marks[1])) == [
                ("api", "api", "churn-api", "v1=50,v2=50", "bob"),
                ("prod", "bundle", "churn", "v2", "bob")]
            after = await deployed_at(nc, marks[2])
            assert seen(after) == [("api", "api", "churn-api", "v1", "carol"),
                                   ("prod", "bundle", "churn", "v1", "carol")]
            assert {d.action for d in after} == {"rollback"}
            assert seen(await deployed_at(nc, marks[1], "prod")) == [
                ("prod", "bundle", "churn", "v2", "bob")]

            # The CLI, with the time as ISO 8601 and as seconds since the epoch.
            import datetime as dt
            iso = dt.datetime.fromtimestamp(marks[1], dt.UTC).isoformat()
            for when in (iso, f"{marks[1]:.6f}"):
                proc = await ashipyard("audit", "at", when, "--json", "--nats", settings.url,
                                env=cli_env, cwd=tmp_path, check=True)
                got = json.loads(proc.stdout)["deployed"]
                assert [(d["infra"], d["name"], d["deployed"]) for d in got] == [
                    ("api", "churn-api", "v1=50,v2=50"), ("prod", "churn", "v2")]
            proc = await ashipyard("audit", "at", "yesterday-ish", "--nats", settings.url,
                            env=cli_env, cwd=tmp_path)
            assert proc.returncode == 2 and "ISO 8601" in proc.stderr
            # Without auth, the ledger still records who the commands claimed to be.
            async def rollbacks() -> list[AuditEntry]:
                return [e for e in await _ledger(nc) if e.command == tag_of(RollbackBundle)]

            recorded = await wait_for(rollbacks, message="the rollback in the ledger")
            assert [(e.outcome, e.verified, e.identity) for e in recorded] == [
                (OK, False, None)]
        finally:
            await close(nc)
