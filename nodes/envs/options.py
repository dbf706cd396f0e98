"""What a node needs to keep code environments: its options, its store, its collector.

Automation, API and Design nodes each keep built environments under
``<data dir>/envs`` (an ``EnvStore``) and install wheels from the ``sy_wheels`` object
store when a lock says they are stored there, else from the node's package index
settings (``--index-url``, ``--find-links``, ``--no-index``, or the ``SHIPYARD_*``
variables; see ``nodes.envs.uv``).

A build that failed because NATS did not answer while the lock's wheels were fetched is
not the lock's fault: ``BuildInterrupted`` says so, and nodes retry it with backoff
like any transfer, instead of refusing the update.

Garbage collection runs on every such node, in a supervised loop: each pass gives the
store the digests something on the node still uses (a kept bundle, a loaded
generation) and the store removes the others once they have been unused for the grace
period.  A pass is one directory listing plus one ``rmtree`` per expired environment,
so it runs every ``gc_interval_s`` (a minute, or half the grace when that is shorter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext

from nodes.envs.fetch import fetch_wheels
from nodes.envs.store import EnvBuildFailed, EnvStore
from nodes.envs.uv import DEFAULT_TIMEOUT_S, IndexSettings
from nodes.runtime.loops import is_transient
from nodes.runtime.transfer import TransferStalled
from protocol.envs import EnvLock

DEFAULT_GRACE_S = 3600.0
MAX_GC_INTERVAL_S = 60.0
MIN_GC_INTERVAL_S = 0.5


@dataclass(frozen=True)
class EnvOptions:
    """A node's code-environment settings (``shipyard node start --index-url ...``)."""

    index: IndexSettings = field(default_factory=IndexSettings.from_env)
    build_timeout_s: float = DEFAULT_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S

    @property
    def gc_interval_s(self) -> float:
        """How often unused environments are looked for: a minute, or half the grace
        when that is shorter, so an environment outlives its grace by at most that."""
        return max(MIN_GC_INTERVAL_S, min(MAX_GC_INTERVAL_S, self.grace_s / 2))


def node_env_store(data_dir: Path, options: EnvOptions,
                   js: Callable[[], JetStreamContext]) -> EnvStore:
    """The environment store of a node whose data lives in ``data_dir``.  ``js`` gives
    the node's JetStream context once it is connected (wheels are fetched only then)."""

    async def fetch(lock: EnvLock, dest: Path) -> None:
        await fetch_wheels(js(), lock, dest)

    return EnvStore(data_dir / "envs", options.index, build_timeout_s=options.build_timeout_s,
                    grace_s=options.grace_s, fetch=fetch)


class BuildInterrupted(ConnectionError):
    """An environment build stopped by the connection (fetching wheels from
    ``sy_wheels``), not by the lock: retrying may succeed."""


def interrupted(exc: EnvBuildFailed) -> bool:
    """Whether a failed build failed only because NATS did not answer."""
    cause = exc.__cause__
    return cause is not None and (isinstance(cause, TransferStalled) or is_transient(cause))
