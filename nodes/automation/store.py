"""An Automation node's local bundle store.  Synchronous (callers use worker threads),
but for ``ActiveManifests``, which reads the active bundle's manifest in one.

Layout under the node's data directory::

    projects/<project>/bundles/<id>/          unpacked, verified bundles (the last few)
    projects/<project>/bundles/.partial-*     work in progress, never active
    projects/<project>/current -> bundles/<id>  the active bundle (a symlink)
    projects/<project>/state.json             active, previous (written atomically)
    projects/<project>/datasets/              datasets (at their manifest paths): persist
                                              across bundle versions

Activation is one ``rename`` of a fresh symlink over ``current``: a reader sees the old
bundle or the new one, never a half-written one, and a crash at any point leaves the
previous bundle active.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec

from nodes.project.bundle import unpack
from nodes.project.manifest import Manifest, ManifestError, load_manifest
from protocol.base import new_id
from protocol.bundles import BundleInfo
from protocol.errors import BadRequest, NotFound
from protocol.state import BundleState

RECORD = ".shipyard-bundle.json"  # the verified BundleInfo, inside each unpacked bundle


class BundleStore:
    def __init__(self, root: Path, keep: int = 5) -> None:
        self.root = root
        self.keep = keep

    def project_dir(self, project: str) -> Path:
        return self.root / "projects" / project

    def bundle_dir(self, project: str, bundle: str) -> Path:
        return self.project_dir(project) / "bundles" / bundle

    def data_dir(self, project: str) -> Path:
        return self.project_dir(project) / "datasets"

    def current_dir(self, project: str) -> Path:
        return self.project_dir(project) / "current"

    def projects(self) -> list[str]:
        base = self.root / "projects"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def active(self, project: str) -> str | None:
        try:
            target = os.readlink(self.current_dir(project))
        except OSError:
            return None
        return Path(target).name

    def read_state(self, project: str) -> dict[str, Any]:
        try:
            data = json.loads((self.project_dir(project) / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def has(self, project: str, bundle: str) -> bool:
        return (self.bundle_dir(project, bundle) / RECORD).is_file()

    def record(self, project: str, bundle: str) -> BundleInfo:
        """The verified record of an unpacked bundle.  Raises ``OSError`` when it is not
        unpacked here, ``ValueError`` when the record is unreadable."""
        data = (self.bundle_dir(project, bundle) / RECORD).read_bytes()
        try:
            return msgspec.json.decode(data, type=BundleInfo)
        except msgspec.DecodeError as exc:
            raise ValueError(f"record of bundle {bundle} of {project}: {exc}") from None

    def cached(self, project: str) -> list[str]:
        base = self.project_dir(project) / "bundles"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / RECORD).is_file())

    def install(self, project: str, archive: Path, info: BundleInfo) -> None:
        """Verify and unpack ``archive`` as bundle ``info.id`` (raises BundleRejected)."""
        final = self.bundle_dir(project, info.id)
        if self.has(project, info.id):
            return
        work = final.parent / f".partial-{info.id}-{new_id()}"
        final.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir(project).mkdir(parents=True, exist_ok=True)
        unpack(archive, info, work)
        (work / RECORD).write_bytes(msgspec.json.encode(info))
        if final.exists():  # a leftover without a record: an interrupted earlier attempt
            shutil.rmtree(final)
        os.rename(work, final)

    def activate(self, project: str, bundle: str) -> str | None:
        """Make ``bundle`` active atomically; return the bundle that was active before."""
        if not self.has(project, bundle):
            raise FileNotFoundError(f"bundle {bundle} of {project} is not installed")
        before = self.active(project)
        pdir = self.project_dir(project)
        link = pdir / f".current-{new_id()}"
        os.symlink(Path("bundles") / bundle, link)
        os.replace(link, self.current_dir(project))
        state = self.read_state(project)
        previous = before if before != bundle else state.get("previous")
        self._write_state(project, {"active": bundle, "previous": previous})
        return before

    def _write_state(self, project: str, state: dict[str, Any]) -> None:
        pdir = self.project_dir(project)
        tmp = pdir / f".state-{new_id()}.json"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, pdir / "state.json")

    def prune(self, project: str) -> list[str]:
        """Remove unpacked bundles beyond the newest ``keep`` (never active or previous)."""
        base = self.project_dir(project) / "bundles"
        if not base.is_dir():
            return []
        for leftover in base.glob(".partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        state = self.read_state(project)
        protect = {self.active(project), state.get("previous")}
        bundles = sorted((p for p in base.iterdir() if (p / RECORD).is_file()),
                         key=lambda p: (p / RECORD).stat().st_mtime, reverse=True)
        removed = []
        for p in bundles[self.keep:]:
            if p.name not in protect:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed


class ActiveManifests:
    """The manifest of each project's active bundle here, read once per bundle.

    ``active`` maps a project to the node's state of it (the node's heartbeat state), so
    this reads the bundle the node activated last, never one being unpacked."""

    def __init__(self, store: BundleStore, active: Mapping[str, BundleState],
                 node_name: str) -> None:
        self.store = store
        self.active = active
        self.node_name = node_name
        self._cache: dict[tuple[str, str], Manifest] = {}

    async def get(self, project: str) -> tuple[str, Manifest]:
        """(bundle, manifest) of ``project``'s active bundle.  Raises ``NotFound`` when
        the project is not active here, ``BadRequest`` when its manifest is unreadable."""
        st = self.active.get(project)
        bundle = st.active if st is not None else None
        if not bundle:
            raise NotFound(f"project {project!r} is not active on node {self.node_name}")
        cached = self._cache.get((project, bundle))
        if cached is None:
            where = self.store.bundle_dir(project, bundle)
            try:
                cached = await anyio.to_thread.run_sync(
                    lambda: load_manifest(where, strict=False))
            except ManifestError as exc:
                raise BadRequest(f"bundle {bundle} of {project}: {exc.message}") from None
            self._cache[(project, bundle)] = cached
        return bundle, cached
