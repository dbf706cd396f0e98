"""Bundles from Design to Automation nodes, against a real nats-server."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import tarfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NATS

from nodes.automation import AutomationNode
from nodes.deployer import DeployerNode
from nodes.deployer.updates import close_last
from nodes.design import DesignNode
from nodes.runtime import transfer
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import CreateApiPackage, ListApiPackages
from protocol.base import encode, new_id
from protocol.bundles import (
    BUNDLE_INFO,
    BundleInfo,
    CreateBundle,
    FileEntry,
    ListBundles,
    bundle_key,
    files_digest,
)
from protocol.deploy import (
    DEPLOYMENT_VALUE,
    SUPERSEDED,
    BundleActivated,
    CreateInfra,
    DeployBundle,
    DeploymentFinished,
    DeploymentRequested,
    DeploymentView,
    GetHistory,
    ListDeployments,
    RollbackBundle,
    Update,
    deployment_key,
)
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.scenarios import BuildDatasets
from tests.helpers import Fleet, fleet, wait_for
from tests.projects import make_project

HB = 0.2


def deployer(settings: NatsSettings) -> DeployerNode:
    return DeployerNode(name="deployer", nats=settings, heartbeat_interval=HB)


def design(settings: NatsSettings, ws: Path) -> DesignNode:
    return DesignNode(name="design", nats=settings, workspace=ws, heartbeat_interval=HB)


def automation(settings: NatsSettings, tmp: Path, name: str, infra: str = "prod") -> AutomationNode:
    return AutomationNode(name=name, nats=settings, infra=infra, data_dir=tmp / "nodes" / name,
                          heartbeat_interval=HB, resync_interval=1.0)


async def control_plane(f: Fleet, settings: NatsSettings, tmp: Path) -> tuple[NATS, Caller]:
    await f.start(deployer(settings))
    await f.start(design(settings, tmp / "ws"))
    nc = await connect(settings, name="test")
    caller = Caller(nc, sender="test")
    await caller.call(CreateInfra(name="prod", kind="automation", stage="production"))
    return nc, caller


async def view(caller: Caller, project: str = "churn", infra: str = "prod") -> DeploymentView:
    reply = await caller.call(ListDeployments(project=project, infra=infra))
    return reply.deployments[0]


async def converged(caller: Caller, bundle: str, nodes: int,
                    project: str = "churn") -> DeploymentView | None:
    v = await view(caller, project)
    running = [n for n in v.nodes if n.status == "online" and n.running == bundle]
    if v.desired == bundle and v.state == "in_sync" and len(running) == nodes:
        return v
    return None


def active_dir(node: AutomationNode, project: str = "churn") -> Path:
    return node.store.current_dir(project).resolve()


async def test_deploy_roll_forward_and_back(settings: NatsSettings, tmp_path: Path) -> None:
    """The happy path: bundle, deploy to two nodes, deploy a second bundle, roll back."""
    project = make_project(tmp_path / "ws", "churn", version="1")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        a1 = await f.start(automation(settings, tmp_path, "a1"))
        a2 = await f.start(automation(settings, tmp_path, "a2"))

        first = await caller.call(CreateBundle(project="churn", bundle_id="v1", notes="first"))
        assert first.diff.previous is None
        assert set(first.diff.added) == {"shipyard.toml", "recipes/clean.py", "data/raw.csv",
                                         "README.md"}
        deployed = await caller.call(DeployBundle(project="churn", bundle_id="v1",
                                                  infra="prod", by="alice"))
        assert deployed.desired == "v1" and deployed.last_update is not None
        await wait_for(lambda: converged(caller, "v1", 2), message="v1 on both nodes")
        for node in (a1, a2):
            assert (active_dir(node) / "recipes" / "clean.py").read_text().endswith("'1'\n")
            assert not (active_dir(node) / "data" / "clean.csv").exists()  # not shipped

        make_project(tmp_path / "ws", "churn", version="2",
                     extra_files={"notes/changelog.md": "v2"})
        (project / "README.md").unlink()
        second = await caller.call(CreateBundle(project="churn", bundle_id="v2"))
        assert (second.diff.previous, second.diff.added, second.diff.removed,
                second.diff.changed) == ("v1", ["notes/changelog.md"], ["README.md"],
                                         ["recipes/clean.py"])
        await caller.call(DeployBundle(project="churn", bundle_id="v2", infra="prod",
                                       by="bob"))
        v = await wait_for(lambda: converged(caller, "v2", 2), message="v2 on both nodes")
        assert v.previous == "v1" and v.health == "HEALTHY"
        assert (active_dir(a1) / "recipes" / "clean.py").read_text().endswith("'2'\n")

        back = await caller.call(RollbackBundle(project="churn", infra="prod", by="carol"))
        assert back.desired == "v1"
        await wait_for(lambda: converged(caller, "v1", 2), message="rolled back to v1")
        # The old bundle was still unpacked: the rollback transferred nothing.
        events = [e.event async for e in read_events(nc, subject=subjects.event(
            "deploy", "prod", "churn"))]
        activations = [e for e in events if isinstance(e, BundleActivated)]
        assert [(e.bundle, e.transferred > 0) for e in activations
                if e.node == "a1"] == [("v1", True), ("v2", True), ("v1", False)]

        history = await wait_for(lambda: _history_done(caller, 3), message="3 finished updates")
        assert [(u.by, u.action, u.from_bundle, u.to_bundle, u.result) for u in history] == [
            ("alice", "deploy", None, "v1", "succeeded"),
            ("bob", "deploy", "v1", "v2", "succeeded"),
            ("carol", "rollback", "v2", "v1", "succeeded"),
        ]
        bundles = await caller.call(ListBundles(project="churn"))
        assert [b.id for b in bundles.bundles] == ["v1", "v2"]
        await nc.close()


async def _history_done(caller: Caller, n: int) -> list[Any] | None:
    h = await caller.call(GetHistory(project="churn", infra="prod"))
    done = [u for u in h.updates if u.result != "pending"]
    return h.updates if len(h.updates) == n and len(done) == n else None


async def test_bundle_ids_are_immutable_and_bad_names_are_refused(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        with pytest.raises(Conflict, match=r"already exists.*immutable"):
            await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        with pytest.raises(NotFound, match=r"unknown project 'nope'.*known: churn"):
            await caller.call(CreateBundle(project="nope", bundle_id="v1"))
        with pytest.raises(BadRequest, match="invalid bundle id"):
            await caller.call(CreateBundle(project="churn", bundle_id="../v1"))
        with pytest.raises(NotFound, match="bundle 'v9' of project 'churn' not found"):
            await caller.call(DeployBundle(project="churn", bundle_id="v9", infra="prod"))
        with pytest.raises(NotFound, match="unknown infra 'staging'"):
            await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="staging"))
        with pytest.raises(NotFound, match="not deployed"):
            await caller.call(RollbackBundle(project="churn", infra="prod"))
        await nc.close()


async def test_the_design_node_answers_malformed_names_with_bad_request(
        settings: NatsSettings, tmp_path: Path) -> None:
    """Names are checked where they are used, whoever sends them (not only the CLI)."""
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        await f.start(design(settings, tmp_path / "ws"))
        nc = await connect(settings, name="test")
        caller = Caller(nc, sender="test")
        for bad in ("he*", "a.b", "x" * 200, ""):
            for cmd in (CreateBundle(project=bad, bundle_id="v1"), ListBundles(project=bad),
                        CreateApiPackage(project=bad, service="s", version="v1"),
                        CreateApiPackage(project="churn", service=bad, version="v1"),
                        ListApiPackages(service=bad),
                        BuildDatasets(project=bad, datasets=["raw"])):
                with pytest.raises(BadRequest, match="invalid"):
                    await caller.call(cmd)
        await nc.close()


async def test_invalid_manifest_fails_bundle_create_naming_file_and_field(
        settings: NatsSettings, tmp_path: Path) -> None:
    project = make_project(tmp_path / "ws", "churn")
    manifest = project / "shipyard.toml"
    manifest.write_text(manifest.read_text().replace('ship = true', 'ship = "sometimes"'))
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        with pytest.raises(BadRequest) as info:
            await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        assert str(info.value) == ("churn/shipyard.toml: datasets.raw.ship: "
                                   "expected bool, got str")
        # Listing its bundles points at the same mistake instead of "unknown project".
        with pytest.raises(BadRequest, match=r"datasets\.raw\.ship"):
            await caller.call(ListBundles(project="churn"))
        await nc.close()


async def test_node_down_during_deploy_converges_when_back(settings: NatsSettings,
                                                           tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        a1 = await f.start(automation(settings, tmp_path, "a1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v2"))
        await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        await wait_for(lambda: converged(caller, "v1", 1), message="v1 active")
        await f.stop(a1)
        await caller.call(DeployBundle(project="churn", bundle_id="v2", infra="prod"))
        v = await view(caller)
        assert v.state == "out_of_sync" and v.health == "ERROR"
        assert any("no online automation node" in r for r in v.reasons)
        # The same node (same data dir) comes back and converges on its own.
        back = await f.start(automation(settings, tmp_path, "a1"))
        await wait_for(lambda: converged(caller, "v2", 1), timeout=5, message="v2 after return")
        assert back.store.active("churn") == "v2"
        await nc.close()


async def test_a_new_node_joining_receives_the_infra_bundles(settings: NatsSettings,
                                                             tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    make_project(tmp_path / "ws", "fraud")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        await f.start(automation(settings, tmp_path, "a1"))
        for p in ("churn", "fraud"):
            await caller.call(CreateBundle(project=p, bundle_id="v1"))
            await caller.call(DeployBundle(project=p, bundle_id="v1", infra="prod"))
        await f.start(automation(settings, tmp_path, "other", infra="elsewhere"))
        late = await f.start(automation(settings, tmp_path, "a2"))
        for p in ("churn", "fraud"):
            await wait_for(lambda p=p: converged(caller, "v1", 2, project=p),
                           message=f"{p} on both nodes")
        assert sorted(late.store.projects()) == ["churn", "fraud"]
        await nc.close()


async def test_a_restarted_deployer_loses_nothing(settings: NatsSettings, tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        await f.start(automation(settings, tmp_path, "a1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v2"))
        await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        await wait_for(lambda: converged(caller, "v1", 1), message="v1")
        await caller.call(DeployBundle(project="churn", bundle_id="v2", infra="prod"))
        await wait_for(lambda: converged(caller, "v2", 1), message="v2")
        old = next(n for n in f.nodes if isinstance(n, DeployerNode))
        before = await caller.call(GetHistory(project="churn", infra="prod"))
        await f.stop(old)
        await f.start(deployer(settings))
        v = await view(caller)
        assert (v.desired, v.previous, v.state) == ("v2", "v1", "in_sync")
        after = await caller.call(GetHistory(project="churn", infra="prod"))
        assert after.updates == before.updates
        # And it still deploys: roll back through the new Deployer.
        await caller.call(RollbackBundle(project="churn", infra="prod"))
        await wait_for(lambda: converged(caller, "v1", 1), message="rollback via new deployer")
        await nc.close()


async def test_a_new_deployer_announces_events_a_killed_one_left_unsent_and_none_twice(
        settings: NatsSettings, tmp_path: Path) -> None:
    """A Deployer killed between writing an update and publishing its events leaves them
    unsent.  The next active one announces the recent updates again, under event ids
    derived from each update: the missing events appear once, and those already stored
    are not stored twice (the stream drops the repeats), however often it restarts."""
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        for b in ("v1", "v2"):
            await caller.call(CreateBundle(project="churn", bundle_id=b))
        first = await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        # What a Deployer killed right after its compare-and-set leaves: an update (here
        # already closed as failed) in KV, and no event of it.
        kv = await nc.jetstream().key_value(subjects.DEPLOY_BUCKET)
        key = deployment_key("bundle", "prod", "churn")
        entry = await kv.get(key)
        assert entry.value is not None
        rec = DEPLOYMENT_VALUE.decode(entry.value)
        now = time.time()
        lost = Update(id=new_id(), at=now, by="ghost", action="deploy", from_bundle="v1",
                      to_bundle="v2", result="failed", detail="no node answered",
                      finished_at=now + 0.5)
        superseded = msgspec.structs.replace(rec.history[-1], result=SUPERSEDED,
                                             finished_at=now)
        await kv.update(key, encode(msgspec.structs.replace(
            rec, desired="v2", previous="v1", update_id=lost.id,
            history=[*rec.history[:-1], superseded, lost])), last=entry.revision)

        async def announced() -> list[tuple[str, str]]:
            return [(type(e.event).__name__, e.event.update_id) async for e in read_events(
                nc, subject=subjects.event("deploy", "prod", "churn"))
                if isinstance(e.event, DeploymentRequested | DeploymentFinished)]

        assert await announced() == [("DeploymentRequested", first.update_id)]
        want = [("DeploymentRequested", first.update_id), ("DeploymentRequested", lost.id),
                ("DeploymentFinished", lost.id)]
        for _ in range(2):  # a takeover, then another
            old = next(n for n in f.nodes if isinstance(n, DeployerNode))
            await f.stop(old)
            await f.start(deployer(settings))
            assert await wait_for(lambda: _when(announced, want), message="the lost events")
        finished = [e.event async for e in read_events(
            nc, subject=subjects.event("deploy", "prod", "churn"))
            if isinstance(e.event, DeploymentFinished)]
        assert [(e.result, e.detail, e.bundle, e.ts) for e in finished] == [
            ("failed", "no node answered", "v2", lost.finished_at)]
        await nc.close()


async def _when(read: Any, want: list[tuple[str, str]]) -> bool:
    return sorted(await read()) == sorted(want)


async def test_concurrent_deploys_are_resolved_by_compare_and_set(settings: NatsSettings,
                                                                   tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        for b in ("v1", "v2", "v3"):
            await caller.call(CreateBundle(project="churn", bundle_id=b))
        first = await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        results: dict[str, Any] = {}

        async def deploy(bundle: str) -> None:
            try:
                results[bundle] = await caller.call(DeployBundle(
                    project="churn", bundle_id=bundle, infra="prod",
                    expected_revision=first.revision))
            except Conflict as exc:
                results[bundle] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(deploy, "v2")
            tg.start_soon(deploy, "v3")
        won = [b for b, r in results.items() if isinstance(r, DeploymentView)]
        lost = [b for b, r in results.items() if isinstance(r, Conflict)]
        assert len(won) == 1 and len(lost) == 1
        assert "changed" in str(results[lost[0]])
        v = await view(caller)
        assert v.desired == won[0]
        history = await caller.call(GetHistory(project="churn", infra="prod"))
        assert [u.to_bundle for u in history.updates] == ["v1", won[0]]
        # Without an expected revision, concurrent deploys are serialised, each recorded
        # with the bundle it replaced: the history is one unbroken chain.
        async with anyio.create_task_group() as tg:
            for b in ("v1", "v2", "v3"):
                tg.start_soon(lambda b=b: _deploy_quietly(caller, b))
        history = await caller.call(GetHistory(project="churn", infra="prod"))
        chain = history.updates
        for prev, nxt in itertools.pairwise(chain):
            assert nxt.from_bundle == prev.to_bundle
        assert (await view(caller)).desired == chain[-1].to_bundle
        await nc.close()


async def test_a_deploy_that_races_the_recorded_outcome_of_the_last_update_is_applied(
        settings: NatsSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Deployer closes an update (``_finish``) with a compare-and-set of the same
    record a new deploy is changing.  Losing that race is bookkeeping, not a concurrent
    change of what is wanted: the deploy (and a rollback) retries on the new revision.
    A caller's own ``expected_revision`` stays strict."""
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        node = next(n for n in f.nodes if isinstance(n, DeployerNode))
        desk = node.projects
        for b in ("v1", "v2"):
            await caller.call(CreateBundle(project="churn", bundle_id=b))
        first = await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        real_read = desk._read
        raced: list[int] = []

        async def read_then_record_outcome(key: str) -> Any:
            current, revision = await real_read(key)
            if not raced and current is not None:  # the outcome lands after this read
                closed, _ = close_last(current, "failed", "no node answered")
                raced.append(await desk._write(key, closed, revision))
            return current, revision

        monkeypatch.setattr(desk, "_read", read_then_record_outcome)
        second = await caller.call(DeployBundle(project="churn", bundle_id="v2",
                                                infra="prod"))
        assert raced and second.desired == "v2" and second.revision == raced[0] + 1
        history = await caller.call(GetHistory(project="churn", infra="prod"))
        assert [(u.to_bundle, u.result) for u in history.updates[:1]] == [("v1", "failed")]
        assert [u.to_bundle for u in history.updates] == ["v1", "v2"]

        raced.clear()
        back = await caller.call(RollbackBundle(project="churn", infra="prod"))
        assert raced and back.desired == "v1" and back.previous == "v2"

        raced.clear()  # a stale revision the caller gave is still a conflict
        with pytest.raises(Conflict, match="changed"):
            await caller.call(DeployBundle(project="churn", bundle_id="v2", infra="prod",
                                           expected_revision=first.revision))
        assert (await view(caller)).desired == "v1"
        await nc.close()


