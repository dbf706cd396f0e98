"""Capabilities a node lends its components, as Protocols.

A component (the Deployer's desks, the Automation node's schedule, claims and execution,
the Design node's API packager) is given what it uses, typed by one of these or by a
Protocol beside it, never the whole node: what it can reach is in its signature, and a
test can hand it a small stand-in.  ``Node`` satisfies each of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from nats.aio.subscription import Subscription

from protocol.base import Codec

M = TypeVar("M")


class SubscribesDecoded(Protocol):
    """``Node.subscribe_decoded``: a plain subscription that decodes, validates and
    drops malformed messages in one place."""

    async def subscribe_decoded(
        self,
        subject: str,
        codec: Codec[M],
        handler: Callable[[M], Awaitable[None]],
        *,
        validate: Callable[[M, str], None] | None = ...,
        kind: str = ...,
        sender: Callable[[str], str] | None = ...,
        queue: str = ...,
        pending_msgs_limit: int = ...,
        pending_bytes_limit: int = ...,
    ) -> Subscription: ...


class Logs(Protocol):
    @property
    def log(self) -> Any: ...
