"""nodes.runtime.natscompat: every access to nats-py's internals, checked against a real
nats-server, so a nats-py release that renames or reshapes one fails here, by name; and a
scan proving no other module of nodes/, bench/ or tests/ reads nats-py's private
attributes."""

from __future__ import annotations

import ast
import base64
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.aio.client
import nkeys
import pytest
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Endpoint, Service, ServiceConfig

from nodes.runtime import natscompat
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
NATS_PY = Path(nats.__file__).resolve().parent
TIMEOUT = 5.0


@asynccontextmanager
async def client(url: str, **options: Any) -> AsyncIterator[NATS]:
    nc = await nats.connect(url, connect_timeout=TIMEOUT, allow_reconnect=False, **options)
    try:
        yield nc
    finally:
        await nc.close()


@asynccontextmanager
async def service(nc: NATS, name: str = "compat") -> AsyncIterator[Service]:
    svc = await add_service(nc, ServiceConfig(name=name, version="1.0.0",
                                              description="natscompat test",
                                              metadata={"a": "1"}))
    try:
        yield svc
    finally:
        await svc.stop()


async def _ask(nc: NATS, subject: str) -> dict[str, Any]:
    msg = await nc.request(subject, b"", timeout=TIMEOUT)
    reply: dict[str, Any] = json.loads(msg.data)
    return reply


# -- JetStream context ----------------------------------------------------------------


async def test_js_client_is_the_connection_the_context_sends_through(
        settings: NatsSettings) -> None:
    async with client(settings.url) as nc:
        assert natscompat.js_client(nc.jetstream()) is nc
        assert natscompat.js_client(nc.jetstream(domain="hub")) is nc


async def test_a_watch_matches_nothing_only_when_no_key_of_its_filter_has_a_message(
        settings: NatsSettings) -> None:
    async with client(settings.url) as nc:
        kv = await nc.jetstream().create_key_value(bucket="compat_count")
        await kv.put("b.one", b"1")

        async def matches_nothing(keys: str) -> bool:
            watcher = await natscompat.kv_watch(kv, keys)
            try:
                return await natscompat.kv_watch_matches_nothing(watcher)
            finally:
                await watcher.stop()

        assert await matches_nothing("a.>") is True
        await kv.put("a.two", b"1")
        await kv.delete("a.two")  # a deletion marker is a message too
        assert await matches_nothing("a.>") is False
        assert await matches_nothing("b.>") is False
        assert await matches_nothing("c.>") is True


async def test_kv_watch_delivers_the_filtered_keys_through_a_named_consumer(
        settings: NatsSettings) -> None:
    """The consumer has a name (so the create request's subject carries the filter,
    which permissions check: tests/test_auth_permissions.py), filters as asked, and the
    watch delivers the current values and later changes like ``KeyValue.watch``."""
    async with client(settings.url) as nc:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="compat_watch")
        await kv.put("a.one", b"1")
        await kv.put("b.one", b"1")
        watcher = await natscompat.kv_watch(kv, "a.>")
        try:
            first = await watcher.updates(timeout=TIMEOUT)
            assert (first.key, first.value) == ("a.one", b"1")
            assert await watcher.updates(timeout=TIMEOUT) is None  # end of the replay
            (consumer,) = await js.consumers_info("KV_compat_watch")
            assert consumer.name.startswith("sy_watch_")
            assert consumer.config.filter_subject == "$KV.compat_watch.a.>"
            await kv.put("b.two", b"2")
            await kv.put("a.two", b"2")
            later = await watcher.updates(timeout=TIMEOUT)
            assert (later.key, later.value) == ("a.two", b"2")
        finally:
            await watcher.stop()


async def test_js_api_prefix_is_where_the_server_answers_jetstream_requests(
        settings: NatsSettings) -> None:
    """The default prefix reaches the server's JetStream API (an account info request is
    answered); a domain and an explicit prefix change it as JetStream defines."""
    async with client(settings.url) as nc:
        prefix = natscompat.js_api_prefix(nc.jetstream())
        assert prefix == "$JS.API"
        info = await _ask(nc, f"{prefix}.INFO")
        assert info["type"] == "io.nats.jetstream.api.v1.account_info_response"
        assert natscompat.js_api_prefix(nc.jetstream(domain="hub")) == "$JS.hub.API"
        assert natscompat.js_api_prefix(nc.jetstream(prefix="$JS.x.API")) == "$JS.x.API"


