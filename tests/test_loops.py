"""Background loops (``nodes.runtime.loops``) and the run log's writer task: transient
NATS errors are retried with capped backoff, defects are logged and retried,
cancellation passes through, and no task outlives its owner."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from nodes.flow.run_log import RunLog
from nodes.runtime.kvcache import Entry, KVCache
from nodes.runtime.loops import Backoff, forever, is_transient, supervised
from nodes.runtime.settings import NatsSettings
from tests.helpers import wait_for


class Recorder:
    """A logger that keeps what it is given (the loops only call these two methods)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.records.append(("warning", event, kw))

    def error(self, event: str, **kw: Any) -> None:
        self.records.append(("error", event, kw))

    def delays(self) -> list[float]:
        return [kw["retry_in_s"] for _, _, kw in self.records]


def no_jitter(**kw: float) -> Backoff:
    return Backoff(jitter=0.0, **{"initial": 0.01, "cap": 0.04, **kw})


async def test_forever_retries_nats_errors_with_capped_exponential_backoff() -> None:
    log = Recorder()
    calls = 0
    done = anyio.Event()
    errors = [nats.errors.TimeoutError(), nats.errors.ConnectionClosedError(),
              nats.js.errors.ServiceUnavailableError(), nats.errors.NoRespondersError(),
              TimeoutError()]

    async def step() -> None:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        done.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: forever("kv", step, log=log, backoff=no_jitter()))
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    assert calls == 6
    assert log.delays() == [0.01, 0.02, 0.04, 0.04, 0.04]  # doubling, capped
    assert {level for level, _, _ in log.records} == {"warning"}
    assert all(kw["loop"] == "kv" for _, _, kw in log.records)
    assert "TimeoutError" in log.records[0][2]["error"]


async def test_forever_starts_the_backoff_over_after_a_successful_step() -> None:
    log = Recorder()
    outcomes: list[Exception | None] = [nats.errors.TimeoutError(), nats.errors.TimeoutError(),
                                        None, nats.errors.TimeoutError()]
    done = anyio.Event()

    async def step() -> None:
        if not outcomes:
            done.set()
            await anyio.sleep_forever()
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: forever("tick", step, log=log, backoff=no_jitter()))
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    assert log.delays() == [0.01, 0.02, 0.01]


async def test_an_unexpected_exception_is_logged_with_its_traceback_and_the_loop_goes_on(
) -> None:
    log = Recorder()
    seen: list[int] = []

    async def step(n: list[int]) -> None:
        n.append(len(n))
        if len(n) == 1:
            raise KeyError("a defect")

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: forever("converge", step, seen, log=log, interval=0.001,
                                      backoff=no_jitter()))
        await wait_for(lambda: len(seen) >= 3, message="the loop going on after the defect")
        tg.cancel_scope.cancel()
    [(level, event, kw)] = log.records
    assert level == "error" and "failed" in event
    assert isinstance(kw["exc_info"], KeyError)  # rendered as a traceback by structlog
    assert kw["retry_in_s"] == 0.01


async def test_cancellation_passes_through_without_a_retry() -> None:
    log = Recorder()
    started = anyio.Event()
    cancelled = False

    async def step() -> None:
        nonlocal cancelled
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: forever("idle", step, log=log))
            tg.start_soon(lambda: supervised("idle too", step, log=log))
            await started.wait()
            tg.cancel_scope.cancel()
    assert cancelled and log.records == []


async def test_supervised_restarts_a_failed_run_and_returns_when_it_returns() -> None:
    log = Recorder()
    runs = 0

    async def run(fail_times: int) -> str:
        nonlocal runs
        runs += 1
        if runs <= fail_times:
            raise ExceptionGroup("from a task group", [nats.errors.TimeoutError(),
                                                       nats.errors.ConnectionClosedError()])
        return "done"

    with anyio.fail_after(10):
        await supervised("cron", run, 2, log=log, backoff=no_jitter())
    assert runs == 3
    assert [level for level, _, _ in log.records] == ["warning", "warning"]
    assert log.delays() == [0.01, 0.02]


