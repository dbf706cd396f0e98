"""Building one environment from its lock: venv, wheels, install, verify.

The steps are uv's: ``uv venv --python <x.y> --python-preference only-system`` (never a
downloaded interpreter: an env runs on a Python the host has), then ``uv pip sync
--require-hashes`` of a requirements file rendered from the lock, from the fetched
``sy_wheels`` folder with ``--no-index`` when the lock's wheels are stored, else from the
node's index settings.  ``--require-hashes`` makes uv install exactly the locked files
or fail; verification then runs the env's own interpreter (``-I``: nothing of
shipyard's on its path) and compares every locked distribution with what is installed,
so a build that installed something else never counts as built.

A cold build of 3 tiny wheels from a local folder, with an empty uv cache, takes
0.32 s p50 here (2 shared cores): ``uv venv`` 174 ms (it inspects the interpreter),
``uv pip sync`` 75 ms, verification 54 ms (an interpreter start); from ``sy_wheels``
0.35 s (fetching the 3 wheels adds ~7 ms).  The time of a real env is uv's download and
unpack.

Every uv call gets what is left of the build's time; a failure raises
``EnvBuildFailed`` naming the env and the step and ending with uv's last lines, which is
what ``deploy --wait`` shows.  The lock is checked before anything runs: its digest must
be its content's, and its Python version, names and versions must be plain, so a
hostile lock cannot reach uv as a path to another interpreter or as an option.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from nodes.envs import uv
from nodes.envs.uv import IndexSettings, UvFailed
from protocol.envs import EnvLock
from protocol.errors import InvalidMessage, OperationError

REQUIREMENTS = ".lock-requirements.txt"  # in the env dir: what was installed, readable
PYTHON = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?\Z")
NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*\Z")

Fetch = Callable[[EnvLock, Path], Awaitable[None]]
Step = Callable[[str], Awaitable[None]]

# Runs in the env's interpreter with -I: the distributions it sees, and its version.
VERIFY = """\
import importlib.metadata as m, json, re, sys
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "dists": {
    re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
    for d in m.distributions() if d.metadata["Name"]}}))
"""


class EnvBuildFailed(OperationError):
    """An environment could not be built or verified; the message names the env and
    the step that failed and ends with the tool's last lines."""

    def __init__(self, message: str, *, digest: str = "") -> None:
        super().__init__(message, details={"digest": digest} if digest else None)


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_lock(lock: EnvLock) -> None:
    """Raise ``EnvBuildFailed`` unless ``lock`` is well formed, its digest is its
    content's, and nothing in it could be read as a path or an option by uv."""
    try:
        lock.validate()
    except InvalidMessage as exc:
        raise EnvBuildFailed(f"building env {lock.name}: {exc.reason}") from None
    bad = [] if PYTHON.match(lock.python) else [f"python {lock.python!r}"]
    bad += [f"package {p.name!r} {p.version!r}" for p in lock.packages
            if not NAME.match(p.name) or not VERSION.match(p.version)]
    if bad:
        raise EnvBuildFailed(f"building env {lock.name}: the lock has {', '.join(bad)}; "
                             "expected a version like '3.11' and plain package names and "
                             "versions")


def requirements(lock: EnvLock) -> str:
    """The lock as a ``--require-hashes`` requirements file: one pinned line per package
    with every locked file's hash."""
    lines = []
    for p in sorted(lock.packages, key=lambda p: p.name):
        hashes = " ".join(f"--hash=sha256:{h}" for h in p.hashes)
        lines.append(f"{p.pin} {hashes}".rstrip())
    return "".join(f"{line}\n" for line in lines)


def python_in(env: Path) -> Path:
    """The interpreter of the venv at ``env``."""
    return env / "bin" / "python"


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


