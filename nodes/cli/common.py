"""What every command shares: finding NATS, running async code, output, exit codes.

Exit codes: 0 success, 1 the operation failed, 2 usage error or NATS unreachable.
Expected errors print one line on stderr and never a traceback.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import msgspec
from nats.aio.client import Client as NATS
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nodes.auth.store import admin_credentials
from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.settings import DEFAULT_HOME, NatsSettings, read_stack_file, resolve
from protocol import subjects
from protocol.api import check_version
from protocol.bundles import check_bundle_id
from protocol.progress import CommandProgress

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# The CLI fails within 5 s when NATS is unreachable.
CLI_CONNECT_TIMEOUT = 3.0

# Off a terminal (pipes, files, CI logs) tables are not squeezed into 80 columns and
# nothing is styled.  Markup is off everywhere: names, notes and errors may hold "[" and are
# printed as they are; a styled part is a ``Text`` (see ``styled``), which rich renders
# with colours on a terminal and as plain characters off one.
out = Console(highlight=False, markup=False, soft_wrap=True,
              width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True,
              width=None if sys.stderr.isatty() else 200)

STATUS_STYLE = {"online": "green", "lost": "red", "HEALTHY": "green", "WARNING": "yellow",
                "ERROR": "red", "UNKNOWN": "dim", "SUCCESS": "green", "FAILED": "red",
                "CANCELLED": "magenta", "RUNNING": "cyan"}


def styled(text: str, style: str | None = None) -> Text:
    """``text`` in ``style`` (default: the colour ``STATUS_STYLE`` gives a status word)."""
    return Text(text, style=style if style is not None else STATUS_STYLE.get(text, ""))


class CliState:
    """Values the top-level group collects (``--nats``, ``--identity``) for sub-commands."""

    def __init__(self, nats_url: str | None = None, identity: str | None = None) -> None:
        self.nats_url = nats_url
        self.identity = identity


def nats_option(fn: F) -> F:
    """``--nats URL`` on a sub-command (it also works before the sub-command)."""
    return click.option(
        "--nats", "nats_url", metavar="URL", default=None,
        help="NATS server URL(s), comma separated. Default: $SHIPYARD_NATS_URL, then "
             "./.shipyard/stack.json, then nats://127.0.0.1:4222.")(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of a table.")(fn)


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` (which passes every comparison, so a
    range alone lets it through): a usage error, like any value out of range."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if rv != rv:
            self.fail(f"{value!r} is not a number", param, ctx)
        return rv


def _token(what: str) -> Callable[[str], str]:
    return lambda value: subjects.token(value, what)


# The rule each kind of name a command carries must meet (the same the nodes apply).
NAME_RULES: dict[str, Callable[[str], str]] = {
    "project": _token("project"), "service": _token("service"), "infra": _token("infra"),
    "role": _token("role"), "node": _token("node name"), "scenario": _token("scenario"),
    "dataset": _token("dataset"), "run": _token("run id"), "key": _token("key id"),
    "bundle": check_bundle_id, "version": check_version,
    "identity": _token("identity name"),
}


def check_names(**names: str | Sequence[str] | None) -> None:
    """Refuse a malformed name before anything is sent.

    Keywords are kinds of ``NAME_RULES`` (``project="he*"``); ``None`` is skipped, a
    sequence checks each item.  Raises ``BadName``: a ``bad_request`` like the one a node
    answers, so the command exits 1 with the rule that was broken.
    """
    for kind, value in names.items():
        rule = NAME_RULES[kind]
        for item in ([] if value is None else [value] if isinstance(value, str) else value):
            rule(item)


def identity_file(explicit: str | None = None) -> str | None:
    """The credentials file the CLI acts as: ``--identity``, ``SHIPYARD_IDENTITY``,
    ``SHIPYARD_NATS_CREDS``, then the stack home's admin (``stack.json``'s
    ``credentials``, else ``HOME/auth/creds/admin.creds``) if there is one.  The same
    file opens the NATS connection and signs every command sent on it."""
    if explicit:
        return explicit
    for var in ("SHIPYARD_IDENTITY", "SHIPYARD_NATS_CREDS"):
        if os.environ.get(var):
            return os.environ[var]
    home = Path(os.environ.get("SHIPYARD_HOME") or DEFAULT_HOME)
    stack = read_stack_file(home) or {}
    if isinstance(stack.get("credentials"), str):
        return str(stack["credentials"])
    admin = admin_credentials(home)
    return str(admin) if admin.is_file() else None


def settings_for(nats_url: str | None) -> NatsSettings:
    ctx = click.get_current_context(silent=True)
    identity = None
    if ctx is not None:
        state = ctx.find_object(CliState)
        if state is not None:
            nats_url = nats_url if nats_url is not None else state.nats_url
            identity = state.identity
    return resolve(nats_url, creds=identity_file(identity))


@asynccontextmanager
async def connected(nats_url: str | None) -> AsyncIterator[NATS]:
    settings = settings_for(nats_url)
    nc = await connect(settings, name="shipyard-cli", first_connect_timeout=CLI_CONNECT_TIMEOUT)
    try:
        yield nc
    finally:
        with anyio.move_on_after(2, shield=True):
            await nc.close()


async def call(nats_url: str | None, cmd: Any, timeout: float = 10.0,
               progress: Callable[[CommandProgress], None] | None = None) -> Any:
    """Send ``cmd`` and return its reply; ``progress`` hears the node's progress notices
    (``nodes.cli.progress.Bar.notices``)."""
    async with connected(nats_url) as nc:
        return await Caller(nc, sender="cli").call(cmd, timeout=timeout, on_progress=progress)


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args)


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(to_builtins(value), indent=2, sort_keys=False) + "\n")


def print_json_line(value: Any) -> None:
    sys.stdout.write(json.dumps(to_builtins(value), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
          title: str | None = None) -> None:
    """Cells are shown as they are (names, notes and errors may hold ``[``); pass a rich
    ``Text`` to style one."""
    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(v if isinstance(v, Text) else Text("" if v is None else str(v))
                    for v in r))
    out.print(t)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration: expected e.g. 30s, 15m, 2h, 1d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def human_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def whoami() -> str:
    """Who runs this command, as recorded in bundles, packages, keys and deploys."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def print_changes(previous: str | None, first: str, added: Sequence[str],
                  removed: Sequence[str], changed: Sequence[str]) -> None:
    """What a new bundle or package changed since the previous one, a line per file."""
    if previous is None:
        out.print(first)
        return
    out.print(f"changes since {previous}: {len(added)} added, {len(removed)} removed, "
              f"{len(changed)} changed")
    for sign, paths, style in (("+", added, "green"), ("-", removed, "red"),
                               ("~", changed, "yellow")):
        for p in paths:
            out.print(styled(f"  {sign} {p}", style))


def human_size(n: float) -> str:
    """Bytes in decimal units (``143.1 MB`` is 143,100,000 bytes), as the progress bars
    count them, so a size printed after a bar matches the bar's."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@contextmanager
def spinner(text: str) -> Iterator[None]:
    """A spinner on a terminal while a long operation runs; nothing otherwise."""
    if err.is_terminal:
        with err.status(Text(text)):  # a str would be parsed as markup
            yield
    else:
        yield


def home_option(fn: F) -> F:
    return click.option("--home", type=click.Path(path_type=Path), default=Path(".shipyard"),
                        show_default=True, help="Stack home: NATS store, logs, stack.json.")(fn)