async def _deploy_quietly(caller: Caller, bundle: str) -> None:
    with contextlib.suppress(Conflict):
        await caller.call(DeployBundle(project="churn", bundle_id=bundle, infra="prod"))


async def _stored(nc: NATS, bundle: str) -> BundleInfo:
    kv = await nc.jetstream().key_value(subjects.BUNDLE_BUCKET)
    entry = await kv.get(bundle_key("churn", bundle))
    assert entry.value is not None
    return BUNDLE_INFO.decode(entry.value)


async def _refused(caller: Caller, bundle: str, still: str) -> DeploymentView | None:
    v = await view(caller)
    if v.desired == bundle and v.state == "failed":
        assert [n.running for n in v.nodes] == [still]
        return v
    return None


async def test_tampered_bundle_is_refused_and_the_old_one_keeps_running(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        a1 = await f.start(automation(settings, tmp_path, "a1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v2"))
        await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        await wait_for(lambda: converged(caller, "v1", 1), message="v1")
        # Rewrite v2's stored archive with different bytes (a consistent object, so
        # the Object Store's own digest matches: only the bundle record can tell).
        info = await _stored(nc, "v2")
        evil = tmp_path / "evil.tar"
        evil.write_bytes(b"\0" * info.archive_size)
        await transfer.put_file(nc.jetstream(), subjects.BUNDLE_STORE, info.archive, evil)
        await caller.call(DeployBundle(project="churn", bundle_id="v2", infra="prod"))
        v = await wait_for(lambda: _refused(caller, "v2", "v1"), message="v2 refused")
        assert v.health == "ERROR"
        assert "damaged" in v.reasons[0] and "SHA-256" in v.reasons[0]
        assert a1.store.active("churn") == "v1"
        assert (active_dir(a1) / "shipyard.toml").exists()
        # Still serving: a good deploy afterwards works.
        await caller.call(RollbackBundle(project="churn", infra="prod", to="v1"))
        await wait_for(lambda: converged(caller, "v1", 1), message="back on v1")
        await nc.close()


async def _plant(nc: NATS, tmp_path: Path, bundle: str, members: list[tuple[str, bytes]],
                 truncate: bool = False) -> None:
    """Store a hostile archive with a record that describes it consistently."""
    archive = tmp_path / f"{bundle}.tar"
    files = await anyio.to_thread.run_sync(_hostile_tar, archive, members, truncate)
    js = nc.jetstream()
    name = f"churn/{bundle}/planted.tar"
    stored = await transfer.put_file(js, subjects.BUNDLE_STORE, name, archive)
    info = BundleInfo(id=bundle, project="churn", created_at=1.0, created_by="mallory",
                      files=files, digest=files_digest(files), size=sum(f.size for f in files),
                      archive=name, archive_size=stored.size, archive_sha256=stored.sha256)
    kv = await js.key_value(subjects.BUNDLE_BUCKET)
    await kv.create(bundle_key("churn", bundle), encode(info))


def _hostile_tar(archive: Path, members: list[tuple[str, bytes]],
                 truncate: bool) -> list[FileEntry]:
    files = []
    with tarfile.open(archive, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            files.append(FileEntry(path=name.removeprefix("files/"), size=len(data),
                                   sha256=hashlib.sha256(data).hexdigest()))
    if truncate:
        archive.write_bytes(archive.read_bytes()[:700])
    return files


@pytest.mark.parametrize(("members", "truncate", "reason"), [
    ([("files/shipyard.toml", b"x"), ("files/../../../../tmp/pwned", b"evil")], False,
     "escapes the target directory"),
    ([("/etc/evil", b"evil")], False, "absolute path"),
    ([("files/big.bin", b"y" * 4096)], True, "truncated"),
])
async def test_hostile_bundles_are_refused(settings: NatsSettings, tmp_path: Path,
                                           members: list[tuple[str, bytes]], truncate: bool,
                                           reason: str) -> None:
    make_project(tmp_path / "ws", "churn")
    async with fleet() as f:
        nc, caller = await control_plane(f, settings, tmp_path)
        a1 = await f.start(automation(settings, tmp_path, "a1"))
        await caller.call(CreateBundle(project="churn", bundle_id="v1"))
        await caller.call(DeployBundle(project="churn", bundle_id="v1", infra="prod"))
        await wait_for(lambda: converged(caller, "v1", 1), message="v1")
        await _plant(nc, tmp_path, "evil", members, truncate)
        await caller.call(DeployBundle(project="churn", bundle_id="evil", infra="prod"))
        v = await wait_for(lambda: _refused(caller, "evil", "v1"), message="refused")
        assert reason in v.reasons[0]
        assert a1.store.active("churn") == "v1"
        assert not await anyio.Path("/tmp/pwned").exists()
        assert not (a1.store.project_dir("churn") / "bundles" / "evil").exists()
        state = msgspec.to_builtins(a1.projects["churn"])
        assert state["failed"]["bundle"] == "evil" and reason in state["failed"]["reason"]
        await nc.close()
