"""Code environments of test builds on the Design node.

``shipyard build`` runs the recipes a target needs in the environments a bundle made now
would carry: each environment is locked from the workspace's manifest (as ``bundle
create`` locks it) and built in the node's own store under ``<data dir>/envs``, like on
any node, so "test before you deploy" runs the same libraries as production.  A lock
that did not change is built once: the next test build costs the lock (one ``uv pip
compile``, answered from uv's cache) and a ``stat``.

The environments each project's last test build used are in use; the others are
collected after the grace period, as on Automation and API nodes.
"""

from __future__ import annotations

from pathlib import Path

from nodes.design.envs import EnvLocker
from nodes.envs.store import EnvStore
from nodes.flow.errors import FlowError
from nodes.project.manifest import Manifest
from protocol.envs import EnvState
from protocol.errors import OperationError


class BuildEnvs:
    def __init__(self, locker: EnvLocker, store: EnvStore) -> None:
        self.locker = locker
        self.store = store
        self._last: dict[str, set[str]] = {}  # project -> digests its last build used

    @staticmethod
    def needed(manifest: Manifest, recipes: list[str]) -> set[str]:
        """The environments ``recipes`` run in (not the builtin one)."""
        return {env for r in recipes if (env := manifest.recipe_env(r)) is not None}

    async def pythons(self, project_dir: Path, manifest: Manifest,
                      names: set[str]) -> dict[str, str]:
        """Lock and build ``names``; environment name -> interpreter.  Raises
        ``FlowError`` with what failed (the build run fails with it)."""
        try:
            locks = await self.locker.lock(project_dir, manifest, names, wheels=False)
            pythons = {name: str(await self.store.ensure(lock))
                       for name, lock in locks.items()}
        except OperationError as exc:  # ManifestError, LockFailed, EnvBuildFailed
            raise FlowError([exc.message]) from None
        self._last[manifest.project.key] = {lock.digest for lock in locks.values()}
        return pythons

    def users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for project, digests in self._last.items():
            for digest in digests:
                users.setdefault(digest, []).append(f"build {project}")
        return users

    def states(self) -> list[EnvState]:
        return self.store.states(self.users())

    async def collect(self) -> None:
        """One collector pass: remove environments no project's last build used for
        the grace period."""
        await self.store.collect(set(self.users()))
