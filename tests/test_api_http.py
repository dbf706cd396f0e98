"""The HTTP front under hostile and careless clients, against a real uvicorn server (a
gateway or API node in the test), real clients (httpx, and raw sockets for what httpx
will not send) and a real nats-server: bounded heads, bodies, time and connections, a
JSON error body on every refusal, bounded /metrics, and fast 503s while NATS is down."""

from __future__ import annotations

import json
import re
import select
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from nodes.api.gateway import GatewayNode
from nodes.api.httplimits import HttpLimits
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import HTTP_STATUS, error_body, error_reply, http_status
from protocol.system import SYSTEM, Ping
from tests.apiproject import make_api_project
from tests.apistack import api_stack, url
from tests.helpers import fleet, gather, wait_for

ROOT = Path(__file__).resolve().parent.parent
API = "/public/api/v1/churn-api/predict/predict"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the answer

    def error(self) -> dict[str, str]:
        assert self.headers.get("content-type") == "application/json", self.headers
        error: dict[str, str] = json.loads(self.body)["error"]
        return error


def _read_answer(sock: socket.socket, timeout: float = 10.0,
                 buffer: bytearray | None = None) -> Answer:
    """One HTTP response from a blocking socket, and whether the server then closed.
    ``buffer`` keeps bytes of later (pipelined) responses between calls."""
    sock.settimeout(timeout)
    data = buffer if buffer is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {bytes(data)!r}")
        data += chunk
    end = data.index(b"\r\n\r\n")
    lines = data[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(data) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    body = bytes(data[end + 4:end + 4 + length])
    del data[:end + 4 + length]
    if data:
        return Answer(status, headers, body, closed=False)  # more responses follow
    try:
        more = sock.recv(65536)
        closed = more == b""
        data += more  # a pipelined response that arrived meanwhile is kept for the next call
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    return Answer(status, headers, body, closed)


def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 10.0) -> Answer:
    """Send ``parts`` (``pause`` seconds apart) on a new connection; read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, part in enumerate(parts):
            if i and pause:
                select.select([], [], [], pause)  # a slow client, on purpose
            sock.sendall(part)
        return _read_answer(sock, timeout)


@asynccontextmanager
async def gateway(settings: NatsSettings, **limits: Any) -> AsyncIterator[GatewayNode]:
    """A gateway node (HTTP only) on a free port with ``limits``."""
    async with fleet() as f:
        node = GatewayNode(name="gw", nats=settings, http_port=0, http_host="127.0.0.1",
                           heartbeat_interval=0.2, http_limits=HttpLimits(**limits))
        await f.start(node)
        yield node


def port_of(node: GatewayNode) -> int:
    assert node.http is not None
    return node.http.port


# -- size -----------------------------------------------------------------------------------

def _send_huge_header(port: int, total: int) -> tuple[Answer, int]:
    """Send a request whose one header is ``total`` bytes, until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.sendall(f"POST {API} HTTP/1.1\r\nhost: x\r\nx-big: ".encode())
        chunk = b"a" * 65536
        sent = 0
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                return _read_answer(sock), sent
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
        return _read_answer(sock), sent