class Build:
    """One build of ``lock`` into ``env`` (which must not exist), done by ``run``.

    ``fetch`` puts the lock's wheels into ``wheels`` when the lock says they are stored;
    ``step`` is told each step as it starts; ``timeout_s`` bounds the whole build;
    ``cache`` is uv's cache folder (uv's default without it)."""

    def __init__(self, lock: EnvLock, env: Path, *, index: IndexSettings, wheels: Path,
                 fetch: Fetch | None, timeout_s: float, step: Step,
                 cache: Path | None = None) -> None:
        self.lock = lock
        # uv installs by hard-linking from its cache: a cache of the node's own keeps
        # envs apart from every other uv user on the host (an operator's UV_CACHE_DIR
        # still wins)
        self.uv_env = ({"UV_CACHE_DIR": str(cache)}
                       if cache is not None and "UV_CACHE_DIR" not in os.environ else {})
        self.env = env
        self.index = index
        self.wheels = wheels
        self.fetch = fetch
        self.timeout_s = timeout_s
        self.step = step
        self.deadline = anyio.current_time() + timeout_s

    def left(self) -> float:
        return max(0.01, self.deadline - anyio.current_time())

    async def run(self) -> None:
        """Build, install and verify.  Raises ``EnvBuildFailed``; what it made under
        ``env`` is the caller's to remove."""
        lock, env = self.lock, self.env
        doing = f"creating venv (python {lock.python})"
        await self.step(doing)
        try:
            await uv.run_uv(["venv", "--python", lock.python, "--python-preference",
                             "only-system", "--no-config", str(env)],
                            doing=doing, timeout_s=self.left(), cwd=env.parent,
                            env=self.uv_env)
        except UvFailed as exc:
            if "no interpreter" in exc.tail.lower():
                raise await self._no_python(exc) from None
            raise self._failure(doing, exc) from None
        n = len(lock.packages)
        source = self.index.args()
        if lock.wheels_stored and self.fetch is not None and n:
            await self._fetch(_plural(n, "wheel"))
            source = ["--no-index", "--find-links", str(self.wheels)]
        doing = f"installing {_plural(n, 'package')}"
        await self.step(doing)
        reqs = env / REQUIREMENTS
        try:
            await anyio.to_thread.run_sync(reqs.write_text, requirements(lock))
        except OSError as exc:
            raise self._fail(doing, f"cannot write {reqs}: {exc}") from None
        try:
            await uv.run_uv(["pip", "sync", "--python", str(python_in(env)),
                             "--require-hashes", "--no-config", *source, str(reqs)],
                            doing=doing, timeout_s=self.left(), cwd=env.parent,
                            env=self.uv_env)
        except UvFailed as exc:
            raise self._failure(doing, exc) from None
        await self.step("verifying")
        await self._verify()

    async def _fetch(self, wheels: str) -> None:
        assert self.fetch is not None
        doing = f"fetching {wheels}"
        await self.step(doing)
        with anyio.move_on_after(self.left()) as scope:
            try:
                await self.fetch(self.lock, self.wheels)
            except OperationError as exc:
                raise self._fail(doing, exc.message) from exc
            except Exception as exc:  # the connection, the disk: still a failed build
                raise self._fail(doing, repr(exc)) from exc
        if scope.cancelled_caught:
            raise self._fail(doing, f"gave up: the build ran past {self.timeout_s:g} s")

    async def _verify(self) -> None:
        lock, python = self.lock, python_in(self.env)
        try:
            out = await uv.run_tool([str(python), "-I", "-c", VERIFY], doing="verifying",
                                    timeout_s=self.left(), env=uv.uv_environ())
            # the last line: a .pth file of some package may print before it
            seen = json.loads(out.strip().splitlines()[-1])
            dists: dict[str, str] = seen["dists"]
        except UvFailed as exc:
            raise self._failure("verifying", exc) from None
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise self._fail("verifying", f"unreadable answer from {python}: {exc}") \
                from None
        wrong = []
        if seen.get("python") != lock.python:
            wrong.append(f"python is {seen.get('python')}, locked {lock.python}")
        for p in sorted(lock.packages, key=lambda p: p.name):
            got = dists.get(normalize(p.name))
            if got is None:
                wrong.append(f"{p.pin} is locked but not installed")
            elif got != p.version:
                wrong.append(f"{p.pin} is locked but {got} is installed")
        if wrong:
            raise self._fail("verifying", "; ".join(wrong))

    async def _no_python(self, exc: UvFailed) -> EnvBuildFailed:
        """No interpreter for the lock's Python: name it, and what the host has."""
        has = ""
        with contextlib.suppress(UvFailed, ValueError, TypeError, KeyError):
            out = await uv.run_uv(["python", "list", "--only-installed",
                                   "--python-preference", "only-system",
                                   "--output-format", "json", "--no-config"],
                                  doing="listing interpreters",
                                  timeout_s=min(30, self.left()), env=self.uv_env)
            versions = sorted({".".join(str(v["version"]).split(".")[:2])
                               for v in json.loads(out)})
            has = f" (this host has {', '.join(versions) or 'none'})"
        return EnvBuildFailed(f"building env {self.lock.name}: no Python {self.lock.python} "
                              f"interpreter on this host{has}; the lock needs one: "
                              f"{exc.tail}", digest=self.lock.digest)

    def _fail(self, doing: str, why: str) -> EnvBuildFailed:
        return EnvBuildFailed(f"building env {self.lock.name}: {doing} failed: {why}",
                              digest=self.lock.digest)

    def _failure(self, doing: str, exc: UvFailed) -> EnvBuildFailed:
        if exc.timed_out:
            why = f"gave up: the build ran past {self.timeout_s:g} s"
            return self._fail(doing, f"{why}: {exc.tail}" if exc.tail else why)
        return self._fail(doing, exc.tail or exc.doing)
