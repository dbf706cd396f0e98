"""Packing a project and unpacking a bundle: what goes in, and what is refused."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import msgspec
import pytest

from nodes.project.bundle import BundleRejected, pack, unpack
from nodes.project.files import LinksOutside
from nodes.project.manifest import load_manifest
from protocol.bundles import BundleInfo, FileEntry, files_digest
from protocol.errors import BadRequest
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


def test_links_inside_the_project_are_packed_as_copies_of_their_targets(
        tmp_path: Path) -> None:
    project = make_project(tmp_path / "ws", "churn")
    (project / "alias.md").symlink_to(project / "README.md")
    (project / "models" / "v3").mkdir(parents=True)
    (project / "models" / "v3" / "m.bin").write_bytes(b"weights")
    (project / "models" / "latest").symlink_to("v3")  # a relative folder link
    (project / "models" / "best.bin").symlink_to("../models/v3/m.bin")
    archive = tmp_path / "b.tar"
    result = pack(project, load_manifest(project), archive, bundle_id="v1", created_by="t",
                  notes="")
    by_path = {f.path: f for f in result.info.files}
    assert {"alias.md", "models/v3/m.bin", "models/latest/m.bin", "models/best.bin"} <= set(
        by_path)
    assert by_path["models/latest/m.bin"].sha256 == hashlib.sha256(b"weights").hexdigest()
    out = tmp_path / "out"
    unpack(archive, result.info, out)  # the archive holds regular files only
    assert not (out / "models" / "latest").is_symlink()
    assert (out / "models" / "best.bin").read_bytes() == b"weights"
    assert (out / "alias.md").read_text() == (project / "README.md").read_text()


def test_a_link_out_of_the_project_refuses_the_bundle_naming_every_link(
        tmp_path: Path) -> None:
    """A file link, a folder link and a shipped dataset that is a link, all leading out:
    nothing is packed and the refusal (a bad_request) names each with its target."""
    project = make_project(tmp_path / "ws", "churn")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("x")
    (project / "leak.txt").symlink_to(secret)
    (project / "shared").symlink_to(elsewhere)
    (project / "data" / "raw.csv").unlink()
    (project / "data" / "raw.csv").symlink_to(tmp_path / "raw.csv")  # shipped, outside
    (tmp_path / "raw.csv").write_text("id\n1\n")
    (project / "docs").mkdir()
    (project / "docs" / "up.md").symlink_to("../../../secret.txt")  # out by '..' hops
    with pytest.raises(LinksOutside) as caught:
        pack(project, load_manifest(project), tmp_path / "b.tar", bundle_id="v1",
             created_by="t", notes="")
    exc = caught.value
    assert isinstance(exc, BadRequest) and exc.code == "bad_request"
    for name in ("leak.txt ->", "shared ->", "data/raw.csv ->", "docs/up.md ->"):
        assert name in exc.message, exc.message
    assert str(secret) in exc.message and "churn" in exc.message
    assert len(exc.links) == 4


def test_a_folder_link_that_loops_is_refused(tmp_path: Path) -> None:
    project = make_project(tmp_path / "ws", "churn")
    (project / "docs").mkdir()
    (project / "docs" / "again").symlink_to("..")
    with pytest.raises(LinksOutside, match=r"docs/again -> \.\. \(a loop"):
        pack(project, load_manifest(project), tmp_path / "b.tar", bundle_id="v1",
             created_by="t", notes="")


def test_links_under_an_unshipped_dataset_are_not_looked_at(tmp_path: Path) -> None:
    project = make_project(tmp_path / "ws", "churn")
    (project / "data" / "clean.csv").unlink()
    (project / "data" / "clean.csv").symlink_to(tmp_path / "scratch.csv")  # ship = false
    result = pack(project, load_manifest(project), tmp_path / "b.tar", bundle_id="v1",
                  created_by="t", notes="")
    assert "data/clean.csv" not in {f.path for f in result.info.files}
    assert "data/clean.csv (dataset not shipped)" in result.skipped
