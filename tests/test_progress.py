"""Progress bars: drawn on a terminal, absent from piped output."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from nodes.cli.progress import Bar
from tests.helpers import shipyard
from tests.projects import make_flow_project

# What a bar leaves in output: carriage returns, escape codes, bar glyphs, spinner dots.
NOISE = ("\r", "\x1b[", "━", "⠋", "⠙")


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


def test_piped_bundle_deploy_and_run_output_has_no_progress_noise(
        cluster: dict[str, str], tmp_path: Path) -> None:
    env, ws = cluster, tmp_path / "ws"
    make_flow_project(ws)
    shipyard("infra", "create", "prod", "--kind", "automation", env=env, check=True)
    results = [
        shipyard("bundle", "create", "flows", "--id", "v1", env=env, check=True),
        shipyard("deploy", "bundle", "flows", "v1", "--infra", "prod", "--wait", env=env,
                 timeout=60, check=True),
        shipyard("scenario", "run", "flows", "nightly", "--infra", "prod", "--wait",
                 env=env, timeout=60, check=True),
    ]
    assert "bundle flows v1 created" in results[0].stdout
    assert "step 1" in results[2].stdout  # the run's steps are still printed, as lines
    for r in results:
        for noise in NOISE:
            assert noise not in r.stdout and noise not in r.stderr, (noise, r.args)
