"""The HTTP front of API services: a small ASGI app on uvicorn (httptools).

Routes::

    POST /public/api/v1/{service}/{endpoint}/predict         {"features": {...}}
    POST /public/api/v1/{service}/{endpoint}/predict-multi   {"items": [...]}
    POST /public/api/v1/{service}/{endpoint}/run             any JSON
    GET  /isAlive                                            the health probe
    GET  /metrics                                            Prometheus text format

A plain ASGI callable, not a framework router: the request path is the hot path, and a
router's request and response objects cost more than the rest of the gateway.  Every
error is ``protocol.api.error_body`` with the status of its code (``http_status``),
including a wrong method (405 with ``Allow``) and what the connection itself refuses
(``httplimits``: oversized or slow heads and bodies, too many connections, malformed
requests).  ``/isAlive`` is 503 while the node's NATS connection is down, and so is every
API call: it would otherwise wait out its deadline.  The listening socket has
``SO_REUSEPORT``, so several API nodes on one host share one port and the kernel spreads
connections across them.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import uvicorn
from anyio.abc import TaskStatus

from nodes.api.httplimits import HttpLimits, bounded_protocol
from nodes.api.metrics import CONTENT_TYPE, OTHER, Metrics
from nodes.runtime.logs import get_logger
from protocol.api import error_reply
from protocol.base import encode

if TYPE_CHECKING:
    from nodes.api.gateway import Gateway

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PREFIX = "/public/api/v1/"
JSON = b"application/json"
ACTIONS = ("predict", "predict-multi", "run")
PROBES = ("/isAlive", "/metrics")


class HttpApp:
    def __init__(self, gateway: Gateway, metrics: Metrics, *, node: str) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.node = node
        self.alive = encode({"alive": True, "node": node})
        self.log = get_logger(component="http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path.startswith(PREFIX):
                await self._api(scope, path, method, receive, send)
            elif path in PROBES and method not in ("GET", "HEAD"):
                await _error(send, "method_not_allowed", f"{path} takes GET, not {method}",
                             allow=b"GET, HEAD")
            elif path == "/isAlive":
                if self.gateway.connected:
                    await _respond(send, 200, self.alive)
                else:
                    await _error(send, "unavailable", f"node {self.node} is not alive: its "
                                 "NATS connection is down (reconnecting)")
            elif path == "/metrics":
                body = await anyio.to_thread.run_sync(self.metrics.render)
                await _respond(send, 200, body, CONTENT_TYPE.encode())
            else:
                await _error(send, "not_found", f"no route {path}; API calls are POST "
                                                f"{PREFIX}SERVICE/ENDPOINT/predict")
        except Exception:  # never a stack trace to the client
            self.log.exception("HTTP request failed", path=path)
            await _error(send, "internal", "internal error in the gateway")

    async def _api(self, scope: Scope, path: str, method: str, receive: Receive,
                   send: Send) -> None:
        parts = path[len(PREFIX):].split("/")
        if len(parts) != 3 or parts[2] not in ACTIONS or not parts[0] or not parts[1]:
            await _error(send, "not_found", f"no route {path}; expected POST {PREFIX}"
                                            "SERVICE/ENDPOINT/(predict|predict-multi|run)")
            return
        service, endpoint, action = parts
        if method != "POST":
            await _error(send, "method_not_allowed", f"{path} takes POST, not {method}",
                         allow=b"POST")
            return
        authorization = generation = dispatch_key = None
        length = -1
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"x-shipyard-generation":
                generation = value.decode("latin-1")
            elif name == b"x-shipyard-dispatch-key":
                dispatch_key = value.decode("latin-1")
        limit = self.gateway.max_body
        if length > limit:
            status, body = error_reply("too_large", f"request body of {length} bytes is over "
                                                    f"the limit of {limit}")
        else:
            try:
                data = await _read_body(receive, limit)
            except _ClientGone:
                return  # the client went away (or was too slow): no one to answer
            if data is None:
                status, body = error_reply("too_large", f"request body is over the limit "
                                                        f"of {limit} bytes")
            else:
                status, body = await self.gateway.handle(service, endpoint, action, data,
                                                         authorization, generation,
                                                         dispatch_key)
        if not self.gateway.known(service, endpoint):
            service = endpoint = OTHER  # names from clients never become series
        self.metrics.count_http(service, endpoint, status)
        await _respond(send, status, body)


class _ClientGone(Exception):
    """The client disconnected (or was cut off as too slow) before its body arrived."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body; None when it is over ``limit``.  Raises ``_ClientGone``."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                   allow: bytes | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if allow is not None:
        headers.append((b"allow", allow))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, code: str, message: str, allow: bytes | None = None) -> None:
    status, body = error_reply(code, message)
    await _respond(send, status, body, allow=allow)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node owns SIGINT/SIGTERM and stops the server itself


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket that several processes may share (``SO_REUSEPORT``)."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # protocol says TCP (with proto 0, Nagle plus delayed ACKs add 40 ms per response).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn serving ``HttpApp`` in the node's event loop."""

    def __init__(self, gateway: Gateway, metrics: Metrics, *, host: str, port: int,
                 node: str, required: bool = True, limits: HttpLimits | None = None) -> None:
        self.app = HttpApp(gateway, metrics, node=node)
        self.limits = limits or HttpLimits()
        self.host = host
        self.port = port
        self.required = required
        self.error = ""
        self.server: _Server | None = None
        self._done = anyio.Event()
        self.log = get_logger(component="http")

    @property
    def url(self) -> str | None:
        if self.server is None:
            return None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            sock = listen(self.host, self.port)
        except OSError as exc:
            self.error = f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            if self.required:
                raise
            self.log.error("HTTP not served", error=self.error)
            self._done.set()
            task_status.started()
            return
        self.port = sock.getsockname()[1]
        limits = self.limits
        # timeout_keep_alive is annotated int, but uvicorn hands it to call_later: seconds.
        config = uvicorn.Config(self.app, http=bounded_protocol(limits), ws="none",
                                loop="none", lifespan="off", access_log=False,
                                log_level="warning", server_header=False,
                                proxy_headers=False,
                                timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
                                timeout_graceful_shutdown=10, backlog=2048)
        self.server = server = _Server(config)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [sock])
                for _ in range(2000):  # uvicorn has no readiness event; at most 10 s
                    if server.started:
                        break
                    await anyio.sleep(0.005)
                else:
                    raise TimeoutError("the HTTP server did not start within 10 s")
                self.log.info("serving HTTP", url=self.url)
                task_status.started()
        finally:
            self._done.set()

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        with anyio.move_on_after(15):
            await self._done.wait()
