"""Alerts: webhooks get typed JSON bodies from the Deployer, through a real local HTTP
receiver: retried after a 500 with one idempotency key, never held up by a dead webhook,
bounded per webhook; a lost node and a failed run each alert once; ``shipyard alerts
test`` reports each webhook."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from nodes.deployer import DeployerNode
from nodes.deployer.alerts import Alerter, Policy
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.events import read_events
from nodes.runtime.logs import get_logger
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.bundles import CreateBundle
from protocol.deploy import CreateInfra, DeployBundle, SetInfra
from protocol.errors import BadRequest
from protocol.events import HealthChanged
from protocol.health import IDEMPOTENCY_HEADER, Alert, SendTestAlert
from protocol.scenarios import RunScenario
from tests.helpers import fleet, shipyard, wait_for


@dataclass
class Received:
    path: str
    key: str
    alert: Alert


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1: each path answers the statuses scripted for it
    in turn (then 200); ``/hang`` answers nothing for 3 s."""

    url: str
    script: dict[str, list[int]]
    got: list[Received] = field(default_factory=list)

    def alerts(self, path: str, kind: str | None = None) -> list[Alert]:
        return [r.alert for r in self.got if r.path == path
                and (kind is None or r.alert.kind == kind)]


@contextmanager
def receiver(**script: list[int]) -> Iterator[Receiver]:
    lock = threading.Lock()
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/hang":
                time.sleep(3)
                return
            with lock:
                statuses = box[0].script.setdefault(self.path.strip("/"), [])
                status = statuses.pop(0) if statuses else 200
                box[0].got.append(Received(self.path.strip("/"),
                                           self.headers.get(IDEMPOTENCY_HEADER, ""),
                                           msgspec.json.decode(body, type=Alert)))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box.append(Receiver(url=f"http://127.0.0.1:{server.server_port}", script=dict(script)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()


def _alert(name: str = "flows") -> Alert:
    return Alert(kind="test", infra="prod", about="infra", name=name, summary="hello",
                 ts=time.time())


FAST = Policy(attempts=3, base_delay_s=0.05, max_delay_s=0.2, timeout_s=1.0, queue_size=2)


async def test_a_webhook_gets_the_alert_after_a_500_with_one_idempotency_key() -> None:
    alerter = Alerter(get_logger(), FAST)
    with receiver(flaky=[500], refuse=[400, 400]) as rx:
        async with anyio.create_task_group() as tg:
            await tg.start(alerter.run)
            alert = _alert()
            flaky, refused = alerter.send(alert, [f"{rx.url}/flaky", f"{rx.url}/refuse"])
            with anyio.fail_after(10):
                await flaky.done.wait()
                await refused.done.wait()
            tg.cancel_scope.cancel()
    assert flaky.result is not None and flaky.result.delivered
    assert (flaky.result.attempts, flaky.result.status) == (2, 200)
    assert [(r.key, r.alert) for r in rx.got if r.path == "flaky"] == [(alert.id, alert)] * 2
    # A 4xx is the receiver refusing this body: not retried.
    assert refused.result is not None and not refused.result.delivered
    assert (refused.result.attempts, refused.result.error) == (1, "HTTP 400")
    assert alerter.sent == 1 and alerter.failed == 1


async def test_a_dead_webhook_holds_up_no_other_and_drops_its_oldest_alerts() -> None:
    alerter = Alerter(get_logger(), FAST)
    with receiver() as rx:
        async with anyio.create_task_group() as tg:
            await tg.start(alerter.run)
            hanging = []
            for i in range(5):
                dead, ok = alerter.send(_alert(f"a{i}"), [f"{rx.url}/hang", f"{rx.url}/ok"])
                hanging.append(dead)
                with anyio.fail_after(5):
                    await ok.done.wait()
                assert ok.result is not None and ok.result.delivered
            # Every alert reached /ok while /hang still holds its first one.
            assert not hanging[0].done.is_set()
            assert [a.name for a in rx.alerts("ok")] == ["a0", "a1", "a2", "a3", "a4"]
            # /hang's queue holds 2: the oldest waiting ones were dropped, and say so.
            assert alerter.dropped == 2
            assert [d.result.error if d.result else None for d in hanging[1:3]] == [
                "dropped: the webhook's queue was full"] * 2
            with anyio.fail_after(15):
                await hanging[0].done.wait()
            assert hanging[0].result is not None and not hanging[0].result.delivered
            assert hanging[0].result.error == "no answer within 1s"
            tg.cancel_scope.cancel()


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(partial(shipyard, *args, env=env, timeout=60))


async def test_a_lost_node_and_a_failed_run_each_alert_once(
        settings: NatsSettings, tmp_path: Path, cli_env: dict[str, str]) -> None:
    from tests.projects import make_flow_project
    from tests.test_deploy import HB, automation, design
    broken = {"recipes/clean.py": "def run(ctx):\n    raise ValueError('bad row 7')\n"}
    make_flow_project(tmp_path / "ws", files=broken)
    env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
    with receiver() as rx:
        async with fleet() as f:
            await f.start(DeployerNode(name="deployer", nats=settings, heartbeat_interval=HB,
                                       health_hold_s=0.3, alert_policy=FAST))
            await f.start(design(settings, tmp_path / "ws"))
            nc = await connect(settings, name="test")
            caller = Caller(nc, sender="test")
            await caller.call(CreateInfra(name="prod", kind="automation"))
            await f.start(automation(settings, tmp_path, "a1"))
            a2 = await f.start(automation(settings, tmp_path, "a2"))
            await caller.call(CreateBundle(project="flows", bundle_id="v1"), timeout=30)
            await caller.call(DeployBundle(project="flows", bundle_id="v1", infra="prod"))

            # Two webhooks, one dead (nothing listens on port 9): the test reports each.
            dead = "http://127.0.0.1:9/alerts"
            set_ = await _cli(env, "infra", "set", "prod", "--webhook",
                              f"{rx.url}/ok,{dead}")
            assert set_.returncode == 0 and "2 webhook(s)" in set_.stdout, set_.stderr
            tested = await _cli(env, "alerts", "test", "prod", "--json")
            assert tested.returncode == 1, tested.stderr
            results = {r["url"]: r for r in json.loads(tested.stdout)["results"]}
            assert results[f"{rx.url}/ok"]["delivered"] is True
            assert results[dead]["delivered"] is False and results[dead]["attempts"] == 3
            assert "ConnectError" in results[dead]["error"]
            [test] = rx.alerts("ok", "test")
            assert test.infra == "prod" and "test alert for infra prod" in test.summary
            with pytest.raises(BadRequest, match="invalid webhook URL 'ftp://x/y'"):
                await caller.call(SetInfra(name="prod", webhooks=["ftp://x/y"]))
            await caller.call(SetInfra(name="prod", webhooks=[f"{rx.url}/ok"]))

            # A failed run: one run_failed alert, then the deployment's health change.
            accepted = await caller.call(RunScenario(project="flows", scenario="nightly",
                                                     infra="prod"))
            await wait_for(lambda: [a for a in rx.alerts("ok", "health_changed")
                                    if a.about == "deployment" and a.health == "ERROR"],
                           timeout=30, message="flows ERROR alert")
            [failed] = rx.alerts("ok", "run_failed")
            assert failed.name == accepted.run_id and failed.about == "run"
            assert "ValueError: bad row 7" in failed.reasons[0]

            # A lost node: one node_lost alert (a test alert after it marks the end).
            await f.stop(a2)
            await wait_for(lambda: rx.alerts("ok", "node_lost"), timeout=10,
                           message="node_lost alert")
            marker = await caller.call(SendTestAlert(infra="prod"), timeout=30)
            assert [r.delivered for r in marker.results] == [True]
            [lost] = rx.alerts("ok", "node_lost")
            assert (lost.about, lost.name, lost.infra) == ("node", "a2", "prod")
            assert len(rx.alerts("ok", "run_failed")) == 1
            # Every delivery carried its alert's id as the idempotency key.
            assert all(r.key == r.alert.id for r in rx.got)

            # The health change is an event in the stream too.
            changes = [e.event async for e in read_events(nc, subject=subjects.events_of(
                "health")) if isinstance(e.event, HealthChanged)]
            assert any(c.about == "deployment" and c.name == "flows" and c.health == "ERROR"
                       for c in changes)
            cleared = await _cli(env, "infra", "set", "prod", "--webhook", "")
            assert cleared.returncode == 0 and "0 webhook(s)" in cleared.stdout
            await nc.close()
