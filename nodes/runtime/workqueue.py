"""A bounded hand-off queue for a fixed pool of worker tasks.

``asyncio.Queue`` is general and pure Python; on the request hot path this one does the
minimum: an item goes straight to a waiting worker when there is one, waits in a
bounded deque when there is not, and a producer waits only when the deque is full.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class WorkQueue(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._idle: deque[asyncio.Future[T]] = deque()  # workers waiting for an item
        self._blocked: deque[asyncio.Future[None]] = deque()  # producers waiting for room
        # Bound on first use; asking asyncio for the running loop on every wait costs a
        # getpid() system call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _future(self) -> asyncio.Future[T]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> bool:
        """Hand ``item`` to an idle worker or queue it; False if the queue is full."""
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        return True

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting while the queue is full."""
        while not self.put_nowait(item):
            room: asyncio.Future[None] = self._future()  # type: ignore[assignment]
            self._blocked.append(room)
            await room

    async def get(self) -> T:
        """The next item, waiting for one if needed."""
        if self._items:
            item = self._items.popleft()
            blocked = self._blocked
            while blocked:
                room = blocked.popleft()
                if not room.done():
                    room.set_result(None)
                    break
            return item
        waiter = self._future()
        self._idle.append(waiter)
        return await waiter
