"""Code environments of the bundles an Automation node keeps.

A bundle's record (``BundleInfo.envs``, kept verified inside the unpacked bundle) names
the locks its code runs in.  Before a bundle is switched in, every one of them is built
(``prepare``): the current bundle keeps running meanwhile, and a lock that cannot be
built refuses the bundle with the build's last lines.  An environment that is built
already (a rollback, a second bundle or project with the same lock) costs one ``stat``.

Runs of the active bundle get the interpreter of each of its environments
(``pythons``).  Every environment a kept bundle (active, previous or cached) uses is in
use; the collector removes the others after the grace period (``collect``), and the
heartbeat shows each environment with the bundles that use it (``states``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from nodes.automation.store import BundleStore
from nodes.envs.options import BuildInterrupted, interrupted
from nodes.envs.store import EnvBuildFailed, EnvStore
from protocol.envs import EnvLock, EnvState

Building = Callable[[str], Awaitable[None]]  # called with an env's name as its build starts


class EnvNotBuilt(Exception):
    """A bundle's environment could not be built (or its lock is malformed); retrying
    the same bundle builds the same lock, so this refuses the update."""


def _refusal(exc: EnvBuildFailed) -> Exception:
    """The bundle is refused, unless only NATS failed the build (then it is retried)."""
    return BuildInterrupted(exc.message) if interrupted(exc) else EnvNotBuilt(exc.message)


class BundleEnvs:
    def __init__(self, store: BundleStore, envs: EnvStore, log: Any) -> None:
        self.store = store
        self.envs = envs
        self.log = log.bind(component="envs")
        self.users: dict[str, list[str]] = {}  # digest -> its bundles, as last scanned
        self._locks: dict[tuple[str, str], dict[str, EnvLock]] = {}
        self._guard = threading.Lock()  # _locks is used from worker threads

    def locks(self, project: str, bundle: str) -> dict[str, EnvLock]:
        """The environments of an unpacked bundle, from its verified record (blocking;
        records are immutable, so each is read once)."""
        key = (project, bundle)
        with self._guard:
            locks = self._locks.get(key)
        if locks is None:
            locks = dict(self.store.record(project, bundle).envs)
            with self._guard:
                self._locks[key] = locks
        return locks

    async def prepare(self, project: str, bundle: str, building: Building) -> None:
        """Build every environment of ``bundle`` that is not built here yet, one after
        the other, calling ``building(name)`` as each starts.  Raises ``EnvNotBuilt``, or
        ``BuildInterrupted`` (a ``ConnectionError``: retry) when only NATS failed it."""
        try:
            locks = await anyio.to_thread.run_sync(self.locks, project, bundle)
        except (OSError, ValueError) as exc:  # just unpacked: a defect or a tampered disk
            raise EnvNotBuilt(f"bundle record unreadable: {exc}") from None
        for name, lock in sorted(locks.items()):
            if self.envs.python_of(lock.digest) is not None:  # a stat; built: nothing to do
                continue
            await building(name)
            try:
                await self.envs.ensure(lock)
            except EnvBuildFailed as exc:  # "building env <name>: <step> failed: <tail>"
                raise _refusal(exc) from None
            self.log.info("code env built", project=project, bundle=bundle, env=name,
                          digest=lock.digest[:12])

    async def pythons(self, project: str, bundle: str) -> dict[str, str]:
        """Environment name -> interpreter, for runs of ``bundle`` (built at its
        activation; built again here if something removed it since).  Raises
        ``EnvNotBuilt``."""
        try:
            locks = await anyio.to_thread.run_sync(self.locks, project, bundle)
        except (OSError, ValueError) as exc:
            raise EnvNotBuilt(f"bundle record unreadable: {exc}") from None
        out = {}
        for name, lock in locks.items():
            try:
                out[name] = str(await self.envs.ensure(lock))
            except EnvBuildFailed as exc:
                raise _refusal(exc) from None
        return out

    def used_by(self) -> dict[str, list[str]]:
        """Digest -> the kept bundles that use it, ``"bundle <project>/<id>"`` (blocking:
        lists the bundle folders)."""
        users: dict[str, list[str]] = {}
        kept: set[tuple[str, str]] = set()
        for project in self.store.projects():
            for bundle in self.store.cached(project):
                kept.add((project, bundle))
                try:
                    locks = self.locks(project, bundle)
                except (OSError, ValueError) as exc:  # removed meanwhile, or unreadable
                    self.log.warning("bundle record unreadable", project=project,
                                     bundle=bundle, error=str(exc))
                    continue
                for lock in locks.values():
                    users.setdefault(lock.digest, []).append(f"bundle {project}/{bundle}")
        with self._guard:
            for key in set(self._locks) - kept:
                del self._locks[key]
        return users

    async def refresh(self) -> None:
        """Re-read which bundles use which environment (after bundles came or went).
        Never raises: a listing that fails keeps the last one (the collector retries)."""
        try:
            self.users = await anyio.to_thread.run_sync(self.used_by)
        except OSError as exc:
            self.log.warning("bundle folders unreadable", error=str(exc))

    def states(self) -> list[EnvState]:
        """Every environment here, with its bundles (memory only: for heartbeats)."""
        return self.envs.states(self.users)

    async def collect(self) -> list[Path]:
        """One collector pass: remove environments no kept bundle has used for the
        grace period; the folders removed."""
        self.users = await anyio.to_thread.run_sync(self.used_by)  # raises: no pass
        removed = await self.envs.collect(set(self.users))
        return [self.envs.env_dir(d) for d in removed]
