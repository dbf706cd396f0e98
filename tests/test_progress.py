"""Progress bars: drawn on a terminal, absent from piped output."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from nodes.cli.progress import Bar

# What a bar leaves in output: carriage returns, escape codes, bar glyphs, spinner dots.
# (Piped CLI output is checked for them in tests/test_monitor.py, on its stack.)
PROGRESS_NOISE = ("\r", "\x1b[", "━", "⠋", "⠙")


def test_a_bar_draws_on_a_terminal_and_writes_nothing_off_one() -> None:
    screen = Console(file=io.StringIO(), force_terminal=True, width=100)
    lines = Console(file=io.StringIO(), force_terminal=False, width=100)
    with Bar("storing churn v1", total=2048, bytes_=True, console=screen,
             lines=lines) as b:
        assert b.shown
        b.advance(1024)
        b.note("  step 1 done")
    drawn = screen.file.getvalue()  # type: ignore[attr-defined]
    assert "storing churn v1" in drawn and "step 1 done" in drawn and "\x1b[" in drawn
    assert lines.file.getvalue() == ""  # type: ignore[attr-defined]

    pipe = Console(file=io.StringIO(), force_terminal=False, width=100)
    with Bar("storing churn v1", total=None, console=pipe, lines=lines) as b:
        assert not b.shown
        b.update(description="still storing", completed=3)
        b.advance()
        b.note("  step 1 done")
    assert pipe.file.getvalue() == ""  # type: ignore[attr-defined]
    assert lines.file.getvalue() == "  step 1 done\n"  # type: ignore[attr-defined]


def test_a_bar_follows_a_nodes_stages_in_files_then_bytes_and_ignores_them_off_a_terminal(
        ) -> None:
    from protocol.progress import CommandProgress

    screen = Console(file=io.StringIO(), force_terminal=True, width=120)
    with Bar("packing and storing churn as bundle v2", console=screen) as b:
        show = b.notices("bundle churn v2")
        assert show is not None and b.progress is not None
        [task] = b.progress.tasks
        show(CommandProgress(stage="packing files", done=0, total=None, unit="files"))
        assert (task.description, task.total) == ("bundle churn v2: packing files", None)
        show(CommandProgress(stage="packing files", done=7, total=7, unit="files"))
        b.progress.refresh()
        assert "7/7" in screen.file.getvalue()  # type: ignore[attr-defined]
        show(CommandProgress(stage="storing", done=1 << 20, total=3 << 20, unit="bytes"))
        b.progress.refresh()
        assert (task.completed, task.total) == (1 << 20, 3 << 20)
        assert "1.0/3.1 MB" in screen.file.getvalue()  # type: ignore[attr-defined]
        show(CommandProgress(stage="later", done=0, total=None))
        assert task.total is None  # a stage of unknown length pulses again

    pipe = Console(file=io.StringIO(), force_terminal=False, width=100)
    with Bar("packing and storing churn as bundle v2", console=pipe) as b:
        assert b.notices("bundle churn v2") is None  # nothing to subscribe to them for
    assert pipe.file.getvalue() == ""  # type: ignore[attr-defined]


def test_a_nodes_deploy_bar_keeps_the_fetched_size_when_later_stages_carry_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nodes.cli import waiting
    from protocol.deploy import ActivationReport

    screen = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(waiting, "err", screen)
    bars = waiting._Progress(show=True)

    def report(stage: str, done: int, total: int) -> None:
        bars.report(ActivationReport(node="a1", infra="prod", project="churn", bundle="v2",
                                     update_id="u1", stage=stage, bytes_done=done,
                                     bytes_total=total))
    with bars:
        report("fetching", 4096, 10240)
        report("activated", 0, 0)
        assert bars.bars is not None
        [task] = bars.bars.tasks
        assert (task.completed, task.total) == (10240, 10240)
    assert "10.2/10.2 kB" in screen.file.getvalue()  # type: ignore[attr-defined]


def test_sizes_printed_after_a_bar_use_the_bars_decimal_units() -> None:
    from nodes.cli.common import human_size

    assert [human_size(n) for n in (999, 150_000_000, 10_240, 2.5e9)] == [
        "999 B", "150.0 MB", "10.2 kB", "2.5 GB"]
