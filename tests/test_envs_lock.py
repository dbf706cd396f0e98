"""Locking code environments with the real uv against a local folder of tiny wheels."""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

import pytest

from nodes.envs.lock import (
    LockFailed,
    host_platform,
    parse_pylock,
    pick_wheel,
    public_url,
    requirements_of,
    resolve,
    supported_tags,
)
from nodes.envs.uv import IndexSettings
from nodes.project.manifest import ManifestError, parse_manifest
from protocol.envs import env_digest
from tests.wheels import make_wheel


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    for version in ("1.0", "2.0"):
        make_wheel(d, "tiny", version)
    make_wheel(d, "Needs_Tiny", "0.3", requires=["tiny>=2"])
    return d


def _index(d: Path) -> IndexSettings:
    return IndexSettings(find_links=[str(d)], no_index=True)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


async def test_two_versions_lock_to_exact_files_with_different_digests(wheels: Path) -> None:
    one = await resolve("ml", ["tiny==1.0"], python="3.11", platform="x86_64-manylinux_2_28",
                        index=_index(wheels))
    two = await resolve("ml", ["tiny==2.0"], python="3.11", platform="x86_64-manylinux_2_28",
                        index=_index(wheels))
    [p1], [p2] = one.packages, two.packages
    assert (p1.name, p1.version, p2.version) == ("tiny", "1.0", "2.0")
    assert p1.wheel is not None and p2.wheel is not None
    assert p1.wheel.filename == "tiny-1.0-py3-none-any.whl"
    assert p1.wheel.sha256 == _sha(wheels / "tiny-1.0-py3-none-any.whl")
    assert p2.wheel.sha256 == _sha(wheels / "tiny-2.0-py3-none-any.whl")
    assert p1.wheel.size == (wheels / "tiny-1.0-py3-none-any.whl").stat().st_size
    assert p1.wheel.url.startswith("file://") and p1.sdist is None
    assert one.digest == env_digest("3.11", "x86_64-manylinux_2_28", one.packages)
    assert one.digest != two.digest
    one.validate()
    assert (one.python, one.platform, one.requirements) == ("3.11", "x86_64-manylinux_2_28",
                                                            ["tiny==1.0"])


async def test_the_same_requirements_give_the_same_digest_whatever_the_env_name(
        wheels: Path) -> None:
    a = await resolve("ml", ["needs-tiny"], index=_index(wheels))
    b = await resolve("other", ["Needs_Tiny"], index=_index(wheels))
    assert a.digest == b.digest and a.name != b.name
    assert [p.pin for p in a.packages] == ["needs-tiny==0.3", "tiny==2.0"]  # normalized
    assert a.python == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert a.platform == host_platform()


async def test_an_unresolvable_requirement_names_the_env_and_uvs_reason(wheels: Path) -> None:
    with pytest.raises(LockFailed) as info:
        await resolve("ml", ["tiny==3.0"], index=_index(wheels))
    msg = str(info.value)
    assert msg.startswith("code env 'ml' cannot be locked: ")
    assert "tiny" in msg and "unsatisfiable" in msg
    with pytest.raises(LockFailed, match="no-such-thing was not found"):
        await resolve("ml", ["no-such-thing"], index=_index(wheels))


async def test_an_index_that_does_not_answer_fails_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    dead = IndexSettings(index_url="http://127.0.0.1:9/simple")
    with pytest.raises(LockFailed,
                       match=r"(?s)code env 'ml' cannot be locked: .*127\.0\.0\.1.*refused"):
        await resolve("ml", ["tiny"], index=dead, timeout_s=60)


async def test_an_option_line_never_reaches_the_resolver(wheels: Path) -> None:
    with pytest.raises(LockFailed, match="invalid requirement '--index-url=http://evil'"):
        await resolve("ml", ["--index-url=http://evil"], index=_index(wheels))


def test_the_most_specific_wheel_for_the_target_wins() -> None:
    names = ["tiny-1.0-py3-none-any.whl", "tiny-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
             "tiny-1.0-cp311-abi3-manylinux2014_x86_64.whl"]
    linux = supported_tags("3.11", "x86_64-manylinux_2_28")
    assert pick_wheel(names, linux) == 1
    assert pick_wheel([names[0], names[2]], linux) == 1
    mac = supported_tags("3.11", "aarch64-apple-darwin")
    assert pick_wheel(["x-1-py3-none-any.whl", "x-1-cp311-cp311-macosx_11_0_arm64.whl"],
                      mac) == 1
    assert supported_tags("3.11", "wasm32-pyodide2024") is None  # not modelled: uv's first
    assert pick_wheel(names, None) == 0


def test_a_lock_from_an_index_keeps_the_sdist_and_drops_credentials() -> None:
    sha = "ab" * 32
    text = f"""
lock-version = "1.0"
[[packages]]
name = "Foo.Bar"
version = "1.2"
sdist = {{ url = "https://u:secret@pkgs.example/f/foo.bar-1.2.tar.gz", size = 10, \
hashes = {{ sha256 = "{sha}" }} }}
wheels = [{{ url = "https://u:secret@pkgs.example/f/foo_bar-1.2-py3-none-any.whl", \
size = 7, hashes = {{ sha256 = "{'cd' * 32}" }} }}]
"""
    lock = parse_pylock(text, env="ml", python="3.11", platform="x86_64-manylinux_2_28",
                        requirements=["foo.bar"])
    [p] = lock.packages
    assert p.name == "foo-bar" and p.sdist is not None and p.wheel is not None
    assert p.sdist.filename == "foo.bar-1.2.tar.gz" and p.sdist.size == 10
    assert p.wheel.url == "https://pkgs.example/f/foo_bar-1.2-py3-none-any.whl"
    assert "secret" not in repr(lock)
    assert public_url("https://h:8080/x") == "https://h:8080/x"


