"""The Design node locks code environments into bundles and API packages, and stores
their wheels once each, against a real nats-server and the real uv, with no internet:
tiny wheels in a local folder, the only package source."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client as NATS

from nodes.design import DesignNode
from nodes.design.envs import EnvLocker, WheelsRefused
from nodes.envs.uv import IndexSettings
from nodes.runtime import transfer
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import CreateApiPackage
from protocol.bundles import BUNDLE_INFO, CreateBundle, ListBundles, bundle_key
from protocol.envs import EnvLock, LockedFile, LockedPackage, env_digest, wheel_key
from protocol.errors import BadRequest
from tests.helpers import Background, fleet, shipyard, shipyard_argv
from tests.wheels import make_wheel

PROJECT = """\
[project]
key = "churn"
code_env = "ml"

[code_envs.ml]
requirements = [{reqs}]

[datasets.raw]
path = "data/raw.csv"
ship = true

[datasets.clean]
path = "data/clean.csv"

[recipes.clean]
code = "recipes/clean.py"
inputs = ["raw"]
outputs = ["clean"]

[api_services.churn-api]

[api_services.churn-api.endpoints.score]
kind = "function"
code = "api/score.py"
function = "score"
"""


def write_project(ws: Path, *reqs: str, note: str = "") -> Path:
    d = ws / "churn"
    for rel, text in {"shipyard.toml": PROJECT.format(reqs=", ".join(map(json.dumps, reqs))),
                      "recipes/clean.py": f"import tiny\n\ndef run(ctx):\n    pass\n# {note}\n",
                      "api/score.py": "import tiny\n\ndef score(x):\n    return tiny.VERSION\n",
                      "data/raw.csv": "id\n1\n"}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    make_wheel(d, "tiny", "1.0")
    make_wheel(d, "tiny", "2.0")
    make_wheel(d, "helper-lib", "0.5", requires=["tiny"])
    return d


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- in-process Design node: the record, the store ------------------------------------------

@asynccontextmanager
async def design_node(settings: NatsSettings, tmp_path: Path, wheels: Path, *,
                      find_links: str = "") -> AsyncIterator[tuple[Caller, NATS, Path]]:
    """A Design node in this process whose only package source is ``wheels`` (or the
    ``find_links`` URL)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    index = IndexSettings(find_links=[find_links or str(wheels)], no_index=True)
    async with fleet() as f:
        await f.start(DesignNode(name="design", nats=settings, workspace=ws,
                                 data_dir=tmp_path / "design", heartbeat_interval=0.2,
                                 index=index))
        nc = await connect(settings, name="test")
        try:
            yield Caller(nc, sender="test"), nc, ws
        finally:
            await nc.close()


async def stored_wheels(nc: NATS) -> list[str]:
    store = await nc.jetstream().object_store(subjects.WHEELS_STORE)
    try:
        return sorted(o.name for o in await store.list() if not o.deleted)
    except Exception as exc:  # nats-py raises NotFoundError for an empty store
        if type(exc).__name__ == "NotFoundError":
            return []
        raise