def test_what_counts_as_transient() -> None:
    assert is_transient(nats.errors.TimeoutError())
    assert is_transient(nats.js.errors.NoStreamResponseError())
    assert is_transient(nats.errors.ConnectionClosedError())
    assert is_transient(ExceptionGroup("g", [TimeoutError(), nats.errors.NoServersError()]))
    assert not is_transient(ExceptionGroup("g", [TimeoutError(), KeyError("x")]))
    assert not is_transient(ValueError("bad"))


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial <= cap"):
        Backoff(initial=5, cap=1)
    delays = Backoff(initial=1.0, cap=8.0, jitter=0.5)
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert expected * 0.5 <= delays.delay() <= expected


async def test_a_kv_cache_keeps_following_after_its_callback_raises(
        settings: NatsSettings) -> None:
    """A defect in ``on_change`` is logged and the watch is started again; it does not
    end the cache (nor the node whose task group holds it)."""
    nc = await nats.connect(settings.url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="cache_test"))
        seen: list[str] = []

        async def on_change(key: str, entry: Entry[bytes] | None) -> None:
            seen.append(key)
            if key == "bad":
                raise RuntimeError("a defect in the callback")

        cache = KVCache(kv, ">", bytes, on_change=on_change, resync_interval=600)
        async with anyio.create_task_group() as tg:
            await tg.start(cache.run)
            await kv.put("bad", b"1")
            await wait_for(lambda: "bad" in seen, message="the failing change")
            await kv.put("good", b"2")
            await wait_for(lambda: "good" in cache.entries, message="a later change applied")
            tg.cancel_scope.cancel()
        assert seen.count("bad") == 1  # the restarted watch does not repeat it
    finally:
        await nc.close()


async def test_a_cron_slot_is_not_delayed_by_a_wall_clock_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for a wall-clock slot rechecks the clock: when the clock steps forward
    past the slot, the wait ends at the next recheck, not after the old remainder."""
    from nodes.automation import schedule

    clock = [1000.0]
    monkeypatch.setattr(schedule, "CRON_RECHECK_S", 0.01)
    monkeypatch.setattr(schedule.time, "time", lambda: clock[0])

    async def step_the_clock() -> None:
        await anyio.sleep(0.05)
        clock[0] = 5000.0  # NTP, or a VM resumed: the slot (at 2000) is now past

    with anyio.fail_after(10):  # the slot was 1000 s away when the wait began
        async with anyio.create_task_group() as tg:
            tg.start_soon(step_the_clock)
            await schedule._sleep_until(2000.0)
    assert clock[0] == 5000.0


# -- the run log's writer task ------------------------------------------------------------

def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if not t.done()}


async def test_an_error_in_the_run_log_body_is_raised_as_itself_and_leaves_no_task(
        tmp_path: Path) -> None:
    before = _tasks()
    path = tmp_path / "logs" / "run.log"
    log = RunLog(path)
    writers: list[int] = []

    async def body() -> None:
        async with log:
            log.write("engine", "first line\nsecond line")
            writers.append(len(_tasks() - before))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await body()
    assert writers == [1]  # the writer task, held by the log's task group
    assert _tasks() - before == set()
    assert log._file is not None and log._file.closed
    text = path.read_text()
    assert "[engine] first line" in text and "[engine] second line" in text


async def test_a_cancelled_run_log_body_still_flushes_and_closes(tmp_path: Path) -> None:
    before = _tasks()
    path = tmp_path / "run.log"
    with anyio.move_on_after(0.05) as scope:
        async with RunLog(path) as log:
            log.write("engine", "started")
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert _tasks() - before == set()
    assert log._file is not None and log._file.closed
    assert "[engine] started" in path.read_text()


async def test_a_run_log_file_that_cannot_be_written_does_not_fail_the_run() -> None:
    full = Path("/dev/full")  # every write fails with ENOSPC (Linux)
    before = _tasks()
    async with RunLog(full) as log:
        log.write("engine", "one")
        await wait_for(lambda: log.write_error, message="the write error noticed")
        log.write("engine", "two")
    assert "No space left" in log.write_error or "ENOSPC" in log.write_error
    assert any("log file not written" in line for line in log.tail())
    assert log.tail()[-1].endswith("[engine] two")  # the tail keeps every line
    assert _tasks() - before == set()


async def test_a_run_log_is_entered_once(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "a.log")
    async with log:
        with pytest.raises(RuntimeError, match="entered once"):
            await log.__aenter__()
