"""Reading the event stream: history from a point, then (optionally) live."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from protocol import subjects
from protocol.errors import DecodeError
from protocol.stream import EVENT, AnyEvent, describe_unknown

BUFFER = 1024


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    subject: str
    raw: bytes
    event: AnyEvent | None  # None: a kind this reader does not know

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = describe_unknown(self.raw)
        return {"seq": self.seq, "subject": self.subject, **body}


async def read_events(nc: NATS, *, since_s: float | None = None, last: int | None = None,
                      follow: bool = False, subject: str = subjects.EVENTS_ALL,
                      caught_up: Callable[[], None] | None = None,
                      ) -> AsyncIterator[StoredEvent]:
    """Yield stored events: those newer than ``since_s`` seconds, or the ``last`` N, or
    all; then, with ``follow``, new ones as they arrive.  Without ``follow`` it ends
    once it has caught up with the stream.  ``caught_up`` is called once, when the
    history is read (at once if there is none)."""
    told = False

    def tell() -> None:
        nonlocal told
        if not told and caught_up is not None:
            told = True
            caught_up()

    js = nc.jetstream()
    try:
        info = await js.stream_info(subjects.EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        tell()
        return
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
    if since_s is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=since_s)
    elif last is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(info.state.first_seq, info.state.last_seq - last + 1, 1)
    else:
        config.deliver_policy = DeliverPolicy.ALL

    send, recv = anyio.create_memory_object_stream[Msg](BUFFER)

    async def on_msg(msg: Msg) -> None:
        # Once the reader has finished, late messages are not wanted.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(msg)

    try:
        sub = await js.subscribe(subject, stream=subjects.EVENTS_STREAM, cb=on_msg,
                                 ordered_consumer=True, config=config)
    except BaseException:  # a timeout while the stream elects a leader, say
        send.close()
        recv.close()
        raise
    try:
        # Nothing pending and nothing already pushed to us: the stream has no match.
        consumer = await sub.consumer_info()
        delivered = consumer.delivered.consumer_seq if consumer.delivered else 0
        if not consumer.num_pending and not delivered:
            tell()
            if not follow:
                return
        async for msg in recv:
            meta = msg.metadata
            try:
                event: AnyEvent | None = EVENT.decode(msg.data, msg.subject)
            except DecodeError:
                event = None
            yield StoredEvent(seq=meta.sequence.stream, subject=msg.subject,
                              raw=msg.data, event=event)
            if meta.num_pending == 0:
                tell()
                if not follow:
                    return
    finally:
        send.close()
        recv.close()
        with anyio.move_on_after(2, shield=True):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