# -- Client ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    assert shutil.which("openssl"), "the openssl command makes this test's certificate"
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[EmbeddedNats, EmbeddedNats, Path]]:
    """Two TLS servers in one cluster; the client learns the second one's IP address from
    the first one's INFO."""
    cert, key = _self_signed_cert(tmp_path)
    routes = [_free_port(), _free_port()]
    servers = []
    for i, port in enumerate(routes):
        args = ["--tls", "--tlscert", str(cert), "--tlskey", str(key), "--cluster_name", "c",
                "--cluster", f"nats://127.0.0.1:{port}",
                "--routes", f"nats://127.0.0.1:{routes[1 - i]}"]
        servers.append(EmbeddedNats(tmp_path / f"n{i}", monitor_port=None,
                                    server_name=f"n{i}", extra_args=args))
    try:
        for s in servers:
            s.start()
        yield servers[0], servers[1], cert
    finally:
        for s in servers:
            s.stop()


async def test_server_tls_name_is_the_host_name_kept_for_a_discovered_server(
        tls_pair: tuple[EmbeddedNats, EmbeddedNats, Path]) -> None:
    """Connected by host name, the server in use has no TLS name of its own (None: the
    URL's host is verified); after failing over to a server discovered by IP address,
    it is the original host name, which TLS must verify instead of the address."""
    first, second, cert = tls_pair
    tls = NatsSettings(tls_ca_file=str(cert)).tls_context()
    nc = await nats.connect(f"tls://localhost:{first.port}", tls=tls, dont_randomize=True,
                            reconnect_time_wait=0.1, max_reconnect_attempts=-1,
                            connect_timeout=TIMEOUT)
    try:
        await wait_for(lambda: any(u.port == second.port for u in nc.discovered_servers),
                       timeout=TIMEOUT,
                       message="the second server discovered")
        assert natscompat.server_tls_name(nc) is None
        await first.astop()
        await wait_for(lambda: nc.is_connected and nc.connected_url is not None
                       and nc.connected_url.port == second.port, timeout=10,
                       message="failover to the discovered server")
        assert nc.connected_url is not None and nc.connected_url.hostname == "127.0.0.1"
        assert natscompat.server_tls_name(nc) == "localhost"
    finally:
        await nc.close()


async def test_server_tls_name_of_a_client_never_connected_is_none() -> None:
    assert natscompat.server_tls_name(NATS()) is None


async def test_credentials_of_a_client_without_credentials(settings: NatsSettings) -> None:
    async with client(settings.url) as nc:
        assert natscompat.credentials_of(nc) == natscompat.Credentials(configured=False)


async def test_credentials_of_a_password_client_say_configured(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", monitor_port=None,
                          extra_args=["--user", "u", "--pass", "p"])
    await server.astart()
    try:
        async with client(server.url, user="u", password="p") as nc:
            got = natscompat.credentials_of(nc)
    finally:
        await server.astop()
    assert got.configured and (got.sign, got.jwt, got.nkey) == (None, None, None)


def _user_seed() -> bytes:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def _verifies(seed: bytes, nonce: str, signature: bytes) -> bool:
    """The signature is the seed's over the nonce (``verify`` raises otherwise)."""
    key = nkeys.from_seed(bytearray(seed))
    return bool(key.verify(nonce.encode(), base64.b64decode(signature)))


async def test_credentials_of_an_nkey_client_sign_with_its_seed(tmp_path: Path) -> None:
    """The server demands a signed nonce from the nkey user: the client connects, and
    the signer and public key read back are the ones that did it."""
    seed = _user_seed()
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    server = EmbeddedNats(tmp_path / "nats", monitor_port=None, extra_args=["-c", str(conf)])
    await server.astart()
    try:
        async with client(server.url, nkeys_seed=str(seed_file)) as nc:
            got = natscompat.credentials_of(nc)
    finally:
        await server.astop()
    assert got.configured and got.nkey == public and got.jwt is None
    assert got.sign is not None and _verifies(seed, "a-nonce", got.sign("a-nonce"))


async def test_credentials_of_a_creds_file_client_give_its_jwt_and_signer(
        settings: NatsSettings, tmp_path: Path) -> None:
    """A creds file's JWT and seed are read through the callbacks nats-py builds from it
    (the server here asks for no signature, so any JWT text connects)."""
    seed = _user_seed()
    token = "eyJ0eXAiOiJKV1QifQ.e30.c2ln"
    creds = tmp_path / "user.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n"
                     f"\n-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n"
                     f"------END USER NKEY SEED------\n")
    async with client(settings.url, user_credentials=str(creds)) as nc:
        got = natscompat.credentials_of(nc)
    assert got.configured and got.nkey is None
    assert got.jwt is not None and bytes(got.jwt()) == token.encode()
    assert got.sign is not None and _verifies(seed, "n0nce", got.sign("n0nce"))


# -- nats.micro -----------------------------------------------------------------------


