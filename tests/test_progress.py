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
