"""User code runs in job processes: whatever it does, its run fails cleanly, the engine
and its event loop are unharmed, and nothing it started is left running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from nodes.flow import Limits, Outcome, RecipeStarted
from tests.helpers import pid_alive, wait_for
from tests.test_flow_support import Events, leftovers, open_flow, read, write, write_project

ONE = """
[datasets.out]
path = "out.txt"
[recipes.job]
code = "job.py"
outputs = ["out"]
{extra}
"""

WRITE_OK = """
def run(ctx):
    ctx.outputs["out"].write_text("ok")
"""


async def test_recipe_that_raises_fails_with_type_message_and_traceback(
        tmp_path: Path) -> None:
    code = """
    def helper():
        raise ValueError("bad row 17")

    def run(ctx):
        helper()
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"], log=tmp_path / "run.log")
        write(tmp_path / "job.py", WRITE_OK)
        after = await flow.build(["out"])  # the pool is unharmed
    run = result.recipe("job")
    assert result.outcome is Outcome.FAILED and run.outcome is Outcome.FAILED
    assert run.reason == "ValueError: bad row 17"
    assert run.exit_code == 1
    assert any("Traceback" in line for line in run.log_tail)
    assert run.log_tail[-1].endswith("ValueError: bad row 17")
    log = read(tmp_path / "run.log")
    assert "in helper" in log and "ValueError: bad row 17" in log
    assert after.outcome is Outcome.SUCCESS


async def test_recipe_calling_sys_exit_fails_with_its_exit_code(tmp_path: Path) -> None:
    code = """
    import sys

    def run(ctx):
        sys.exit(3)
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"])
    run = result.recipe("job")
    assert run.outcome is Outcome.FAILED
    assert run.exit_code == 3
    assert run.reason == "sys.exit(3) called"


async def test_recipe_killed_by_a_signal_fails_naming_it(tmp_path: Path) -> None:
    code = """
    import os, signal

    def run(ctx):
        os.kill(os.getpid(), signal.SIGKILL)
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"])
    assert result.recipe("job").reason == "killed by SIGKILL"


# Loops forever, ignoring SIGTERM (so only SIGKILL stops it), with a grandchild
# process in its group; writes both pids to the file named by params["pids"].
STUBBORN = """
import os, signal, subprocess

def run(ctx):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])
    with open(ctx.params["pids"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    while True:
        pass
"""


def pids(path: Path) -> list[int]:
    text = path.read_text() if path.exists() else ""
    return [int(p) for p in text.split()] if len(text.split()) == 2 else []


async def test_cancel_event_stops_a_looping_recipe_and_its_children_quickly(
        tmp_path: Path) -> None:
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": STUBBORN})
    pid_file = tmp_path / "pids"
    cancel = anyio.Event()
    cancelled_at = 0.0
    async with open_flow(tmp_path, manifest, kill_grace_s=0.5) as flow, \
            anyio.create_task_group() as tg:
        async def cancel_when_running() -> None:
            nonlocal cancelled_at
            await wait_for(lambda: pids(pid_file), message="recipe to start")
            cancelled_at = time.monotonic()
            cancel.set()

        tg.start_soon(cancel_when_running)
        result = await flow.build(["out"], params={"pids": str(pid_file)}, cancel=cancel)
        stop_time = time.monotonic() - cancelled_at
    assert result.outcome is Outcome.CANCELLED
    assert result.recipe("job").outcome is Outcome.CANCELLED
    assert result.recipe("job").reason == "cancelled"
    assert 0.5 <= stop_time < 2, "SIGTERM is ignored: SIGKILL after the 0.5 s grace"
    recipe_pid, grandchild_pid = pids(pid_file)

    def both_gone() -> bool:
        return not pid_alive(recipe_pid) and not pid_alive(grandchild_pid)

    await wait_for(both_gone, timeout=3, message="the recipe and its child to be gone")
    assert not (tmp_path / "out.txt").exists()
    assert leftovers(tmp_path) == []


