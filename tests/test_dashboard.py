"""The dashboard's HTTP side against a real Deployer and NATS: logins, CSRF, actions
through the CLI's command path, the live feed's bounds, and its options."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS

from nodes.deployer import DeployerNode
from nodes.deployer.dashboard.access import (
    COOKIE,
    MAX_LOGOUTS,
    SESSION_TTL_S,
    Login,
    Logins,
    TokenFileError,
    ensure_token_file,
    read_tokens,
)
from nodes.deployer.dashboard.app import ActionBody, build_command
from nodes.deployer.dashboard.config import DashboardConfig
from nodes.deployer.dashboard.feed import CLIENT_QUEUE, Feed
from nodes.deployer.dashboard.state import TRAFFIC_POINTS, Traffic, redeployable
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import DeployApi, RollbackApi
from protocol.base import encode
from protocol.bundles import BundleInfo, bundle_key
from protocol.deploy import (
    CreateInfra,
    DeployBundle,
    DeploymentView,
    GetHistory,
    ListDeployments,
    Update,
)
from protocol.errors import BadRequest
from tests.helpers import fleet, shipyard, wait_for


async def _churn_v1_then_v2_on_prod(nc: NATS) -> Caller:
    """Infra ``prod``, bundles v1 and v2 of ``churn`` recorded, deployed one after the
    other (so there is something to roll back to); the caller that did it."""
    caller = Caller(nc, sender="test")
    await caller.call(CreateInfra(name="prod", kind="automation"))
    kv = await ensure_kv(nc.jetstream(), subjects.BUNDLE_BUCKET)
    for b in ("v1", "v2"):
        await kv.put(bundle_key("churn", b), encode(BundleInfo(
            id=b, project="churn", created_at=time.time(), created_by="design")))
        await caller.call(DeployBundle(project="churn", bundle_id=b, infra="prod"))
    return caller


@asynccontextmanager
async def _dashboard(settings: NatsSettings, board: DashboardConfig,
                     ) -> AsyncIterator[tuple[Caller, httpx.AsyncClient]]:
    """A Deployer serving the dashboard ``board``, churn v1 then v2 deployed on prod: a
    caller, and an HTTP client on the dashboard."""
    async with fleet() as f:
        deployer = DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2,
                                dashboard=board)
        await f.start(deployer)
        nc = await connect(settings, name="test")
        try:
            caller = await _churn_v1_then_v2_on_prod(nc)
            assert deployer.dashboard is not None
            async with httpx.AsyncClient(base_url=deployer.dashboard.url, timeout=5) as http:
                yield caller, http
        finally:
            await close(nc)


async def test_dashboard_needs_a_login_and_a_csrf_token_then_rolls_back_like_the_cli(
        settings: NatsSettings, tmp_path: Path) -> None:
    token = ensure_token_file(tmp_path / "dashboard.token", "ops")
    board = DashboardConfig(token_file=tmp_path / "dashboard.token", port=0)
    async with _dashboard(settings, board) as (caller, http):
        # Nothing but the login page, static files and /metrics without a session.
        assert (await http.get("/api/state")).status_code == 401
        page = await http.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert (await http.get("/static/app.js")).status_code == 200
        bad = await http.get("/login", params={"token": "x" * 32})
        assert bad.status_code == 401 and COOKIE not in bad.cookies
        denied = await http.post("/api/actions", json={
            "action": "rollback", "kind": "bundle", "infra": "prod", "name": "churn"})
        assert denied.status_code == 401

        good = await http.get("/login", params={"token": token})
        assert good.status_code == 303
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = await http.get("/")
        assert page.status_code == 200 and b"/static/app.js" in page.content
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        session = (await http.get("/api/session")).json()
        assert session["user"] == "ops" and session["can_act"] is True

        body = {"action": "rollback", "kind": "bundle", "infra": "prod",
                "name": "churn"}
        # A cross-site form could send the cookie, never the CSRF header.
        no_csrf = await http.post("/api/actions", json=body)
        assert no_csrf.status_code == 403
        assert "X-CSRF-Token" in no_csrf.json()["error"]["message"]
        wrong = await http.post("/api/actions", json=body,
                                headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 403
        view = (await caller.call(ListDeployments(project="churn"))).deployments[0]
        assert view.desired == "v2"  # nothing was done

        csrf = {"X-CSRF-Token": session["csrf"]}
        bad_body = await http.post("/api/actions", content=b'{"action": 1}',
                                   headers=csrf)
        assert bad_body.status_code == 400
        assert "expected JSON" in bad_body.json()["error"]["message"]
        unknown = await http.post("/api/actions", headers=csrf, json={
            **body, "name": "nope"})
        assert unknown.status_code == 404
        assert "not deployed" in unknown.json()["error"]["message"]

        done = await http.post("/api/actions", json=body, headers=csrf)
        assert done.status_code == 200, done.text
        assert done.json()["deployment"]["desired"] == "v1"
        history = await caller.call(GetHistory(project="churn", infra="prod"))
        last = history.updates[-1]
        assert (last.action, last.to_bundle, last.by) == ("rollback", "v1",
                                                          "dashboard:ops")

        # Redeploy a listed version: the same DeployBundle the CLI sends.
        again = await http.post("/api/actions", headers=csrf, json={
            "action": "deploy", "kind": "bundle", "infra": "prod", "name": "churn",
            "target": "v2"})
        assert again.status_code == 200 and \
            again.json()["deployment"]["desired"] == "v2"
        no_log = await http.get("/api/runs/r-404/log")
        assert no_log.status_code == 404 and "unknown run" in no_log.text
        state = (await http.get("/api/state")).json()
        listed = state["deployments"][0]
        assert [u["to_bundle"] for u in listed["history"]] == ["v2", "v1", "v2", "v1"]
        assert listed["history"][1]["redeploy"] == "v1"


async def test_a_viewer_login_gets_a_read_only_page_and_its_clicks_are_refused(
        settings: NatsSettings, tmp_path: Path) -> None:
    tokens = tmp_path / "dashboard.token"
    viewer, reviewer, ops = "v" * 24, "r" * 24, "o" * 24
    tokens.write_text(f"vera:{viewer}:viewer\nrita:{reviewer}:reviewer\nops:{ops}\n")
    board = DashboardConfig(token_file=tokens, port=0)
    async with _dashboard(settings, board) as (caller, http):
        assert (await http.get("/login", params={"token": viewer})).status_code == 303
        session = (await http.get("/api/session")).json()
        assert (session["user"], session["role"], session["can_act"]) == (
            "vera", "viewer", False)
        assert "vera, a viewer" in session["why_not"]
        assert "read-only" in session["why_not"]
        csrf = {"X-CSRF-Token": session["csrf"]}
        for body in ({"action": "rollback", "kind": "bundle", "infra": "prod",
                      "name": "churn"},
                     {"action": "deploy", "kind": "bundle", "infra": "prod",
                      "name": "churn", "target": "v1"}):
            refused = await http.post("/api/actions", json=body, headers=csrf)
            assert refused.status_code == 403
            assert refused.json()["error"]["message"] == (
                f"vera is a viewer on this dashboard: {body['action']} needs role "
                "deployer")
        for token, allowed in ((reviewer, False), (ops, True)):
            rollback = await http.post(
                "/api/actions", headers={"Authorization": f"Bearer {token}"},
                json={"action": "rollback", "kind": "bundle", "infra": "prod",
                      "name": "churn"})
            assert rollback.status_code == (200 if allowed else 403), rollback.text
        view = (await caller.call(ListDeployments(project="churn"))).deployments[0]
        assert (view.desired, view.updated_by) == ("v1", "dashboard:ops")


def test_a_token_file_line_with_an_unknown_role_is_refused_not_read_as_a_deployer(
        tmp_path: Path) -> None:
    tokens = tmp_path / "dashboard.token"
    tokens.write_text(f"vera:{'v' * 24}:veiwer\n")
    with pytest.raises(TokenFileError, match="line 1: expected NAME:TOKEN or NAME:TOKEN:ROLE"):
        read_tokens(tokens)
    tokens.write_text(f"# logins\nops:{'o' * 24}\nvera:{'v' * 24}:viewer\n")
    assert read_tokens(tokens) == {"o" * 24: Login("ops", "deployer"),
                                   "v" * 24: Login("vera", "viewer")}


def test_a_session_is_accepted_by_any_deployer_with_the_same_logins_until_it_expires(
        ) -> None:
    now = [1_000_000.0]
    tokens = {"o" * 24: Login("ops", "deployer"), "v" * 24: Login("vera", "viewer")}
    first = Logins(dict(tokens), clock=lambda: now[0])
    assert first.login("x" * 24) is None
    ops, vera = first.login("o" * 24), first.login("v" * 24)
    assert ops is not None and vera is not None and ops.id != vera.id
    # A restarted Deployer, or the standby, reads the same token file.
    again = Logins(dict(reversed(tokens.items())), clock=lambda: now[0])
    found = again.session(ops.id)
    assert found == ops and (found.user, found.role) == ("ops", "deployer")
    seen = again.session(vera.id)
    assert seen is not None and (seen.user, seen.role, seen.csrf) == ("vera", "viewer",
                                                                       vera.csrf)
    assert len({ops.csrf, vera.csrf}) == 2
    now[0] += SESSION_TTL_S + 1
    assert again.session(ops.id) is None
    # Changed logins: no session signed before is accepted.
    now[0] -= SESSION_TTL_S
    changed = Logins({"o" * 24: Login("ops", "viewer")}, clock=lambda: now[0])
    assert changed.session(ops.id) is None and first.session(ops.id) is not None


def test_a_forged_or_altered_session_cookie_is_refused() -> None:
    logins = Logins({"o" * 24: Login("ops", "viewer")})
    session = logins.login("o" * 24)
    assert session is not None
    version, payload, mac = session.id.split(".")
    as_admin = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).replace(
            b'"viewer"', b'"admin"')).rstrip(b"=").decode()
    for forged in (f"{version}.{as_admin}.{mac}", f"{version}.{payload}.{'A' * len(mac)}",
                   f"s0.{payload}.{mac}", f"{version}.{payload}", "", "x" * 5000,
                   f"{version}.{payload}.{mac}.", session.id[:-1],
                   f"{version}.{payload}.{'é' * len(mac)}", f"{version}.é.{mac}"):
        assert logins.session(forged) is None, forged
    assert logins.session(session.id) == session


def test_a_logged_out_session_is_refused_and_logouts_stay_bounded() -> None:
    now = [1_000_000.0]
    logins = Logins({"o" * 24: Login("ops")}, clock=lambda: now[0])
    first = logins.login("o" * 24)
    assert first is not None
    logins.logout(first.id)
    assert logins.session(first.id) is None
    logins.logout("junk")  # not a session: nothing remembered
    assert list(logins.ended) == [first.id]
    sessions = []
    for _ in range(MAX_LOGOUTS + 5):
        session = logins.login("o" * 24)
        assert session is not None
        sessions.append(session)
        logins.logout(session.id)
    assert len(logins.ended) == MAX_LOGOUTS
    assert all(logins.session(s.id) is None for s in sessions[-MAX_LOGOUTS:])
    now[0] += SESSION_TTL_S + 1  # expired ones are forgotten at the next logout
    last = logins.login("o" * 24)
    assert last is not None
    logins.logout(last.id)
    assert list(logins.ended) == [last.id]


async def test_live_feed_pushes_changes_and_drops_a_client_that_stops_reading() -> None:
    counter = {"n": 0}
    feed = Feed(lambda: {"nodes": [counter["n"]], "runs": []})
    feed.refresh()
    reader = feed.subscribe()
    stuck = feed.subscribe()
    first = [reader.receive_nowait(), reader.receive_nowait()]
    assert first[0].startswith(b"event: nodes\ndata: [0]")  # every section at once
    assert first[1].startswith(b"event: runs\n")
    got: list[bytes] = []
    for i in range(1, CLIENT_QUEUE + 5):
        counter["n"] = i
        assert feed.refresh() == 1  # only the section that changed is pushed
        got.append(reader.receive_nowait())  # this one keeps up
    assert feed.dropped == 1 and feed.clients == 1  # the stuck one is gone, nobody waited
    assert got[-1] == f"event: nodes\ndata: [{CLIENT_QUEUE + 4}]\n\n".encode()
    backlog = []
    with anyio.move_on_after(1):
        async for message in stuck:  # what it had is kept, then its stream ends
            backlog.append(message)
    assert len(backlog) == CLIENT_QUEUE + 2
    assert feed.refresh() == 0  # unchanged: nothing pushed
    feed.close()
    for stream in (reader, stuck):
        feed.unsubscribe(stream)


async def test_dashboard_stream_sends_every_section_then_live_changes(
        settings: NatsSettings, tmp_path: Path) -> None:
    token = ensure_token_file(tmp_path / "dashboard.token", "ops")
    board = DashboardConfig(token_file=tmp_path / "dashboard.token", port=0)
    async with fleet() as f:
        deployer = DeployerNode(name="deployer", nats=settings, heartbeat_interval=0.2,
                                dashboard=board)
        await f.start(deployer)
        assert deployer.dashboard is not None
        seen: dict[str, object] = {}
        async with httpx.AsyncClient(base_url=deployer.dashboard.url, timeout=10) as http, \
                http.stream("GET", "/api/events",
                            headers={"Authorization": f"Bearer {token}"}) as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            nc = await connect(settings, name="test")
            try:
                section, sent = "", False
                with anyio.fail_after(10):
                    async for line in stream.aiter_lines():
                        if line.startswith("event: "):
                            section = line[7:]
                        elif line.startswith("data: "):
                            seen[section] = msgspec.json.decode(line[6:])
                            if section == "events" and any(
                                    e["type"] == "infra.created" for e in seen["events"]):
                                break
                            if section == "nodes" and not sent:
                                sent = True  # a change after the first snapshot
                                await Caller(nc).call(CreateInfra(name="prod",
                                                                  kind="automation"))
            finally:
                await close(nc)
        assert {"nodes", "deployments", "runs", "traffic", "events", "flows"} <= set(seen)
        assert any(n["name"] == "deployer" for n in seen["nodes"])  # type: ignore[attr-defined]
        await wait_for(lambda: deployer.dashboard is not None
                       and deployer.dashboard.feed.clients == 0,
                       message="the closed stream to be forgotten")


def test_up_says_clearly_when_the_dashboard_port_is_taken(cli_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = shipyard("up", "--nats-port", "-1", "--monitor-port", "-1", "--http-port",
                        "18099", "--dashboard-port", str(port), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"port {port} is already in use on 127.0.0.1" in proc.stderr
    assert "--dashboard-port" in proc.stderr and "Traceback" not in proc.stderr
    proc = shipyard("node", "start", "automation", "--dashboard-port", "1234", env=cli_env,
                    cwd=tmp_path)
    assert proc.returncode == 2 and "--dashboard-port is for deployer nodes" in proc.stderr


def test_clicks_become_the_clis_typed_commands_and_bad_ones_say_why() -> None:
    api = build_command(ActionBody(action="deploy", kind="api", infra="api", name="scorer",
                                   target="v1=90,v2=10", revision=3), "ops")
    assert api == DeployApi(service="scorer", infra="api", generations={"v1": 90, "v2": 10},
                            by="dashboard:ops", expected_revision=3)
    assert build_command(ActionBody(action="rollback", kind="api", infra="api",
                                    name="scorer"), "ops") == RollbackApi(
        service="scorer", infra="api", by="dashboard:ops")
    for body, message in (
            (ActionBody(action="deploy", kind="api", infra="a", name="s", target="v1=x"),
             "invalid split"),
            (ActionBody(action="deploy", kind="bundle", infra="a", name="p"),
             "deploy needs a target"),
            (ActionBody(action="delete", kind="bundle", infra="a", name="p"),
             "expected rollback or deploy"),
            (ActionBody(action="rollback", kind="model", infra="a", name="p"),
             "expected bundle or api")):
        with pytest.raises(BadRequest, match=message):
            build_command(body, "ops")
    # What a listed API version redeploys as: a split, never a mapping with a shadow.
    update = Update(id="u", at=0, by="x", action="deploy", from_bundle=None, to_bundle="v2")
    assert redeployable("api", update) == "v2=100"
    assert redeployable("api", msgspec.structs.replace(update, to_bundle="v1=90,v2=10")) \
        == "v1=90,v2=10"
    assert redeployable("api", msgspec.structs.replace(
        update, to_bundle="v2 (+shadow v3)")) is None
    assert redeployable("bundle", update) == "v2"


def test_traffic_history_is_sampled_per_generation_and_bounded() -> None:
    traffic = Traffic()

    def view(rows: list[dict[str, object]]) -> DeploymentView:
        return DeploymentView(project="scorer", infra="api", desired="v1=90,v2=10",
                              previous=None, revision=1, update_id="u", updated_at=0,
                              updated_by="x", state="in_sync", health="HEALTHY", kind="api",
                              extra={"metrics": rows})

    # Counts since the nodes started, and over their last report interval: the charts
    # draw the interval (an error burst long ago no longer weighs on the error rate).
    rows: list[dict[str, object]] = [
        {"endpoint": "predict", "generation": "v1", "shadow": False, "requests": 100,
         "errors": 50, "rps": 9.0, "p95_ms": 900.0, "recent_requests": 18,
         "recent_errors": 1, "recent_p95_ms": 25.0},
        {"endpoint": "other", "generation": "v1", "shadow": False, "requests": 100,
         "errors": 0, "rps": 1.0, "p95_ms": 50.0, "recent_requests": 2,
         "recent_errors": 0, "recent_p95_ms": 50.0},
        {"endpoint": "predict", "generation": "v2", "shadow": False, "requests": 40,
         "errors": 4, "rps": 0.0, "p95_ms": 5.0, "recent_requests": 0,
         "recent_errors": 0, "recent_p95_ms": None},
        {"endpoint": "predict", "generation": "*", "shadow": False, "requests": 0,
         "errors": 0, "inflight": 3, "rps": 0.0, "p95_ms": None},
        {"endpoint": "predict", "generation": "v3", "shadow": True, "requests": 7,
         "errors": 0, "rps": 1.0, "p95_ms": 5.0, "recent_requests": 2,
         "recent_errors": 0, "recent_p95_ms": 5.0}]
    assert traffic.sample([view(rows)], now=1000.0)
    assert not traffic.sample([view(rows)], now=1000.5)  # at most one sample per period
    series = {g["generation"]: g["points"] for g in traffic.section()}
    # Shadow traffic is not live traffic; "*" holds queued requests, not a generation.
    assert set(series) == {"v1", "v2"}
    assert series["v1"] == [[1000.0, 10.0, 0.05, 50.0]]
    assert series["v2"] == [[1000.0, 0.0, None, None]]  # idle: no rate to draw
    for i in range(TRAFFIC_POINTS + 10):
        traffic.sample([view(rows)], now=2000.0 + i * 3)
    assert len(traffic.section()[0]["points"]) == TRAFFIC_POINTS
