"""Locking a code environment: requirements in, exact files out.

The Design node resolves each ``[code_envs.<name>]`` an artifact uses with
``uv pip compile --format pylock.toml`` for the target's Python version and platform, and
turns the PEP 751 lock uv writes into an ``EnvLock``: per distribution the exact version,
the one wheel a node of that platform installs (with its SHA-256) and the sdist.  Nodes
never resolve: they install exactly these files, with ``--require-hashes``.

Which wheel: for a platform-specific target uv lists only the wheels that install there,
often several (``py3-none-any`` beside ``cp311-manylinux_2_17``).  We pick the most
specific one by the target's tag order (``packaging.tags``), which is the order pip and uv
prefer.  For targets whose tags we do not model (``windows``, ``linux-android``...), we keep
the first wheel uv lists: every wheel it lists installs on the target, so the first is
correct, merely perhaps not the fastest.

Index credentials never enter a lock: the lock travels in KV records every node reads, so
URLs are stored without their ``user:password@`` part.
"""

from __future__ import annotations

import contextlib
import functools
import platform as _platform
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import anyio
from packaging import tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from nodes.envs.uv import IndexSettings, UvFailed, run_uv
from nodes.project.manifest import (
    MANIFEST,
    PYTHON_VERSION,
    Manifest,
    ManifestError,
    check_requirement,
)
from protocol.envs import EnvLock, LockedFile, LockedPackage, env_digest
from protocol.errors import BadRequest

DEFAULT_LOCK_TIMEOUT_S = 300.0
MAX_REQUIREMENTS_FILE = 1 << 20  # a requirements file larger than 1 MiB is not one

# the manylinux glibc versions uv accepts as a target (``uv pip compile --help``)
_UV_MANYLINUX = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)


class LockFailed(BadRequest):
    """An environment that cannot be locked; the message names it and ends with the
    resolver's last lines (no such package, no version matches, no network...)."""

    def __init__(self, env: str, reason: str) -> None:
        self.env = env
        self.reason = reason
        super().__init__(f"code env {env!r} cannot be locked: {reason}",
                         details={"env": env})


