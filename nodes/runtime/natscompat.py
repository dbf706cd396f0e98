"""The only module that reads or writes nats-py's private attributes.

nats-py has no public API for a few things shipyard needs; each access below is one small
typed function, and ``tests/test_natscompat.py`` checks every one against a real
nats-server, so a nats-py upgrade that renames or reshapes an attribute fails those tests
loudly instead of breaking a node quietly (``pyproject.toml`` pins nats-py below the next
minor version for the same reason).  A test also scans ``nodes/``, ``bench/`` and
``tests/`` for private nats-py attributes used anywhere else.

Why each access is needed (nats-py 2.16):

* ``js_client(js)`` (``JetStreamContext._nc``): the Object Store transfers publish chunks
  and pull them over the client's core API (un-acked windows, raw pull requests), and
  their callers hold only the JetStream context.
* ``kv_watch_matches_nothing(watcher)`` (``KeyWatcher._sub``): the consumer of a watch,
  to ask whether its filter matches any key when nats-py's end-of-replay marker comes
  first (that marker can also come before messages already pushed).
* ``kv_watch(kv, keys)`` (``KeyValue._name``, ``_stream``, ``_pre``, ``_js``, ``_direct``;
  ``PushSubscription._sub._jsi``: its ``_ccreq`` and ``recreate_consumer``): a KV watch
  whose consumer has a name, so its key filter is in the subject of the create request, where a NATS
  permission can allow one key range of a bucket and refuse the rest (an Automation
  node's user reads only its infra's desired state).  ``KeyValue.watch`` creates an
  unnamed consumer (its filter only in the request body), and its ordered consumer
  re-creates itself after a gap with the same config, so each re-creation is renamed.
* ``js_api_prefix(js)`` (``JetStreamContext._prefix``): pull requests go to
  ``<prefix>.CONSUMER.MSG.NEXT...``; the prefix changes with a JetStream domain.
* ``server_tls_name(nc)`` (``Client._current_server.tls_name``): the host name TLS must
  verify when the connected server was discovered by IP address; ``connected_url`` has
  only the address.
* ``credentials_of(nc)`` (``Client._auth_configured``, ``_signature_cb``,
  ``_user_jwt_cb``, ``_public_nkey``): the bulk receive path opens a second connection
  with the client's own credentials; nkey and JWT signers live only there, not in
  ``Client.options``.
* ``micro_endpoints(service)`` (``Service._endpoints``): ``add_endpoint`` returns
  nothing, and the endpoint object is needed for its subscription and its counters.
* ``set_service_metadata(service, ...)`` (``Service._metadata``): a service's metadata
  (the generations it serves) changes while it runs; micro has no setter.
* ``endpoint_subscription(ep)`` (``Endpoint._subscription``): its backlog decides load
  shedding (``Subscription.pending_msgs`` is public), and draining it leaves the queue
  group while in-flight requests are still answered (``Service.stop`` drops them).
* ``count_endpoint_error(ep, message)`` (``Endpoint._num_errors``, ``_last_error``):
  micro counts only errors a handler raises; shipyard answers its errors itself, so
  ``$SRV.STATS`` would otherwise report none.
* ``request_reply(request)`` (``Request._msg.reply``): handlers publish the answer
  themselves (and name the reply subject on the worker's busy page); micro's ``Request``
  exposes subject, headers and data but not the reply subject.
* ``flush(nc)`` (``Client._pending``, ``_pending_data_size``, ``_transport``): a flush
  that returns only once the server has processed everything sent before it.
  ``Client.flush`` writes its PING straight to the socket while the commands queued
  before it (a SUB, a reply) may still wait in the pending buffer for the flusher task,
  so its PONG can come back first: a subscription "flushed" that way missed a message
  another connection published right after in 4-5% of tries (15 of 300, one server
  on loopback), and a worker that flushed its last replies before exiting could lose
  them.  The pending commands are written first, as the flusher and ``close`` write them.
* ``handled(sub)`` (``Subscription._pending_queue``): wait until the callback has handled
  every message the client already received for ``sub``, so a request's last progress
  notices, which arrive before its reply, reach their callback before it unsubscribes
  (``unsubscribe`` drops them; ``drain`` costs a round trip to the server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KeyValue
from nats.micro.request import Request
from nats.micro.service import Endpoint, Service
from nats.nuid import NUID

LAST_ERROR_MAX = 500  # characters of an error message kept in micro's stats


# -- JetStream context ----------------------------------------------------------------


def js_client(js: JetStreamContext) -> NATS:
    """The NATS client the JetStream context sends through."""
    nc: NATS = js._nc
    return nc


async def kv_watch_matches_nothing(watcher: KeyValue.KeyWatcher) -> bool:
    """Whether a watch's consumer has delivered nothing and has nothing to deliver: no
    key of its filter has a message, live or a deletion marker.  One consumer-info
    request, on the watch's own consumer: a user that may watch only some keys may ask
    it (stream info, which could tell the same, lists every key's name)."""
    sub: JetStreamContext.PushSubscription | None = watcher._sub
    if sub is None:
        raise RuntimeError("the watch has no subscription (stopped?)")
    info = await sub.consumer_info()
    return not info.num_pending and not (info.delivered and info.delivered.consumer_seq)


async def kv_watch(kv: KeyValue, keys: str) -> KeyValue.KeyWatcher:
    """``kv.watch(keys)`` through a named consumer: the create request goes to
    ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`` (nats-server 2.9+), so the
    server's permissions decide which keys a user may watch."""
    named = KeyValue(name=kv._name, stream=kv._stream, pre=kv._pre,
                     js=_NamedConsumers(kv._js), direct=kv._direct)  # type: ignore[arg-type]
    watcher: KeyValue.KeyWatcher = await named.watch(keys)
    return watcher


class _NamedConsumers:
    """A JetStream context whose ``subscribe`` names the consumer it creates, and names
    it afresh each time the ordered consumer re-creates it (the old one may still exist
    until its inactivity threshold; a create under its name with another config would be
    refused)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    def __getattr__(self, name: str) -> object:
        return getattr(self._js, name)

    async def subscribe(self, subject: str, **kw: object) -> JetStreamContext.PushSubscription:
        config = kw.pop("config", None) or js_api.ConsumerConfig()
        assert isinstance(config, js_api.ConsumerConfig)
        config.name = _consumer_name()
        sub: JetStreamContext.PushSubscription = await self._js.subscribe(
            subject, config=config, **kw)  # type: ignore[arg-type]
        jsi = sub._sub._jsi
        if jsi is not None:
            recreate = jsi.recreate_consumer

            async def renamed() -> None:
                jsi._ccreq.name = _consumer_name()
                await recreate()

            jsi.recreate_consumer = renamed  # type: ignore[method-assign]
        return sub


_NUID = NUID()


def _consumer_name() -> str:
    return "sy_watch_" + _NUID.next().decode()


def js_api_prefix(js: JetStreamContext) -> str:
    """The JetStream API subject prefix: ``$JS.API``, or ``$JS.<domain>.API``."""
    prefix: str = js._prefix
    return prefix


# -- Client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What the client authenticates with, beyond ``Client.options`` (user, password,
    token) and the URL's user info: whether any credentials were configured, and the
    nkey or JWT signers of an nkey seed or a creds file."""

    configured: bool
    sign: Callable[[str], bytes] | None = field(default=None, repr=False)
    jwt: Callable[[], bytes | bytearray] | None = field(default=None, repr=False)
    nkey: str | None = None


def credentials_of(nc: NATS) -> Credentials:
    """The client's configured credentials (read after ``connect``)."""
    return Credentials(configured=bool(nc._auth_configured), sign=nc._signature_cb,
                       jwt=nc._user_jwt_cb, nkey=nc._public_nkey)


def server_tls_name(nc: NATS) -> str | None:
    """The TLS host name nats-py verifies for the server it is connected to (set for a
    discovered server known by IP address), or None: then the URL's host is used."""
    server = nc._current_server
    if server is None:
        return None
    name: str | None = server.tls_name
    return name


# -- nats.micro -----------------------------------------------------------------------


def micro_endpoints(service: Service) -> tuple[Endpoint, ...]:
    """The service's endpoints in the order they were added."""
    endpoints: list[Endpoint] = service._endpoints
    return tuple(endpoints)


def set_service_metadata(service: Service, metadata: Mapping[str, str]) -> None:
    """Update the metadata the service reports in ``$SRV.INFO``/``PING``/``STATS``."""
    current: dict[str, str] = service._metadata
    current.update(metadata)


def endpoint_subscription(ep: Endpoint) -> Subscription | None:
    """The endpoint's queue subscription (None once the endpoint was stopped)."""
    sub: Subscription | None = ep._subscription
    return sub


def count_endpoint_error(ep: Endpoint, message: str) -> None:
    """Count an error answered without raising in the endpoint's ``$SRV.STATS``."""
    ep._num_errors += 1
    ep._last_error = message[:LAST_ERROR_MAX]  # type: ignore[assignment]  # typed as None


def request_reply(request: Request) -> str:
    """The reply subject of a micro request ("" if the caller expects no answer)."""
    reply: str = request._msg.reply
    return reply


# -- the connection --------------------------------------------------------------------


async def flush(nc: NATS, timeout: float = 10.0) -> None:
    """Return once the server has processed every command this connection sent or queued
    before the call (a subscription is in place, a publish was routed).

    Raises ``nats.errors.FlushTimeoutError`` after ``timeout`` seconds and
    ``ConnectionClosedError`` on a closed connection, as ``Client.flush`` does.  While
    disconnected, the queued commands stay queued for the reconnect."""
    transport = nc._transport
    if nc.is_connected and transport is not None and nc._pending_data_size > 0:
        transport.writelines(nc._pending[:])
        nc._pending = []
        nc._pending_data_size = 0
    await nc.flush(timeout=cast(int, timeout))  # nats-py types it int; any number works


# -- subscriptions ---------------------------------------------------------------------


async def handled(sub: Subscription) -> None:
    """Return once ``sub``'s callback has handled every message received so far."""
    queue: asyncio.Queue[Msg] = sub._pending_queue
    await queue.join()
