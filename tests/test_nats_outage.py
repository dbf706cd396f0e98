"""An Automation node rides out a nats-server restart: its cron schedule meets NATS
timeouts while the server is down, retries, and fires again once the server is back
(same port, same store), without the node stopping."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nats
from structlog.testing import capture_logs

from nodes.runtime.calls import Caller
from nodes.runtime.embedded import EmbeddedNats
from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.scenarios import FireScenario, Firing, RunAccepted, RunStarted
from tests.helpers import fleet, wait_for
from tests.test_scenarios import deployed

TICK = ('\n[scenarios.tick]\nsteps = [{ python = "scripts/report.py" }]\n'
        'triggers = [{ cron = "* * * * * *" }]\n')


async def _ticks_after(url: str, t: float) -> list[float]:
    """Cron slots of ``tick`` runs started after wall-clock time ``t`` (a fresh client)."""
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        return [slot async for e in read_events(nc, subject=subjects.runs_of("flows"))
                if isinstance(e.event, RunStarted) and e.event.scenario == "tick"
                and e.event.firing.startswith("cron-")
                and (slot := float(e.event.firing.removeprefix("cron-"))) > t]
    finally:
        await nc.close()


def _interrupted(logs: list[dict[str, Any]], loop_prefix: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == "background loop interrupted; retrying"
            and str(e.get("loop", "")).startswith(loop_prefix)]


async def test_cron_survives_a_nats_server_restart_under_the_automation_node(
        tmp_path: Path) -> None:
    store = tmp_path / "nats"
    server = EmbeddedNats(store, port=-1, monitor_port=None, log_file=tmp_path / "nats.log")
    await server.astart()
    settings = NatsSettings(servers=(server.url,))
    try:
        with capture_logs() as logs:
            async with fleet() as f:
                nc, _, [a1] = await deployed(f, settings, tmp_path, extra=TICK)
                await nc.close()
                # Leave the Automation node alone with its bundle: it needs nothing else.
                for node in [n for n in f.nodes if n is not a1]:
                    await f.stop(node)
                t0 = time.time()
                await wait_for(lambda: _ticks_after(server.url, t0), timeout=15,
                               message="tick fired by cron before the outage")

                await server.astop()
                await wait_for(lambda: _interrupted(logs, "cron flows/tick"), timeout=30,
                               message="the cron schedule meeting the outage")
                assert a1 in f.nodes and not a1.stopping_requested

                server = EmbeddedNats(store, port=server.port, monitor_port=None,
                                      log_file=tmp_path / "nats-2.log")
                await server.astart()
                back = time.time()
                await wait_for(lambda: _ticks_after(server.url, back), timeout=30,
                               message="tick fired by cron after the restart")

                # Still serving its node-direct commands, on the same process.
                check = await nats.connect(server.url)
                try:
                    reply = await Caller(check, sender="test").call(
                        FireScenario(project="flows", scenario="tick",
                                     firing=Firing(id="manual-after-outage", trigger="manual")),
                        node=a1.name, timeout=10)
                    assert isinstance(reply, RunAccepted)
                finally:
                    await check.close()
                assert a1 in f.nodes and a1.conn_stats.reconnects >= 1
        assert not [e for e in logs if e.get("log_level") == "error"
                    and e.get("event") == "background loop failed; retrying"]
    finally:
        server.stop()