def test_a_lock_entry_without_a_hash_is_refused() -> None:
    text = ('[[packages]]\nname = "x"\nversion = "1"\n'
            'wheels = [{ url = "file:///x-1-py3-none-any.whl" }]\n')
    with pytest.raises(LockFailed, match=r"x-1-py3-none-any\.whl has no sha256"):
        parse_pylock(text, env="ml", python="3.11", platform="linux", requirements=["x"])
    vcs = '[[packages]]\nname = "x"\nvcs = { type = "git", url = "https://g/x" }\n'
    with pytest.raises(LockFailed, match="VCS checkout or a local folder"):
        parse_pylock(vcs, env="ml", python="3.11", platform="linux", requirements=["x"])


def test_host_platform_is_a_uv_target() -> None:
    p = host_platform()
    assert re.fullmatch(r"(x86_64|aarch64)-(manylinux_2_\d+|unknown-linux-musl|apple-darwin)"
                        r"|linux|.*-pc-windows-msvc", p), p


@pytest.mark.skipif(sys.platform != "linux", reason="the glibc mapping is Linux's")
@pytest.mark.parametrize(("machine", "libc", "expected"), [
    ("x86_64", ("glibc", "2.36"), "x86_64-manylinux_2_36"),
    ("x86_64", ("glibc", "2.30"), "x86_64-manylinux_2_28"),  # the newest level uv knows below
    ("aarch64", ("glibc", "2.45"), "aarch64-manylinux_2_40"),
    ("x86_64", ("glibc", "2.12"), "x86_64-manylinux_2_17"),  # never below manylinux_2_17
    ("x86_64", ("", ""), "x86_64-unknown-linux-musl"),
])
def test_host_platform_follows_the_hosts_glibc(monkeypatch: pytest.MonkeyPatch, machine: str,
                                               libc: tuple[str, str], expected: str) -> None:
    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr("platform.libc_ver", lambda: libc)
    assert host_platform() == expected


async def test_a_python_that_is_not_major_minor_is_refused(wheels: Path) -> None:
    with pytest.raises(LockFailed, match=r"python '3': expected major\.minor"):
        await resolve("ml", ["tiny"], python="3", index=_index(wheels))


REQ_MANIFEST = """\
[project]
key = "churn"

[code_envs.ml]
requirements_file = "env/requirements.txt"
"""


def _project(tmp_path: Path, reqs: str | None) -> Path:
    d = tmp_path / "churn"
    (d / "env").mkdir(parents=True)
    (d / "shipyard.toml").write_text(REQ_MANIFEST)
    if reqs is not None:
        (d / "env" / "requirements.txt").write_text(reqs)
    return d


def test_a_requirements_file_gives_its_requirements(tmp_path: Path) -> None:
    d = _project(tmp_path, "# pinned\n\ntiny==1.0  # the tiny one\n"
                           "needs-tiny; python_version >= '3'\n")
    m = parse_manifest((d / "shipyard.toml").read_text())
    assert requirements_of(d, m, "ml") == ["tiny==1.0", "needs-tiny; python_version >= '3'"]
    inline = parse_manifest('[project]\nkey = "k"\n[code_envs.a]\nrequirements = ["x"]\n')
    assert requirements_of(d, inline, "a") == ["x"]


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("tiny\n-r other.txt\n", "churn/env/requirements.txt: line 2: ", "'-r' lines are not"),
    ("-e .\n", "churn/env/requirements.txt: line 1: ", "'-e' lines are not supported"),
    ("--index-url http://x\n", "churn/env/requirements.txt: line 1: ", "'--index-url' lines"),
    ("tiny\n\npandas>>2\n", "churn/env/requirements.txt: line 3: ",
     "invalid requirement 'pandas>>2'"),
    (None, "churn/shipyard.toml: code_envs.ml.requirements_file: ",
     "cannot read env/requirements.txt"),
])
def test_a_bad_requirements_file_names_the_file_and_the_line(
        tmp_path: Path, text: str | None, where: str, problem: str) -> None:
    d = _project(tmp_path, text)
    m = parse_manifest((d / "shipyard.toml").read_text())
    with pytest.raises(ManifestError) as info:
        requirements_of(d, m, "ml")
    assert str(info.value).startswith(where) and problem in str(info.value)


def test_a_requirements_file_linked_from_outside_is_refused(tmp_path: Path) -> None:
    d = _project(tmp_path, None)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("tiny\n")
    (d / "env" / "requirements.txt").symlink_to(outside)
    m = parse_manifest((d / "shipyard.toml").read_text())
    with pytest.raises(ManifestError, match="leaves the project"):
        requirements_of(d, m, "ml")
    shutil.rmtree(d)
