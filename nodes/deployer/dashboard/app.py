"""The dashboard's HTTP routes: a plain ASGI callable, like the API nodes' front.

Routes::

    GET  /login?token=T        trade a login token for a session cookie, then go to /
    GET  /login[?ended=1]      the login form (saying why, when a session ended)
    GET  /                     the page (static/index.html); its JS and CSS: /static/...
    GET  /api/session          who is logged in, the CSRF token, whether clicks can act
    GET  /api/state            every section at once (JSON)
    GET  /api/events           the live feed (text/event-stream)
    GET  /api/runs/{id}/log    a run's log (text)
    POST /api/actions          {"action": "rollback"|"deploy", "kind", "infra", "name",
                                "target"}: the same command the CLI sends
    POST /logout
    GET  /metrics              Prometheus text format (no session: scrapers have none)

Every answer carries a Content-Security-Policy that allows only this origin's scripts
and styles and no framing (a one-click rollback must not be clickjacked).  Errors are
``{"error": {"code", "message"}}`` with the status of their code, as everywhere else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
import msgspec

from nodes.deployer.dashboard.access import COOKIE, SESSION_TTL_S, Session, cookie_of
from nodes.deployer.dashboard.feed import TooManyClients
from nodes.deployer.metrics import CONTENT_TYPE
from nodes.runtime.logs import get_logger
from protocol.api import DeployApi, RollbackApi, error_reply, parse_split
from protocol.auth import may_send, required_role
from protocol.base import Command, Request, new_id
from protocol.deploy import DeployBundle, RollbackBundle
from protocol.errors import BadRequest, Forbidden, OperationError
from protocol.scenarios import GetRunLog

if TYPE_CHECKING:
    from nodes.deployer.dashboard.server import Dashboard

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY = 64 * 1024
LOG_BYTES = 256 * 1024
KEEPALIVE_S = 15.0
STATIC_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                ".css": b"text/css; charset=utf-8", ".svg": b"image/svg+xml"}
SECURITY = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
JSON = b"application/json"
SESSION_ENDED = ("Your session has ended: sessions last 12 hours, and end when the "
                 "dashboard's logins change. Log in again.")


class ActionBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A click on the page: roll back, or deploy a listed version again."""

    action: str
    kind: str
    infra: str
    name: str
    target: str | None = None
    revision: int | None = None


def load_static() -> dict[str, tuple[bytes, bytes]]:
    """Every file of the package's ``static`` folder, read once: name -> (type, bytes)."""
    out: dict[str, tuple[bytes, bytes]] = {}
    folder = resources.files("nodes.deployer.dashboard") / "static"
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in STATIC_TYPES:
            out[item.name] = (STATIC_TYPES[suffix], item.read_bytes())
    return out


class Reply(Exception):
    """Answer this at once (an error, a redirect)."""

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = JSON,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or []


def _error(code: str, message: str) -> Reply:
    status, body = error_reply(code, message)
    return Reply(status, body)


def build_command(body: ActionBody, user: str) -> Command[Any]:
    """The typed command a click sends (what the CLI sends for the same action)."""
    by = f"dashboard:{user}"
    if body.kind not in ("bundle", "api"):
        raise BadRequest(f"invalid kind {body.kind!r}: expected bundle or api")
    if body.action == "rollback":
        if body.kind == "bundle":
            return RollbackBundle(project=body.name, infra=body.infra, by=by)
        return RollbackApi(service=body.name, infra=body.infra, by=by)
    if body.action != "deploy":
        raise BadRequest(f"invalid action {body.action!r}: expected rollback or deploy")
    if not body.target:
        raise BadRequest("deploy needs a target: the bundle id, or the API split "
                         "(v1=90,v2=10) to deploy")
    if body.kind == "bundle":
        return DeployBundle(project=body.name, infra=body.infra, bundle_id=body.target,
                            by=by, expected_revision=body.revision)
    try:
        generations = parse_split(body.target)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return DeployApi(service=body.name, infra=body.infra, generations=generations, by=by,
                     expected_revision=body.revision)


