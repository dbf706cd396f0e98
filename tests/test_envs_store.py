"""The node's environment store with the real ``uv`` and no internet: tiny wheels made in
the test, served from a folder or from a real nats-server's ``sy_wheels`` object store.

uv is run through a small wrapper (``SHIPYARD_UV``) that logs every call and can stall or
tamper on request, so "built once" is counted, not timed."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext

from nodes.envs import build as build_mod
from nodes.envs.fetch import fetch_wheels, store_wheel
from nodes.envs.store import MARKER, EnvBuildFailed, EnvStore
from nodes.envs.uv import IndexSettings, run_uv
from nodes.runtime import transfer
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol.envs import EnvLock, LockedFile, LockedPackage, env_digest, wheel_key
from protocol.subjects import WHEELS_STORE
from tests.helpers import wait_for
from tests.wheels import make_wheel

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PLATFORM = "x86_64-manylinux_2_28"

WRAPPER = """\
#!{python}
import os, pathlib, re, sys, time
args = sys.argv[1:]
with open(os.environ["UV_TEST_LOG"], "a") as f:
    f.write(" ".join(args) + "\\n")
sync = args[:2] == ["pip", "sync"]
if sync and os.environ.get("UV_TEST_STALL"):
    pathlib.Path(os.environ["UV_TEST_STALL"]).write_text(str(os.getpid()))
    time.sleep(60)
if not (sync and os.environ.get("UV_TEST_TAMPER")):
    os.execv({uv!r}, [{uv!r}, *args])
import subprocess
rc = subprocess.call([{uv!r}, *args])
env = pathlib.Path(args[args.index("--python") + 1]).parent.parent
for meta in env.glob("lib/python*/site-packages/*.dist-info/METADATA"):
    # a new file, not a write into the old one: that is a hard link into uv's cache
    tmp = meta.with_name("METADATA.tmp")
    tmp.write_text(re.sub(r"(?m)^Version: .*$", "Version: 6.6.6", meta.read_text()))
    os.replace(tmp, meta)
sys.exit(rc)
"""


class Uv:
    """The wrapper's log: every uv command line, in order."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def calls(self, *words: str) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [ln for ln in lines if ln.split()[:len(words)] == list(words)]


@pytest.fixture
def uv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Uv:
    from uv import find_uv_bin

    script = tmp_path / "uv-wrapper"
    script.write_text(WRAPPER.format(python=sys.executable, uv=str(find_uv_bin())))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("SHIPYARD_UV", str(script))
    monkeypatch.setenv("UV_TEST_LOG", str(tmp_path / "uv.log"))
    return Uv(tmp_path / "uv.log")


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """A local folder of tiny wheels: tinyone 1.0 and 2.0, tinytwo (needs tinyone)."""
    folder = tmp_path / "wheels"
    make_wheel(folder, "tinyone", "1.0")
    make_wheel(folder, "tinyone", "2.0")
    make_wheel(folder, "tiny-two", "1.0", requires=["tinyone"])
    make_wheel(folder, "tiny_three", "0.3")
    return folder


async def lock_of(wheels: Path, requirements: list[str], *, name: str = "ml",
                  wheels_stored: bool = False) -> EnvLock:
    """Resolve ``requirements`` against ``wheels`` with uv into an EnvLock."""
    work = wheels.parent / f"lock-{abs(hash((name, *requirements)))}"
    work.mkdir(exist_ok=True)
    (work / "reqs.in").write_text("".join(f"{r}\n" for r in requirements))
    await run_uv(["pip", "compile", str(work / "reqs.in"), "--format", "pylock.toml",
                  "-o", str(work / "pylock.toml"), "--python-version", PY, "--no-index",
                  "--find-links", str(wheels), "--no-config"], doing="locking",
                 timeout_s=60)
    data = tomllib.loads((work / "pylock.toml").read_text())
    packages = []
    for p in data.get("packages", []):
        (wheel,) = p["wheels"]
        url = wheel["url"]
        packages.append(LockedPackage(
            name=p["name"], version=p["version"],
            wheel=LockedFile(filename=url.rsplit("/", 1)[-1], url=url,
                             sha256=wheel["hashes"]["sha256"])))
    return EnvLock(name=name, requirements=requirements, python=PY, platform=PLATFORM,
                   packages=packages, wheels_stored=wheels_stored,
                   digest=env_digest(PY, PLATFORM, packages))


