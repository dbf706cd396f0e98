"""Each identity may do only its job, and nats-server (not shipyard) says so: every denial
in the permissions table, against a real server started with ``shipyard auth``'s config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from nodes.runtime import natscompat
from nodes.runtime.jetstream import ensure_events_stream, ensure_kv
from nodes.runtime.kvcache import snapshot
from protocol import subjects
from protocol.base import tag_of
from protocol.deploy import DeployBundle, deployment_key, deployment_keys
from protocol.heartbeat import HEARTBEAT
from protocol.reports import REPORT, NodeExit
from tests.authstack import AuthStack, Conn, auth_stack
from tests.helpers import wait_for

DESIRED = deployment_key("bundle", "automation", "churn")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[AuthStack]:
    with auth_stack(tmp_path, ("vera", "user", "viewer", None),
                    ("dora", "user", "deployer", None),
                    ("automation-2", "node", "automation", "automation")) as s:
        yield s


async def _seed(admin: Conn) -> None:
    """What a running stack has: buckets, the event stream, one desired state."""
    js = admin.nc.jetstream()
    await ensure_events_stream(js)
    deploy = await ensure_kv(js, subjects.DEPLOY_BUCKET)
    for bucket in (subjects.INFRA_BUCKET, subjects.BUNDLE_BUCKET, subjects.IDENTITIES_BUCKET,
                   subjects.LOCKS_BUCKET, subjects.FIRED_BUCKET):
        await ensure_kv(js, bucket)
    await deploy.put(DESIRED, b'{"desired": "v1"}')


async def _desired(admin: Conn) -> bytes:
    kv = await admin.nc.jetstream().key_value(subjects.DEPLOY_BUCKET)
    entry = await kv.get(DESIRED)
    return entry.value or b""


class Seen:
    """Messages an admin subscriber received on one subject filter."""

    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def on_msg(self, msg: Msg) -> None:
        self.subjects.append(msg.subject)


async def _watch(admin: Conn, subject: str) -> Seen:
    seen = Seen()
    await admin.nc.subscribe(subject, cb=seen.on_msg)
    await natscompat.flush(admin.nc)
    return seen


def _beat(node: str, role: str = "automation") -> bytes:
    from protocol.heartbeat import Heartbeat
    return HEARTBEAT.encode(Heartbeat(node=node, role=role, infra="automation", version="0",
                                      host="h", pid=1, uptime_s=1.0, interval_s=2.0, seq=1,
                                      ts=1.0))


async def test_a_node_cannot_publish_a_heartbeat_or_exit_report_as_another_node(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("automation-1") as node:
        beats = await _watch(admin, subjects.HEARTBEATS_ALL)
        reports = await _watch(admin, "sy.rpt.>")
        spoofed_hb = subjects.heartbeat("automation", "automation-2")
        own_hb = subjects.heartbeat("automation", "automation-1")
        await node.nc.publish(spoofed_hb, _beat("automation-2"))
        exit_report = NodeExit(node="deployer", role="deployer", infra="control", pid=1,
                               reason="stopped")
        await node.nc.publish(exit_report.subject(), REPORT.encode(exit_report))
        await node.nc.publish(own_hb, _beat("automation-1"))  # its own: allowed
        await node.denied(spoofed_hb)
        await node.denied(exit_report.subject())
        await wait_for(lambda: own_hb in beats.subjects, message="the node's own heartbeat")
        await natscompat.flush(admin.nc)
        assert beats.subjects == [own_hb]
        assert reports.subjects == []


async def test_an_automation_node_cannot_write_desired_state_nor_command_the_deployer(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("automation-1") as node:
        await _seed(admin)
        commands = await _watch(admin, subjects.COMMANDS_ALL)
        kv = await ensure_kv(node.nc.jetstream(timeout=0.5), subjects.DEPLOY_BUCKET,
                             read_info=False)  # opened as its node opens it
        mine = await snapshot(kv, deployment_keys("bundle", "automation"))  # it may read
        assert mine[DESIRED][1] == b'{"desired": "v1"}'
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put(DESIRED, b'{"desired": "evil"}')
        await node.denied(f"$KV.{subjects.DEPLOY_BUCKET}.{DESIRED}")
        deploy = subjects.command("deployer", "deploy.bundle")
        await node.nc.publish(deploy, b"{}")
        await node.denied(deploy)
        await natscompat.flush(admin.nc)
        assert await _desired(admin) == b'{"desired": "v1"}'
        assert commands.subjects == []


async def test_an_automation_node_reads_the_desired_state_of_its_infra_only(
        stack: AuthStack) -> None:
    """automation-1 (infra ``automation``) follows its infra's deployments as its node
    does (a watch through a named consumer); another infra's are refused by the
    server: a watch of them, a get, a consumer whose filter is only in the body, and
    the bucket's stream info (with a subject filter it lists every key's name)."""
    other = deployment_key("bundle", "staging", "churn")
    async with stack.connect("admin") as admin, stack.connect("automation-1") as node:
        await _seed(admin)
        admin_kv = await admin.nc.jetstream().key_value(subjects.DEPLOY_BUCKET)
        await admin_kv.put(other, b'{"desired": "secret"}')
        js = node.nc.jetstream(timeout=1)
        kv = await ensure_kv(js, subjects.DEPLOY_BUCKET, read_info=False)  # as its node
        mine = await snapshot(kv, deployment_keys("bundle", "automation"))
        assert {k: v for k, (_, v) in mine.items()} == {DESIRED: b'{"desired": "v1"}'}

        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await snapshot(kv, deployment_keys("bundle", "staging"), timeout=2)
        await node.denied(f"$KV.{subjects.DEPLOY_BUCKET}.bundle.staging.>")
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await kv.get(other)
        # A message get names the key only in its body: refused for every key.
        await node.denied(f"STREAM.MSG.GET.KV_{subjects.DEPLOY_BUCKET}")
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await kv.watch(deployment_keys("bundle", "staging"))  # nats-py's own: unnamed
        await node.denied(f"CONSUMER.CREATE.KV_{subjects.DEPLOY_BUCKET}\"")
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await js.stream_info(f"KV_{subjects.DEPLOY_BUCKET}",
                                 subjects_filter=f"$KV.{subjects.DEPLOY_BUCKET}.>")
        await node.denied(f"STREAM.INFO.KV_{subjects.DEPLOY_BUCKET}")


async def test_a_viewer_reads_state_but_cannot_deploy_write_or_delete(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("vera") as viewer:
        await _seed(admin)
        commands = await _watch(admin, subjects.COMMANDS_ALL)
        js = viewer.nc.jetstream(timeout=0.5)
        kv = await js.key_value(subjects.DEPLOY_BUCKET)
        assert (await kv.get(DESIRED)).value == b'{"desired": "v1"}'
        listing = subjects.command("deployer", "deploy.list")
        await viewer.nc.publish(listing, b"{}")  # a read command: allowed
        await wait_for(lambda: listing in commands.subjects, message="the list command")
        deploy = subjects.command("deployer", tag_of(DeployBundle))
        await viewer.nc.publish(deploy, b"{}")
        await viewer.denied(deploy)
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put(DESIRED, b"x")
        await viewer.denied(f"$KV.{subjects.DEPLOY_BUCKET}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(f"KV_{subjects.DEPLOY_BUCKET}")
        await viewer.denied("$JS.API.STREAM.DELETE")
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_stream(StreamConfig(name="MINE", subjects=["mine.>"]))
        await viewer.denied("$JS.API.STREAM.CREATE.MINE")
        await natscompat.flush(admin.nc)
        assert commands.subjects == [listing]
        assert await _desired(admin) == b'{"desired": "v1"}'
        assert (await admin.nc.jetstream().stream_info(f"KV_{subjects.DEPLOY_BUCKET}")).state


async def test_no_identity_reads_another_identitys_replies(stack: AuthStack) -> None:
    async with stack.connect("vera") as viewer, stack.connect("automation-1") as node:
        await viewer.nc.subscribe("_INBOX.admin.>")
        await viewer.denied("_INBOX.admin.>")
        await node.nc.subscribe("_INBOX.>")
        await node.denied("_INBOX.>")
        # Its own inbox works: a request through it is answered.
        assert viewer.nc.new_inbox().startswith("_INBOX.vera.")


async def test_design_publishes_bundles_but_cannot_write_desired_state(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("design") as design:
        await _seed(admin)
        js = design.nc.jetstream(timeout=0.5)
        bundles = await js.key_value(subjects.BUNDLE_BUCKET)
        await bundles.put("churn.v1", b"{}")  # its job
        deploy = await js.key_value(subjects.DEPLOY_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await deploy.put(DESIRED, b"x")
        await design.denied(f"$KV.{subjects.DEPLOY_BUCKET}")
        assert await _desired(admin) == b'{"desired": "v1"}'


async def test_design_progress_reaches_a_requesters_inbox_and_nothing_else(
        stack: AuthStack) -> None:
    async with stack.connect("vera") as viewer, stack.connect("design") as design:
        reply = viewer.nc.new_inbox() + ".1"  # as a Requester names a request's reply
        heard: list[bytes] = []

        async def on_msg(msg: Msg) -> None:
            heard.append(msg.data)

        await viewer.nc.subscribe(subjects.command_progress(reply), cb=on_msg)
        await natscompat.flush(viewer.nc)
        await design.nc.publish(subjects.command_progress(reply), b"{}")
        try:
            await wait_for(lambda: heard == [b"{}"], message="the notice delivered")
        except AssertionError as e:  # say what the server told either side
            raise AssertionError(f"{e}; the viewer was told {viewer.errors}, "
                                 f"the design node {design.errors}") from None
        # Only progress notices: not a reply nor a "working" notice on someone's inbox.
        await design.nc.publish(reply, b"forged")
        await design.denied(reply)
        await design.nc.publish(subjects.api_working(reply), b"")
        await design.denied(subjects.api_working(reply))
        assert viewer.violations() == []


async def test_the_gateway_only_requests_apis_and_api_nodes_only_serve_them(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("gateway") as gateway, \
            stack.connect("api-1") as api:
        await _seed(admin)

        async def answer(msg: Msg) -> None:
            await msg.respond(b"pong")

        await api.nc.subscribe(subjects.api_endpoint("svc", "predict"), queue="svc",
                               cb=answer)
        await natscompat.flush(api.nc)

        async def answered() -> bytes | None:
            try:
                reply = await gateway.nc.request(subjects.api_endpoint("svc", "predict"),
                                                 b"ping", timeout=5)
            except nats.errors.NoRespondersError:
                return None
            return bytes(reply.data)

        assert await wait_for(answered, message="the API node answers the gateway") == b"pong"
        for conn, subject in ((gateway, subjects.command("deployer", "deploy.list")),
                              (api, subjects.command("deployer", "deploy.list")),
                              (gateway, subjects.heartbeat("api", "api-1")),
                              (api, subjects.heartbeat("api", "api-2"))):
            await conn.nc.publish(subject, b"{}")
            await conn.denied(subject)
        for conn in (gateway, api):
            kv = await conn.nc.jetstream(timeout=0.5).key_value(subjects.DEPLOY_BUCKET)
            with pytest.raises(nats.errors.TimeoutError):
                await kv.put(DESIRED, b"x")
            await conn.denied(f"$KV.{subjects.DEPLOY_BUCKET}")
        assert await _desired(admin) == b'{"desired": "v1"}'


async def test_an_api_node_cannot_answer_on_a_callers_re_used_reply_subjects(
        stack: AuthStack) -> None:
    """An API node may publish to any request's own reply subject (it answers what its
    other connections received), never to the re-used ones commands wait on: those only
    a responder the server let answer the request reaches."""
    async with stack.connect("admin") as admin, stack.connect("api-1") as api:
        inbox = admin.nc.new_inbox()
        heard: list[str] = []

        async def on_msg(msg: Msg) -> None:
            heard.append(msg.subject)

        await admin.nc.subscribe(f"{inbox}.>", cb=on_msg)
        await natscompat.flush(admin.nc)
        slot = subjects.reused_reply(inbox, "1")
        await api.nc.publish(f"{inbox}.token", b"")
        await api.nc.publish(slot, b"forged")
        await api.denied(slot)
        assert len(api.violations()) == 1
        await wait_for(lambda: heard == [f"{inbox}.token"], message="the allowed one delivered")


async def test_nodes_cannot_rewrite_identities(stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("deployer") as deployer:
        await _seed(admin)
        kv = await deployer.nc.jetstream(timeout=0.5).key_value(subjects.IDENTITIES_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put("mallory", b"{}")
        await deployer.denied(f"$KV.{subjects.IDENTITIES_BUCKET}")
        admin_kv = await admin.nc.jetstream().key_value(subjects.IDENTITIES_BUCKET)
        with pytest.raises(Exception, match="not found"):
            await admin_kv.get("mallory")


async def test_a_revoked_identity_is_disconnected_and_refused_without_a_restart(
        stack: AuthStack) -> None:
    async with stack.connect("admin") as admin, stack.connect("vera") as viewer:
        stack.store.revoke("vera")
        stack.server.reload()
        await wait_for(lambda: viewer.nc.is_closed or not viewer.nc.is_connected,
                       message="the revoked viewer's connection closed")
        assert admin.nc.is_connected  # everyone else stays
        with pytest.raises(Exception, match=r"(?i)authorization"):
            async with stack.connect("vera"):
                pass
    # Added without a restart too.
    stack.add("newcomer", "viewer")
    stack.server.reload()

    async def can_connect() -> bool:
        try:
            async with stack.connect("newcomer"):
                return True
        except Exception:
            return False

    await wait_for(can_connect, message="the new identity connects after a reload")
