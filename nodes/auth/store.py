"""The auth directory: identities, their credentials files, and the nats-server config.

Layout (``shipyard auth init --dir DIR``; ``shipyard up`` uses ``<home>/auth``)::

    DIR/identities.json     every identity ever added (revoked ones stay, marked)
    DIR/nats-auth.conf      nats-server ``authorization`` block: one nkey user per
                            identity that is not revoked, with its permissions
    DIR/creds/<name>.creds  credentials files (mode 0600), unless written elsewhere

Why config-file nkey users and reload, not NATS JWT accounts: measured on nats-server
2.15 here, ``SIGHUP`` re-reads ``nats-auth.conf`` and closes a removed user's live
connection 21 ms later while every other connection stays; there is no account resolver
to run and no JWT to encode.  ``nats-auth.conf`` is a complete server config and can be
``include``d from an operator's own.  The price: adding an identity rewrites a file on
the server's host, where ``shipyard auth`` runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec

from nodes.auth.keys import Credentials, new_seed, public_key_of, write_credentials
from nodes.auth.permissions import server_users
from protocol import subjects
from protocol.auth import Identity, check_role
from protocol.errors import Conflict, NotFound, ShipyardError

AUTH_DIR = "auth"  # in the stack home
IDENTITIES_FILE = "identities.json"
SERVER_CONFIG = "nats-auth.conf"
CREDS_DIR = "creds"
ADMIN = "admin"

# What ``init`` creates: the first admin and one node identity per role (named as
# ``shipyard up`` names its nodes).
INIT_NODES: tuple[tuple[str, str, str | None], ...] = (
    ("deployer", "deployer", "control"), ("design", "design", "control"),
    ("govern", "govern", "control"), ("gateway", "gateway", "api"),
    ("automation-1", "automation", "automation"), ("api-1", "api", "api"),
)

_IDENTITIES = msgspec.json.Decoder(list[Identity])


def home_auth_dir(home: Path) -> Path:
    """The auth directory ``shipyard up`` uses in a stack home."""
    return home / AUTH_DIR


def admin_credentials(home: Path) -> Path:
    """The first admin's credentials file in a stack home's auth directory."""
    return AuthStore(home_auth_dir(home)).creds_path(ADMIN)


class AuthStoreError(ShipyardError):
    """The auth directory is missing or damaged."""


class AuthStore:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def identities_file(self) -> Path:
        return self.dir / IDENTITIES_FILE

    @property
    def server_config(self) -> Path:
        return self.dir / SERVER_CONFIG

    def creds_path(self, name: str) -> Path:
        return self.dir / CREDS_DIR / f"{name}.creds"

    @property
    def exists(self) -> bool:
        return self.identities_file.exists()

    # -- reading -----------------------------------------------------------------------

    def identities(self) -> list[Identity]:
        try:
            data = self.identities_file.read_bytes()
        except FileNotFoundError:
            raise AuthStoreError(f"no auth directory at {self.dir}: run 'shipyard auth "
                                 f"init --dir {self.dir}' first") from None
        try:
            return _IDENTITIES.decode(data)
        except msgspec.DecodeError as exc:
            raise AuthStoreError(f"{self.identities_file} is damaged: {exc}") from None

    def get(self, name: str) -> Identity:
        for i in self.identities():
            if i.name == name:
                return i
        raise NotFound(f"no identity named {name!r} in {self.dir}")

    # -- changing ----------------------------------------------------------------------

    def init(self) -> list[tuple[Identity, Path]]:
        """Create the admin and one node identity per role; refuse if already done."""
        if self.exists:
            raise Conflict(f"{self.dir} already holds identities ({IDENTITIES_FILE}); "
                           "add more with 'shipyard auth user add' / 'auth node add'")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._save([])
        made = [self.add(ADMIN, kind="user", role="admin")]
        for name, role, infra in INIT_NODES:
            made.append(self.add(name, kind="node", role=role, infra=infra))
        return made

    def ensure(self) -> bool:
        """``init`` unless done already; True if it created the directory."""
        if self.exists:
            return False
        self.init()
        return True

    def add(self, name: str, *, kind: str, role: str, infra: str | None = None,
            out: Path | None = None) -> tuple[Identity, Path]:
        """Add an identity, write its credentials file and the server config."""
        subjects.token(name, "identity name")
        check_role(role, kind)
        if infra is not None:
            subjects.token(infra, "infra")
        current = self.identities()
        if any(i.name == name for i in current):
            raise Conflict(f"an identity named {name!r} exists already (names are never "
                           "re-used, even after a revoke)")
        seed = new_seed()
        identity = Identity(name=name, kind=kind, role=role, public_key=public_key_of(seed),
                            infra=infra, created_at=time.time())
        path = write_credentials(out or self.creds_path(name),
                                 Credentials(name=name, kind=kind, role=role, seed=seed,
                                             infra=infra))
        self._save([*current, identity])
        return identity, path.resolve()

    def revoke(self, name: str) -> Identity:
        current = self.identities()
        for n, i in enumerate(current):
            if i.name == name:
                if i.revoked:
                    return i
                current[n] = msgspec.structs.replace(i, revoked_at=time.time())
                self._save(current)
                return current[n]
        raise NotFound(f"no identity named {name!r} in {self.dir}")

    def _save(self, identities: list[Identity]) -> None:
        """identities.json, then the server config from it; each replaced whole."""
        _write(self.identities_file, msgspec.json.format(msgspec.json.encode(identities)))
        users = server_users(identities)
        text = ("# Written by 'shipyard auth' from identities.json: edits are overwritten.\n"
                "authorization: " + json.dumps({"users": users}, indent=1) + "\n")
        _write(self.server_config, text.encode())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
