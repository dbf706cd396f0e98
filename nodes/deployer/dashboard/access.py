"""Who may use the dashboard, and as whom it acts.

Login: a token file (``NAME:TOKEN`` per line, mode 0600) names who may log in; a line
``NAME:TOKEN:ROLE`` gives the login a role of ``protocol.auth.HUMAN_ROLES`` (default
``deployer``), and a click is refused unless that role may send the command it sends
(``protocol.auth.may_send``): a ``viewer`` or ``reviewer`` login sees a read-only page.
``shipyard up`` writes ``HOME/dashboard.token`` with one line for ``admin`` (kept across restarts)
and prints the login URL ``http://HOST:PORT/login?token=...``; a Deployer started alone
makes ``.shipyard/nodes/<name>/dashboard.token`` with an ``operator`` line unless given
one.  A login trades the token for a session cookie (HttpOnly, SameSite=Strict, random,
12 hours) and the page gets a per-session CSRF token from ``/api/session`` that every
POST must carry in ``X-CSRF-Token``: a cross-site page can neither send that header
without a CORS preflight (never granted) nor read the token.  Everything but
``/login``, ``/static/`` and ``/metrics`` needs a session.

Acting: a click sends the same typed command the CLI sends (``RollbackBundle``,
``DeployBundle``, ``RollbackApi``, ``DeployApi``) on NATS, with ``by`` set to
``dashboard:<login name>``.  On a stack with auth the Deployer's own node identity may not
send commands (nodes send none), so the dashboard signs with a user identity of its own
(``--dashboard-creds``: ``shipyard up`` creates ``dashboard``, role deployer): the audit
ledger records the verified identity ``dashboard`` and, in the arguments, who clicked.
Without those credentials on a stack with auth, the page is read-only and says why.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol import checks
from protocol.auth import HUMAN_ROLES

SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000
COOKIE = "shipyard_session"
TOKEN_FILE = "dashboard.token"
DASHBOARD_IDENTITY = "dashboard"
DEFAULT_LOGIN_ROLE = "deployer"  # a line without a role: the role the dashboard acts with


class TokenFileError(ValueError):
    """A token file that cannot be read or is malformed."""


@dataclass(frozen=True)
class Login:
    name: str
    role: str = DEFAULT_LOGIN_ROLE


def read_tokens(path: Path) -> dict[str, Login]:
    """``NAME:TOKEN[:ROLE]`` lines (``#`` comments) as token -> login."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"cannot read dashboard token file {path}: "
                             f"{exc.strerror or exc}") from None
    tokens: dict[str, Login] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(":")]
        name, token = fields[0], fields[1] if len(fields) > 1 else ""
        role = fields[2] if len(fields) == 3 else DEFAULT_LOGIN_ROLE
        if len(fields) not in (2, 3) or len(token) < 16 or role not in HUMAN_ROLES:
            raise TokenFileError(f"{path} line {n}: expected NAME:TOKEN or NAME:TOKEN:ROLE "
                                 "with a token of at least 16 characters (no ':') and a "
                                 f"role of {', '.join(HUMAN_ROLES)}")
        try:
            checks.name(name, "login name")
        except ValueError as exc:
            raise TokenFileError(f"{path} line {n}: {exc}") from None
        tokens[token] = Login(name, role)
    if not tokens:
        raise TokenFileError(f"{path} holds no NAME:TOKEN line")
    return tokens


def ensure_token_file(path: Path, name: str) -> str:
    """The first token of ``path``, after writing one for ``name`` if the file is new."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# Dashboard logins, NAME:TOKEN[:ROLE] per line (shipyard)\n"
                    f"{name}:{secrets.token_urlsafe(24)}\n")
    return next(iter(read_tokens(path)))


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    expires: float
    role: str = DEFAULT_LOGIN_ROLE


@dataclass
class Logins:
    """Tokens that open a session, and the open sessions (bounded, oldest dropped)."""

    tokens: dict[str, Login]
    clock: Callable[[], float] = time.monotonic
    sessions: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def _now(self) -> float:
        return self.clock()

    def user_of(self, token: str) -> Login | None:
        """Who logs in with ``token``, compared in constant time."""
        found = None
        for known, login in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = login
        return found

    def login(self, token: str) -> Session | None:
        user = self.user_of(token)
        if user is None:
            return None
        session = Session(id=secrets.token_urlsafe(32), user=user.name,
                          csrf=secrets.token_urlsafe(24), expires=self._now() + SESSION_TTL_S,
                          role=user.role)
        self.sessions[session.id] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self.sessions.get(sid)
        if session is None:
            return None
        if session.expires < self._now():
            del self.sessions[sid]
            return None
        return session

    def logout(self, sid: str | None) -> None:
        if sid:
            self.sessions.pop(sid, None)


def cookie_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The session id in a request's Cookie headers."""
    for name, value in headers:
        if name != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, _, val = part.strip().partition("=")
            if key == COOKIE:
                return val
    return None
