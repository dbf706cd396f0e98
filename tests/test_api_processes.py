"""API nodes and a gateway as real processes: one queue group across nodes, and kill -9
of a node under load without a client-visible error."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import httpx

from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.settings import NatsSettings
from tests.apiproject import make_api_project
from tests.apistack import SERVICE, api_stack
from tests.helpers import Background, shipyard_argv, wait_for
from tests.test_cli_stack import free_port


def _api_node(url: str, name: str, tmp: Path, env: dict[str, str], *extra: str) -> Background:
    return Background(shipyard_argv("node", "start", "api", "--name", name, "--infra", "prod",
                                    "--nats", url, "--data-dir", str(tmp / "nodes" / name),
                                    "--heartbeat-interval", "0.2", "--workers", "1",
                                    "--no-http", *extra), env=env)


async def _subsz(server: EmbeddedNats) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{server.monitor_url}/subsz?subs=1")
    subs: list[dict[str, Any]] = r.json().get("subscriptions_list") or []
    return subs


async def test_nodes_share_one_queue_group_and_survive_kill_9_under_load(
        nats_server: EmbeddedNats, settings: NatsSettings, tmp_path: Path,
        cli_env: dict[str, str]) -> None:
    make_api_project(tmp_path / "ws", version="1")
    env = dict(cli_env, SHIPYARD_LOG_LEVEL="warning")
    port = free_port()
    procs = [_api_node(settings.url, f"api-{i}", tmp_path, env) for i in range(3)]
    procs.append(Background(shipyard_argv("node", "start", "gateway", "--name", "gw",
                                          "--nats", settings.url, "--http-port", str(port),
                                          "--http-host", "127.0.0.1",
                                          "--heartbeat-interval", "0.2"), env=env))
    try:
        async with api_stack(settings, tmp_path) as s:
            await s.package("v1")
            view = await s.deploy({"v1": 100}, wait=False)

            async def three_serving() -> bool:
                v = await s.view()
                return v.update_id == view.update_id and v.state == "in_sync" and \
                    sum(n.running == "v1" for n in v.nodes) == 3
            await wait_for(three_serving, timeout=60, message="3 API node processes serving")

            subject = f"sy.api.v1.{SERVICE}.predict"
            subs = [x for x in await _subsz(nats_server) if x["subject"] == subject]
            assert len(subs) == 3 and {x.get("qgroup") for x in subs} == {SERVICE}, subs
            assert len({x["cid"] for x in subs}) == 3  # three connections, one group

            endpoint = f"http://127.0.0.1:{port}/public/api/v1/{SERVICE}/predict/predict"
            async with httpx.AsyncClient(timeout=30) as http:
                async def ready() -> bool:
                    r = await http.post(endpoint, json={"features": {}})
                    return r.status_code == 200
                await wait_for(ready, timeout=20, message="gateway serving")

                pids: dict[int, int] = {}
                failures: list[str] = []
                done = 0
                stop = anyio.Event()

                async def client(i: int) -> None:
                    nonlocal done
                    while not stop.is_set():
                        r = await http.post(endpoint, json={"features": {"x": i}})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text}")
                            continue
                        pid = r.json()["result"]["pid"]
                        pids[pid] = pids.get(pid, 0) + 1
                        done += 1

                async with anyio.create_task_group() as tg:
                    for i in range(16):
                        tg.start_soon(client, i)
                    await wait_for(lambda: done > 300, timeout=30, message="load running")
                    assert len(pids) == 3, pids  # spread over the three nodes' workers
                    os.kill(procs[0].proc.pid, signal.SIGKILL)
                    killed_at = done
                    await wait_for(lambda: done > killed_at + 500, timeout=30,
                                   message="load after the kill")
                    stop.set()
                assert failures == []
            subs = [x for x in await _subsz(nats_server) if x["subject"] == subject]
            assert len(subs) == 2
    finally:
        for p in procs:
            p.stop(signal.SIGTERM)
    for p in procs[1:]:
        assert "Traceback" not in p.output(), p.output()
    assert json.dumps(pids)  # the run produced a distribution