async def test_a_64_mib_header_is_answered_431_before_it_is_sent(
        settings: NatsSettings) -> None:
    """Eight clients each start a 64 MiB header: each gets 431 with a JSON body after a
    fraction of it, the connection is closed, and the node's memory does not follow."""
    async with gateway(settings) as node:
        port = port_of(node)
        rss = psutil.Process().memory_info().rss
        results = await gather(*(anyio.to_thread.run_sync(_send_huge_header, port, 64 << 20)
                                 for _ in range(8)))
        grown = psutil.Process().memory_info().rss - rss
        for answer, sent in results:
            assert answer.status == 431, answer
            assert answer.error()["code"] == "headers_too_large"
            assert "16384 bytes" in answer.error()["message"]
            assert answer.closed
            assert sent < 4 << 20, f"{sent} bytes went out before the answer"
        assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB"
        # A head just under the limit is served; the limit is configurable.
        ok = await anyio.to_thread.run_sync(
            exchange, port, b"GET /isAlive HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 15000
            + b"\r\n\r\n")
        assert ok.status == 200 and json.loads(ok.body)["alive"] is True
    async with gateway(settings, max_header_bytes=1024) as node:
        big = await anyio.to_thread.run_sync(
            exchange, port_of(node), b"GET /isAlive HTTP/1.1\r\nx-pad: " + b"p" * 2000
            + b"\r\n\r\n")
        assert big.status == 431 and big.error()["code"] == "headers_too_large"
        long_url = await anyio.to_thread.run_sync(
            exchange, port_of(node), b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\n\r\n")
        assert long_url.status == 431


# -- time -----------------------------------------------------------------------------------

async def test_slow_and_idle_clients_are_disconnected(settings: NatsSettings) -> None:
    """Slowloris heads and bodies get 408 with a JSON body and a closed connection; a
    connection that sends nothing, or idles after a response, is closed."""
    async with gateway(settings, header_timeout=0.5, body_timeout=0.5,
                       keep_alive=0.5) as node:
        port = port_of(node)
        head = await anyio.to_thread.run_sync(
            lambda: exchange(port, b"GET /isAlive HTTP/1.1\r\n", b"host: x\r\n",
                             b"x-a: 1\r\n", pause=0.3))
        assert head.status == 408 and head.closed
        assert head.error() == {"code": "client_timeout", "message":
                                "the request head did not arrive within 0.5s"}

        body = await anyio.to_thread.run_sync(
            lambda: exchange(port, f"POST {API} HTTP/1.1\r\ncontent-length: 100\r\n"
                                   "\r\n".encode(), b"[1,", b"2,", b"3,", pause=0.3))
        assert body.status == 408 and body.closed
        assert body.error()["message"] == "the request body did not arrive within 0.5s"

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                return sock.recv(100)
        assert await anyio.to_thread.run_sync(silent) == b""  # closed, nothing to answer

        def idle_after_answer() -> Answer:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /isAlive HTTP/1.1\r\nhost: x\r\n\r\n")
                return _read_answer(sock, timeout=5)  # waits for the close
        idle = await anyio.to_thread.run_sync(idle_after_answer)
        assert idle.status == 200 and idle.closed

        # A client that is merely careful still gets its answer.
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{node.http.url}{API}", json={"features": {}})  # type: ignore
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- connections ------------------------------------------------------------------------------

async def test_connections_beyond_the_limit_get_a_fast_503(settings: NatsSettings) -> None:
    async with gateway(settings, max_connections=4) as node:
        port = port_of(node)
        assert node.http is not None and node.http.server is not None
        state = node.http.server.server_state
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            await wait_for(lambda: len(state.connections) == 4, timeout=10,
                           message="4 connections accepted")
            async with httpx.AsyncClient() as http:
                t0 = anyio.current_time()
                r = await http.get(f"{node.http.url}/isAlive")
                assert anyio.current_time() - t0 < 5.0  # not after a timeout
                assert r.status_code == 503 and r.headers["connection"] == "close"
                assert r.json()["error"]["code"] == "unavailable"
                assert "at most 4 HTTP connections" in r.json()["error"]["message"]
        finally:
            for s in held:
                s.close()
        await wait_for(lambda: len(state.connections) == 0, timeout=10,
                       message="held connections gone")
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{node.http.url}/isAlive")
        assert r.status_code == 200


# -- every answer has the JSON error body ---------------------------------------------------

async def test_malformed_requests_and_wrong_methods_get_json_errors(
        settings: NatsSettings) -> None:
    async with gateway(settings) as node:
        port = port_of(node)
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /isAlive HTTP/1.1\r\nbad header\r\n\r\n",
                    b"POST /x HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                    b"GET /\xff\xfe HTTP/1.1\r\n\r\n"):
            answer = await anyio.to_thread.run_sync(exchange, port, raw)
            assert answer.status == 400, (raw, answer)
            error = answer.error()
            assert error["code"] == "bad_request" and error["message"].startswith(
                "malformed HTTP request: "), error
            assert answer.closed
        async with httpx.AsyncClient(base_url=node.http.url or "") as http:  # type: ignore
            for method, path, allow in (("POST", "/isAlive", "GET, HEAD"),
                                        ("DELETE", "/metrics", "GET, HEAD"),
                                        ("GET", API, "POST"), ("PUT", API, "POST")):
                r = await http.request(method, path)
                assert r.status_code == 405, (method, path, r.text)
                assert r.headers["allow"] == allow
                assert r.json()["error"]["code"] == "method_not_allowed"
            r = await http.head("/isAlive")
            assert r.status_code == 200
            r = await http.get("/nope")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_pipelined_and_keep_alive_requests_keep_their_limits(
        settings: NatsSettings) -> None:
    """Limits are per request: pipelined requests are answered in order, and a later
    request on the same connection with a head too large gets its own 431."""
    async with gateway(settings, max_header_bytes=1024) as node:
        port = port_of(node)

        def pipelined() -> list[Answer]:
            get = b"GET /isAlive HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 600 + b"\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(get * 3)
                buffer = bytearray()
                answers = [_read_answer(sock, 0.5, buffer) for _ in range(3)]
                sock.sendall(b"GET /isAlive HTTP/1.1\r\nx-pad: " + b"p" * 2000 + b"\r\n\r\n")
                answers.append(_read_answer(sock))
                return answers
        answers = await anyio.to_thread.run_sync(pipelined)
        assert [a.status for a in answers] == [200, 200, 200, 431]
        assert not any(a.closed for a in answers[:3]) and answers[3].closed


# -- /metrics --------------------------------------------------------------------------------

async def test_unknown_names_do_not_grow_metrics(settings: NatsSettings) -> None:
    """Requests to 2,000 random service and endpoint names add no series: they are
    counted under one ``(unknown)`` label."""
    async with gateway(settings) as node, httpx.AsyncClient(
            base_url=node.http.url or "",  # type: ignore[union-attr]
            limits=httpx.Limits(max_connections=16)) as http:
        before = len((await http.get("/metrics")).content)
        names = [uuid.uuid4().hex for _ in range(2000)]
        for i in range(0, len(names), 50):
            replies = await gather(*(http.post(f"/public/api/v1/{n}/{n[:8]}/predict",
                                               content=b"{}") for n in names[i:i + 50]))
            assert {r.status_code for r in replies} == {404}
        text = (await http.get("/metrics")).text
        assert not any(n in text for n in names[:50])
        line = ('shipyard_http_responses_total{endpoint="(unknown)",node="gw",'
                'service="(unknown)",status="404"} 2000.0')
        assert line in text
        assert len(text) < before + 1000, (before, len(text))


# -- NATS down -----------------------------------------------------------------------------

async def test_while_nats_is_down_isalive_and_predictions_answer_503_at_once(
        nats_server: EmbeddedNats, settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    restarted: EmbeddedNats | None = None
    try:
        async with api_stack(settings, tmp_path) as s:
            node = await s.api_node("api-1", workers=1)
            await s.package("v1")
            await s.deploy({"v1": 100})
            assert node.http is not None
            alive = f"{node.http.url}/isAlive"
            assert (await s.http.get(alive)).status_code == 200

            port = nats_server.port
            await anyio.to_thread.run_sync(nats_server.kill)

            async def down() -> httpx.Response | None:
                r = await s.http.get(alive)
                return r if r.status_code == 503 else None
            r = await wait_for(down, timeout=10, message="/isAlive 503")
            assert r.json()["error"]["code"] == "unavailable"
            assert "NATS connection is down" in r.json()["error"]["message"]
            t0 = anyio.current_time()
            r = await s.http.post(url(node), json={"features": {"x": 1}})
            assert anyio.current_time() - t0 < 5.0  # not the 31 s request deadline
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"

            restarted = EmbeddedNats(nats_server.store_dir, port=port, monitor_port=None)
            await restarted.astart()

            async def serving() -> bool:
                r = await s.http.post(url(node), json={"features": {"x": 1}})
                return r.status_code == 200
            await wait_for(serving, timeout=30, message="predictions served again")
            assert (await s.http.get(alive)).status_code == 200
    finally:
        if restarted is not None:
            await restarted.astop()


async def test_a_request_in_flight_when_nats_drops_is_answered_503_at_once(
        nats_server: EmbeddedNats, settings: NatsSettings, tmp_path: Path) -> None:
    """A reply sent while the connection is down is lost, so the gateway answers every
    request in flight 503 when the connection drops, instead of 504 at the deadline."""
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1)
        await s.package("v1")
        await s.deploy({"v1": 100})
        result: list[httpx.Response] = []

        async def slow_call() -> None:
            result.append(await s.http.post(url(node, "score", "run"), json={"sleep": 5}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_call)
            await wait_for(lambda: node.pool.busy >= 1, timeout=10,
                           message="the slow call running in a worker")
            await anyio.to_thread.run_sync(nats_server.kill)
        (r,) = result  # the worker still sleeps: without the fail-fast this is a 504 at 31 s
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert "dropped while the request was out" in r.json()["error"]["message"]


# -- bodies and results that are not valid JSON ------------------------------------------------

async def test_deep_nesting_is_a_400_and_non_finite_results_a_500_on_every_endpoint(
        settings: NatsSettings, tmp_path: Path) -> None:
    make_api_project(tmp_path / "ws", version="1")
    async with api_stack(settings, tmp_path) as s:
        node = await s.api_node("api-1", workers=1)
        await s.package("v1")
        await s.deploy({"v1": 100})
        deep = b"[" * 2048 + b"]" * 2048
        nested = "nested too deeply"
        cases = [
            (url(node), deep, "expected {\"features\""),  # refused by shape first
            (url(node), b'{"features": ' + deep + b"}", nested),
            (url(node), b'{"features": {"x": ' + deep + b"}}", nested),
            (url(node), b'{"features": {}, "junk": ' + deep + b"}", nested),
            (url(node, action="predict-multi"), b'{"items": ' + deep + b"}", "expected"),
            (url(node, action="predict-multi"),
             b'{"items": [{"features": {"x": ' + deep + b"}}]}", nested),
            (url(node, "score", "run"), deep, nested),
            (url(node, "score", "run"), b"{" * 5000, "malformed JSON body"),
            (url(node, "score", "run"), b'{"a": ' * 3000, nested),
        ]
        for target, body, needle in cases:
            r = await s.http.post(target, content=body)
            assert r.status_code == 400, (target, body[:40], r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert error["code"] == "bad_request"
            assert needle in error["message"], (body[:40], error)

        for value in ("nan", "inf", "-inf"):
            cases = [
                (url(node), {"features": {"float": value}}, "result.score"),
                (url(node, action="predict-multi"),
                 {"items": [{"features": {"x": 1}}, {"features": {"float": value}}]},
                 "items[1]: the result is not valid JSON: result.score"),
                (url(node, "score", "run"), {"float": value}, "response.value"),
            ]
            for target, payload, where in cases:
                r = await s.http.post(target, json=payload)
                assert r.status_code == 500, (target, payload, r.text)
                error = r.json()["error"]
                assert error["code"] == "bad_result" and where in error["message"], error
                assert "not a finite number" in error["message"]
        r = await s.http.post(url(node), json={"features": {"float": "1.5"}})
        assert r.status_code == 200 and r.json()["result"]["scores"] == [1.0, 1.5]
        # A result larger than NATS carries: said at once, not a timeout at the deadline.
        r = await s.http.post(url(node, "score", "run"), json={"big": 2_000_000})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_result" and "max_payload" in error["message"], error
        assert "the result is 20000" in error["message"], error


async def test_a_deeply_nested_command_is_bad_request(settings: NatsSettings) -> None:
    """On the command bus too: a ``bad_request`` reply, and the node keeps answering."""
    nc = await connect(settings, name="test")
    try:
        async with gateway(settings):
            subject = subjects.node_command("gw", "ping")
            msg = await nc.request(subject, b'{"id": "1", "ts": 0, "body": {"type": "ping", '
                                   b'"junk": ' + b"[" * 2048 + b"}}", timeout=5)
            reply = SYSTEM.replies.decode(msg.data)
            assert reply.error is not None and reply.error.code == "bad_request", reply
            assert "nested too deeply" in reply.error.message
            pong = await Caller(nc).call(Ping(), node="gw", timeout=5)
            assert pong.node == "gw"
    finally:
        await nc.close()


# -- one table of error codes --------------------------------------------------------------

def test_error_bodies_come_from_one_function_and_statuses_from_one_table() -> None:
    assert json.loads(error_body("not_found", "no such")) == {
        "error": {"code": "not_found", "message": "no such"}}
    assert error_reply("overloaded", "full") == (503, error_body("overloaded", "full"))
    assert http_status("something-new") == 500


def test_readme_error_table_matches_the_code_table() -> None:
    """README's API error table lists every code with the status the code table gives."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| error | code | status |")
    rows = readme[start:].split("\n\n")[0].splitlines()[2:]
    documented: dict[str, int] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3, row
        codes = re.findall(r"`([a-z_]+)`", cells[1])
        assert codes, row
        for code in codes:
            assert code not in documented, f"{code} appears twice"
            documented[code] = int(cells[2])
    assert documented == HTTP_STATUS


@pytest.mark.parametrize("code", sorted(HTTP_STATUS))
def test_every_code_has_a_real_http_status(code: str) -> None:
    import http

    assert http.HTTPStatus(http_status(code)).phrase
