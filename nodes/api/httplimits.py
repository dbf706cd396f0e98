"""HTTP limits: uvicorn's httptools protocol, bounded in every dimension a client controls.

Why a subclass.  uvicorn with httptools (the fast parser the HTTP front runs on) bounds
only idle keep-alive.  It does not bound the request head (``h11_max_incomplete_event_size``
is h11's alone, and httptools concatenates a header value in memory as it arrives): a
64 MiB header was accepted, and 8 connections sending one took an API node from 62 MB to
619 MB of RSS.  It has no deadline for a head or a body, so a client sending a byte a
second holds a connection (and its memory) for ever.  ``limit_concurrency`` answers a
plain-text 503 only once it has read the head, and parser errors get a plain-text 400.
So this module keeps httptools and adds, per connection:

==================  ============================================================
head size           request line and headers over ``max_header_bytes`` (16 KiB):
                    431 ``headers_too_large`` as soon as that many bytes arrived
                    (memory stays at the limit plus one socket read)
head time           the head not complete ``header_timeout`` (10 s) after the
                    connection (or its first byte after keep-alive): 408
                    ``client_timeout``; a connection that sent nothing is closed
body time           the body not complete ``body_timeout`` (30 s) after the head:
                    408 ``client_timeout``
idle keep-alive     ``keep_alive`` (5 s), uvicorn's own timer
connections         over ``max_connections`` (1024) per process: 503
                    ``unavailable`` as soon as the head is read
malformed requests  400 ``bad_request`` with the parser's reason
==================  ============================================================

Every answer here is the JSON error body of ``protocol.api``, with ``connection: close``;
then the connection is half-closed and its input discarded for at most ``LINGER``
seconds, so the client reads the answer instead of a reset.  Measured with 8 clients
each starting a 64 MiB header against a bare uvicorn server: plain httptools grew from
33 MB to 530 MB of RSS and read all 512 MiB; with this protocol it peaked at 34 MB and
each client had 2 MiB (its socket buffers) out when the 431 came.  On the fast path (a request
whose head and body arrive in one read) no timer is armed: the checks are a few integer
comparisons per request.  A bare ASGI no-op measured within noise of plain httptools
with it (wrk, 32 connections, 3 rounds on a shared 2-core machine: 8.4-10.6k req/s
bounded, 7.7-9.7k plain), and bench/api_http.py's API path did not move (5,631 req/s
before, 5,947 after; p50 0.61 / 0.45 ms at one connection).

uvicorn's protocol is not a public API: this is the one module that depends on its
internals (``cycle``, ``connections``, the parser callbacks); tests/test_api_http.py
checks every behaviour above against a real server.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from protocol.api import error_reply

LINGER = 2.0  # seconds an answered, refused connection keeps draining input


@dataclass(frozen=True)
class HttpLimits:
    """The bounds of one HTTP server (``shipyard node start api|gateway`` flags)."""

    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_connections: int = 1024


def raw_response(status: int, body: bytes) -> bytes:
    """A complete HTTP/1.1 response with a JSON body, closing the connection."""
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that has been answered."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the limits above; ``bounded_protocol`` sets ``limits``."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._head = True  # reading a request head (or waiting for one)
        self._head_bytes = 0  # bytes received since this head began
        self._head_size = 0  # URL, header names and values, as parsed
        self._timer: asyncio.TimerHandle | None = None
        self._over = False  # over max_connections: answer 503 once the head is read
        self._closing = False  # answered: discard input until closed

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over = len(self.connections) > self.limits.max_connections
        self._arm(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._unset_keepalive_if_required()
        if self._head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # WebSocket is off: the request was handed to the app as plain HTTP
        except httptools.HttpParserError as exc:
            if not self._closing:
                reason = exc.__context__ if isinstance(
                    exc, httptools.HttpParserCallbackError) and exc.__context__ else exc
                self._refuse("bad_request", f"malformed HTTP request: {reason}; expected "
                                            "an HTTP/1.1 request")
            return
        if self._closing:
            return
        if self._head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._head_too_large()
            elif self._head_bytes and self._timer is None:
                self._arm(self.limits.header_timeout)  # a head has begun
        elif self._timer is None and not self.pipeline:
            self._arm(self.limits.body_timeout)  # a body has begun and is not complete

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        if self._over:
            self._refuse("unavailable", f"this node serves at most "
                                        f"{self.limits.max_connections} HTTP connections at "
                                        "once; try again shortly")
            raise _Refused
        self._head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._head = True
        self._head_bytes = 0
        super().on_message_complete()

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.limits.max_header_bytes:
            self._head_too_large()
            raise _Refused

    # -- refusing -----------------------------------------------------------------------

    def _head_too_large(self) -> None:
        self._refuse("headers_too_large", f"the request line and headers are over the limit "
                                          f"of {self.limits.max_header_bytes} bytes")

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._closing or self.transport.is_closing():
            self.transport.close()
        elif self._head and not self._head_bytes:
            self.transport.close()  # connected and sent nothing: no request to answer
        elif self._head:
            self._refuse("client_timeout", f"the request head did not arrive within "
                                           f"{self.limits.header_timeout:g}s")
        else:
            self._refuse("client_timeout", f"the request body did not arrive within "
                                           f"{self.limits.body_timeout:g}s")

    def _refuse(self, code: str, message: str) -> None:
        """Answer ``code`` if nothing else is being written, then close the connection."""
        self._closing = True
        self._disarm()
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if self._head:  # between requests: the previous one must be answered in full
            answer = cycle is None or cycle.response_complete
        else:  # reading this request's body, unless it waits behind a pipelined one
            answer = not cycle.response_started and not self.pipeline
            if answer:  # to the app, which is reading the body, the client has gone
                cycle.disconnected = True
                cycle.message_event.set()
        if not answer:
            transport.close()
            return
        status, body = error_reply(code, message)
        transport.write(raw_response(status, body))
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self.loop.call_later(LINGER, self._expired)
        else:
            transport.close()


def bounded_protocol(limits: HttpLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class uvicorn should use for a server with ``limits``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})
