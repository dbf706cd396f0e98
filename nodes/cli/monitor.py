"""``shipyard monitor``: the fleet, deployments, API traffic, runs and events, live.

The view feeds itself from two sources, so neither a Deployer restart nor a NATS outage
stops it:

* live subscriptions (heartbeats ``sy.hb.>``, API metrics and exit reports
  ``sy.rpt.metrics.*``/``sy.rpt.exit.*``, events ``sy.evt.>``): plain subscriptions,
  which nats-py re-sends after a reconnect;
* the Deployer, asked every ``--poll`` seconds for lost nodes (online ones are known
  from their beats), deployments (desired state, health and reasons) and recent runs,
  each request with a timeout; a failed round is shown in the header and the last
  answers stay on screen until the next one succeeds.

On a terminal it redraws twice a second with rich's ``Live`` on the alternate
screen (whole frames, no flicker); piped, it prints a plain-text snapshot every
``--interval`` seconds (or one, ``--once``), or JSON (``--json``).  What is shown is
decided in ``nodes.cli.monitor_model`` (pure, testable without a terminal); this module
wires it to NATS and draws it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import click
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from nodes.cli.common import (
    CLI_CONNECT_TIMEOUT,
    STATUS_STYLE,
    FloatRange,
    check_names,
    human_age,
    human_size,
    nats_option,
    out,
    print_json,
    print_json_line,
    run,
    settings_for,
)
from nodes.cli.monitor_model import (
    ASKING,
    TRAFFIC_WINDOW_S,
    BadFilter,
    Filter,
    MonitorModel,
    Snapshot,
)
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.events import StoredEvent, read_events
from protocol import subjects
from protocol.api import METRICS_REPORT, ApiMetricsReport
from protocol.deploy import ListDeployments
from protocol.errors import DecodeError, OperationError, TooLarge
from protocol.heartbeat import HEARTBEAT
from protocol.registry import LOST, ListNodes
from protocol.reports import REPORT
from protocol.scenarios import ListRuns
from protocol.stream import EVENT, describe_unknown

REFRESH_PER_S = 2  # terminal redraws per second (a frame of 5,000 nodes: ~60 ms here)
HISTORY_EVENTS = 30  # events shown from the stream's history when the view opens
FILTERED_HISTORY_EVENTS = 2_000  # read back through, with a filter, to find them
RUNS_PER_PROJECT = 10
TERMINAL_NODE_ROWS = 20  # nodes listed on a terminal (lost first); the rest are counted
TERMINAL_EVENT_ROWS = 10


class Feed:
    """The live half: subscriptions that hand decoded, validated messages to the model.

    A malformed message is counted in ``dropped`` and skipped; nothing here can raise
    out of a callback."""

    def __init__(self, nc: NATS, model: MonitorModel) -> None:
        self.nc = nc
        self.model = model
        self.dropped = 0

    async def start(self) -> None:
        await self.nc.subscribe(subjects.HEARTBEATS_ALL, cb=self._on_heartbeat,
                                pending_msgs_limit=200_000)
        await self.nc.subscribe(subjects.reports("metrics"), cb=self._on_metrics)
        await self.nc.subscribe(subjects.reports("exit"), cb=self._on_exit)
        await self.nc.subscribe(subjects.EVENTS_ALL, cb=self._on_event)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = HEARTBEAT.decode(msg.data, msg.subject)
            hb.validate(msg.subject)
        except Exception:
            self.dropped += 1
            return
        self.model.on_heartbeat(hb)

    async def _on_metrics(self, msg: Msg) -> None:
        try:
            report = METRICS_REPORT.decode(msg.data, msg.subject)
            report.validate(msg.subject)
        except Exception:
            self.dropped += 1
            return
        if isinstance(report, ApiMetricsReport):
            self.model.on_metrics(report)

    async def _on_exit(self, msg: Msg) -> None:
        try:
            report = REPORT.decode(msg.data, msg.subject)
            report.validate(msg.subject)
        except Exception:
            self.dropped += 1
            return
        self.model.on_exit(report.node, report.pid)

    async def _on_event(self, msg: Msg) -> None:
        try:
            self.model.on_event(EVENT.decode(msg.data, msg.subject))
        except DecodeError:
            _unknown(self.model, msg.data)
        except Exception:
            self.dropped += 1

    async def history(self, last: int = HISTORY_EVENTS, timeout: float = 3.0) -> None:
        """The last ``last`` events already stored that pass the filter, so the tail is
        not empty when the view opens (with a filter, up to ``FILTERED_HISTORY_EVENTS``
        are read to find them: other infras' events may be all the latest ones)."""
        kept: deque[StoredEvent] = deque(maxlen=last)
        read = FILTERED_HISTORY_EVENTS if self.model.filter.narrows else last
        with anyio.move_on_after(timeout), contextlib.suppress(Exception):
            async for stored in read_events(self.nc, last=max(read, last)):
                if stored.event is None or self.model.admits_event(stored.event):
                    kept.append(stored)
        for stored in kept:
            if stored.event is not None:
                self.model.on_event(stored.event)
            else:
                _unknown(self.model, stored.raw)


def _unknown(model: MonitorModel, raw: bytes) -> None:
    body = describe_unknown(raw)
    ts = body.get("ts")
    model.on_unknown_event(ts if isinstance(ts, int | float) else 0.0,
                           str(body.get("type", "?")), f"(unknown event) {body}")


async def poll_deployer(caller: Caller, model: MonitorModel, timeout: float, *,
                        everyone: bool = False) -> bool:
    """One round of questions to the Deployer (about every node with ``everyone``, else
    the lost ones): whether it answered; never raises (the header says why not)."""
    f = model.filter
    try:
        try:
            nodes = await caller.call(ListNodes(role=f.role, infra=f.infra,
                                                status=None if everyone else LOST),
                                      timeout=timeout)
        except TooLarge:
            if not everyone:
                raise
            # A fleet too large for one reply (thousands of nodes): the lost ones, and
            # the online ones from their beats, as in every later round.
            everyone = False
            nodes = await caller.call(ListNodes(role=f.role, infra=f.infra, status=LOST),
                                      timeout=timeout)
        model.on_nodes(nodes.nodes, everyone=everyone)
        deps = await caller.call(ListDeployments(project=f.project, infra=f.infra),
                                 timeout=timeout)
        model.on_deployments(deps.deployments)
        for project, infra in sorted({(v.project, v.infra) for v in deps.deployments
                                      if v.kind == "bundle"}):
            runs = await caller.call(ListRuns(project=project, infra=infra,
                                              limit=RUNS_PER_PROJECT), timeout=timeout)
            model.on_runs(runs.runs)
        model.deployer_ok()
        return True
    except OperationError as exc:
        model.deployer_failed(exc.message)
    except Exception as exc:
        model.deployer_failed(str(exc) or type(exc).__name__)
    return False


async def watch(nats_url: str | None, model: MonitorModel, *, poll_s: float,
                timeout: float, show: Callable[[MonitorModel], Any],
                every_s: float, once: bool, settle: bool = False) -> None:
    """Connect, feed ``model``, and call ``show(model)`` every ``every_s`` seconds (once
    after the first Deployer round and one interval, with ``once``; from the first
    Deployer round on, with ``settle``: a pipe gets no half-empty first snapshot)."""

    async def down() -> None:
        model.nats = "disconnected: reconnecting"

    async def up() -> None:
        model.nats = "connected"

    nc = await connect(settings_for(nats_url), name="shipyard-monitor",
                       on_disconnect=down, on_reconnect=up,
                       first_connect_timeout=CLI_CONNECT_TIMEOUT)
    model.nats = "connected"
    try:
        feed = Feed(nc, model)
        await feed.start()
        caller = Caller(nc, sender="cli")
        first = anyio.Event()

        async def poller() -> None:
            whole = False  # every node listed once (later rounds: the lost ones)
            while True:
                whole = await poll_deployer(caller, model, timeout, everyone=not whole) \
                    or whole
                first.set()
                await anyio.sleep(poll_s)

        async with anyio.create_task_group() as tg:
            tg.start_soon(poller)
            tg.start_soon(feed.history)
            if once:
                await first.wait()
                await anyio.sleep(every_s)
                show(model)
                tg.cancel_scope.cancel()
                return
            if settle:
                await first.wait()
            while True:
                show(model)
                await anyio.sleep(every_s)
    finally:
        with anyio.move_on_after(2, shield=True), contextlib.suppress(Exception):
            await nc.close()


# -- drawing -----------------------------------------------------------------------------

def _style(word: str) -> Text:
    return Text(word, style=STATUS_STYLE.get(word, ""))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", box=None,
              header_style="bold", pad_edge=False, expand=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _cell(v: Any) -> Text:
    return v if isinstance(v, Text) else Text("-" if v is None else str(v))


def render(s: Snapshot, *, node_rows: int | None = None,
           event_rows: int | None = None) -> RenderableType:
    """The whole view: header, nodes, deployments, traffic, runs, events.  ``node_rows``
    and ``event_rows`` cap those panels (a terminal has a height; a pipe does not)."""
    when = dt.datetime.fromtimestamp(s.at, dt.UTC).strftime("%H:%M:%S")
    deployer = s.deployer if s.deployer in ("ok", ASKING) else f"unreachable ({s.deployer})"
    colour = {"ok": "green", ASKING: "yellow"}.get(s.deployer, "red")
    age = "" if s.deployer_age_s is None else f", answered {human_age(s.deployer_age_s)} ago"
    lag = "" if s.feed_lag_p50_ms is None else \
        f"  feed lag p50 {s.feed_lag_p50_ms:g} ms p99 {_ms(s.feed_lag_p99_ms)} ms"
    header = Text.assemble(("shipyard monitor", "bold"), f"  {when}Z  filter {s.filter}  nats ",
                           (s.nats, "green" if s.nats == "connected" else "red"),
                           "  deployer ", (deployer, colour),
                           age, lag)

    online = sum(1 for n in s.nodes if n.status == "online")
    nodes = _table(f"nodes ({online}/{len(s.nodes)} online)",
                   ["NAME", "ROLE", "INFRA", "STATUS", "BEAT", "CPU", "MEM", "VERSION", "HOST"])
    shown = sorted(s.nodes, key=lambda n: (n.status == "online", n.role, n.name))
    for n in shown[:node_rows] if node_rows is not None else shown:
        nodes.add_row(*map(_cell, (
            n.name, n.role, n.infra, _style(n.status),
            None if n.age_s is None else f"{human_age(n.age_s)} ago",
            None if n.cpu_pct is None else f"{n.cpu_pct:.1f}%",
            None if n.rss_bytes is None else human_size(n.rss_bytes), n.version, n.host)))
    if node_rows is not None and len(shown) > node_rows:
        nodes.add_row(Text(f"... and {len(shown) - node_rows} more", style="dim"))

    deps = _table("deployments", ["KIND", "NAME", "INFRA", "DESIRED", "ACTUAL", "STATE",
                                  "HEALTH", "REASONS"])
    for d in s.deployments:
        deps.add_row(*map(_cell, (d.kind, d.name, d.infra, d.desired, d.actual,
                                  _style(d.state), _style(d.health), "; ".join(d.reasons))))

    traffic = _table(f"API traffic (last {TRAFFIC_WINDOW_S:g}s)",
                     ["SERVICE", "GENERATION", "INFRA", "REQ/S", "P50 MS", "P99 MS",
                      "ERRORS", "NODES"])
    for r in s.traffic:
        err_rate = None if r.error_rate is None else f"{100 * r.error_rate:.1f}%"
        traffic.add_row(*map(_cell, (r.service, r.generation, r.infra, f"{r.rps:g}",
                                     _ms(r.p50_ms), _ms(r.p99_ms), err_rate, r.nodes)))

    runs = _table("scenario runs", ["PROJECT", "SCENARIO", "INFRA", "RUNNING", "LAST",
                                    "FINISHED", "SECONDS", "ERROR"])
    for g in s.runs:
        finished = None if g.last_finished_at is None else \
            dt.datetime.fromtimestamp(g.last_finished_at, dt.UTC).strftime("%H:%M:%SZ")
        runs.add_row(*map(_cell, (
            g.project, g.scenario, g.infra, ", ".join(g.running) or None,
            None if g.last_outcome is None else _style(g.last_outcome), finished,
            None if g.last_duration_s is None else f"{g.last_duration_s:.1f}",
            g.last_error or None)))

    events = _table("events", ["TIME", "KIND", "WHAT"])
    tail = s.events[-event_rows:] if event_rows is not None else s.events
    for e in tail:
        stamp = dt.datetime.fromtimestamp(e.ts, dt.UTC).strftime("%H:%M:%S") if e.ts else "?"
        events.add_row(*map(_cell, (stamp, e.kind, e.text)))

    return Group(header, Text(), nodes, Text(), deps, Text(), traffic, Text(), runs, Text(),
                 events)


def plain_text(s: Snapshot, width: int = 200) -> str:
    """A snapshot as plain text (no colours, no escape codes): what a pipe gets."""
    console = Console(width=width, no_color=True, force_terminal=False, highlight=False,
                      markup=False, file=io.StringIO())
    console.print(render(s))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    return str(text).rstrip("\n")


@click.command("monitor")
@click.option("--filter", "filter_text", metavar="KEY=VALUE[,...]", default=None,
              help="Narrow the view: infra=NAME, project=NAME (also an API service), "
                   "role=NAME, comma separated.")
@click.option("--interval", type=FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between snapshots when output is piped or --json.")
@click.option("--poll", "poll_s", type=FloatRange(min=0.2), default=2.0,
              show_default=True, help="Seconds between questions to the Deployer.")
@click.option("--timeout", type=FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds each question to the Deployer may take.")
@click.option("--once", is_flag=True,
              help="Print one snapshot (after one Deployer round and one interval) and "
                   "exit.")
@nats_option
@click.option("--json", "as_json", is_flag=True,
              help="Print snapshots as JSON (one per line; one document with --once).")
def monitor_cmd(filter_text: str | None, interval: float, poll_s: float, timeout: float,
                once: bool, nats_url: str | None, as_json: bool) -> None:
    """A live view of the fleet: nodes, deployments and their health, API traffic per
    service and generation, scenario runs and the event stream.  Redraws on a terminal;
    piped, prints a plain-text snapshot every --interval seconds."""
    try:
        model = MonitorModel(filter=Filter.parse(filter_text))
    except BadFilter as exc:
        raise click.BadParameter(str(exc), param_hint="--filter") from None
    check_names(infra=model.filter.infra, project=model.filter.project,
                role=model.filter.role)
    live = sys.stdout.isatty() and not as_json and not once

    def show_json(m: MonitorModel) -> None:
        (print_json if once else print_json_line)(m.snapshot())

    def show_text(m: MonitorModel) -> None:
        sys.stdout.write(plain_text(m.snapshot()) + "\n")
        sys.stdout.flush()

    if not live:
        try:
            with contextlib.suppress(KeyboardInterrupt):
                run(lambda: watch(nats_url, model, poll_s=poll_s, timeout=timeout,
                                  show=show_json if as_json else show_text,
                                  every_s=interval, once=once, settle=True))
        except* BrokenPipeError:
            out.on_broken_pipe()  # the reader left (| head): quiet, as rich's listings
        return

    with Live(console=out, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as screen:
        def draw(m: MonitorModel) -> None:
            rows = max(3, out.size.height // 4)
            screen.update(render(m.snapshot(), node_rows=min(TERMINAL_NODE_ROWS, rows),
                                 event_rows=TERMINAL_EVENT_ROWS), refresh=True)

        with contextlib.suppress(KeyboardInterrupt):
            run(lambda: watch(nats_url, model, poll_s=poll_s, timeout=timeout, show=draw,
                              every_s=1 / REFRESH_PER_S, once=False))
