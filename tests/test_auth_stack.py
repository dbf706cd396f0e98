"""Every role does its whole job with only its own permissions: a bundle and an API
deployment go through a stack whose every node runs as its own NATS user, and the server
refuses nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from nodes.api.gateway import GatewayNode
from nodes.api.node import ApiNode
from nodes.automation import AutomationNode
from nodes.runtime.connection import close, connect
from nodes.runtime.progress import STORING
from nodes.runtime.requests import requester
from nodes.runtime.settings import resolve
from protocol import subjects
from protocol.api import CreateApiPackage, DeployApi
from protocol.bundles import CreateBundle
from protocol.deploy import CreateInfra, DeployBundle, ListDeployments
from protocol.progress import CommandProgress
from protocol.scenarios import GetRunLog, ListRuns, RunScenario
from tests.apiproject import make_api_project
from tests.authstack import auth_stack, control_plane
from tests.helpers import wait_for
from tests.projects import make_flow_project, make_project

HB = 0.2


async def test_a_bundle_and_an_api_deploy_under_least_privilege_raise_no_violation(
        tmp_path: Path) -> None:
    make_project(tmp_path / "ws", "churn", version="1")
    make_flow_project(tmp_path / "ws")
    make_api_project(tmp_path / "ws", version="1")
    with auth_stack(tmp_path) as stack:
        async with control_plane(stack, tmp_path, HB) as (admin, f):
            await f.start(AutomationNode(name="automation-1", infra="automation",
                                         nats=stack.settings("automation-1"),
                                         data_dir=tmp_path / "a1", heartbeat_interval=HB,
                                         resync_interval=1.0))
            api = await f.start(ApiNode(name="api-1", infra="api",
                                        nats=stack.settings("api-1"),
                                        data_dir=tmp_path / "api1", http_port=0,
                                        http_host="127.0.0.1", heartbeat_interval=HB,
                                        resync_interval=1.0, metrics_interval=0.5,
                                        workers=1))
            gateway = await f.start(GatewayNode(name="gateway", infra="api",
                                                nats=stack.settings("gateway"),
                                                http_port=0, http_host="127.0.0.1",
                                                heartbeat_interval=HB,
                                                resync_interval=1.0))
            await admin.call(CreateInfra(name="automation", kind="automation"))
            await admin.call(CreateInfra(name="api", kind="api"))

            # The Design node's progress reaches the admin's inbox, as its reply does.
            heard: list[CommandProgress] = []
            await admin.call(CreateBundle(project="churn", bundle_id="v1"), timeout=30,
                             on_progress=heard.append)
            assert heard[-1].stage == STORING
            assert heard[-1].unit == "bytes" and heard[-1].done == heard[-1].total > 0
            await admin.call(DeployBundle(project="churn", bundle_id="v1",
                                          infra="automation", by="admin"))
            await admin.call(CreateBundle(project="flows", bundle_id="v1"), timeout=30)
            await admin.call(DeployBundle(project="flows", bundle_id="v1",
                                          infra="automation", by="admin"))
            heard.clear()
            await admin.call(CreateApiPackage(project="churn", service="churn-api",
                                              version="v1"), timeout=30,
                             on_progress=heard.append)
            assert heard[-1].stage == STORING and heard[-1].done == heard[-1].total > 0
            await admin.call(DeployApi(service="churn-api", infra="api",
                                       generations={"v1": 100}))

            async def in_sync() -> bool:
                views = [v for infra in ("automation", "api") for v in (
                    await admin.call(ListDeployments(infra=infra))).deployments]
                return len(views) == 3 and all(v.state == "in_sync" for v in views)

            await wait_for(in_sync, timeout=60, message="every deployment in sync")
            # A scenario run: fired on the node, its log stored, its events published.
            run = await admin.call(RunScenario(project="flows", scenario="nightly",
                                               infra="automation", params={"suffix": "!"},
                                               by="admin"))

            async def finished() -> bool:
                listed = await admin.call(ListRuns(project="flows"))
                return any(r.run_id == run.run_id and r.outcome != "RUNNING"
                           for r in listed.runs)

            await wait_for(finished, timeout=60, message="the scenario run finished")
            log = await admin.call(GetRunLog(run_id=run.run_id))
            assert "keeping 3 rows" in log.text
            assert isinstance(api, ApiNode) and api.http is not None
            assert isinstance(gateway, GatewayNode) and gateway.http is not None
            path = "/public/api/v1/churn-api/predict/predict"
            async with httpx.AsyncClient(timeout=30) as http:
                for front in (api.http.url, gateway.http.url):

                    async def answered(front: str | None = front) -> httpx.Response | None:
                        r = await http.post(f"{front}{path}", json={"features": {"x": 1}})
                        return r if r.status_code == 200 else None

                    r = await wait_for(answered, timeout=20, message=f"{front} answers")
                    assert r.json()["result"]["prediction"] == "yes"
            # A hedged copy goes to the node, which hands it to a worker: the worker
            # answers a request its own connection never received.
            gw = await connect(stack.settings("gateway"), name="gateway-copy")
            try:
                msg = await requester(gw).request(
                    subjects.api_hedge("churn-api", "predict"),
                    b'{"features": {"x": 1}}', timeout=10)
            finally:
                await close(gw)
            assert b'"prediction":"yes"' in msg.data.replace(b" ", b""), msg
        violations = [line for line in stack.server_log().splitlines()
                      if "Violation" in line]
        assert violations == []



async def test_an_api_nodes_workers_find_credentials_given_as_a_relative_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers run in another directory than the node: a ``--creds auth/creds/N.creds``
    typed where the node was started must still be found by them."""
    make_api_project(tmp_path / "ws", version="1")
    with auth_stack(tmp_path) as stack:
        monkeypatch.chdir(tmp_path)
        relative = stack.store.creds_path("api-1").relative_to(tmp_path)
        settings = resolve(stack.server.url, creds=str(relative), env={})
        async with control_plane(stack, tmp_path, HB) as (admin, f):
            api = await f.start(ApiNode(name="api-1", infra="api", nats=settings,
                                        data_dir=tmp_path / "api1", http_port=0,
                                        http_host="127.0.0.1", heartbeat_interval=HB,
                                        resync_interval=1.0, workers=1))
            assert isinstance(api, ApiNode) and api.http is not None
            await admin.call(CreateInfra(name="api", kind="api"))
            await admin.call(CreateApiPackage(project="churn", service="churn-api",
                                              version="v1"), timeout=30)
            await admin.call(DeployApi(service="churn-api", infra="api",
                                       generations={"v1": 100}))
            path = f"{api.http.url}/public/api/v1/churn-api/predict/predict"
            async with httpx.AsyncClient(timeout=30) as http:

                async def answered() -> httpx.Response | None:
                    r = await http.post(path, json={"features": {"x": 1}})
                    return r if r.status_code == 200 else None

                r = await wait_for(answered, timeout=30, message="the worker serving")
            assert r.json()["result"]["prediction"] == "yes"
            assert api.pool.crashes == 0
