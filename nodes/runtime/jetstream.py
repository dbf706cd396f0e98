"""JetStream resources every role shares: the event stream, buckets, safe publishing."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE
from nats.js.kv import KeyValue

from nodes.runtime.logs import get_logger
from protocol import subjects
from protocol.base import encode
from protocol.events import Event

EVENTS_MAX_AGE_S = 30 * 24 * 3600
EVENTS_MAX_BYTES = 1 << 30
DEDUP_WINDOW_S = 120

_RETRYABLE = (
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one's config up to date."""
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with a different config: update what may be updated.
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.update_stream(config)


async def ensure_events_stream(js: JetStreamContext, replicas: int = 1) -> None:
    await ensure_stream(js, StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[subjects.EVENTS_ALL],
        max_age=EVENTS_MAX_AGE_S,
        max_bytes=EVENTS_MAX_BYTES,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DEDUP_WINDOW_S,
    ))


async def ensure_kv(js: JetStreamContext, bucket: str, *, replicas: int = 1, history: int = 1,
                    description: str = "", read_info: bool = True) -> KeyValue:
    """Open a KV bucket, creating it if needed.

    ``read_info=False`` opens it without asking for its stream info, which a user that
    may read only some of its keys is refused (with a subject filter, stream info lists
    every key's name): a create with this config either makes the bucket or meets it
    unchanged, and a bucket made with another config (by another role) is opened as
    shipyard makes its buckets (no direct get)."""
    config = KeyValueConfig(bucket=bucket, history=history, replicas=replicas,
                            description=description, storage=StorageType.FILE)
    if not read_info:
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:  # there already, made with another config
            return KeyValue(name=bucket, stream=KV_STREAM_TEMPLATE.format(bucket=bucket),
                            pre=KV_PRE_TEMPLATE.format(bucket=bucket), js=js, direct=False)
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        return await js.key_value(bucket)  # created concurrently by another node


async def publish_retry(js: JetStreamContext, subject: str, data: bytes, *, msg_id: str,
                        attempts: int = 8, timeout: float = 2.0,
                        headers: dict[str, str] | None = None) -> Any:
    """``js.publish`` with backoff.  Safe to repeat: ``Nats-Msg-Id`` dedups retries."""
    hdrs = {"Nats-Msg-Id": msg_id, **(headers or {})}
    delay = 0.05
    for attempt in range(attempts):
        try:
            return await js.publish(subject, data, timeout=timeout, headers=hdrs)
        except _RETRYABLE:
            if attempt == attempts - 1:
                raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
    return None  # unreachable


async def publish_event(js: JetStreamContext, event: Event) -> None:
    """Store one event in SY_EVENTS (at most once, thanks to its id)."""
    try:
        await publish_retry(js, event.subject(), encode(event), msg_id=event.id)
    except Exception as exc:
        get_logger(component="events").error(
            "event not stored", type=type(event).__name__, error=str(exc) or type(exc).__name__)
