"""Each deployed project's Flow as a picture: datasets and recipes, laid out as a graph,
with each dataset's last build and check outcome.

The Flow comes from the manifest inside the deployed bundle (the deployed truth, not a
workspace that may have moved on): the bundle's archive is fetched from the object store
once per bundle id (ids are immutable), only ``shipyard.toml`` is read out of it, checked
against the bundle record's SHA-256, and the parsed manifest is kept (at most
``MAX_CACHED``).  Archives over ``MAX_ARCHIVE`` bytes are not fetched: their Flow says so.
Outcomes come from the run history the Deployer holds: a scenario step names the
datasets it builds or checks; a design build's steps are recipes, which build their
outputs.  Layout is columns by dependency depth, computed here so the page only draws.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import nats.js.errors

from nodes.flow.graph import Graph
from nodes.project.manifest import MANIFEST, Manifest, parse_manifest
from nodes.runtime import transfer
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.loops import is_transient
from protocol import subjects
from protocol.bundles import BUNDLE_INFO, BundleInfo, bundle_key
from protocol.scenarios import RunSummary

if TYPE_CHECKING:
    from nodes.deployer.node import DeployerNode

MAX_ARCHIVE = 64 * 1024 * 1024
MAX_MANIFEST = 1024 * 1024
MAX_CACHED = 64
BOX_W, BOX_H, COL_W, ROW_H = 150, 34, 210, 56


def _read_manifest(archive: Path, info: BundleInfo) -> bytes:
    """``files/shipyard.toml`` out of a bundle archive, checked against the record."""
    entry = next((f for f in info.files if f.path == MANIFEST), None)
    if entry is None:
        raise ValueError(f"bundle {info.id} has no {MANIFEST}")
    with tarfile.open(archive, "r:") as tar:
        member = tar.getmember(f"files/{MANIFEST}")
        if not member.isfile() or member.size > MAX_MANIFEST or member.size != entry.size:
            raise ValueError(f"{MANIFEST} in bundle {info.id} does not match its record")
        f = tar.extractfile(member)
        assert f is not None
        data = f.read(MAX_MANIFEST + 1)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ValueError(f"{MANIFEST} in bundle {info.id} does not match its SHA-256")
    return data


class Flows:
    """Manifests of deployed bundles, loaded in the background, one at a time."""

    def __init__(self, deployer: DeployerNode) -> None:
        self.d = deployer
        self.manifests: OrderedDict[tuple[str, str], Manifest | str] = OrderedDict()
        self._wanted: list[tuple[str, str]] = []
        self._kick = anyio.Event()
        self.on_loaded: list[Any] = []

    def want(self, project: str, bundle: str) -> Manifest | str | None:
        """The manifest (or why there is none) of ``bundle``; None while it loads."""
        key = (project, bundle)
        if key in self.manifests:
            return self.manifests[key]
        if key not in self._wanted:
            self._wanted.append(key)
            self._kick.set()
        return None

    async def run(self) -> None:
        while True:
            while self._wanted:
                project, bundle = self._wanted[0]
                result: Manifest | str | None
                try:
                    result = await self._load(project, bundle)
                except Exception as exc:  # shown on the page in place of the picture
                    # NATS not answering now: asked again at the next refresh.
                    result = None if is_transient(exc) else f"Flow not available: {exc}"
                if result is not None:
                    self.manifests[(project, bundle)] = result
                while len(self.manifests) > MAX_CACHED:
                    self.manifests.popitem(last=False)
                self._wanted.pop(0)
                for hook in self.on_loaded:
                    hook()
            self._kick = anyio.Event()
            await self._kick.wait()

    async def _load(self, project: str, bundle: str) -> Manifest:
        kv = await ensure_kv(self.d.js, subjects.BUNDLE_BUCKET)
        try:
            entry = await kv.get(bundle_key(project, bundle))
        except nats.js.errors.KeyNotFoundError:
            raise ValueError(f"no record of bundle {bundle} of {project}") from None
        info = BUNDLE_INFO.decode(entry.value or b"")
        if not info.archive:
            raise ValueError(f"bundle {bundle} has no archive")
        if info.archive_size > MAX_ARCHIVE:
            raise ValueError(f"the archive of bundle {bundle} is {info.archive_size} bytes, "
                             f"over {MAX_ARCHIVE} (not fetched for a picture)")
        with tempfile.TemporaryDirectory(prefix="sy-flow-") as tmp:
            dest = Path(tmp) / "bundle.tar"
            await transfer.get_file(self.d.js, subjects.BUNDLE_STORE, info.archive, dest,
                                    expected_sha256=info.archive_sha256 or None)
            data = await anyio.to_thread.run_sync(_read_manifest, dest, info)
        return parse_manifest(data, strict=False)


def _outcomes(manifest: Manifest, runs: list[RunSummary]) -> dict[str, dict[str, Any]]:
    """dataset -> {"build": {...}, "check": {...}}: the newest of each, from ``runs``."""
    out: dict[str, dict[str, Any]] = {}
    producers = {ds: name for name, r in manifest.recipes.items() for ds in r.outputs}

    def put(ds: str, what: str, run: RunSummary, outcome: str, message: str) -> None:
        slot = out.setdefault(ds, {})
        if what not in slot:
            slot[what] = {"outcome": outcome, "run": run.run_id, "at": run.finished_at,
                          "message": message}

    for run in sorted(runs, key=lambda r: r.finished_at or 0, reverse=True):
        if run.finished_at is None:
            continue
        scenario = manifest.scenarios.get(run.scenario)
        for step in run.steps:
            if step.kind == "recipe":
                recipe = manifest.recipes.get(step.name)
                for ds in recipe.outputs if recipe else []:
                    put(ds, "build", run, step.outcome, step.message)
                continue
            if scenario is None or not 0 <= step.index < len(scenario.steps):
                continue
            spec = scenario.steps[step.index]
            if spec.build is not None:
                for ds in spec.build:
                    put(ds, "build", run, step.outcome, step.message)
                    # the recipes upstream of a target were built by the same step
                    stack = [producers.get(ds)]
                    while stack:
                        r = stack.pop()
                        if r is None:
                            continue
                        for up in manifest.recipes[r].inputs:
                            if up in producers:
                                put(up, "build", run, step.outcome, step.message)
                                stack.append(producers[up])
            elif spec.check is not None:
                for ds in spec.check:
                    put(ds, "check", run, step.outcome, step.message)
    return out


def picture(manifest: Manifest, runs: list[RunSummary]) -> dict[str, Any]:
    """Boxes and edges of the Flow, with coordinates."""
    try:
        graph = Graph.of(manifest)
        producers = graph.producers
        order = list(graph.order)
    except Exception:  # a bundle's manifest was valid when packed; draw what there is
        producers = {ds: n for n, r in manifest.recipes.items() for ds in r.outputs}
        order = sorted(manifest.recipes)
    depth: dict[str, int] = {ds: 0 for ds in manifest.datasets if ds not in producers}
    rdepth: dict[str, int] = {}
    for name in order:
        recipe = manifest.recipes[name]
        d = 1 + max((depth.get(ds, 0) for ds in recipe.inputs), default=0)
        rdepth[name] = d
        for ds in recipe.outputs:
            depth[ds] = d + 1
    for ds in manifest.datasets:
        depth.setdefault(ds, 0)
    columns: dict[int, list[tuple[str, str]]] = {}
    for ds, d in sorted(depth.items()):
        columns.setdefault(d, []).append(("dataset", ds))
    for r, d in sorted(rdepth.items()):
        columns.setdefault(d, []).append(("recipe", r))
    outcomes = _outcomes(manifest, runs)
    boxes: list[dict[str, Any]] = []
    where: dict[tuple[str, str], tuple[int, int]] = {}
    for col, items in sorted(columns.items()):
        for row, (kind, name) in enumerate(items):
            x, y = 10 + col * COL_W, 10 + row * ROW_H
            where[(kind, name)] = (x, y)
            box: dict[str, Any] = {"kind": kind, "name": name, "x": x, "y": y}
            if kind == "dataset":
                box.update(outcomes.get(name, {}))
            boxes.append(box)
    edges = []
    for name, recipe in manifest.recipes.items():
        for ds in recipe.inputs:
            if ("dataset", ds) in where:
                edges.append({"from": where[("dataset", ds)], "to": where[("recipe", name)]})
        for ds in recipe.outputs:
            if ("dataset", ds) in where:
                edges.append({"from": where[("recipe", name)], "to": where[("dataset", ds)]})
    width = 20 + (max(columns) + 1 if columns else 1) * COL_W
    height = 20 + max((len(v) for v in columns.values()), default=1) * ROW_H
    return {"boxes": boxes, "edges": edges, "width": width, "height": height,
            "box_w": BOX_W, "box_h": BOX_H}


def flows_section(d: DeployerNode, flows: Flows) -> list[dict[str, Any]]:
    """One picture per deployed project and infra."""
    from nodes.deployer.dashboard.state import bundle_records

    out = []
    for entry in bundle_records(d):
        rec = entry.value
        item: dict[str, Any] = {"project": rec.project, "infra": rec.infra,
                                "bundle": rec.desired}
        manifest = flows.want(rec.project, rec.desired)
        if manifest is None:
            item["pending"] = True
        elif isinstance(manifest, str):
            item["error"] = manifest
        else:
            runs = [r for r in d.runs.runs.values()
                    if r.project == rec.project and r.infra == rec.infra]
            item["graph"] = picture(manifest, runs)
        out.append(item)
    return sorted(out, key=lambda i: (i["project"], i["infra"]))
