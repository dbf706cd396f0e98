"""Packing a project and unpacking a bundle: what goes in, and what is refused."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import msgspec
import pytest

from nodes.project.bundle import BundleRejected, pack, unpack
from nodes.project.manifest import load_manifest
from protocol.bundles import BundleInfo, FileEntry, files_digest
from tests.projects import make_project


def packed(tmp_path: Path) -> tuple[Path, BundleInfo]:
    project = make_project(tmp_path / "ws", "churn")
    archive = tmp_path / "b.tar"
    result = pack(project, load_manifest(project), archive, bundle_id="v1",
                  created_by="tester", notes="first")
    return archive, result.info


def test_bundle_holds_code_and_shipped_data_only(tmp_path: Path) -> None:
    _, info = packed(tmp_path)
    paths = {f.path for f in info.files}
    assert paths == {"shipyard.toml", "recipes/clean.py", "data/raw.csv", "README.md"}
    assert info.digest == files_digest(info.files)
    raw = (tmp_path / "ws" / "churn" / "data" / "raw.csv").read_bytes()
    entry = next(f for f in info.files if f.path == "data/raw.csv")
    assert entry.size == len(raw) and entry.sha256 == hashlib.sha256(raw).hexdigest()
    assert (info.id, info.project, info.created_by, info.notes) == ("v1", "churn", "tester",
                                                                    "first")


def test_unpack_restores_every_file_byte_for_byte(tmp_path: Path) -> None:
    archive, info = packed(tmp_path)
    dest = tmp_path / "out"
    unpack(archive, info, dest)
    src = tmp_path / "ws" / "churn"
    for f in info.files:
        assert (dest / f.path).read_bytes() == (src / f.path).read_bytes()


def hostile(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]],
            files: list[FileEntry] | None = None) -> tuple[Path, BundleInfo]:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    if files is None:
        files = [FileEntry(path=ti.name.removeprefix("files/"), size=len(d),
                           sha256=hashlib.sha256(d).hexdigest())
                 for ti, d in members if ti.isfile()]
    info = BundleInfo(id="evil", project="churn", created_at=0, created_by="x", files=files,
                      digest=files_digest(files))
    return archive, info


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE,
           link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.linkname = link
    return ti, data


@pytest.mark.parametrize(("members", "reason"), [
    ([member("files/../../escape.txt")], "escapes the target directory"),
    ([member("/etc/cron.d/evil")], "absolute path"),
    ([member("files/link", kind=tarfile.SYMTYPE, link="/etc/passwd")],
     "points outside the target"),
    ([member("files/link", kind=tarfile.SYMTYPE, link="../../../../etc")],
     "points outside the target"),
    ([member("files/hard", kind=tarfile.LNKTYPE, link="/etc/shadow")], "link"),
    ([member("files/dev", kind=tarfile.CHRTYPE)], "not a regular file"),
])
def test_hostile_members_are_refused_and_nothing_is_left(tmp_path: Path,
                                                         members: list[tuple[tarfile.TarInfo,
                                                                             bytes]],
                                                         reason: str) -> None:
    archive, info = hostile(tmp_path, members)
    dest = tmp_path / "out"
    with pytest.raises(BundleRejected, match=reason):
        unpack(archive, info, dest)
    assert not dest.exists()
    assert not (tmp_path / "escape.txt").exists()


def test_content_that_does_not_match_the_record_is_refused(tmp_path: Path) -> None:
    archive, info = packed(tmp_path)
    tampered = [msgspec.structs.replace(f, sha256="0" * 64) if f.path == "recipes/clean.py"
                else f for f in info.files]
    info = msgspec.structs.replace(info, files=tampered, digest=files_digest(tampered))
    with pytest.raises(BundleRejected, match=r"digest mismatch for recipes/clean\.py"):
        unpack(archive, info, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_record_whose_digest_does_not_cover_its_files_is_refused(tmp_path: Path) -> None:
    archive, info = packed(tmp_path)
    with pytest.raises(BundleRejected, match="inconsistent"):
        unpack(archive, msgspec.structs.replace(info, digest="f" * 64), tmp_path / "out")


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    archive, info = packed(tmp_path)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleRejected, match="truncated"):
        unpack(archive, info, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_unlisted_files_are_refused(tmp_path: Path) -> None:
    archive, info = packed(tmp_path)
    extra = [*info.files, FileEntry(path="missing.txt", size=1, sha256="0" * 64)]
    with pytest.raises(BundleRejected, match="missing 1 file"):
        unpack(archive, msgspec.structs.replace(info, files=extra, digest=files_digest(extra)),
               tmp_path / "out1")
    fewer = [f for f in info.files if f.path != "README.md"]
    with pytest.raises(BundleRejected, match=r"'README\.md' is not in the bundle record"):
        unpack(archive, msgspec.structs.replace(info, files=fewer, digest=files_digest(fewer)),
               tmp_path / "out2")


def test_links_inside_the_project_are_stored_as_files_and_outside_ones_left_out(
        tmp_path: Path) -> None:
    project = make_project(tmp_path / "ws", "churn")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (project / "leak.txt").symlink_to(outside)
    (project / "alias.md").symlink_to(project / "README.md")
    result = pack(project, load_manifest(project), tmp_path / "b.tar", bundle_id="v1",
                  created_by="t", notes="")
    paths = {f.path for f in result.info.files}
    assert "alias.md" in paths and "leak.txt" not in paths
    assert any("leak.txt" in s for s in result.skipped)
