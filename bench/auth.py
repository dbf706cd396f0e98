"""Signed commands: what signing and verifying add to a command's round trip.

One nats-server with auth on (the config ``shipyard auth init`` writes), one responder
process running the node runtime as the ``deployer`` node identity, load from this
process as the admin, the same 128-byte echo command each way:

* ``unsigned``: a responder that does not verify, called on a connection with no signer;
* ``signed``: a responder that verifies every command in ``Node._handle`` (signature,
  identity, age, nonce, role) and claims its nonce stack-wide in the ``sy_nonces`` KV
  bucket (one JetStream publish), called with ``Caller`` on a connection that signs;
* ``signed-local``: the same with the nonce kept only in the responder's process (the
  guard before the stack-wide claim), to show what the claim costs.

Both cross the same authenticated server, so the difference is the signing (client),
the bigger envelope and the verification (responder).  Reported: sequential p50/p99 and
64-in-flight throughput; target: signed p50 - unsigned p50 < 1 ms.

    python -m bench auth
    python -m bench.auth serve URL CREDS verify|plain     (the responder process)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import anyio
import nats

from bench.common import load_average, print_table, processes, python, summary_us
from bench.echo import sequential, throughput
from bench.responders import BenchEcho, BenchNode
from nodes.auth import guard
from nodes.auth.keys import read_credentials
from nodes.auth.registry import publish_identities
from nodes.auth.store import AuthStore
from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings

PAYLOAD = "x" * 128
TARGET_ADDED_P50_US = 1000.0
KINDS = ("unsigned", "signed-local", "signed")


class VerifyingBenchNode(BenchNode):
    verifies_commands: ClassVar[bool] = True


async def serve(url: str, creds: str, mode: str) -> None:
    cls = BenchNode if mode == "plain" else VerifyingBenchNode
    node = cls(name="bench-1", nats=NatsSettings(servers=(url,), creds_file=creds),
               heartbeat_interval=2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(node.serve)
        if mode == "local":  # open the guard, then take its stack-wide nonce claim away
            await guard.guard_of(node)
            guard._NONCES.pop(node)
        print("READY", flush=True)


async def measure(url: str, admin: str, signed: bool, n_seq: int,
                  seconds: float) -> dict[str, Any]:
    settings = NatsSettings(servers=(url,), creds_file=admin)
    if signed:
        nc = await connect(settings, name="bench")  # attaches the identity's signer
    else:
        nc = await nats.connect(url, **settings.connect_options())  # no signer
    caller = Caller(nc, sender="bench")
    assert (caller._signer is not None) == signed
    cmd = BenchEcho(payload=PAYLOAD)

    async def request() -> Any:
        return await caller.call(cmd, timeout=5)

    await sequential(request, 200)  # warm up (and, signed, the responder's identity cache)
    lat = await sequential(request, n_seq)
    await throughput(request, 64, 0.5)
    rps = await throughput(request, 64, seconds)
    await close(nc)
    return {**summary_us(lat), "rps_64": round(rps)}


def run(quick: bool = False) -> dict[str, Any]:
    n_seq, seconds, rounds = (1000, 1.5, 1) if quick else (3000, 3.0, 3)
    results: dict[str, Any] = {"target_added_p50_us": TARGET_ADDED_P50_US,
                               "payload_bytes": len(PAYLOAD),
                               "load_average_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="sy-bench-auth-") as tmp:
        store = AuthStore(Path(tmp) / "auth")
        store.init()
        server = EmbeddedNats(Path(tmp) / "js", port=-1, monitor_port=None,
                              config_file=store.server_config)
        server.start()
        try:
            admin = str(store.creds_path("admin"))
            anyio.run(_publish, server.url, admin, store)
            per: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
            for _ in range(rounds):  # interleaved, so drift hits both alike
                for kind, mode in zip(KINDS, ("plain", "local", "verify"), strict=True):
                    argv = python("-m", "bench.auth", "serve", server.url,
                                  str(store.creds_path("deployer")), mode)
                    with processes([argv]):
                        per[kind].append(anyio.run(
                            measure, server.url, admin, kind != "unsigned", n_seq, seconds,
                            backend_options={"use_uvloop": True}))
        finally:
            server.stop()
    results["load_average_end"] = load_average()
    for kind, cases in per.items():
        results[kind] = sorted(cases, key=lambda c: c["p50_us"])[len(cases) // 2]
    added = round(results["signed"]["p50_us"] - results["unsigned"]["p50_us"], 1)
    results["added_p50_us"] = added
    results["added_p50_us_local_nonces"] = round(
        results["signed-local"]["p50_us"] - results["unsigned"]["p50_us"], 1)
    results["rps_ratio"] = round(results["signed"]["rps_64"] / results["unsigned"]["rps_64"], 3)
    results["pass"] = added < TARGET_ADDED_P50_US
    print_table("auth: signed vs unsigned command round trip (auth server, node runtime)",
                ["path", "seq p50 us", "seq p99 us", "req/s @64"],
                [(k, results[k]["p50_us"], results[k]["p99_us"], results[k]["rps_64"])
                 for k in KINDS])
    print(f"added p50: {added} us (target < {TARGET_ADDED_P50_US:g} us); throughput ratio "
          f"{results['rps_ratio']} -> {'PASS' if results['pass'] else 'FAIL'}")
    return results


async def _publish(url: str, admin: str, store: AuthStore) -> None:
    nc = await connect(NatsSettings(servers=(url,), creds_file=admin), name="bench-admin")
    try:
        await publish_identities(nc, store.identities())
    finally:
        await close(nc)


def main() -> None:
    _, url, creds, mode = sys.argv[1:5]
    from nodes.runtime.logs import configure_logging
    configure_logging("warning", json=True)
    read_credentials(creds)  # a clear error before anything starts
    anyio.run(serve, url, creds, mode, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
