"""Keys and credentials files.

A credentials file is the nats-tools "decorated nkey" format with a few ``# key: value``
header lines shipyard reads (name, kind, role, infra)::

    # shipyard credentials: keep this file secret (it holds a private key)
    # name: alice
    # kind: user
    # role: deployer
    -----BEGIN USER NKEY SEED-----
    SUA...
    ------END USER NKEY SEED------

The Go ``nats`` CLI reads it as it is (``nats --nkey FILE``); shipyard passes the seed to
nats-py (``nkeys_seed_str``) and signs commands with the same key.  Measured here
(PyNaCl through ``nkeys``, best of 5 x 20,000, 400 bytes): signing ~20 µs, verifying
~55 µs, on a loaded 2-core machine.  PyNaCl (libsodium) is the fastest Ed25519 at hand:
``cryptography`` (OpenSSL) took 33 µs to sign and 108 µs to verify on the same data.
"""

from __future__ import annotations

import base64
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

from protocol.errors import ShipyardError

SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
SEED_END = "------END USER NKEY SEED------"
_HEADER = re.compile(r"^#\s*(name|kind|role|infra):\s*(\S+)\s*$")
_SEED = re.compile(r"^\s*(SU[A-Z2-7]{56})\s*$")


class CredentialsError(ShipyardError):
    """A credentials file is missing, unreadable or not in the expected format."""


def new_seed() -> str:
    """A new user seed (``SU...``) from 32 random bytes."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key_of(seed: str) -> str:
    kp = nkeys.from_seed(bytearray(seed.encode()))
    try:
        public: str = kp.public_key.decode()
        return public
    finally:
        kp.wipe()


def inbox_prefix(name: str) -> str:
    """The only reply subjects identity ``name`` may subscribe to (its NATS permissions
    allow ``<prefix>.>``), so no identity reads another's replies."""
    return f"_INBOX.{name}"


@dataclass(frozen=True)
class Credentials:
    name: str
    kind: str  # user | node
    role: str
    seed: str
    infra: str | None = None
    path: Path | None = None

    @property
    def public_key(self) -> str:
        return public_key_of(self.seed)

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)

    def keypair(self) -> nkeys.KeyPair:
        return nkeys.from_seed(bytearray(self.seed.encode()))


def render(creds: Credentials) -> str:
    lines = ["# shipyard credentials: keep this file secret (it holds a private key)",
             f"# name: {creds.name}", f"# kind: {creds.kind}", f"# role: {creds.role}"]
    if creds.infra:
        lines.append(f"# infra: {creds.infra}")
    return "\n".join([*lines, SEED_BEGIN, creds.seed, SEED_END, ""])


def write_credentials(path: Path, creds: Credentials) -> Path:
    """Write ``creds`` to ``path`` (mode 0600, replaced whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(creds))
    os.replace(tmp, path)
    return path


def parse_credentials(text: str, where: str = "credentials") -> Credentials:
    fields: dict[str, str] = {}
    seed = None
    for line in text.splitlines():
        if m := _HEADER.match(line):
            fields[m.group(1)] = m.group(2)
        elif m := _SEED.match(line):
            seed = m.group(1)
    if seed is None:
        raise CredentialsError(f"{where}: no user nkey seed (a line 'SU...' between "
                               f"{SEED_BEGIN} and {SEED_END})")
    try:
        public_key_of(seed)
    except Exception as exc:
        raise CredentialsError(
            f"{where}: the seed is not a valid nkeys user seed ({exc})") from None
    missing = [k for k in ("name", "kind", "role") if k not in fields]
    if missing:
        raise CredentialsError(f"{where}: missing header line(s) "
                               + ", ".join(f"'# {k}: ...'" for k in missing))
    return Credentials(name=fields["name"], kind=fields["kind"], role=fields["role"],
                       infra=fields.get("infra"), seed=seed)


def read_credentials(path: Path | str) -> Credentials:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: "
                               f"{exc.strerror or exc}") from None
    creds = parse_credentials(text, str(path))
    return Credentials(name=creds.name, kind=creds.kind, role=creds.role, seed=creds.seed,
                       infra=creds.infra, path=path)


def is_shipyard_credentials(path: str) -> bool:
    """A shipyard (decorated nkey) file, as opposed to a NATS JWT ``.creds`` file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return False
    return SEED_BEGIN in text and "BEGIN NATS USER JWT" not in text


@functools.lru_cache(maxsize=1024)
def verify_key(public_key: str) -> nacl.signing.VerifyKey:
    """The Ed25519 key inside an nkeys user public key (``U...``); ``ValueError`` if it
    is not one."""
    try:
        raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an nkeys public key: {exc}") from None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError("not an nkeys user public key")
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if nkeys.crc16(bytearray(body)) != crc:
        raise ValueError("nkeys public key checksum mismatch")
    return nacl.signing.VerifyKey(body[1:])


def verify(public_key: str, data: bytes, signature: bytes) -> bool:
    try:
        verify_key(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True
