"""The HTTP front of API services: a small ASGI app on uvicorn (httptools).

Routes::

    POST /public/api/v1/{service}/{endpoint}/predict         {"features": {...}}
    POST /public/api/v1/{service}/{endpoint}/predict-multi   {"items": [...]}
    POST /public/api/v1/{service}/{endpoint}/run             any JSON
    GET  /isAlive                                            the health probe
    GET  /metrics                                            Prometheus text format

A plain ASGI callable, not a framework router: the request path is the hot path, and a
router's request and response objects cost more than the rest of the gateway.  Every
error is JSON ``{"error": {"code", "message"}}``.  The listening socket has
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

from nodes.api.metrics import CONTENT_TYPE, Metrics
from nodes.runtime.logs import get_logger
from protocol.base import encode

if TYPE_CHECKING:
    from nodes.api.gateway import Gateway

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PREFIX = "/public/api/v1/"
JSON_HEADERS = [(b"content-type", b"application/json")]
ACTIONS = ("predict", "predict-multi", "run")


def _error(code: str, message: str) -> bytes:
    return encode({"error": {"code": code, "message": message}})


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
            elif path == "/isAlive":
                await _respond(send, 200, self.alive)
            elif path == "/metrics":
                body = await anyio.to_thread.run_sync(self.metrics.render)
                await _respond(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])
            else:
                await _respond(send, 404, _error("not_found", f"no route {path}; API calls "
                                                 f"are POST {PREFIX}SERVICE/ENDPOINT/predict"))
        except Exception:  # never a stack trace to the client
            self.log.exception("HTTP request failed", path=path)
            await _respond(send, 500, _error("internal", "internal error in the gateway"))

    async def _api(self, scope: Scope, path: str, method: str, receive: Receive,
                   send: Send) -> None:
        parts = path[len(PREFIX):].split("/")
        if len(parts) != 3 or parts[2] not in ACTIONS or not parts[0] or not parts[1]:
            await _respond(send, 404, _error("not_found", f"no route {path}; expected POST "
                                             f"{PREFIX}SERVICE/ENDPOINT/(predict|"
                                             "predict-multi|run)"))
            return
        service, endpoint, action = parts
        if method != "POST":
            await _respond(send, 405, _error("method_not_allowed", f"{path} takes POST"),
                           [*JSON_HEADERS, (b"allow", b"POST")])
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
            status, body = 413, _error("too_large", f"request body of {length} bytes is over "
                                                    f"the limit of {limit}")
        else:
            data = await _read_body(receive, limit)
            if data is None:
                status, body = 413, _error("too_large", f"request body is over the limit of "
                                                        f"{limit} bytes")
            else:
                status, body = await self.gateway.handle(service, endpoint, action, data,
                                                         authorization, generation,
                                                         dispatch_key)
        self.metrics.count_http(service, endpoint, status)
        await _respond(send, status, body)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers or JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


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
                 node: str, required: bool = True) -> None:
        self.app = HttpApp(gateway, metrics, node=node)
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
        config = uvicorn.Config(self.app, http="httptools", loop="none", lifespan="off",
                                access_log=False, log_level="warning", server_header=False,
                                proxy_headers=False,
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