class DashboardApp:
    def __init__(self, board: Dashboard) -> None:
        self.board = board
        self.static = load_static()
        self.log = get_logger(component="dashboard")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path == "/api/events" and method == "GET":
                await self._events(scope, receive, send)
                return
            status, body, ctype, headers = await self._route(scope, path, method, receive)
        except Reply as r:
            status, body, ctype, headers = r.status, r.body, r.content_type, r.headers
        except Exception:  # never a stack trace to the browser
            self.log.exception("dashboard request failed", path=path)
            status, body = error_reply("internal", "internal error in the dashboard")
            ctype, headers = JSON, []
        await _respond(send, status, body, ctype, headers)

    # -- routing -----------------------------------------------------------------------

    async def _route(self, scope: Scope, path: str, method: str, receive: Receive,
                     ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        if path == "/metrics":
            _method(method, "GET")
            return 200, await self.board.metrics.render(), CONTENT_TYPE.encode(), []
        if path.startswith("/static/"):
            _method(method, "GET")
            found = self.static.get(path[len("/static/"):])
            if found is None:
                raise _error("not_found", f"no static file {path}")
            return 200, found[1], found[0], []
        if path == "/login":
            _method(method, "GET")
            return self._login(scope)
        session = self._session(scope)
        if path == "/":
            _method(method, "GET")
            if session is None:
                raise Reply(303, headers=[(b"location", b"/login")])
            ctype, page = self.static["index.html"]
            return 200, page, ctype, []
        if session is None:
            raise _error("unauthorized", "log in first: open the login URL 'shipyard up' "
                         "printed (or send Authorization: Bearer TOKEN)")
        if path == "/api/session":
            _method(method, "GET")
            can, why = self.board.actor.can_act()
            if can and not may_send(session.role, RollbackBundle):
                can, why = False, (f"you are logged in as {session.user}, a "
                                   f"{session.role}: rollback and redeploy need role "
                                   f"{required_role(RollbackBundle)}; the page is read-only")
            return 200, msgspec.json.encode({
                "user": session.user, "role": session.role, "csrf": session.csrf,
                "can_act": can, "why_not": why, "acts_as": self.board.actor.identity,
                "node": self.board.node.name}), JSON, []
        if path == "/api/state":
            _method(method, "GET")
            return 200, msgspec.json.encode(self.board.sections()), JSON, []
        if path.startswith("/api/runs/") and path.endswith("/log"):
            _method(method, "GET")
            return await self._run_log(path[len("/api/runs/"):-len("/log")])
        if path == "/api/actions":
            _method(method, "POST")
            self._csrf(scope, session)
            return await self._act(session, await _read_body(receive))
        if path == "/logout":
            _method(method, "POST")
            self._csrf(scope, session)
            self.board.logins.logout(session.id)
            return 200, b'{"ok": true}', JSON, [(b"set-cookie", _cookie("", 0))]
        raise _error("not_found", f"no route {method} {path}")

    # -- sessions ----------------------------------------------------------------------

    def _session(self, scope: Scope) -> Session | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                user = self.board.logins.user_of(token.strip()) \
                    if scheme.lower() == "bearer" else None
                if user is None:
                    raise _error("unauthorized", "unknown bearer token")
                # A bearer is not sent by browsers on their own: no CSRF check needed.
                return Session(id="", user=user.name, csrf="", expires=time.time() + 1,
                               role=user.role)
        return self.board.logins.session(cookie_of(headers))

    def _csrf(self, scope: Scope, session: Session) -> None:
        if not session.id:
            return  # bearer token
        sent = next((v.decode("latin-1") for k, v in scope["headers"]
                     if k == b"x-csrf-token"), "")
        if not sent or sent != session.csrf:
            raise _error("forbidden", "missing or wrong X-CSRF-Token header (reload the page)")

    def _login(self, scope: Scope) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        if not token:
            note = SESSION_ENDED if query.get("ended") else ""
            return 200, _login_page(note), STATIC_TYPES[".html"], []
        session = self.board.logins.login(token)
        if session is None:
            self.log.warning("dashboard login refused", client=_client(scope))
            return 401, _login_page("That token is not valid."), STATIC_TYPES[".html"], []
        self.log.info("dashboard login", user=session.user, client=_client(scope))
        return 303, b"", JSON, [(b"location", b"/"),
                                (b"set-cookie", _cookie(session.id, int(SESSION_TTL_S)))]

    # -- data and actions --------------------------------------------------------------

    async def _run_log(self, run_id: str) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        cmd = GetRunLog(run_id=run_id, max_bytes=LOG_BYTES)
        try:
            reply = await self.board.node.runs.run_log(cmd, _request(cmd))
        except OperationError as exc:
            raise _error(exc.code, exc.message) from None
        return 200, msgspec.json.encode(reply), JSON, []

    async def _act(self, session: Session, data: bytes,
                   ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        try:
            body = msgspec.json.decode(data, type=ActionBody)
        except msgspec.DecodeError as exc:
            raise _error("bad_request", f"invalid action: {exc}; expected JSON "
                         '{"action": "rollback"|"deploy", "kind": "bundle"|"api", '
                         '"infra", "name", "target"}') from None
        try:
            cmd = build_command(body, session.user)
            if not may_send(session.role, type(cmd)):
                raise Forbidden(f"{session.user} is a {session.role} on this dashboard: "
                                f"{body.action} needs role {required_role(type(cmd))}")
            view = await self.board.actor.call(cmd)
        except OperationError as exc:
            self.log.info("dashboard action refused", user=session.user, action=body.action,
                          name=body.name, infra=body.infra, error=exc.message)
            raise _error(exc.code, exc.message) from None
        self.log.info("dashboard action", user=session.user, action=body.action,
                      kind=body.kind, name=body.name, infra=body.infra, target=body.target)
        self.board.feed.kick()
        return 200, msgspec.json.encode({"ok": True, "deployment": view}), JSON, []

    # -- the live feed -----------------------------------------------------------------

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._session(scope) is None:
                raise _error("unauthorized", "log in first")
            stream = self.board.feed.subscribe()
        except Reply as r:
            await _respond(send, r.status, r.body, r.content_type, r.headers)
            return
        except TooManyClients as exc:
            status, body = error_reply("overloaded", str(exc))
            await _respond(send, status, body, JSON, [(b"retry-after", b"5")])
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"x-accel-buffering", b"no"), *SECURITY]})
        try:
            async with anyio.create_task_group() as tg:
                async def gone() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(gone)
                await send({"type": "http.response.body", "body": b"retry: 1000\n\n",
                            "more_body": True})
                while True:
                    with anyio.move_on_after(KEEPALIVE_S) as idle:
                        message = await stream.receive()
                    if idle.cancelled_caught:
                        message = b": keepalive\n\n"
                    await send({"type": "http.response.body", "body": message,
                                "more_body": True})
        except (anyio.EndOfStream, anyio.ClosedResourceError, OSError):
            pass  # dropped as too slow, the server is stopping, or the client left
        finally:
            self.board.feed.unsubscribe(stream)
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b""})


def _method(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise Reply(*error_reply("method_not_allowed", f"this route takes {allowed}"),
                    headers=[(b"allow", allowed.encode())])


def _request(cmd: Command[Any]) -> Request[Any]:
    return Request(body=cmd, id=new_id(), ts=time.time(), sender="dashboard")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _cookie(value: str, max_age: int) -> bytes:
    return (f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
            ).encode()


def _login_page(message: str) -> bytes:
    note = f'<p class="bad">{message}</p>' if message else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>shipyard: log in</title>"
        '<link rel=stylesheet href="/static/style.css"></head><body class=login>'
        "<h1>shipyard dashboard</h1>" + note +
        "<p>Open the login URL that <code>shipyard up</code> printed, or paste a token "
        "from the dashboard token file.</p>"
        '<form method=get action="/login"><input name=token type=password '
        'autocomplete=off placeholder="token" size=40> <button>Log in</button></form>'
        "</body></html>").encode()


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Reply(400, b"")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _error("too_large", f"request body over {MAX_BODY} bytes")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", b"%d" % len(body)), *SECURITY, *headers]})
    await send({"type": "http.response.body", "body": body})
