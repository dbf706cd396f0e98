"""A local, always-converging copy of some keys of a KV bucket.

A KV watch pushes changes within milliseconds, but a watch alone is not trusted (after
a failover one went silent for ~17 s): the cache also re-reads every key periodically
and whenever ``resync()`` is called (for example on reconnect).  Each change is handed
to ``on_change``; the callback must be idempotent, since a resync may repeat entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.js.kv import KeyValue

from nodes.runtime import natscompat
from nodes.runtime.logs import get_logger
from nodes.runtime.loops import forever

V = TypeVar("V")

DELETE_OPS = ("DEL", "PURGE")
WATCH_RESTART_S = 0.2  # pause before a watch that ended is started again


@dataclass(frozen=True)
class Entry(Generic[V]):
    key: str
    revision: int
    value: V


class KVCache(Generic[V]):
    def __init__(self, kv: KeyValue, keys: str, decode: Callable[[bytes], V], *,
                 on_change: Callable[[str, Entry[V] | None], Awaitable[None]] | None = None,
                 resync_interval: float = 5.0) -> None:
        self.kv = kv
        self.keys = keys  # a subject-style filter: "bundle.prod.>"
        self.decode = decode
        self.on_change = on_change
        self.resync_interval = resync_interval
        self.entries: dict[str, Entry[V]] = {}
        self.loaded = anyio.Event()
        self.log = get_logger(component="kvcache", keys=keys)
        self._resync_now = anyio.Event()

    def get(self, key: str) -> Entry[V] | None:
        return self.entries.get(key)

    def values(self) -> list[V]:
        return [e.value for e in self.entries.values()]

    def resync(self) -> None:
        """Re-read every key soon (safe to call from any task)."""
        self._resync_now.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load, signal readiness, then follow the watch and resync periodically."""
        await self._full_read()
        self.loaded.set()
        task_status.started()
        async with anyio.create_task_group() as tg:
            # A failed watch or resync (or a failing on_change) is logged and retried
            # with backoff; neither ends the cache.
            tg.start_soon(partial(forever, f"watch {self.keys}", self._watch, log=self.log,
                                  interval=WATCH_RESTART_S))
            await forever(f"resync {self.keys}", self._resync, log=self.log)

    async def _resync(self) -> None:
        with anyio.move_on_after(self.resync_interval):
            await self._resync_now.wait()
        self._resync_now = anyio.Event()
        await self._full_read()

    async def _full_read(self) -> None:
        snap = await snapshot(self.kv, self.keys)
        for key, (revision, raw) in snap.items():
            await self._apply(key, revision, raw, deleted=False)
        for key in list(self.entries):
            if key not in snap:
                await self._apply(key, 0, b"", deleted=True)

    async def _watch(self) -> None:
        """Follow the watch until it ends or fails (``forever`` starts it again)."""
        watcher: Any = await natscompat.kv_watch(self.kv, self.keys)
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                await self._apply(entry.key, entry.revision or 0, entry.value or b"",
                                  deleted=entry.operation in DELETE_OPS)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def written(self, key: str, revision: int, raw: bytes) -> None:
        """A write this process just made (``revision`` from the server's ack): applied
        now, so this process reads its own writes even before the watch delivers them
        (on a 3-server cluster the watch can trail the ack); the watch's copy is then
        skipped as already seen."""
        await self._apply(key, revision, raw, deleted=False)

    async def _apply(self, key: str, revision: int, raw: bytes, *, deleted: bool) -> None:
        current = self.entries.get(key)
        if deleted:
            if current is None:
                return
            del self.entries[key]
            if self.on_change is not None:
                await self.on_change(key, None)
            return
        if current is not None and current.revision >= revision:
            return  # already seen (a resync repeating what the watch delivered)
        try:
            value = self.decode(raw)
        except Exception as exc:  # one unreadable value must not stop the cache
            self.log.warning("unreadable value skipped", key=key, error=str(exc))
            return
        entry = Entry(key=key, revision=revision, value=value)
        self.entries[key] = entry
        if self.on_change is not None:
            await self.on_change(key, entry)


async def snapshot(kv: KeyValue, keys: str, timeout: float = 10.0) -> dict[str, tuple[int, bytes]]:
    """Every live key matching ``keys`` (a subject filter), with revision and value.

    One filtered watch read up to the last replayed entry: unlike ``kv.keys()``, it
    filters on the server and brings the values along.

    The end is the entry whose ``delta`` (messages still pending) is 0, deletion markers
    included, not nats-py's end-of-replay ``None``: that marker is also sent when the
    consumer reports nothing pending before the client has processed the messages the
    server already pushed, and a snapshot that trusted it came back empty under load
    (listings then showed no deployments for a moment, and a cache dropped every key).
    A ``None`` before any entry is believed only if the watch's consumer has delivered
    nothing and has nothing pending (no key of ``keys`` in the stream).
    """
    out: dict[str, tuple[int, bytes]] = {}
    watcher: Any = await natscompat.kv_watch(kv, keys)
    seen = False
    try:
        with anyio.fail_after(timeout):
            async for entry in watcher:
                if entry is None:
                    if not seen and await natscompat.kv_watch_matches_nothing(watcher):
                        break
                    continue
                seen = True
                if entry.operation in DELETE_OPS:
                    out.pop(entry.key, None)
                else:
                    out[entry.key] = (entry.revision or 0, entry.value or b"")
                if not entry.delta:
                    break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    return out


WRONG_LAST_SEQUENCE = (10071, 10164)


async def delete_if(kv: KeyValue, key: str, revision: int) -> bool:
    """Delete ``key`` only if it is still at ``revision`` (compare-and-set)."""
    try:
        await kv.delete(key, last=revision)
    except nats.js.errors.APIError as exc:
        if exc.err_code in WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


async def read(kv: KeyValue, key: str, decode: Callable[[bytes], V]) -> tuple[V | None, int]:
    """A key's decoded value and revision; ``(None, 0)`` if it does not exist, and
    ``(None, revision)`` if it was deleted (a compare-and-set must name that revision)."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    if not entry.value:
        return None, entry.revision or 0
    return decode(entry.value), entry.revision or 0