def relocked(lock: EnvLock, **changes: object) -> EnvLock:
    """``lock`` with fields changed and its digest recomputed."""
    new = msgspec.structs.replace(lock, **changes)  # type: ignore[arg-type]
    return msgspec.structs.replace(new, digest=env_digest(new.python, new.platform,
                                                          new.packages))


async def bad_hash_lock(wheels: Path) -> EnvLock:
    """A lock of tinyone 1.0 whose wheel hash is not the wheel's."""
    good = await lock_of(wheels, ["tinyone==1.0"])
    (pkg,) = good.packages
    assert pkg.wheel is not None
    bad_file = msgspec.structs.replace(pkg.wheel, sha256="0" * 64)
    return relocked(good, packages=[msgspec.structs.replace(pkg, wheel=bad_file)])


def local(wheels: Path) -> IndexSettings:
    return IndexSettings(find_links=[str(wheels)], no_index=True)


async def run_in(python: Path, code: str) -> str:
    with anyio.fail_after(30):
        done = await anyio.run_process([str(python), "-I", "-c", code])
    return done.stdout.decode().strip()


async def test_ensure_builds_an_env_whose_python_imports_the_pinned_version(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tiny-two", "tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    steps: list[str] = []
    python = await envs.ensure(lock, on_progress=steps.append)
    assert python == tmp_path / "envs" / lock.digest / "bin" / "python"
    assert await run_in(python, "import tinyone, tiny_two; print(tinyone.VERSION)") == "1.0"
    assert steps == [f"creating venv (python {PY})", "installing 2 packages", "verifying"]
    assert envs.python_of(lock.digest) == python
    marker = msgspec.json.decode((python.parent.parent / MARKER).read_bytes())
    assert marker["lock"]["digest"] == lock.digest and marker["packages"] == 2
    (state,) = envs.states({lock.digest: ["bundle churn/b1"]})
    assert (state.status, state.names, state.used_by) == ("ready", ["ml"], ["bundle churn/b1"])
    assert state.size > 0 and state.packages == 2 and state.python == PY


async def test_shipyards_interpreter_does_not_see_the_envs_packages(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==2.0"])
    python = await EnvStore(tmp_path / "envs", local(wheels)).ensure(lock)
    assert await run_in(python, "import tinyone; print(tinyone.VERSION)") == "2.0"
    with anyio.fail_after(30):
        missing = await anyio.run_process([sys.executable, "-I", "-c", "import tinyone"],
                                          check=False)
    assert missing.returncode != 0 and b"No module named 'tinyone'" in missing.stderr


async def test_a_built_env_is_returned_without_running_uv(tmp_path: Path, wheels: Path,
                                                          uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    python = await envs.ensure(lock)
    marker = python.parent.parent / MARKER
    before, calls = marker.stat().st_mtime_ns, len(uv_log.calls())
    steps: list[str] = []
    # a new store on the same folder (a restarted node) also finds it built
    for again in (envs, EnvStore(tmp_path / "envs", local(wheels))):
        assert await again.ensure(lock, on_progress=steps.append) == python
    assert len(uv_log.calls()) == calls and marker.stat().st_mtime_ns == before
    assert steps == []


async def test_locks_differing_only_by_name_share_one_env(tmp_path: Path, wheels: Path,
                                                          uv_log: Uv) -> None:
    ml = await lock_of(wheels, ["tinyone==1.0"])
    other = msgspec.structs.replace(ml, name="other", requirements=["tinyone"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    assert await envs.ensure(ml) == await envs.ensure(other)
    assert len(uv_log.calls("venv")) == 1
    assert [p.name for p in (tmp_path / "envs").iterdir() if not p.name.startswith(".")] \
        == [ml.digest]
    (state,) = envs.states({})
    assert state.names == ["ml", "other"]


async def test_concurrent_ensures_of_one_lock_build_once(tmp_path: Path, wheels: Path,
                                                         uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0", "tiny_three"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    # a second store on the same folder stands for a second process: the file lock
    other = EnvStore(tmp_path / "envs", local(wheels))
    results: list[Path] = []
    progress: list[str] = []

    async def one(store: EnvStore) -> None:
        results.append(await store.ensure(lock, on_progress=progress.append))

    async with anyio.create_task_group() as tg:
        for store in (envs, envs, envs, other, other):
            tg.start_soon(one, store)
    assert len(set(results)) == 1 and len(results) == 5
    assert len(uv_log.calls("venv")) == 1 and len(uv_log.calls("pip", "sync")) == 1
    assert "verifying" in progress


async def test_concurrent_ensures_share_one_failure(tmp_path: Path, wheels: Path,
                                                    uv_log: Uv) -> None:
    lock = await bad_hash_lock(wheels)
    envs = EnvStore(tmp_path / "envs", local(wheels))
    errors: list[str] = []

    async def one() -> None:
        with pytest.raises(EnvBuildFailed) as info:
            await envs.ensure(lock)
        errors.append(info.value.message)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert len(errors) == 3 and len(set(errors)) == 1
    assert len(uv_log.calls("venv")) == 1


async def test_a_wrong_wheel_hash_fails_with_uvs_tail_and_leaves_no_dir(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = await bad_hash_lock(wheels)
    envs = EnvStore(tmp_path / "envs", local(wheels))
    with pytest.raises(EnvBuildFailed) as info:
        await envs.ensure(lock)
    message = info.value.message
    assert message.startswith("building env ml: installing 1 package failed: ")
    assert "hash" in message.lower() and "0" * 64 in message
    assert not (tmp_path / "envs" / lock.digest).exists()
    assert envs.python_of(lock.digest) is None
    (state,) = envs.states({})
    assert (state.status, state.digest, state.reason) == ("failed", lock.digest, message)
    # a later ensure tries again (and fails again: the wheel is still not that file)
    with pytest.raises(EnvBuildFailed):
        await envs.ensure(lock)
    assert len(uv_log.calls("venv")) == 2


async def test_a_package_the_index_does_not_have_fails_naming_it(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = relocked(await lock_of(wheels, ["tinyone==1.0"]), packages=[LockedPackage(
        name="nosuchpkg", version="1.0",
        wheel=LockedFile(filename="nosuchpkg-1.0-py3-none-any.whl", sha256="1" * 64))])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    with pytest.raises(EnvBuildFailed) as info:
        await envs.ensure(lock)
    assert "installing 1 package failed" in info.value.message
    assert "nosuchpkg" in info.value.message
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_a_python_the_host_lacks_is_named_in_the_failure(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = relocked(await lock_of(wheels, ["tinyone==1.0"]), python="3.99")
    with pytest.raises(EnvBuildFailed) as info:
        await EnvStore(tmp_path / "envs", local(wheels)).ensure(lock)
    assert info.value.message.startswith("building env ml: no Python 3.99 interpreter on "
                                         "this host")
    assert PY in info.value.message  # what the host has
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_a_build_past_its_timeout_is_killed_and_reported(
        tmp_path: Path, wheels: Path, uv_log: Uv, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "stalled.pid"
    monkeypatch.setenv("UV_TEST_STALL", str(pid_file))
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels), build_timeout_s=3)
    with pytest.raises(EnvBuildFailed) as info:
        await envs.ensure(lock)
    assert info.value.message.startswith("building env ml: installing 1 package failed: "
                                         "gave up: the build ran past 3 s")
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_for(gone, timeout=10, message=f"stalled uv {pid} killed")
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_verification_refuses_an_env_that_is_not_the_lock(
        tmp_path: Path, wheels: Path, uv_log: Uv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_TEST_TAMPER", "1")
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    with pytest.raises(EnvBuildFailed) as info:
        await envs.ensure(lock)
    assert info.value.message == ("building env ml: verifying failed: tinyone==1.0 is "
                                  "locked but 6.6.6 is installed")
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_a_leftover_dir_without_marker_is_replaced(tmp_path: Path, wheels: Path,
                                                         uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0"])
    leftover = tmp_path / "envs" / lock.digest
    (leftover / "bin").mkdir(parents=True)
    (leftover / "bin" / "python").write_text("not a python")
    (leftover / "junk").write_text("half a build")
    envs = EnvStore(tmp_path / "envs", local(wheels))
    assert envs.python_of(lock.digest) is None
    python = await envs.ensure(lock)
    assert not (leftover / "junk").exists()
    assert await run_in(python, "import tinyone; print(tinyone.VERSION)") == "1.0"


async def test_a_lock_without_packages_still_gets_a_venv(tmp_path: Path, wheels: Path,
                                                         uv_log: Uv) -> None:
    lock = relocked(await lock_of(wheels, ["tinyone==1.0"]), packages=[])
    python = await EnvStore(tmp_path / "envs", local(wheels)).ensure(lock)
    assert await run_in(python, "import sys; print(sys.prefix != sys.base_prefix)") == "True"


async def test_collect_removes_an_env_only_after_the_grace_period(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    now = [1000.0]
    one = await lock_of(wheels, ["tinyone==1.0"])
    two = await lock_of(wheels, ["tinyone==2.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels), grace_s=60, clock=lambda: now[0])
    await envs.ensure(one)
    await envs.ensure(two)
    assert await envs.collect({two.digest}) == []
    unused = {s.digest: s.unused_since for s in envs.states({})}
    assert unused == {one.digest: 1000.0, two.digest: 0.0}
    now[0] = 1059.0
    assert await envs.collect({two.digest}) == []
    assert await envs.collect({one.digest, two.digest}) == []  # in use again: clock resets
    assert {s.unused_since for s in envs.states({})} == {0.0}
    now[0] = 1100.0
    assert await envs.collect({two.digest}) == []
    now[0] = 1159.0
    assert await envs.collect({two.digest}) == []
    # a restarted node keeps counting from the recorded time
    restarted = EnvStore(tmp_path / "envs", local(wheels), grace_s=60, clock=lambda: now[0])
    now[0] = 1160.0
    assert await restarted.collect({two.digest}) == [one.digest]
    assert not (tmp_path / "envs" / one.digest).exists()
    assert restarted.python_of(one.digest) is None
    assert restarted.python_of(two.digest) is not None
    assert [s.digest for s in restarted.states({})] == [two.digest]


async def test_collect_never_removes_an_env_being_built(
        tmp_path: Path, wheels: Path, uv_log: Uv, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels), grace_s=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(envs.ensure, lock)
        await wait_for(lambda: (tmp_path / "envs" / lock.digest / "bin").exists(),
                       message="the venv being created")
        assert await envs.collect(set()) == []
        assert [s.status for s in envs.states({})] == ["building"]
    assert envs.python_of(lock.digest) is not None
    assert await envs.collect(set()) == [lock.digest]  # grace 0: unused now, removed now


@asynccontextmanager
async def jetstream(settings: NatsSettings) -> AsyncIterator[JetStreamContext]:
    nc = await connect(settings, name="test-envs")
    try:
        yield nc.jetstream(timeout=5.0)
    finally:
        await nc.close()


async def test_store_wheel_uploads_each_wheel_once(settings: NatsSettings,
                                                   wheels: Path) -> None:
    wheel = wheels / "tinyone-1.0-py3-none-any.whl"
    lock = await lock_of(wheels, ["tinyone==1.0"])
    (pkg,) = lock.packages
    assert pkg.wheel is not None
    async with jetstream(settings) as js:
        assert await store_wheel(js, wheel, pkg.wheel.sha256) is True
        assert await store_wheel(js, wheel, pkg.wheel.sha256) is False
        stored = await transfer.stat(js, WHEELS_STORE, wheel_key(pkg.wheel.sha256))
        assert stored.sha256 == pkg.wheel.sha256 and stored.size == wheel.stat().st_size


async def test_store_wheel_refuses_a_file_that_is_not_the_hash(settings: NatsSettings,
                                                               wheels: Path) -> None:
    from protocol.errors import BadRequest, NotFound

    async with jetstream(settings) as js:
        with pytest.raises(BadRequest, match="has SHA-256"):
            await store_wheel(js, wheels / "tinyone-1.0-py3-none-any.whl", "2" * 64)
        with pytest.raises(NotFound):
            await transfer.stat(js, WHEELS_STORE, wheel_key("2" * 64))


async def test_an_env_installs_from_stored_wheels_with_no_index_reachable(
        settings: NatsSettings, tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tiny-two", "tinyone==2.0"], wheels_stored=True)
    unreachable = IndexSettings(index_url="http://127.0.0.1:9/simple")
    async with jetstream(settings) as js:
        for p in lock.packages:
            assert p.wheel is not None
            assert await store_wheel(js, wheels / p.wheel.filename, p.wheel.sha256)
        envs = EnvStore(tmp_path / "envs", unreachable,
                        fetch=lambda lk, dest: fetch_wheels(js, lk, dest))
        steps: list[str] = []
        python = await envs.ensure(lock, on_progress=steps.append)
    assert await run_in(python, "import tinyone; print(tinyone.VERSION)") == "2.0"
    assert steps == [f"creating venv (python {PY})", "fetching 2 wheels",
                     "installing 2 packages", "verifying"]
    assert sorted(p.name for p in (tmp_path / "envs" / ".wheels").iterdir()) == sorted(
        p.wheel.filename for p in lock.packages if p.wheel is not None)
    (sync,) = uv_log.calls("pip", "sync")
    assert "--no-index" in sync.split() and "127.0.0.1:9" not in sync


async def test_a_wheel_missing_from_the_store_fails_naming_the_package(
        settings: NatsSettings, tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0"], wheels_stored=True)
    async with jetstream(settings) as js:
        await transfer.ensure_bucket(js, WHEELS_STORE)
        envs = EnvStore(tmp_path / "envs", local(wheels),
                        fetch=lambda lk, dest: fetch_wheels(js, lk, dest))
        with pytest.raises(EnvBuildFailed) as info:
            await envs.ensure(lock)
    assert info.value.message == (
        "building env ml: fetching 1 wheel failed: wheel tinyone-1.0-py3-none-any.whl of "
        "tinyone==1.0 is not in sy_wheels; expected it stored by 'bundle create --wheels'")
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_fetch_refuses_a_wheel_name_that_leaves_the_folder(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    from protocol.errors import BadRequest

    lock = await lock_of(wheels, ["tinyone==1.0"])
    (pkg,) = lock.packages
    assert pkg.wheel is not None
    hostile = relocked(lock, packages=[msgspec.structs.replace(
        pkg, wheel=msgspec.structs.replace(pkg.wheel, filename="../../evil.whl"))])
    async with jetstream(settings) as js:
        with pytest.raises(BadRequest, match="not a plain"):
            await fetch_wheels(js, hostile, tmp_path / "dest")
    assert not (tmp_path / "evil.whl").exists()


def test_requirements_pin_every_locked_file_hash() -> None:
    lock = EnvLock(name="ml", python=PY, platform=PLATFORM, packages=[LockedPackage(
        name="a", version="1", wheel=LockedFile(filename="a-1-py3-none-any.whl",
                                                sha256="a" * 64),
        sdist=LockedFile(filename="a-1.tar.gz", sha256="b" * 64))])
    assert build_mod.requirements(lock) == textwrap.dedent(f"""\
        a==1 --hash=sha256:{'a' * 64} --hash=sha256:{'b' * 64}
        """)


@pytest.mark.parametrize("change", [
    {"python": "/tmp/some/python"},
    {"packages": [LockedPackage(name="--index-url=http://evil", version="1",
                                wheel=LockedFile(filename="x-1-py3-none-any.whl",
                                                 sha256="3" * 64))]},
    {"packages": [LockedPackage(name="x", version="1\n--find-links /tmp",
                                wheel=LockedFile(filename="x-1-py3-none-any.whl",
                                                 sha256="3" * 64))]},
])
async def test_a_hostile_lock_is_refused_before_uv_runs(
        tmp_path: Path, wheels: Path, uv_log: Uv, change: dict[str, object]) -> None:
    lock = relocked(await lock_of(wheels, ["tinyone==1.0"]), **change)
    calls = len(uv_log.calls())
    with pytest.raises(EnvBuildFailed, match=r"^building env ml: the lock has "):
        await EnvStore(tmp_path / "envs", local(wheels)).ensure(lock)
    assert len(uv_log.calls()) == calls
    assert not (tmp_path / "envs").exists()


async def test_a_lock_whose_digest_is_not_its_content_is_refused(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    one = await lock_of(wheels, ["tinyone==1.0"])
    two = await lock_of(wheels, ["tinyone==2.0"])
    forged = msgspec.structs.replace(two, digest=one.digest)
    with pytest.raises(EnvBuildFailed, match="is not the digest of its packages"):
        await EnvStore(tmp_path / "envs", local(wheels)).ensure(forged)


async def test_a_cancelled_build_leaves_no_dir_and_a_waiter_builds_it(
        tmp_path: Path, wheels: Path, uv_log: Uv, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "stalled.pid"
    monkeypatch.setenv("UV_TEST_STALL", str(pid_file))
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels))
    first = anyio.CancelScope()
    seen: list[str] = []
    built: list[Path] = []

    async def builder() -> None:
        with first:
            await envs.ensure(lock)

    async def waiter() -> None:
        built.append(await envs.ensure(lock, on_progress=seen.append))

    async with anyio.create_task_group() as tg:
        tg.start_soon(builder)
        await wait_for(pid_file.exists, message="pip sync stalled")
        tg.start_soon(waiter)
        await wait_for(lambda: seen == ["installing 1 package"],
                       message="the waiter told the current step")
        monkeypatch.delenv("UV_TEST_STALL")
        first.cancel()
    assert first.cancelled_caught
    assert await run_in(built[0], "import tinyone; print(tinyone.VERSION)") == "1.0"
    assert len(uv_log.calls("venv")) == 2  # the waiter built from scratch
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


async def test_a_second_process_waits_for_the_first_and_says_so(
        tmp_path: Path, wheels: Path, uv_log: Uv, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "stalled.pid"
    monkeypatch.setenv("UV_TEST_STALL", str(pid_file))
    lock = await lock_of(wheels, ["tinyone==1.0"])
    one = EnvStore(tmp_path / "envs", local(wheels), build_timeout_s=2)
    two = EnvStore(tmp_path / "envs", local(wheels), build_timeout_s=2)
    seen: list[str] = []
    errors: list[str] = []

    async def build(store: EnvStore) -> None:
        with pytest.raises(EnvBuildFailed) as info:
            await store.ensure(lock, on_progress=seen.append)
        errors.append(info.value.message)

    async with anyio.create_task_group() as tg:
        tg.start_soon(build, one)
        await wait_for(pid_file.exists, message="pip sync stalled")
        tg.start_soon(build, two)
    assert "waiting for another process building it" in seen
    assert any("gave up: the build ran past 2 s" in e for e in errors)
    assert not (tmp_path / "envs" / lock.digest).exists()


async def test_collect_learns_envs_already_on_disk(tmp_path: Path, wheels: Path,
                                                   uv_log: Uv) -> None:
    lock = await lock_of(wheels, ["tinyone==1.0"])
    await EnvStore(tmp_path / "envs", local(wheels)).ensure(lock)
    restarted = EnvStore(tmp_path / "envs", local(wheels))
    assert restarted.states({}) == []
    assert await restarted.collect({lock.digest}) == []
    (state,) = restarted.states({lock.digest: ["api churn-api/v1"]})
    assert (state.status, state.names, state.used_by) == ("ready", ["ml"],
                                                          ["api churn-api/v1"])
    assert state.size > 0


async def test_collect_removes_fetched_wheels_no_env_locks(
        settings: NatsSettings, tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    now = [0.0]
    one = await lock_of(wheels, ["tinyone==1.0"], wheels_stored=True)
    two = await lock_of(wheels, ["tinyone==2.0"], wheels_stored=True)
    async with jetstream(settings) as js:
        for lock in (one, two):
            for p in lock.packages:
                assert p.wheel is not None
                await store_wheel(js, wheels / p.wheel.filename, p.wheel.sha256)
        envs = EnvStore(tmp_path / "envs", IndexSettings(no_index=True), grace_s=60,
                        fetch=lambda lk, dest: fetch_wheels(js, lk, dest),
                        clock=lambda: now[0])
        await envs.ensure(one)
        await envs.ensure(two)
    fetched = tmp_path / "envs" / ".wheels"
    for wheel in fetched.iterdir():
        os.utime(wheel, (100.0, 100.0))
    now[0] = 1000.0
    assert await envs.collect({two.digest}) == []
    assert len(list(fetched.iterdir())) == 2  # both envs still built
    now[0] = 1060.0
    assert await envs.collect({two.digest}) == [one.digest]
    assert [p.name for p in fetched.iterdir()] == ["tinyone-2.0-py3-none-any.whl"]


def test_a_test_wheel_made_twice_has_one_hash(tmp_path: Path) -> None:
    a = make_wheel(tmp_path / "a", "tinyone", "1.0")
    b = make_wheel(tmp_path / "b", "tinyone", "1.0")
    assert a.read_bytes() == b.read_bytes()


async def test_ensure_of_a_built_env_restarts_its_grace_period(
        tmp_path: Path, wheels: Path, uv_log: Uv) -> None:
    now = [1000.0]
    lock = await lock_of(wheels, ["tinyone==1.0"])
    envs = EnvStore(tmp_path / "envs", local(wheels), grace_s=60, clock=lambda: now[0])
    python = await envs.ensure(lock)
    assert await envs.collect(set()) == []  # unused since 1000
    now[0] = 1059.0
    assert await envs.ensure(lock) == python  # about to be used again (a rollback)
    assert [s.unused_since for s in envs.states({})] == [0.0]
    now[0] = 1061.0
    assert await envs.collect(set()) == []  # unused since 1061, not 1000
    now[0] = 1121.0
    assert await envs.collect(set()) == [lock.digest]


async def test_collect_removes_a_leftover_no_build_holds(tmp_path: Path, wheels: Path,
                                                         uv_log: Uv) -> None:
    leftover = tmp_path / "envs" / ("e" * 64)
    (leftover / "lib").mkdir(parents=True)
    (leftover / "lib" / "half.py").write_text("")
    envs = EnvStore(tmp_path / "envs", local(wheels))
    assert await envs.collect(set()) == []
    assert not leftover.exists()
