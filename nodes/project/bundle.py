"""Packing a project into a bundle archive, and unpacking one safely.

Synchronous code: callers run it in a worker thread (``anyio.to_thread``).

The archive is an uncompressed tar: ``files/<path>`` for every file, then
``bundle.json`` (the ``BundleInfo``).  Unpacking trusts only the ``BundleInfo`` the
caller got from the control plane: every member must be a regular file listed there,
with the listed size and SHA-256, inside the target directory; anything else (``..``,
absolute paths, links, devices, unlisted or missing files, a truncated archive) is
refused with ``BundleRejected`` and the target is left as it was.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import msgspec

from nodes.project.files import Walker
from nodes.project.manifest import MANIFEST, Manifest, ManifestError
from protocol.bundles import BundleInfo, FileEntry, files_digest
from protocol.envs import EnvLock
from protocol.errors import ShipyardError

CHUNK = 1 << 20
MAX_MEMBERS = 100_000

class BundleRejected(ShipyardError):
    """A bundle archive that must not be activated; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Packed:
    info: BundleInfo
    skipped: list[str]  # files left out on purpose, with the reason


def _is_under(rel: PurePosixPath, root: PurePosixPath) -> bool:
    return rel == root or root in rel.parents


def collect(project_dir: Path, manifest: Manifest) -> tuple[list[tuple[str, Path]], list[str]]:
    """The files a bundle of this project contains, as ``(relative path, absolute path)``,
    and the paths left out on purpose (with the reason).

    Left out: unshipped datasets' files, caches, virtualenvs, VCS folders.  Links inside
    the project are packed as copies of their targets; links that leave the project (or
    loop) refuse the whole bundle with ``LinksOutside``, naming each (see ``files``).
    Raises ``ManifestError`` when a shipped dataset does not exist.
    """
    unshipped = [PurePosixPath(d.path) for d in manifest.datasets.values() if not d.ship]

    def skip(rel: PurePosixPath) -> str | None:
        return "dataset not shipped" if any(_is_under(rel, u) for u in unshipped) else None

    walker = Walker(project_dir, skip=skip)
    files = list(walker.files())
    walker.raise_refused(manifest.project.key)
    for name, d in manifest.datasets.items():
        if d.ship and not (walker.root / d.path).exists():
            raise ManifestError(f"{project_dir.name}/{MANIFEST}", f"datasets.{name}.path",
                                f"{d.path} does not exist, but ship = true")
    return files, walker.skipped


