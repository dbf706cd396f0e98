"""Claiming a firing: exactly one node runs it, and a scenario never runs twice at once.

Every node of an infra sees the same triggers (see ``schedule``), so each firing reaches
every node; this is where one of them wins it:

1. the node creates the firing's key in ``sy_fired`` (KV create: one winner per firing);
2. it creates the scenario's lock ``lock.<infra>.<project>.<scenario>``; if the lock is
   taken, the firing is parked on it as the one ``pending`` firing (coalesced: more
   firings while one is pending add nothing);
3. when a run ends, its node starts the pending firing under the same lock, or deletes
   the lock, both by compare-and-set (``release``).

A node that dies holding a lock is noticed by the Deployer (or by itself on restart,
``release_stale_locks``), which marks the run failed ("node lost") and frees the lock.
Running a claimed firing is ``execution``'s part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from nodes.automation.store import ActiveManifests
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import delete_if, snapshot
from nodes.runtime.run_reports import fail_lost_run
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import encode, new_id
from protocol.errors import BadRequest, NotFound
from protocol.events import Event
from protocol.scenarios import (
    RUN_LOCK,
    Firing,
    RunAccepted,
    RunLock,
    fired_key,
    lock_key,
    lock_keys,
)

FIRED_TTL_S = 7 * 24 * 3600


class ClaimHost(Protocol):
    """What claiming needs of its node: who it is, its connection, where events go."""

    @property
    def name(self) -> str: ...

    @property
    def instance(self) -> str: ...

    @property
    def infra(self) -> str: ...

    @property
    def log(self) -> Any: ...

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def settings(self) -> NatsSettings: ...

    @property
    def stopping_requested(self) -> bool: ...

    async def emit(self, event: Event) -> None: ...


@dataclass(frozen=True)
class Claim:
    """The answer to a firing, and the lock to run under (with its revision) when this
    node won it; ``lock`` is None when the firing was coalesced or parked."""

    accepted: RunAccepted
    lock: RunLock | None = None
    revision: int = 0


def run_id_for(project: str, scenario: str) -> str:
    return f"{project}-{scenario}-{time.strftime('%Y%m%dT%H%M%S')}-{new_id()[-6:]}"


class Claims:
    def __init__(self, host: ClaimHost, manifests: ActiveManifests) -> None:
        self.host = host
        self.manifests = manifests
        self.log = host.log.bind(component="claims")
        self._fired: KeyValue | None = None
        self._locks: KeyValue | None = None

    @property
    def fired(self) -> KeyValue:
        assert self._fired is not None
        return self._fired

    @property
    def locks(self) -> KeyValue:
        """``sy_locks``: the scenario locks, and the cron marks (see ``schedule``)."""
        assert self._locks is not None
        return self._locks

    async def setup(self) -> None:
        js, r = self.host.js, self.host.settings.replicas
        try:
            self._fired = await js.key_value(subjects.FIRED_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            try:
                self._fired = await js.create_key_value(KeyValueConfig(
                    bucket=subjects.FIRED_BUCKET, history=1, ttl=FIRED_TTL_S, replicas=r,
                    storage=StorageType.FILE, description="shipyard trigger firings"))
            except nats.js.errors.BadRequestError:
                self._fired = await js.key_value(subjects.FIRED_BUCKET)
        self._locks = await ensure_kv(js, subjects.LOCKS_BUCKET, replicas=r,
                                      description="shipyard scenario locks and cron marks")

    async def claim(self, project: str, scenario: str, firing: Firing) -> Claim:
        """Claim ``firing`` for this infra and take the scenario's lock, or park it on the
        running run.  Raises ``NotFound`` for an unknown project or scenario."""
        bundle, manifest = await self.manifests.get(project)
        if scenario not in manifest.scenarios:
            known = ", ".join(sorted(manifest.scenarios)) or "none"
            raise NotFound(f"project {project} (bundle {bundle}) has no scenario "
                           f"{scenario!r}; scenarios: {known}")
        host = self.host
        infra = host.infra
        try:
            await self.fired.create(fired_key(infra, project, scenario, firing.id),
                                    host.name.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return Claim(RunAccepted(run_id="", node="", coalesced=True,
                                     detail=f"firing {firing.id} is already claimed"))
        key = lock_key(infra, project, scenario)
        while True:
            lock = RunLock(run_id=run_id_for(project, scenario), project=project,
                           scenario=scenario, infra=infra, node=host.name,
                           instance=host.instance, bundle=bundle, firing=firing,
                           started_at=time.time())
            try:
                revision = await self.locks.create(key, encode(lock))
            except nats.js.errors.KeyWrongLastSequenceError:
                parked = await self._park(key, firing)
                if parked is not None:
                    return Claim(parked)
                continue  # the lock went away meanwhile: try again
            return Claim(RunAccepted(run_id=lock.run_id, node=host.name), lock,
                         int(revision))

    async def _park(self, key: str, firing: Firing) -> RunAccepted | None:
        try:
            entry = await self.locks.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        current = RUN_LOCK.decode(entry.value)
        if current.pending is not None:
            return RunAccepted(run_id=current.run_id, node=current.node, coalesced=True,
                               detail=f"{current.scenario} is running ({current.run_id}) and "
                                      "a run is already queued after it")
        parked = msgspec.structs.replace(current, pending=firing)
        try:
            await self.locks.update(key, encode(parked), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return RunAccepted(run_id=current.run_id, node=current.node, coalesced=True,
                           detail=f"{current.scenario} is running ({current.run_id}); one more "
                                  "run will follow it")

    async def release(self, key: str, run_id: str) -> tuple[RunLock, int] | None:
        """End ``run_id``'s hold on the lock: hand it to the pending firing (returned,
        with the lock's revision, for the caller to run), or delete it."""
        host = self.host
        while True:
            try:
                entry = await self.locks.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            if not entry.value:
                return None
            current = RUN_LOCK.decode(entry.value)
            if current.run_id != run_id:
                return None  # taken over (the Deployer declared us lost): not ours any more
            if current.pending is not None and not host.stopping_requested:
                try:
                    bundle, _ = await self.manifests.get(current.project)
                except (NotFound, BadRequest):
                    bundle = current.bundle
                nxt = msgspec.structs.replace(
                    current, run_id=run_id_for(current.project, current.scenario),
                    node=host.name, instance=host.instance, bundle=bundle,
                    firing=current.pending, pending=None, started_at=time.time())
                try:
                    revision = await self.locks.update(key, encode(nxt),
                                                       last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                return nxt, int(revision)
            if await delete_if(self.locks, key, entry.revision or 0):
                return None

    async def release_stale_locks(self) -> None:
        """Locks held by an earlier process of this node: those runs died with it."""
        host = self.host
        snap = await snapshot(self.locks, lock_keys(host.infra))
        for key, (revision, raw) in snap.items():
            try:
                lock = RUN_LOCK.decode(raw)
            except msgspec.DecodeError:
                continue
            if lock.node == host.name and lock.instance != host.instance:
                await fail_lost_run(host, self.locks, key, revision, lock,
                                    f"node restarted: {host.name} was running it "
                                    "when its previous process ended")
