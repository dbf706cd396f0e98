"""Code environments: the locked Python dependencies a bundle or API package brings.

A project declares environments in its manifest (``[code_envs.<name>]``: requirements and
an optional Python version).  The Design node resolves each environment an artifact uses
into an ``EnvLock`` when it makes the artifact: the exact version of every distribution
and the SHA-256 of the file to install, for one Python version and one platform.  The lock
travels inside the artifact's KV record (``BundleInfo.envs``, ``ApiPackageInfo.env``), so a
node trusts it as it trusts the file list.

An environment's identity is ``EnvLock.digest``: a digest of the Python version, the
platform and the locked files, and not of the environment's name, so two projects (or two
versions of one) with the same lock share one built environment on a node.

With ``--wheels`` the Design node also stores every locked wheel in the ``sy_wheels``
object store under ``wheel_key(sha256)``: content-addressed, so a wheel many bundles use
is stored once, and nodes install from there with no package index at all.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from protocol import checks, subjects
from protocol.errors import BadName, InvalidMessage

BUILTIN = ""  # the environment name of user code that runs in the node's own interpreter

SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def check_sha256(value: str) -> str:
    if not SHA256.match(value):
        raise BadName(f"invalid sha256 {value!r}: expected 64 lowercase hex digits")
    return value


# -- object names --------------------------------------------------------------------------
# sy_wheels (Object Store): <sha256 of the wheel file>

def wheel_key(sha256: str) -> str:
    """Object name of a stored wheel in ``sy_wheels``: the file's SHA-256 (hex)."""
    return subjects.token(sha256, "sha256")


class LockedFile(msgspec.Struct, frozen=True, kw_only=True):
    """One installable file of a locked distribution."""

    filename: str  # e.g. "pandas-2.2.3-cp311-cp311-manylinux_2_17_x86_64.whl"
    sha256: str
    url: str = ""  # where the Design node found it (an index URL or file://)
    size: int = 0


class LockedPackage(msgspec.Struct, frozen=True, kw_only=True):
    """One distribution at one exact version: the wheel to install for the lock's
    platform, or (when none exists) the source distribution to build."""

    name: str  # normalized (PEP 503): lowercase, runs of "-_." as "-"
    version: str
    wheel: LockedFile | None = None
    sdist: LockedFile | None = None

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def hashes(self) -> list[str]:
        return [f.sha256 for f in (self.wheel, self.sdist) if f is not None]


class EnvLock(msgspec.Struct, frozen=True, kw_only=True):
    """An environment, resolved: what a node installs, exactly."""

    name: str  # the manifest's name for it ("ml"); not part of the identity
    requirements: list[str] = []  # as declared, for people reading the lock
    python: str  # "3.11": the interpreter version a node must have
    platform: str  # the uv target platform, e.g. "x86_64-manylinux_2_28"
    packages: list[LockedPackage] = []
    wheels_stored: bool = False  # every package's wheel is in sy_wheels
    digest: str = ""  # env_digest(python, platform, packages)

    def validate(self) -> None:
        """Raise ``InvalidMessage`` unless the lock is well formed and its digest is
        the digest of what it lists."""
        checks.text(self.name, "code env name", limit=128)
        checks.text(self.python, "python", limit=32)
        checks.text(self.platform, "platform", limit=128)
        for p in self.packages:
            checks.text(p.name, "package name", limit=256)
            checks.text(p.version, "package version", limit=128)
            for f in (p.wheel, p.sdist):
                if f is not None:
                    check_sha256(f.sha256)
                    checks.text(f.filename, "file name", limit=512)
        if self.digest != env_digest(self.python, self.platform, self.packages):
            raise InvalidMessage(f"code env {self.name!r}: digest {self.digest[:12]} is not "
                                 "the digest of its packages; expected a lock made by a "
                                 "Design node")


def env_digest(python: str, platform: str, packages: list[LockedPackage]) -> str:
    """An environment's identity: SHA-256 over Python version, platform and every locked
    file, in name order."""
    h = hashlib.sha256(f"shipyard-env-1\0{python}\0{platform}\n".encode())
    for p in sorted(packages, key=lambda p: p.name):
        h.update(f"{p.name}\0{p.version}\0{','.join(sorted(p.hashes))}\n".encode())
    return h.hexdigest()


class EnvSummary(msgspec.Struct, frozen=True, kw_only=True):
    """An environment as listings show it."""

    name: str
    digest: str
    python: str
    platform: str
    packages: list[str] = []  # "name==version", in name order
    wheels_stored: bool = False

    @classmethod
    def of(cls, lock: EnvLock) -> EnvSummary:
        return cls(name=lock.name, digest=lock.digest, python=lock.python,
                   platform=lock.platform,
                   packages=sorted(p.pin for p in lock.packages),
                   wheels_stored=lock.wheels_stored)


def diff_envs(old: dict[str, EnvLock], new: dict[str, EnvLock]) -> list[str]:
    """What changed between two artifacts' environments, one line per change::

        ml: + numpy==2.1.0
        ml: - six==1.16.0
        ml: pandas 2.2.2 -> 2.2.3
        + env nlp
    """
    out: list[str] = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"+ env {name}")
        elif name not in new:
            out.append(f"- env {name}")
        a = {p.name: p.version for p in old[name].packages} if name in old else {}
        b = {p.name: p.version for p in new[name].packages} if name in new else {}
        for pkg in sorted(set(a) | set(b)):
            if pkg not in a:
                out.append(f"{name}: + {pkg}=={b[pkg]}")
            elif pkg not in b:
                out.append(f"{name}: - {pkg}=={a[pkg]}")
            elif a[pkg] != b[pkg]:
                out.append(f"{name}: {pkg} {a[pkg]} -> {b[pkg]}")
        if name in old and name in new and not any(
                line.startswith(f"{name}: ") for line in out) and \
                old[name].digest != new[name].digest:
            out.append(f"{name}: same versions, other files (python {old[name].python} -> "
                       f"{new[name].python}, {old[name].platform} -> {new[name].platform})")
    return out


class EnvState(msgspec.Struct, frozen=True, kw_only=True):
    """One environment on one node, as its heartbeat reports it."""

    digest: str
    names: list[str] = []  # the manifest names it is used under
    python: str = ""
    packages: int = 0
    size: int = 0  # bytes on disk
    status: str = ""  # building | ready | failed
    used_by: list[str] = []  # "bundle <project>/<id>", "api <service>/<version>"
    unused_since: float = 0.0  # wall clock; 0 while something uses it
    reason: str = ""  # why the last build failed