async def _noop(request: Request) -> None:
    await request.respond(b"")


async def test_micro_endpoints_are_the_added_endpoints_in_order(
        settings: NatsSettings) -> None:
    async with client(settings.url) as nc, service(nc) as svc:
        assert natscompat.micro_endpoints(svc) == ()
        await svc.add_endpoint(name="one", subject="compat.one", handler=_noop)
        await svc.add_endpoint(name="two", subject="compat.two", handler=_noop)
        eps = natscompat.micro_endpoints(svc)
        assert all(isinstance(ep, Endpoint) for ep in eps)
        subs = [natscompat.endpoint_subscription(ep) for ep in eps]
        assert [s.subject if s else None for s in subs] == ["compat.one", "compat.two"]


async def test_set_service_metadata_shows_in_info_and_stats_replies(
        settings: NatsSettings) -> None:
    async with client(settings.url) as nc, service(nc) as svc:
        natscompat.set_service_metadata(svc, {"generations": "g2=100"})
        for verb in ("INFO", "STATS", "PING"):
            reply = await _ask(nc, f"$SRV.{verb}.compat")
            assert reply["metadata"] == {"a": "1", "generations": "g2=100"}, verb


async def test_endpoint_subscription_is_the_queue_subscription_and_its_backlog(
        settings: NatsSettings) -> None:
    """The subscription serves the endpoint's subject in its queue group; requests
    waiting behind a busy handler show in its public ``pending_msgs``; once the service
    stops there is none."""
    release = anyio.Event()

    async def slow(request: Request) -> None:
        await release.wait()
        await request.respond(b"done")

    async with client(settings.url) as nc:
        async with service(nc) as svc:
            await svc.add_endpoint(name="slow", subject="compat.slow", handler=slow,
                                   queue_group="workers")
            [ep] = natscompat.micro_endpoints(svc)
            sub = natscompat.endpoint_subscription(ep)
            assert isinstance(sub, Subscription)
            assert (sub.subject, sub.queue) == ("compat.slow", "workers")
            for i in range(3):
                await nc.publish("compat.slow", b"", reply=f"compat.replies.{i}")
            await wait_for(lambda: sub.pending_msgs == 2, timeout=TIMEOUT,
                           message="two requests queued behind the first")
            release.set()
            await wait_for(lambda: sub.pending_msgs == 0, timeout=TIMEOUT,
                           message="the backlog drained")
        assert natscompat.endpoint_subscription(ep) is None


async def test_count_endpoint_error_shows_in_stats_replies(settings: NatsSettings) -> None:
    async with client(settings.url) as nc, service(nc) as svc:
        await svc.add_endpoint(name="one", subject="compat.one", handler=_noop)
        [ep] = natscompat.micro_endpoints(svc)
        natscompat.count_endpoint_error(ep, "bad_request: first")
        natscompat.count_endpoint_error(ep, "x" * 2000)
        [stats] = (await _ask(nc, "$SRV.STATS.compat"))["endpoints"]
    assert stats["num_errors"] == 2
    assert stats["last_error"] == "x" * natscompat.LAST_ERROR_MAX


async def test_flush_returns_only_after_the_server_has_every_earlier_subscription(
        settings: NatsSettings) -> None:
    # Client.flush's PING can overtake a SUB still in the pending buffer: a message
    # another connection publishes right after was missed in 4-5% of tries.
    tries = 300
    async with client(settings.url) as a, client(settings.url) as b:
        got = anyio.Event()

        async def on_msg(msg: Any) -> None:
            got.set()

        for i in range(tries):
            got = anyio.Event()
            sub = await a.subscribe(f"compat.flush.{i}", cb=on_msg)
            await natscompat.flush(a)
            await b.publish(f"compat.flush.{i}", b"")
            with anyio.fail_after(TIMEOUT):
                await got.wait()
            await sub.unsubscribe()


async def test_flush_on_a_closed_connection_raises_as_nats_py_does(
        settings: NatsSettings) -> None:
    async with client(settings.url) as nc:
        pass
    with pytest.raises(nats.errors.ConnectionClosedError):
        await natscompat.flush(nc)


async def test_handled_returns_once_the_callback_handled_every_received_message(
        settings: NatsSettings) -> None:
    release = anyio.Event()
    seen: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        await release.wait()
        seen.append(msg.data)

    async with client(settings.url) as nc:
        sub = await nc.subscribe("compat.handled", cb=on_msg)
        for i in range(3):
            await nc.publish("compat.handled", str(i).encode())
        await natscompat.flush(nc)
        await wait_for(lambda: sub.pending_msgs == 2, timeout=TIMEOUT,
                       message="one message in the callback, two queued")
        returned = anyio.Event()

        async def wait() -> None:
            await natscompat.handled(sub)
            returned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert not returned.is_set() and seen == []
            release.set()
        assert seen == [b"0", b"1", b"2"]


async def test_request_reply_is_the_subject_the_caller_listens_on(
        settings: NatsSettings) -> None:
    seen: list[str] = []

    async def handler(request: Request) -> None:
        reply = natscompat.request_reply(request)
        seen.append(reply)
        if reply:
            await nc.publish(reply, request.data.upper())

    async with client(settings.url) as nc, service(nc) as svc:
        await svc.add_endpoint(name="echo", subject="compat.echo", handler=handler)
        answer = await nc.request("compat.echo", b"hi", timeout=TIMEOUT)
        assert answer.data == b"HI"
        sub = await nc.subscribe("compat.mine")
        await nc.publish("compat.echo", b"x", reply="compat.mine")
        assert (await sub.next_msg(timeout=TIMEOUT)).data == b"X"
        await nc.publish("compat.echo", b"no answer wanted")
        await wait_for(lambda: len(seen) == 3, timeout=TIMEOUT, message="three requests")
    assert seen[1:] == ["compat.mine", ""] and seen[0].startswith("_INBOX.")


# -- nobody else touches nats-py's internals -------------------------------------------

# Private attributes of shipyard's own objects that happen to share a name with one of
# nats-py's: (receiver as written, attribute) -> whose it is.
OWN = {
    ("owner", "_pending"): "nodes.api.gateway: the HedgingRequester's own table",
    ("self.owner", "_prefix"): "nodes.api.gateway: the HedgingRequester's reply prefix",
    ("r", "_pending"): "nodes.runtime.requests: the Requester's own table",
    ("self.pool", "_stop"): "nodes.flow.pool: the pool's own stop",
    ("node", "_nc"): "tests: a shipyard Node's connection",
}
COMPAT = ROOT / "nodes" / "runtime" / "natscompat.py"


def nats_py_private_names() -> set[str]:
    """Every ``_name`` nats-py defines: attributes it sets on ``self`` and methods."""
    names = set()
    for path in NATS_PY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_uses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, expression) for each ``x._name`` or ``getattr(x, "_name")`` with ``_name``
    one of ``names``, on anything but ``self``, ``cls`` or ``super()``, and not listed in
    ``OWN``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in names:
            receiver = ast.unparse(node.value)
            if receiver in ("self", "cls", "super()") or (receiver, node.attr) in OWN:
                continue
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in names:
            found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_scan_knows_nats_pys_private_names_and_finds_their_use() -> None:
    names = nats_py_private_names()
    assert {"_nc", "_prefix", "_pending_queue", "_endpoints", "_msg", "_subscription",
            "_num_errors", "_current_server", "_signature_cb"} <= names
    sample = ("nc = js._nc\nq = ep._subscription._pending_queue.qsize()\n"
              "getattr(request, '_msg')\nself._nc = 1\nsuper()._start()\nowner._pending\n")
    assert private_uses(sample, names) == [
        (1, "js._nc"), (2, "ep._subscription"), (2, "ep._subscription._pending_queue"),
        (3, "getattr(request, '_msg')")]


def nats_flushes(source: str) -> list[tuple[int, str]]:
    """(line, call) for each ``flush()`` called on a NATS client (named ``nc`` or
    ``*.nc``, as shipyard names them): they must go through ``natscompat.flush``."""
    return sorted((node.lineno, ast.unparse(node)) for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "flush"
                  and ast.unparse(node.func.value).split(".")[-1] == "nc")


def test_no_module_flushes_a_nats_client_but_through_natscompat() -> None:
    assert nats_flushes("await nc.flush()\nawait self.nc.flush(timeout=1)\n"
                        "sys.stdout.flush()\nawait natscompat.flush(nc)\n") == [
        (1, "nc.flush()"), (2, "self.nc.flush(timeout=1)")]
    offenders = []
    for top in ("nodes", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path != COMPAT:
                offenders += [f"{path.relative_to(ROOT)}:{line}: {call}"
                              for line, call in nats_flushes(path.read_text())]
    assert offenders == [], "use natscompat.flush:\n" + "\n".join(offenders)


def test_no_module_but_natscompat_reads_nats_py_private_attributes() -> None:
    names = nats_py_private_names()
    offenders = []
    for top in ("nodes", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == COMPAT:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line}: {expr}"
                          for line, expr in private_uses(path.read_text(), names)]
    assert offenders == [], ("nats-py internals used outside nodes/runtime/natscompat.py "
                             "(add a function there, with a test here):\n"
                             + "\n".join(offenders))
