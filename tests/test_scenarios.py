"""Scenarios on Automation nodes: triggers, exactly-once per infra, coalescing, cancel,
timeouts, history and health, against a real nats-server with real child processes."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from nats.aio.client import Client as NATS

from nodes.automation import AutomationNode
from nodes.deployer import DeployerNode
from nodes.runtime.calls import Caller
from nodes.runtime.events import read_events
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.bundles import CreateBundle
from protocol.deploy import DeployBundle, ListDeployments
from protocol.errors import NotFound
from protocol.heartbeat import HEARTBEAT
from protocol.scenarios import (
    CancelRun,
    FireScenario,
    Firing,
    GetRunLog,
    ListRuns,
    RunScenario,
    RunStarted,
    RunSummary,
)
from tests.helpers import Fleet, fleet, wait_for
from tests.projects import make_flow_project
from tests.test_deploy import HB, automation, control_plane, converged, deployer


async def deployed(f: Fleet, settings: NatsSettings, tmp: Path, nodes: tuple[str, ...] = ("a1",),
                   extra: str = "", files: dict[str, str] | None = None,
                   ) -> tuple[NATS, Caller, list[AutomationNode]]:
    make_flow_project(tmp / "ws", extra=extra, files=files)
    nc, caller = await control_plane(f, settings, tmp)
    started = [await f.start(automation(settings, tmp, n)) for n in nodes]
    await caller.call(CreateBundle(project="flows", bundle_id="v1"), timeout=30)
    await caller.call(DeployBundle(project="flows", bundle_id="v1", infra="prod"))
    await wait_for(lambda: converged(caller, "v1", len(nodes), project="flows"),
                   message="flows v1 active")
    return nc, caller, started


async def runs(caller: Caller, scenario: str | None = None) -> list[RunSummary]:
    reply = await caller.call(ListRuns(project="flows", scenario=scenario, limit=500))
    return reply.runs


async def finished(caller: Caller, scenario: str, n: int = 1) -> list[RunSummary] | None:
    done = [r for r in await runs(caller, scenario) if r.outcome != "RUNNING"]
    return done if len(done) >= n else None


async def manual(caller: Caller, scenario: str, **params: Any) -> str:
    accepted = await caller.call(RunScenario(project="flows", scenario=scenario, infra="prod",
                                             params=params, by="tester"))
    assert not accepted.coalesced
    return accepted.run_id


async def test_manual_run_with_params_builds_checks_and_is_recorded(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, [a1] = await deployed(f, settings, tmp_path)
        run_id = await manual(caller, "nightly", suffix="!")
        [run] = await wait_for(lambda: finished(caller, "nightly"), message="nightly done")
        assert run.run_id == run_id and run.outcome == "WARNING"  # 3 rows < soft_min 4
        assert (run.node, run.bundle, run.trigger, run.params) == ("a1", "v1", "manual",
                                                                   {"suffix": "!"})
        assert [s.kind for s in run.steps] == ["build", "check"]
        assert run.metrics["clean"]["row_count"] == 3 and run.metrics["clean"]["kept"] == 3
        out = a1.store.data_dir("flows") / "data" / "clean.csv"
        assert out.read_text().splitlines()[1] == "1,a!"
        log = await caller.call(GetRunLog(run_id=run_id))
        assert "keeping 3 rows, suffix '!'" in log.text
        # Deployment health carries the outcome of the last run: its check warned.
        view = (await caller.call(ListDeployments(project="flows"))).deployments[0]
        assert view.health == "WARNING"
        assert any(r.startswith(f"last run {run_id} of scenario nightly warned")
                   for r in view.reasons)
        with pytest.raises(NotFound, match="has no scenario 'nope'"):
            await caller.call(RunScenario(project="flows", scenario="nope", infra="prod"))
        await nc.close()


async def test_a_failed_run_is_reported_with_its_reason_and_feeds_health(
        settings: NatsSettings, tmp_path: Path) -> None:
    broken = {"recipes/clean.py": "def run(ctx):\n    raise ValueError('bad row 7')\n"}
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path, files=broken)
        await manual(caller, "nightly")
        [run] = await wait_for(lambda: finished(caller, "nightly"), message="run done")
        assert run.outcome == "FAILED"
        assert "ValueError: bad row 7" in run.error
        assert any("bad row 7" in line for line in run.log_tail)
        view = await wait_for(lambda: _erroring(caller), message="health follows the run")
        assert any("failed" in r and "bad row 7" in r for r in view.reasons)
        # The node is fine: another scenario still runs.
        await manual(caller, "report")
        [ok] = await wait_for(lambda: finished(caller, "report"), message="report ran")
        assert ok.outcome == "SUCCESS"
        await nc.close()


async def _erroring(caller: Caller) -> Any:
    view = (await caller.call(ListDeployments(project="flows"))).deployments[0]
    return view if view.health == "ERROR" else None


async def test_after_chaining_and_on_activation_run_once_per_infra(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path, nodes=("a1", "a2"))
        # on_activation: both nodes activated v1, the welcome scenario ran once.
        [welcome] = await wait_for(lambda: finished(caller, "welcome"), message="welcome")
        assert welcome.trigger == "on_activation"
        await manual(caller, "nightly")
        [report] = await wait_for(lambda: finished(caller, "report"), message="report")
        assert report.trigger == "after"
        # Nothing ran twice, though two nodes saw every trigger.
        await anyio.sleep(0.5)
        assert len(await runs(caller, "welcome")) == 1
        assert len(await runs(caller, "report")) == 1
        await nc.close()


async def test_one_firing_claimed_by_two_nodes_runs_once(settings: NatsSettings,
                                                          tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path, nodes=("a1", "a2"))
        firing = Firing(id="cron-1234", trigger="cron", detail="test")
        results: list[Any] = []

        async def fire(node: str) -> None:
            results.append(await caller.call(FireScenario(project="flows", scenario="report",
                                                          firing=firing), node=node))

        async with anyio.create_task_group() as tg:
            tg.start_soon(fire, "a1")
            tg.start_soon(fire, "a2")
        assert sorted(r.coalesced for r in results) == [False, True]
        await wait_for(lambda: finished(caller, "report"), message="ran")
        assert len(await runs(caller, "report")) == 1
        await nc.close()


async def test_firings_while_running_are_coalesced_into_one_more_run(
        settings: NatsSettings, tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path, nodes=("a1", "a2"))
        first = await manual(caller, "slow", seconds=1.5)
        await wait_for(lambda: _running(caller, first), message="first run going")
        extra = [await caller.call(RunScenario(project="flows", scenario="slow",
                                               infra="prod", params={"seconds": 0.1}))
                 for _ in range(3)]
        assert all(a.coalesced for a in extra)
        assert "one more run will follow" in extra[0].detail
        assert "already queued" in extra[1].detail
        done = await wait_for(lambda: finished(caller, "slow", 2), timeout=20,
                              message="two runs")
        await anyio.sleep(0.5)
        assert len(await runs(caller, "slow")) == 2
        a, b = sorted(done, key=lambda r: r.started_at)
        assert a.finished_at is not None and b.started_at >= a.finished_at - 0.05  # no overlap
        assert b.params == {"seconds": 0.1}
        await nc.close()


async def _running(caller: Caller, run_id: str) -> bool:
    return any(r.run_id == run_id and r.outcome == "RUNNING" for r in await runs(caller))


async def test_cancel_and_timeout_stop_a_run_within_seconds(settings: NatsSettings,
                                                             tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path)
        run_id = await manual(caller, "slow", seconds=60)
        await wait_for(lambda: _running(caller, run_id), message="running")
        t0 = time.monotonic()
        reply = await caller.call(CancelRun(run_id=run_id))
        assert reply.was_running
        [run] = await wait_for(lambda: finished(caller, "slow"), message="cancelled")
        assert run.outcome == "CANCELLED" and time.monotonic() - t0 < 5
        # The lock is free: the scenario runs again at once.
        again = await manual(caller, "slow", seconds=0.1)
        assert again != run_id
        await manual(caller, "quick_timeout", seconds=30)
        [timed] = await wait_for(lambda: finished(caller, "quick_timeout"), timeout=15,
                                 message="timed out")
        assert timed.outcome == "FAILED" and "timeout" in timed.error
        await nc.close()


async def test_heartbeats_keep_flowing_during_a_cpu_bound_recipe(settings: NatsSettings,
                                                                  tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path)
        beats: list[float] = []

        async def on_beat(msg: Any) -> None:
            if HEARTBEAT.decode(msg.data).node == "a1":
                beats.append(time.monotonic())

        await nc.subscribe(subjects.heartbeat("automation", "a1"), cb=on_beat)
        run_id = await manual(caller, "burn", seconds=2.5)
        await wait_for(lambda: _running(caller, run_id), message="burning")
        start = len(beats)
        [run] = await wait_for(lambda: finished(caller, "burn"), timeout=20, message="burnt")
        assert run.outcome == "SUCCESS"
        during = beats[start:]
        gaps = [b - a for a, b in itertools.pairwise(during)]
        assert len(during) >= 8
        assert max(gaps) < 2 * HB
        await nc.close()


async def test_run_history_survives_a_deployer_restart(settings: NatsSettings,
                                                       tmp_path: Path) -> None:
    async with fleet() as f:
        nc, caller, _ = await deployed(f, settings, tmp_path)
        await manual(caller, "report")
        before = await wait_for(lambda: finished(caller, "report"), message="report")
        old = next(n for n in f.nodes if isinstance(n, DeployerNode))
        await f.stop(old)
        await f.start(deployer(settings))
        assert await finished(caller, "report") == before
        log = await caller.call(GetRunLog(run_id=before[0].run_id))
        assert "report ran" in log.text
        await nc.close()


async def test_missed_cron_slots_give_at_most_one_catch_up_run(settings: NatsSettings,
                                                               tmp_path: Path) -> None:
    extra = ('\n[scenarios.tick]\nsteps = [{ python = "scripts/report.py" }]\n'
             'triggers = [{ cron = "* * * * * *" }]\n'
             '\n[scenarios.tock]\nsteps = [{ python = "scripts/report.py" }]\n'
             'triggers = [{ cron = "* * * * * *", catch_up = false }]\n')
    async with fleet() as f:
        nc, caller, [a1] = await deployed(f, settings, tmp_path, extra=extra)
        await wait_for(lambda: finished(caller, "tick", 2), timeout=10, message="ticking")
        await f.stop(a1)
        down_from = time.time()
        await anyio.sleep(3.5)  # the outage: three or four slots go by
        back_at = time.time()
        await f.start(automation(settings, tmp_path, "a1"))
        await wait_for(lambda: _started_after(nc, "tock", back_at + 1.5), timeout=10,
                       message="tocking again")
        await wait_for(lambda: _started_after(nc, "tick", back_at + 1.5), timeout=10,
                       message="ticking again")
        slots = {s: await _slots(nc, s) for s in ("tick", "tock")}
        # tock (catch_up = false) fires nothing for the outage: its first slot after it is
        # the first regular one, whenever the node came back.  tick fires once before
        # that, for the last slot it missed: one catch-up, not a pile.
        after = {s: [t for t in v if t > down_from + 1] for s, v in slots.items()}
        assert min(after["tock"]) > back_at, slots
        caught_up = [t for t in after["tick"] if t < min(after["tock"])]
        assert len(caught_up) == 1 and back_at - 1 <= caught_up[0], slots
        await nc.close()


async def _slots(nc: NATS, scenario: str) -> list[float]:
    return [float(e.event.firing.removeprefix("cron-"))
            async for e in read_events(nc, subject=subjects.runs_of("flows"))
            if isinstance(e.event, RunStarted) and e.event.scenario == scenario]


async def _started_after(nc: NATS, scenario: str, t: float) -> bool:
    return any(s > t for s in await _slots(nc, scenario))


async def test_a_run_whose_node_dies_is_marked_failed(settings: NatsSettings,
                                                      tmp_path: Path, cli_env: dict[str, str]
                                                      ) -> None:
    """A real node process, killed with SIGKILL in the middle of a run."""
    import signal

    from tests.helpers import Background, shipyard_argv
    async with fleet() as f:
        nc, caller, [a1] = await deployed(f, settings, tmp_path)
        await f.stop(a1)  # leave the infra to a node in its own process
        env = dict(cli_env, SHIPYARD_NATS_URL=settings.url)
        proc = Background(shipyard_argv("node", "start", "automation", "--name", "a9",
                                        "--infra", "prod", "--data-dir", str(tmp_path / "a9"),
                                        "--heartbeat-interval", str(HB)), env=env)
        try:
            await wait_for(lambda: converged(caller, "v1", 1, project="flows"), timeout=20,
                           message="a9 runs v1")
            run_id = await manual(caller, "slow", seconds=60)
            await wait_for(lambda: _running(caller, run_id), message="a9 running it")
            proc.proc.send_signal(signal.SIGKILL)
            [run] = await wait_for(lambda: finished(caller, "slow"), timeout=10,
                                   message="run marked failed")
            assert run.run_id == run_id and run.outcome == "FAILED"
            assert run.error.startswith("node lost: a9")
        finally:
            proc.stop(signal.SIGKILL)
        await nc.close()
