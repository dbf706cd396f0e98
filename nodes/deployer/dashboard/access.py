"""Who may use the dashboard, and as whom it acts.

Login: a token file (``NAME:TOKEN`` per line, mode 0600) names who may log in; a line
``NAME:TOKEN:ROLE`` gives the login a role of ``protocol.auth.HUMAN_ROLES`` (default
``deployer``), and a click is refused unless that role may send the command it sends
(``protocol.auth.may_send``): a ``viewer`` or ``reviewer`` login sees a read-only page.
``shipyard up`` writes ``HOME/dashboard.token`` with one line for ``admin`` (kept across restarts)
and prints the login URL ``http://HOST:PORT/login?token=...``; a Deployer started alone
makes ``.shipyard/nodes/<name>/dashboard.token`` with an ``operator`` line unless given
one.  A login trades the token for a session cookie (HttpOnly, SameSite=Strict, 12
hours) and the page gets a per-session CSRF token from ``/api/session`` that every
POST must carry in ``X-CSRF-Token``: a cross-site page can neither send that header
without a CORS preflight (never granted) nor read the token.  Everything but
``/login``, ``/static/`` and ``/metrics`` needs a session.

Sessions are signed, not stored: the cookie carries the login, its role, its expiry and a
random nonce, with an HMAC-SHA256 under a key derived from the token file (every token
in it, which only the Deployers that serve the dashboard hold), and the CSRF token is an
HMAC of the cookie.  So a session outlives its Deployer: a restarted Deployer, or the
standby that takes over after a failover, accepts the open pages' cookies if it reads the
same token file, and a page stays live through either.  Changing the token file (a login
removed, a token changed) ends every session at the next start.  A logout is remembered
by the Deployer that got it (the browser also drops the cookie) until the cookie expires
or that Deployer restarts.

Acting: a click sends the same typed command the CLI sends (``RollbackBundle``,
``DeployBundle``, ``RollbackApi``, ``DeployApi``) on NATS, with ``by`` set to
``dashboard:<login name>``.  On a stack with auth the Deployer's own node identity may not
send commands (nodes send none), so the dashboard signs with a user identity of its own
(``--dashboard-creds``: ``shipyard up`` creates ``dashboard``, role deployer): the audit
ledger records the verified identity ``dashboard`` and, in the arguments, who clicked.
Without those credentials on a stack with auth, the page is read-only and says why.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from protocol import checks
from protocol.auth import HUMAN_ROLES

SESSION_TTL_S = 12 * 3600.0
MAX_LOGOUTS = 1000  # logged-out cookies remembered until they expire (oldest forgotten first)
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


class _Signed(msgspec.Struct, array_like=True, frozen=True):
    """What a session cookie carries, signed."""

    user: str
    role: str
    expires: int  # Unix seconds
    nonce: str


_SIGNED = msgspec.json.Decoder(_Signed)
COOKIE_VERSION = "s1"
MAX_COOKIE = 512  # characters; a signed cookie is ~140


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_key(tokens: dict[str, Login]) -> bytes:
    """The key sessions are signed with: the same for every Deployer that reads the same
    token file, and new when the file changes."""
    material = "\n".join(sorted(f"{t}:{login.name}:{login.role}"
                                for t, login in tokens.items()))
    return hmac.new(b"shipyard dashboard sessions v1", material.encode(),
                    hashlib.sha256).digest()


@dataclass
class Logins:
    """Tokens that open a session; sessions are signed cookies any Deployer with the
    same token file accepts (``clock``: Unix seconds, injectable)."""

    tokens: dict[str, Login]
    clock: Callable[[], float] = time.time
    ended: OrderedDict[str, float] = field(default_factory=OrderedDict)  # logged out

    def __post_init__(self) -> None:
        self._key = session_key(self.tokens)

    def _mac(self, what: bytes) -> str:
        return _b64(hmac.new(self._key, what, hashlib.sha256).digest())

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
        signed = _Signed(user=user.name, role=user.role,
                         expires=int(self.clock() + SESSION_TTL_S),
                         nonce=secrets.token_urlsafe(12))
        body = f"{COOKIE_VERSION}.{_b64(msgspec.json.encode(signed))}"
        return self._session(f"{body}.{self._mac(body.encode())}", signed)

    def _session(self, sid: str, signed: _Signed) -> Session:
        return Session(id=sid, user=signed.user, role=signed.role,
                       expires=float(signed.expires),
                       csrf=self._mac(b"csrf\0" + sid.encode())[:32])

    def session(self, sid: str | None) -> Session | None:
        """The session of cookie value ``sid``: None unless this key signed it, it has
        not expired, and it was not logged out here."""
        if not sid or len(sid) > MAX_COOKIE or sid in self.ended:
            return None
        version, _, rest = sid.partition(".")
        payload, _, mac = rest.partition(".")
        if version != COOKIE_VERSION or not hmac.compare_digest(  # bytes: any cookie text
                self._mac(f"{version}.{payload}".encode()).encode(),
                mac.encode("utf-8", "replace")):
            return None
        try:
            signed = _SIGNED.decode(_unb64(payload))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            return None  # signed by this key, so never expected; refused all the same
        if signed.expires < self.clock():
            return None
        return self._session(sid, signed)

    def logout(self, sid: str | None) -> None:
        session = self.session(sid)
        if session is None or not sid:
            return
        self.ended[sid] = session.expires
        now = self.clock()
        for old, expires in list(self.ended.items()):  # oldest first; drop the expired
            if expires >= now and len(self.ended) <= MAX_LOGOUTS:
                break
            del self.ended[old]


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
