"""The live feed: server-sent events pushed to every open dashboard page.

One loop builds each section (``state``) when something happened (an event arrived: a
node lost, a deployment requested, a run finished) and at least every ``TICK_S``, at
most every ``MIN_GAP_S``, and pushes a section only when its JSON changed.  A page that
connects gets every section at once, then changes.  With no page open nothing is built
(``idle`` runs instead: the traffic history keeps being sampled).  Building and encoding
every section for 1,000 nodes took 12-22 ms on this loaded 2-core machine, so the feed
costs at most ~8% of a core under a storm of events and ~2% when quiet.

Each client has a queue of ``CLIENT_QUEUE`` messages filled with ``send_nowait``: a
client that falls that far behind is dropped (its stream closed; the browser's
EventSource reconnects and starts from a full snapshot), so a slow or stuck browser
never holds up the Deployer.  At most ``MAX_CLIENTS`` follow at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

TICK_S = 1.0
MIN_GAP_S = 0.25  # bursts of events are coalesced into one push per this long
CLIENT_QUEUE = 64
MAX_CLIENTS = 100

Sections = Callable[[], dict[str, Any]]
Idle = Callable[[], object]


class TooManyClients(Exception):
    pass


def frame(section: str, data: bytes) -> bytes:
    """One server-sent event (``data`` is one line of JSON)."""
    return b"event: " + section.encode() + b"\ndata: " + data + b"\n\n"


class Feed:
    def __init__(self, sections: Sections, idle: Idle | None = None) -> None:
        self.sections = sections
        self.idle = idle
        self.last: dict[str, bytes] = {}
        self._clients: set[MemoryObjectSendStream[bytes]] = set()
        self._kick = anyio.Event()
        self.dropped = 0
        self.pushes = 0
        self.closed = False

    @property
    def clients(self) -> int:
        return len(self._clients)

    def kick(self) -> None:
        self._kick.set()

    def subscribe(self) -> MemoryObjectReceiveStream[bytes]:
        """A new client's stream, primed with every section.  Raises ``TooManyClients``."""
        if len(self._clients) >= MAX_CLIENTS:
            raise TooManyClients(f"{MAX_CLIENTS} dashboard pages follow already")
        if not self._clients:
            self.refresh()  # nothing was built while nobody watched
        send, recv = anyio.create_memory_object_stream[bytes](CLIENT_QUEUE + len(self.last))
        for name, data in self.last.items():
            send.send_nowait(frame(name, data))
        if self.closed:
            send.close()
        else:
            self._clients.add(send)
        return recv

    def unsubscribe(self, recv: MemoryObjectReceiveStream[bytes]) -> None:
        recv.close()  # its sender is dropped at the next push (BrokenResourceError)

    def refresh(self) -> int:
        """Build every section; push those that changed.  Returns how many changed."""
        changed = 0
        for name, value in self.sections().items():
            data = msgspec.json.encode(value)
            if self.last.get(name) == data:
                continue
            self.last[name] = data
            changed += 1
            self.broadcast(frame(name, data))
        return changed

    def broadcast(self, message: bytes) -> None:
        self.pushes += 1
        for client in list(self._clients):
            try:
                client.send_nowait(message)
            except anyio.WouldBlock:
                self.dropped += 1
                self._drop(client)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._drop(client)

    def _drop(self, client: MemoryObjectSendStream[bytes]) -> None:
        self._clients.discard(client)
        client.close()

    async def run(self) -> None:
        """Refresh on every kick (coalesced) and every ``TICK_S``, until cancelled."""
        while True:
            self._kick = anyio.Event()
            if self._clients:
                self.refresh()
            elif self.idle is not None:
                self.idle()
            await anyio.sleep(MIN_GAP_S)
            with anyio.move_on_after(TICK_S - MIN_GAP_S):
                await self._kick.wait()

    def close(self) -> None:
        """End every client's stream (the server is stopping)."""
        self.closed = True
        for client in list(self._clients):
            self._drop(client)