def host_python() -> str:
    """This interpreter's ``major.minor``: the default Python of a lock."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def host_platform() -> str:
    """This host as a uv target platform: ``x86_64-manylinux_2_36`` style on glibc Linux
    (the newest manylinux level uv knows that the host's glibc runs, at least 2_17),
    ``aarch64-apple-darwin`` on macOS, ``x86_64-pc-windows-msvc`` on Windows."""
    machine = _platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform == "darwin":
        return f"{machine}-apple-darwin"
    if sys.platform == "win32":
        return f"{'i686' if machine in ('x86', 'i386', 'i686') else machine}-pc-windows-msvc"
    lib, version = _platform.libc_ver()
    if machine in ("x86_64", "aarch64"):
        if lib == "glibc" and (m := re.match(r"2\.(\d+)", version)):
            minor = int(m.group(1))
            level = max([v for v in _UV_MANYLINUX if v <= minor], default=17)
            return f"{machine}-manylinux_2_{level}"
        if lib == "":
            return f"{machine}-unknown-linux-musl"
    return "linux"


def _platform_tags(target: str) -> list[str] | None:
    """The wheel platform tags a target installs, most specific first; None for
    targets we do not model."""
    if target in ("linux", "x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"):
        arch = "aarch64" if target.startswith("aarch64") else "x86_64"
        target = f"{arch}-manylinux_2_28"  # what uv means by these
    if m := re.fullmatch(r"(x86_64|aarch64)-manylinux(?:_2_(\d+)|(2014))", target):
        arch, glibc = m.group(1), 17 if m.group(3) else int(m.group(2))
        lowest = 5 if arch == "x86_64" else 17
        out: list[str] = []
        for minor in range(glibc, lowest - 1, -1):
            out.append(f"manylinux_2_{minor}_{arch}")
            legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
            if legacy:
                out.append(f"{legacy}_{arch}")
        return out
    if m := re.fullmatch(r"(x86_64|aarch64)-apple-darwin", target):
        arch = "arm64" if m.group(1) == "aarch64" else "x86_64"
        return list(tags.mac_platforms((13, 0) if arch == "arm64" else (12, 0), arch))
    return {"x86_64-pc-windows-msvc": ["win_amd64"], "aarch64-pc-windows-msvc": ["win_arm64"],
            "i686-pc-windows-msvc": ["win32"]}.get(target)


def supported_tags(python: str, target: str) -> list[tags.Tag] | None:
    """Every wheel tag a CPython ``python`` on ``target`` installs, best first."""
    platforms = _platform_tags(target)
    if platforms is None:
        return None
    major, minor = (int(x) for x in python.split("."))
    version = (major, minor)
    interp = f"cp{major}{minor}"
    return [*tags.cpython_tags(version, [interp], platforms),
            *tags.compatible_tags(version, interp, platforms)]


def pick_wheel(filenames: list[str], supported: list[tags.Tag] | None) -> int:
    """Index of the wheel to install among ``filenames`` (the first if we cannot rank)."""
    if supported is None or len(filenames) < 2:
        return 0
    rank = {t: i for i, t in enumerate(supported)}
    best, best_rank = 0, len(rank)
    for i, filename in enumerate(filenames):
        try:
            wheel_tags = parse_wheel_filename(filename)[3]
        except InvalidWheelFilename:
            continue
        r = min((rank[t] for t in wheel_tags if t in rank), default=len(rank))
        if r < best_rank:
            best, best_rank = i, r
    return best


def public_url(url: str) -> str:
    """``url`` without credentials (``https://user:token@host/...`` -> ``https://host/...``)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def _file(env: str, pkg: str, entry: Any) -> LockedFile:
    if not isinstance(entry, dict):
        raise LockFailed(env, f"the resolver's lock lists a file of {pkg} that is not a table")
    url = str(entry.get("url") or entry.get("path") or "")
    filename = str(entry.get("name") or unquote(PurePosixPath(urlsplit(url).path).name))
    hashes = entry.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    if not isinstance(sha256, str) or not sha256:
        raise LockFailed(env, f"{pkg}: {filename or url} has no sha256 in the resolver's "
                              "lock; a node installs only files it can verify")
    size = entry.get("size")
    if not isinstance(size, int):  # find-links folders give no size; the file has one
        size = 0
        if url.startswith("file://"):
            with contextlib.suppress(OSError):
                size = Path(url2pathname(urlsplit(url).path)).stat().st_size
    return LockedFile(filename=filename, sha256=sha256.lower(), url=public_url(url),
                      size=size)


def parse_pylock(text: str, *, env: str, python: str, platform: str,
                 requirements: list[str]) -> EnvLock:
    """Turn a ``pylock.toml`` (PEP 751) written by uv into an ``EnvLock``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockFailed(env, f"the resolver wrote an unreadable lock: {exc}") from None
    supported = supported_tags(python, platform)
    packages: list[LockedPackage] = []
    for raw in doc.get("packages", []):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise LockFailed(env, "the resolver's lock has a package without a name")
        name = canonicalize_name(str(raw["name"]))
        version = str(raw.get("version") or "")
        if not version or any(k in raw for k in ("vcs", "directory")):
            raise LockFailed(env, f"{name} comes from a VCS checkout or a local folder, "
                                  "which cannot be locked to a file hash; build it as a "
                                  "wheel and list it by name and version")
        wheels = [_file(env, name, w) for w in raw.get("wheels", []) or []]
        sdist = _file(env, name, raw["sdist"]) if raw.get("sdist") else None
        if "archive" in raw:  # a direct URL to a file
            f = _file(env, name, raw["archive"])
            if f.filename.endswith(".whl"):
                wheels.append(f)
            else:
                sdist = f
        wheel = wheels[pick_wheel([w.filename for w in wheels], supported)] if wheels else None
        if wheel is None and sdist is None:
            raise LockFailed(env, f"the resolver found no file to install for {name} "
                                  f"{version}")
        packages.append(LockedPackage(name=name, version=version, wheel=wheel, sdist=sdist))
    packages.sort(key=lambda p: p.name)
    return EnvLock(name=env, requirements=list(requirements), python=python,
                   platform=platform, packages=packages,
                   digest=env_digest(python, platform, packages))


async def resolve(name: str, requirements: list[str], *, python: str | None = None,
                  platform: str | None = None, index: IndexSettings,
                  timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> EnvLock:
    """Lock ``requirements`` for ``python`` (default: this interpreter's major.minor) on
    ``platform`` (default: ``host_platform()``).  Raises ``LockFailed`` naming the env,
    with uv's last lines, when they cannot be resolved in ``timeout_s``."""
    python = python or host_python()
    platform = platform or host_platform()
    if not PYTHON_VERSION.match(python):
        raise LockFailed(name, f"python {python!r}: expected major.minor, like \"3.11\"")
    for i, line in enumerate(requirements):  # never hand uv an option line
        try:
            check_requirement(line, f"code env {name}", f"requirements[{i}]")
        except ManifestError as exc:
            raise LockFailed(name, exc.problem) from None
    if not requirements:  # an empty environment: isolation without packages
        return parse_pylock("", env=name, python=python, platform=platform, requirements=[])
    d = Path(await anyio.to_thread.run_sync(
        functools.partial(tempfile.mkdtemp, prefix=f"sy-lock-{name}-")))
    try:
        await anyio.Path(d / "requirements.in").write_text(
            "".join(f"{r}\n" for r in requirements))
        out = d / "pylock.env.toml"  # uv: the name must be pylock.toml or pylock.<x>.toml
        args = ["pip", "compile", "requirements.in", "--format", "pylock.toml", "-o", str(out),
                "--python-version", python, "--python-platform", platform, "--quiet",
                "--no-header", "--no-config", *index.args()]
        try:
            await run_uv(args, doing=f"resolving {len(requirements)} requirement(s)",
                         timeout_s=timeout_s, cwd=d)
        except UvFailed as exc:
            raise LockFailed(name, str(exc)) from None
        text = await anyio.Path(out).read_text()
    finally:
        await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, d, ignore_errors=True))
    return await anyio.to_thread.run_sync(lambda: parse_pylock(
        text, env=name, python=python, platform=platform, requirements=requirements))


def requirements_of(project_dir: Path, manifest: Manifest, env_name: str) -> list[str]:
    """The requirement strings of ``[code_envs.<env_name>]``: its ``requirements``, or
    the lines of its ``requirements_file`` (comments and blank lines skipped).  Option
    lines (``-r``, ``-e``, ``--index-url``...) are refused: where packages come from is
    the node's setting, and a lock needs every requirement by name.  Raises
    ``ManifestError`` naming the file and the line (blocking: run in a thread)."""
    env = manifest.code_envs[env_name]
    if env.requirements is not None:
        return list(env.requirements)
    assert env.requirements_file is not None  # the manifest has one or the other
    rel = env.requirements_file
    label = f"{project_dir.name}/{rel}"
    path = project_dir / rel
    try:
        if not path.resolve().is_relative_to(project_dir.resolve()):
            raise ManifestError(f"{project_dir.name}/{MANIFEST}",
                                f"code_envs.{env_name}.requirements_file",
                                f"{rel} leaves the project (a link?)")
        with path.open("rb") as f:
            raw = f.read(MAX_REQUIREMENTS_FILE + 1)
    except OSError as exc:
        raise ManifestError(f"{project_dir.name}/{MANIFEST}",
                            f"code_envs.{env_name}.requirements_file",
                            f"cannot read {rel}: {exc.strerror or exc}") from None
    if len(raw) > MAX_REQUIREMENTS_FILE:
        raise ManifestError(label, "", f"larger than {MAX_REQUIREMENTS_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(label, "", f"not UTF-8 text ({exc.reason})") from None
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        if line.startswith("-"):
            raise ManifestError(label, f"line {n}",
                                f"{line.split()[0]!r} lines are not supported: list one "
                                "requirement per line (name, version, markers); package "
                                "indexes are the node's --index-url/--find-links")
        if line.endswith("\\"):
            raise ManifestError(label, f"line {n}", "continued lines are not supported: "
                                                    "one requirement per line")
        check_requirement(line, label, f"line {n}")
        out.append(line)
    return out