async def test_recipe_timeout_kills_a_looping_recipe(tmp_path: Path) -> None:
    code = """
    def run(ctx):
        ctx.outputs["out"].write_text("partial")
        while True:
            pass
    """
    manifest = write_project(tmp_path, ONE.format(extra="timeout_s = 0.5"), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        t0 = time.monotonic()
        result = await flow.build(["out"])
        elapsed = time.monotonic() - t0
    run = result.recipe("job")
    assert run.outcome is Outcome.FAILED
    assert run.reason == "killed: timeout after 0.5s"
    assert 0.5 <= elapsed < 3
    assert run.pid is not None and not pid_alive(run.pid)
    assert not (tmp_path / "out.txt").exists()


async def test_run_timeout_stops_the_whole_build(tmp_path: Path) -> None:
    code = """
    def run(ctx):
        while True:
            pass
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    async with open_flow(tmp_path, manifest, limits=Limits(run_timeout_s=0.5)) as flow:
        result = await flow.build(["out"])
    assert result.outcome is Outcome.FAILED
    assert result.recipe("job").reason == "killed: run timeout after 0.5s"


async def test_cancelling_the_callers_scope_kills_the_recipe(tmp_path: Path) -> None:
    code = """
    import time

    def run(ctx):
        time.sleep(60)
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    events = Events()
    async with open_flow(tmp_path, manifest) as flow:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: flow.build(["out"], progress=events))
                await wait_for(lambda: events.events, message="recipe to start")
                scope.cancel()
        started = events.events[0]
        assert isinstance(started, RecipeStarted) and started.pid is not None
        assert not pid_alive(started.pid)  # killed before the cancel completed
        assert leftovers(tmp_path) == []


async def test_recipe_exhausting_memory_fails_with_memory_limit_exceeded(
        tmp_path: Path) -> None:
    code = """
    def run(ctx):
        hoard = []
        while True:
            hoard.append(bytearray(32 * 1024 * 1024))
    """
    manifest = write_project(tmp_path, ONE.format(extra="memory_mb = 300"), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"])
        write(tmp_path / "job.py", WRITE_OK)
        after = await flow.build(["out"])
    run = result.recipe("job")
    assert run.outcome is Outcome.FAILED
    assert run.reason == "memory limit exceeded (300 MB): MemoryError"
    assert after.outcome is Outcome.SUCCESS


async def test_event_loop_keeps_ticking_during_a_cpu_bound_recipe(tmp_path: Path) -> None:
    code = """
    import time

    def run(ctx):
        end = time.monotonic() + 1.0
        n = 0
        while time.monotonic() < end:
            n += sum(i * i for i in range(1000))
        ctx.outputs["out"].write_text(str(n))
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    gaps: list[float] = []
    async with open_flow(tmp_path, manifest) as flow, anyio.create_task_group() as tg:
        async def tick() -> None:
            while True:
                t = time.monotonic()
                await anyio.sleep(0.01)
                gaps.append(time.monotonic() - t)

        tg.start_soon(tick)
        result = await flow.build(["out"])
        tg.cancel_scope.cancel()
    assert result.outcome is Outcome.SUCCESS
    assert len(gaps) > 40
    assert max(gaps) < 0.2, f"event loop stalled for {max(gaps):.3f}s"


async def test_a_dead_worker_process_is_replaced(tmp_path: Path) -> None:
    code = """
    import time

    def run(ctx):
        time.sleep(60)
    """
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    events = Events()
    async with open_flow(tmp_path, manifest) as flow, anyio.create_task_group() as tg:
        first_server = flow.pool.pid
        assert first_server is not None

        async def kill_server_when_running() -> None:
            await wait_for(lambda: events.events, message="recipe to start")
            os.kill(first_server, signal.SIGKILL)

        tg.start_soon(kill_server_when_running)
        lost = await flow.build(["out"], progress=events)
        write(tmp_path / "job.py", WRITE_OK)
        after = await flow.build(["out"])
        assert flow.pool.pid not in (None, first_server)
        assert flow.pool.restarts == 1
    run = lost.recipe("job")
    assert run.outcome is Outcome.FAILED
    assert run.reason == "the flow worker process died"
    assert run.pid is not None
    await wait_for(lambda: not pid_alive(run.pid or 0), timeout=3,
                   message="the orphaned recipe to die with its fork server")
    assert after.outcome is Outcome.SUCCESS


@pytest.mark.parametrize("value", ["x", float("nan")])
async def test_bad_custom_metric_fails_the_recipe(tmp_path: Path, value: object) -> None:
    code = f"""
    def run(ctx):
        ctx.outputs["out"].write_text("ok")
        ctx.metric("m", {value!r})
    """.replace("nan", "float('nan')")
    manifest = write_project(tmp_path, ONE.format(extra=""), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"])
    assert result.recipe("job").outcome is Outcome.FAILED
    assert "metric 'm': expected" in result.recipe("job").reason



async def test_recipe_cannot_lift_its_memory_limit(tmp_path: Path) -> None:
    code = """
    import resource

    def run(ctx):
        unlimited = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_AS, (unlimited, unlimited))
    """
    manifest = write_project(tmp_path, ONE.format(extra="memory_mb = 500"), {"job.py": code})
    async with open_flow(tmp_path, manifest) as flow:
        result = await flow.build(["out"])
    assert result.recipe("job").outcome is Outcome.FAILED
    assert result.recipe("job").reason.startswith("ValueError: not allowed to raise")
