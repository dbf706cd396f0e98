"""Every connection option in one place.

A NATS URL is found in this order: an explicit ``--nats``, ``SHIPYARD_NATS_URL``,
``./.shipyard/stack.json`` (written by ``shipyard up``), then ``nats://127.0.0.1:4222``.
Credentials, TLS and the JetStream replica count come from ``SHIPYARD_*`` variables or
from ``stack.json``.

``creds_file`` is either a shipyard credentials file (``nodes.auth.keys``: an nkey seed
and the identity's name, which also sets the connection's inbox prefix) or a NATS JWT
``.creds`` file.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodes.auth.keys import CredentialsError, is_shipyard_credentials, read_credentials

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_HOME = Path(".shipyard")
STACK_FILE = "stack.json"


@dataclass(frozen=True)
class NatsSettings:
    """How to reach NATS, and how to lay out JetStream state."""

    servers: tuple[str, ...] = (DEFAULT_URL,)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    inbox_prefix: str | None = None
    connect_timeout: float = 3.0
    replicas: int = 1
    source: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return ",".join(self.servers)

    def with_url(self, url: str, source: str = "explicit") -> NatsSettings:
        return replace(self, servers=split_servers(url), source=source)

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca_file or self.tls_cert_file):
            return None
        ctx = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_cert_file:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.aio.client.Client.connect`` (auth and TLS only)."""
        opts: dict[str, Any] = {}
        if self.creds_file:
            if not Path(self.creds_file).is_file():
                raise CredentialsError(f"credentials file {self.creds_file} not found")
            if is_shipyard_credentials(self.creds_file):
                creds = read_credentials(self.creds_file)
                opts["nkeys_seed_str"] = creds.seed
                opts["inbox_prefix"] = creds.inbox_prefix
            else:
                opts["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            opts["nkeys_seed"] = self.nkey_seed_file
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password
        if self.token:
            opts["token"] = self.token
        tls = self.tls_context()
        if tls is not None:
            opts["tls"] = tls
        if self.inbox_prefix:  # explicit wins over the identity's
            opts["inbox_prefix"] = self.inbox_prefix
        return opts


def split_servers(url: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in url.split(",") if s.strip())
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


def read_stack_file(home: Path) -> dict[str, Any] | None:
    path = home / STACK_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def resolve(url: str | None = None, *, home: Path | None = None,
            env: dict[str, str] | None = None, creds: str | None = None) -> NatsSettings:
    """Build settings from an explicit URL, the environment and ``stack.json``.

    Credentials: ``creds`` (``--creds``), else ``SHIPYARD_NATS_CREDS``.  File paths are
    made absolute here, against the directory the command runs in: processes a node
    starts (an API node's workers) run elsewhere and read the same files."""
    env = dict(os.environ) if env is None else env
    stack = read_stack_file(home or Path(env.get("SHIPYARD_HOME", DEFAULT_HOME)))
    if url:
        servers, source = split_servers(url), "--nats"
    elif env.get("SHIPYARD_NATS_URL"):
        servers, source = split_servers(env["SHIPYARD_NATS_URL"]), "SHIPYARD_NATS_URL"
    elif stack and isinstance(stack.get("nats_url"), str):
        servers, source = split_servers(stack["nats_url"]), STACK_FILE
    else:
        servers, source = (DEFAULT_URL,), "default"
    replicas = env.get("SHIPYARD_REPLICAS") or (stack or {}).get("replicas") or 1
    return NatsSettings(
        servers=servers,
        creds_file=_absolute(creds or env.get("SHIPYARD_NATS_CREDS")),
        nkey_seed_file=_absolute(env.get("SHIPYARD_NATS_NKEY")),
        user=env.get("SHIPYARD_NATS_USER") or None,
        password=env.get("SHIPYARD_NATS_PASSWORD") or None,
        token=env.get("SHIPYARD_NATS_TOKEN") or None,
        tls_ca_file=_absolute(env.get("SHIPYARD_NATS_TLS_CA")),
        tls_cert_file=_absolute(env.get("SHIPYARD_NATS_TLS_CERT")),
        tls_key_file=_absolute(env.get("SHIPYARD_NATS_TLS_KEY")),
        replicas=int(replicas),
        source=source,
    )