class _HashingReader:
    """A file reader that hashes what tarfile reads through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def pack(project_dir: Path, manifest: Manifest, out: Path, *, bundle_id: str,
         created_by: str, notes: str, envs: dict[str, EnvLock] | None = None) -> Packed:
    """Write the bundle archive to ``out`` and return its ``BundleInfo`` (with the locks
    ``envs`` of the code environments it uses, also in the archive's ``bundle.json``)."""
    files, skipped = collect(project_dir, manifest)
    entries: list[FileEntry] = []
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in files:
            st = path.stat()
            ti = tarfile.TarInfo(f"files/{rel}")
            ti.size = st.st_size
            ti.mtime = int(st.st_mtime)
            ti.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
            with path.open("rb") as f:
                reader = _HashingReader(f)
                tar.addfile(ti, reader)
            entries.append(FileEntry(path=rel, size=st.st_size, sha256=reader.h.hexdigest()))
        info = BundleInfo(id=bundle_id, project=manifest.project.key, created_at=time.time(),
                          created_by=created_by, notes=notes, files=entries,
                          digest=files_digest(entries), size=sum(e.size for e in entries),
                          envs=dict(envs or {}))
        data = msgspec.json.encode(info)
        ti = tarfile.TarInfo("bundle.json")
        ti.size = len(data)
        ti.mtime = int(info.created_at)
        ti.mode = 0o644
        tar.addfile(ti, io.BytesIO(data))
    return Packed(info=info, skipped=skipped)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    count = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleRejected(f"archive is truncated or corrupt: {exc}") from None
        if member is None:
            return
        count += 1
        if count > MAX_MEMBERS:
            raise BundleRejected(f"archive has more than {MAX_MEMBERS} members")
        yield member


def _safe_rel(name: str) -> str:
    """``files/<rel>`` -> ``<rel>``, refusing anything that could escape the target."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleRejected(f"member {name!r} has an absolute path")
    p = PurePosixPath(name)
    if ".." in p.parts:
        raise BundleRejected(f"member {name!r} escapes the target directory ('..')")
    if not p.parts or p.parts[0] != "files" or len(p.parts) < 2:
        raise BundleRejected(f"member {name!r} is outside files/")
    return PurePosixPath(*p.parts[1:]).as_posix()


def unpack(archive: Path, info: BundleInfo, dest: Path) -> None:
    """Verify and extract ``archive`` into the new directory ``dest``.

    Raises ``BundleRejected``; on failure ``dest`` does not exist afterwards.
    """
    if files_digest(info.files) != info.digest:
        raise BundleRejected("bundle record is inconsistent: its digest does not match "
                             "its file list")
    expected = {f.path: f for f in info.files}
    seen: set[str] = set()
    dest.mkdir(parents=True, exist_ok=False)
    root = dest.resolve()
    try:
        try:
            tar = tarfile.open(archive, "r:")  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleRejected(f"archive is truncated or corrupt: {exc}") from None
        with tar:
            for m in _members(tar):
                if m.name == "bundle.json":
                    continue
                if m.issym() or m.islnk():
                    raise BundleRejected(
                        f"member {m.name!r} is a link to {m.linkname!r}: bundles carry regular "
                        "files only" + (" (and it points outside the target)"
                                        if _points_outside(m, root) else ""))
                if m.isdir():
                    _safe_rel(m.name.rstrip("/") + "/x")
                    continue
                if not m.isfile():
                    raise BundleRejected(f"member {m.name!r} is not a regular file")
                rel = _safe_rel(m.name)
                target = (root / rel).resolve()
                if not target.is_relative_to(root):
                    raise BundleRejected(f"member {m.name!r} escapes the target directory")
                want = expected.get(rel)
                if want is None:
                    raise BundleRejected(f"member {rel!r} is not in the bundle record")
                if rel in seen:
                    raise BundleRejected(f"member {rel!r} appears twice")
                if m.size != want.size:
                    raise BundleRejected(f"size mismatch for {rel}: expected {want.size} "
                                         f"bytes, archive has {m.size}")
                seen.add(rel)
                _extract(tar, m, target, want)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleRejected(f"archive is missing {len(missing)} file(s): "
                                 + ", ".join(missing[:5]))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _points_outside(m: tarfile.TarInfo, root: Path) -> bool:
    base = (root / PurePosixPath(m.name).parent) if not m.islnk() else root
    return not (base / m.linkname).resolve().is_relative_to(root)


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path, want: FileEntry) -> None:
    src = tar.extractfile(m)
    if src is None:
        raise BundleRejected(f"member {m.name!r} has no data")
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    try:
        with target.open("xb") as out:
            while True:
                try:
                    chunk = src.read(CHUNK)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise BundleRejected(f"archive is truncated in {want.path}: {exc}") from None
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except FileExistsError:
        raise BundleRejected(f"member {want.path!r} appears twice") from None
    if size != want.size:
        raise BundleRejected(f"archive is truncated in {want.path}: expected {want.size} "
                             f"bytes, got {size}")
    if h.hexdigest() != want.sha256:
        raise BundleRejected(f"digest mismatch for {want.path}: expected sha256 "
                             f"{want.sha256[:16]}..., got {h.hexdigest()[:16]}...")
    if m.mode & 0o100:
        target.chmod(0o755)