async def test_bundle_create_stores_the_lock_in_the_record(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    async with design_node(settings, tmp_path, wheels) as (caller, nc, ws):
        write_project(ws, "helper-lib")
        created = await caller.call(CreateBundle(project="churn", bundle_id="v1"), timeout=60)
        assert created.bundle.envs["ml"].packages == ["helper-lib==0.5", "tiny==2.0"]
        assert created.diff.packages == ["+ env ml", "ml: + helper-lib==0.5", "ml: + tiny==2.0"]
        kv = await nc.jetstream().key_value(subjects.BUNDLE_BUCKET)
        info = BUNDLE_INFO.decode((await kv.get(bundle_key("churn", "v1"))).value or b"")
        lock = info.envs["ml"]
        lock.validate()
        assert {p.name: p.wheel.sha256 for p in lock.packages if p.wheel} == {
            "helper-lib": sha(wheels / "helper_lib-0.5-py3-none-any.whl"),
            "tiny": sha(wheels / "tiny-2.0-py3-none-any.whl")}
        assert lock.requirements == ["helper-lib"] and not lock.wheels_stored
        assert await stored_wheels(nc) == []  # without --wheels nothing is stored
        listed = await caller.call(ListBundles(project="churn"))
        assert listed.bundles[0].envs["ml"].digest == lock.digest


async def test_wheels_are_stored_once_however_many_bundles_use_them(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    async with design_node(settings, tmp_path, wheels) as (caller, nc, ws):
        write_project(ws, "tiny==1.0")
        first = await caller.call(CreateBundle(project="churn", bundle_id="v1", wheels=True),
                                  timeout=60)
        assert first.bundle.envs["ml"].wheels_stored
        one = wheel_key(sha(wheels / "tiny-1.0-py3-none-any.whl"))
        obj = await transfer.stat(nc.jetstream(), subjects.WHEELS_STORE, one)
        assert (obj.sha256, obj.meta["filename"]) == (one, "tiny-1.0-py3-none-any.whl")
        write_project(ws, "tiny==1.0", note="same lock, other code")
        await caller.call(CreateBundle(project="churn", bundle_id="v2", wheels=True), timeout=60)
        assert await stored_wheels(nc) == [one]
        again = await transfer.stat(nc.jetstream(), subjects.WHEELS_STORE, one)
        assert again.nuid == obj.nuid  # not uploaded a second time

        write_project(ws, "tiny==2.0")
        second = await caller.call(CreateApiPackage(project="churn", service="churn-api",
                                                    version="v1", wheels=True), timeout=60)
        assert second.package.env is not None and second.package.env.wheels_stored
        two = wheel_key(sha(wheels / "tiny-2.0-py3-none-any.whl"))
        assert await stored_wheels(nc) == sorted([one, two])
        kv = await nc.jetstream().key_value(subjects.BUNDLE_BUCKET)
        info = BUNDLE_INFO.decode((await kv.get(bundle_key("churn", "v2"))).value or b"")
        assert info.envs["ml"].wheels_stored


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_wheels(wheels: Path) -> Iterator[str]:
    """``wheels`` served over HTTP, as a find-links page (a directory listing)."""
    handler = functools.partial(_Quiet, directory=str(wheels))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_wheels_locked_from_an_http_index_are_downloaded_and_stored(
        settings: NatsSettings, tmp_path: Path, wheels: Path, http_wheels: str) -> None:
    async with design_node(settings, tmp_path, wheels, find_links=http_wheels) as (
            caller, nc, ws):
        write_project(ws, "helper-lib")
        created = await caller.call(CreateBundle(project="churn", bundle_id="v1",
                                                 wheels=True), timeout=60)
        assert created.bundle.envs["ml"].wheels_stored
        kv = await nc.jetstream().key_value(subjects.BUNDLE_BUCKET)
        info = BUNDLE_INFO.decode((await kv.get(bundle_key("churn", "v1"))).value or b"")
        urls = [p.wheel.url for p in info.envs["ml"].packages if p.wheel]
        assert urls and all(u.startswith(http_wheels) for u in urls)
        expected = {wheel_key(sha(wheels / n)) for n in ("helper_lib-0.5-py3-none-any.whl",
                                                         "tiny-2.0-py3-none-any.whl")}
        assert set(await stored_wheels(nc)) == expected
        (tmp_path / "got").mkdir()
        for key in expected:  # the stored bytes are the wheel's
            dest = tmp_path / "got" / key
            got = await transfer.get_file(nc.jetstream(), subjects.WHEELS_STORE, key, dest)
            assert sha(dest) == key == got.sha256


async def test_a_wheel_whose_bytes_differ_from_the_lock_is_refused(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    """The file at the locked URL changed after locking: nothing of it is stored."""
    async with design_node(settings, tmp_path, wheels) as (_caller, nc, _ws):
        path = wheels / "tiny-1.0-py3-none-any.whl"
        pkg = LockedPackage(name="tiny", version="1.0", wheel=LockedFile(
            filename=path.name, sha256="0" * 64, url=path.as_uri()))
        lock = EnvLock(name="ml", python="3.11", platform="linux", packages=[pkg],
                       digest=env_digest("3.11", "linux", [pkg]))
        locker = EnvLocker(_Host(nc), IndexSettings(find_links=[str(wheels)], no_index=True))
        with pytest.raises(WheelsRefused, match=r"tiny==1\.0: tiny-1\.0-py3-none-any\.whl .* "
                                                r"has sha256 .*the lock says 0000"):
            await locker.store_wheels(lock)
        assert await stored_wheels(nc) == []


class _Host:
    """What ``EnvLocker`` needs of the Design node: JetStream, settings, a logger."""

    def __init__(self, nc: NATS) -> None:
        self.js = nc.jetstream()
        self.settings = NatsSettings()
        self.log = structlog.get_logger("test")


async def test_wheels_refuses_a_package_that_has_only_a_source_distribution(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    async with design_node(settings, tmp_path, wheels) as (_caller, nc, _ws):
        pkg = LockedPackage(name="oldlib", version="0.1", sdist=LockedFile(
            filename="oldlib-0.1.tar.gz", sha256="ab" * 32, url="file:///nowhere/oldlib-0.1.tar.gz"))
        lock = EnvLock(name="ml", python="3.11", platform="linux", packages=[pkg],
                       digest=env_digest("3.11", "linux", [pkg]))
        with pytest.raises(WheelsRefused) as info:
            await EnvLocker(_Host(nc), IndexSettings()).store_wheels(lock)
        assert "code env 'ml': --wheels stores wheels, and oldlib==0.1 has only a source " \
               "distribution" in str(info.value)
        assert info.value.details == {"env": "ml", "packages": ["oldlib==0.1"]}


async def test_an_env_that_cannot_be_locked_refuses_the_bundle_and_stores_nothing(
        settings: NatsSettings, tmp_path: Path, wheels: Path) -> None:
    async with design_node(settings, tmp_path, wheels) as (caller, nc, ws):
        write_project(ws, "tiny==9.9")
        with pytest.raises(BadRequest) as info:
            await caller.call(CreateBundle(project="churn", bundle_id="v1", wheels=True),
                              timeout=60)
        assert str(info.value).startswith("code env 'ml' cannot be locked: ")
        assert "tiny" in str(info.value) and "unsatisfiable" in str(info.value)
        assert (await caller.call(ListBundles(project="churn"))).bundles == []
        assert await stored_wheels(nc) == []
        bundles = await nc.jetstream().object_store(subjects.BUNDLE_STORE)
        with pytest.raises(Exception, match=r"NotFound|no objects|not found"):
            await bundles.list()
        with pytest.raises(BadRequest, match="code env 'ml' cannot be locked"):
            await caller.call(CreateApiPackage(project="churn", service="churn-api",
                                               version="v1"), timeout=60)


# -- the CLI, with the Design node a real process ---------------------------------------------

@pytest.fixture
def design_process(request: pytest.FixtureRequest, nats_server: EmbeddedNats, tmp_path: Path,
                   cli_env: dict[str, str], wheels: Path
                   ) -> Iterator[tuple[dict[str, str], Path]]:
    """A Design node process whose package source is set by its environment, or by its
    options (``--find-links``, ``--no-index``)."""
    env = dict(cli_env, SHIPYARD_NATS_URL=nats_server.url)
    ws = tmp_path / "ws"
    ws.mkdir()
    if getattr(request, "param", "environment") == "environment":
        node_env, source = dict(env, SHIPYARD_FIND_LINKS=str(wheels), SHIPYARD_NO_INDEX="1"), []
    else:
        node_env, source = env, ["--find-links", str(wheels), "--no-index"]
    proc = Background(shipyard_argv("node", "start", "design", "--name", "design",
                                    "--workspace", str(ws), "--data-dir",
                                    str(tmp_path / "design"), "--heartbeat-interval", "0.2",
                                    *source), env=node_env)
    try:
        proc.wait_line("node ready", timeout=30)
        yield env, ws
    finally:
        proc.stop(signal.SIGTERM)


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(shipyard(*args, env=env, check=True, timeout=60).stdout)


@pytest.mark.parametrize("design_process", ["environment"], indirect=True)
def test_bundles_show_their_envs_and_the_packages_that_changed(
        design_process: tuple[dict[str, str], Path]) -> None:
    env, ws = design_process
    write_project(ws, "tiny==1.0")
    first = shipyard("bundle", "create", "churn", "--id", "v1", env=env, check=True,
                     timeout=60).stdout
    assert "code env ml: 1 package, python " in first
    assert "+ env ml" in first and "ml: + tiny==1.0" in first
    write_project(ws, "tiny==2.0")
    second = shipyard("bundle", "create", "churn", "--id", "v2", "--wheels", env=env,
                      check=True, timeout=60).stdout
    assert "locked packages: 1 change" in second and "ml: tiny 1.0 -> 2.0" in second
    assert "wheels stored" in second

    listed = _json(env, "bundle", "list", "churn", "--json")
    assert [(b["id"], b["envs"]["ml"]["packages"], b["envs"]["ml"]["wheels_stored"])
            for b in listed] == [("v1", ["tiny==1.0"], False), ("v2", ["tiny==2.0"], True)]
    assert listed[0]["envs"]["ml"]["digest"] != listed[1]["envs"]["ml"]["digest"]
    table = shipyard("bundle", "list", "churn", env=env, check=True).stdout
    assert "CODE ENVS" in table
    assert f"ml (1 pkgs, {listed[1]['envs']['ml']['digest'][:8]})" in table

    write_project(ws, "tiny==3.0")
    bad = shipyard("bundle", "create", "churn", "--id", "v3", env=env, timeout=60)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "code env 'ml' cannot be locked" in bad.stderr and "tiny" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert [b["id"] for b in _json(env, "bundle", "list", "churn", "--json")] == ["v1", "v2"]


@pytest.mark.parametrize("design_process", ["options"], indirect=True)
def test_api_packages_carry_their_env_lock(design_process: tuple[dict[str, str], Path]
                                           ) -> None:
    env, ws = design_process
    write_project(ws, "tiny==1.0")
    out = shipyard("api", "package", "churn", "churn-api", "--version", "v1", env=env,
                   check=True, timeout=60).stdout
    assert "code env ml: 1 package" in out and "ml: + tiny==1.0" in out
    write_project(ws, "tiny==2.0", "helper-lib")
    out = shipyard("api", "package", "churn", "churn-api", "--version", "v2", "--wheels",
                   env=env, check=True, timeout=60).stdout
    assert "ml: tiny 1.0 -> 2.0" in out and "ml: + helper-lib==0.5" in out
    versions = _json(env, "api", "versions", "churn-api", "--json")
    assert [(v["version"], v["env"]["name"], v["env"]["packages"], v["env"]["wheels_stored"])
            for v in versions] == [
        ("v1", "ml", ["tiny==1.0"], False),
        ("v2", "ml", ["helper-lib==0.5", "tiny==2.0"], True)]
    table = shipyard("api", "versions", "churn-api", env=env, check=True).stdout
    assert "CODE ENV" in table and "ml (2 pkgs" in table



def test_index_options_on_a_node_that_does_not_lock_are_a_usage_error(
        cli_env: dict[str, str]) -> None:
    proc = shipyard("node", "start", "deployer", "--find-links", "/wheels", env=cli_env)
    assert proc.returncode == 2
    assert "--find-links is for automation, api and design nodes" in proc.stderr


@pytest.mark.parametrize("design_process", ["options"], indirect=True)
def test_a_test_build_runs_recipes_in_the_locked_env(
        design_process: tuple[dict[str, str], Path]) -> None:
    env, ws = design_process
    d = write_project(ws, "tiny==1.0")
    (d / "recipes/clean.py").write_text(
        "import sys\nimport tiny\n\ndef run(ctx):\n"
        "    ctx.outputs['clean'].write_text(tiny.VERSION + ' ' + sys.prefix)\n")
    shipyard("build", "churn", "clean", "--wait", env=env, check=True, timeout=120)
    version, prefix = (d / "data/clean.csv").read_text().split(" ")
    assert version == "1.0" and "/design/envs/" in prefix

    write_project(ws, "tiny==2.0")
    (d / "recipes/clean.py").write_text(
        "import tiny\n\ndef run(ctx):\n    ctx.outputs['clean'].write_text(tiny.VERSION)\n")
    shipyard("build", "churn", "clean", "--wait", "--force", env=env, check=True, timeout=120)
    assert (d / "data/clean.csv").read_text() == "2.0"

    write_project(ws, "tiny==3.0")
    bad = shipyard("build", "churn", "clean", "--wait", "--force", env=env, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "code env 'ml' cannot be locked" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr

