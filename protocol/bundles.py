"""Bundles: immutable, versioned snapshots of a project, made by the Design node.

A bundle's ``BundleInfo`` (in the ``sy_bundles`` KV bucket, key ``<project>.<id>``) lists
every file with its size and SHA-256 and a digest over all of them; the archive itself
(a tar of ``files/<path>`` members plus ``bundle.json``) is in the ``sy_bundles`` object
store.  Nodes trust the KV record, not the archive: every unpacked byte is checked
against it.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from protocol import subjects
from protocol.base import Command, Message
from protocol.envs import EnvLock, EnvSummary, diff_envs
from protocol.errors import BadName

BUNDLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_bundle_id(value: str) -> str:
    if not BUNDLE_ID.match(value):
        raise BadName(f"invalid bundle id {value!r}: expected 1-64 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return value


# -- KV keys ------------------------------------------------------------------------------
# sy_bundles: <project>.<bundle id> (BundleInfo; bundle ids may hold dots)

def bundle_key(project: str, bundle_id: str) -> str:
    """KV key of a bundle record in ``sy_bundles``."""
    return f"{subjects.token(project, 'project')}.{check_bundle_id(bundle_id)}"


def bundle_keys(project: str) -> str:
    """The KV filter for every bundle record of ``project``."""
    return f"{subjects.token(project, 'project')}.>"


class FileEntry(msgspec.Struct, frozen=True, array_like=True):
    """One file of a bundle: ``[path, size, sha256-hex]`` (compact in JSON)."""

    path: str
    size: int
    sha256: str


def files_digest(files: list[FileEntry]) -> str:
    """The bundle digest: SHA-256 over the sorted ``path\\0size\\0sha256\\n`` lines."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()


class BundleInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    project: str
    created_at: float
    created_by: str
    notes: str = ""
    files: list[FileEntry] = []
    digest: str = ""
    size: int = 0  # sum of file sizes
    archive: str = ""  # object name in the bundles object store
    archive_size: int = 0
    archive_sha256: str = ""
    archive_blake3: str = ""  # empty in records made before it was kept
    envs: dict[str, EnvLock] = {}  # every code environment the bundle's code uses
    # The Design node's signature over the record's digests (protocol.artifacts), base64,
    # and the name of the identity that signed; empty on a stack without identities.
    signature: str = ""
    signed_by: str = ""
    v: int = 1


class BundleSummary(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    project: str
    created_at: float
    created_by: str
    notes: str
    files: int
    size: int
    digest: str
    archive_size: int
    envs: dict[str, EnvSummary] = {}

    @classmethod
    def of(cls, b: BundleInfo) -> BundleSummary:
        return cls(id=b.id, project=b.project, created_at=b.created_at,
                   created_by=b.created_by, notes=b.notes, files=len(b.files), size=b.size,
                   digest=b.digest, archive_size=b.archive_size,
                   envs={n: EnvSummary.of(lock) for n, lock in b.envs.items()})


class BundleDiff(msgspec.Struct, frozen=True, kw_only=True):
    previous: str | None = None
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    packages: list[str] = []  # changed locked packages (``protocol.envs.diff_envs``)


def diff_bundles(old: BundleInfo | None, new: BundleInfo) -> BundleDiff:
    if old is None:
        return BundleDiff(previous=None, added=sorted(f.path for f in new.files),
                          packages=diff_envs({}, new.envs))
    before = {f.path: f.sha256 for f in old.files}
    after = {f.path: f.sha256 for f in new.files}
    return BundleDiff(
        previous=old.id,
        added=sorted(set(after) - set(before)),
        removed=sorted(set(before) - set(after)),
        changed=sorted(p for p in set(after) & set(before) if after[p] != before[p]),
        packages=diff_envs(old.envs, new.envs),
    )


class ProjectStatus(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    name: str
    path: str
    ok: bool
    error: str = ""
    datasets: int = 0
    recipes: int = 0
    scenarios: int = 0
    api_services: list[str] = []


# -- Design node commands ----------------------------------------------------------------

class BundleCreated(Message, frozen=True, kw_only=True, tag="bundle.created"):
    bundle: BundleSummary
    diff: BundleDiff


class BundleList(Message, frozen=True, kw_only=True, tag="bundle.list.reply"):
    project: str
    bundles: list[BundleSummary] = []


class ProjectList(Message, frozen=True, kw_only=True, tag="project.list.reply"):
    workspace: str
    projects: list[ProjectStatus] = []


class CreateBundle(Command[BundleCreated], frozen=True, kw_only=True, tag="bundle.create"):
    """Pack a workspace project into bundle ``bundle_id`` (ids are immutable)."""

    project: str
    bundle_id: str
    notes: str = ""
    created_by: str = ""
    wheels: bool = False  # also store every locked wheel in sy_wheels


class ListBundles(Command[BundleList], frozen=True, kw_only=True, tag="bundle.list"):
    project: str


class ListProjects(Command[ProjectList], frozen=True, kw_only=True, tag="project.list"):
    pass

BUNDLE_INFO = msgspec.json.Decoder(BundleInfo)
