"""``shipyard audit``: the audit ledger, and what was deployed at a given time."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import click
import msgspec

from nodes.cli.common import (
    check_names,
    connected,
    json_option,
    nats_option,
    out,
    parse_duration,
    print_json,
    run,
    styled,
    table,
    to_builtins,
)
from nodes.runtime.audit import deployed_at, read_audit
from protocol.audit import NO_ARGS, OK, AuditEntry, Deployed

_NUMBER = re.compile(r"^\s*\d+(\.\d+)?\s*$")


def parse_time(text: str, *, now: float | None = None) -> float:
    """A point in time, as seconds since the epoch: ISO 8601 (``2026-12-02T01:30:00Z``;
    without an offset, UTC), seconds since the epoch (``1796175000``), or a duration ago
    (``10m``, ``2h``, ``1d``, as ``events --since`` takes)."""
    if _NUMBER.match(text):
        return float(text)
    try:
        return (now if now is not None else time.time()) - parse_duration(text)
    except click.BadParameter:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a time: expected ISO 8601 (2026-12-02T01:30:00Z), seconds "
            "since the epoch (1796175000) or a duration ago (10m, 2h, 1d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _entry_json(seq: int, e: AuditEntry) -> dict[str, Any]:
    d: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(e))  # args as sent
    d["seq"] = seq
    d["time"] = _iso(e.ts)
    return d


def _args_text(e: AuditEntry, width: int = 60) -> str:
    if e.args == NO_ARGS:
        return ""
    text = bytes(e.args).decode(errors="replace")
    return text if len(text) <= width else text[:width - 1] + "…"



@click.group("audit", invoke_without_command=True)
@click.option("--since", metavar="T",
              help="Only entries from T on: ISO 8601, seconds since the epoch, or a "
                   "duration ago (10m, 2h, 1d).")
@click.option("--who", metavar="NAME", help="Only commands sent by (or claimed by) NAME.")
@nats_option
@json_option
@click.pass_context
def audit(ctx: click.Context, since: str | None, who: str | None, nats_url: str | None,
          as_json: bool) -> None:
    """The audit ledger: every command the Deployer and Govern received, accepted or
    refused, with who sent it, its arguments and its outcome.

    A refused command shows the identity it claimed (not verified)."""
    if ctx.invoked_subcommand is not None:
        return
    check_names(identity=who)
    start = parse_time(since) if since else None

    async def main() -> list[tuple[int, AuditEntry]]:
        found: list[tuple[int, AuditEntry]] = []
        async with connected(nats_url) as nc:
            async for seq, entry, _ in read_audit(nc, since=start):
                if entry is not None and (who is None or entry.identity == who):
                    found.append((seq, entry))
        return found

    entries = run(main)
    if as_json:
        print_json([_entry_json(seq, e) for seq, e in entries])
        return
    if not entries:
        out.print("no audit entries" + (" match" if since or who else " yet"))
        return
    rows = []
    for _, e in entries:
        outcome = (styled("ok", "green") if e.outcome == OK
                   else styled(f"{e.error_code}" + (f" ({e.reason})" if e.reason else ""),
                               "red"))
        who_text = (e.identity or "-") + ("" if e.verified or not e.identity else " (claimed)")
        rows.append((_iso(e.ts), who_text, e.command, outcome, _args_text(e)))
    table(["TIME", "WHO", "COMMAND", "OUTCOME", "ARGUMENTS"], rows)


@audit.command("at")
@click.argument("when", metavar="T")
@click.option("--infra", help="Only this infrastructure.")
@nats_option
@json_option
def audit_at(when: str, infra: str | None, nats_url: str | None, as_json: bool) -> None:
    """What was deployed on each infra at time T (ISO 8601, seconds since the epoch, or a
    duration ago): every project's bundle and every API service's mapping, as the
    desired state stood then, with the update that set it."""
    check_names(infra=infra)
    at = parse_time(when)

    async def main() -> list[Deployed]:
        async with connected(nats_url) as nc:
            return await deployed_at(nc, at, infra)

    found = run(main)
    if as_json:
        print_json({"at": at, "time": _iso(at), "deployed": to_builtins(found)})
        return
    if not found:
        out.print(f"nothing was deployed at {_iso(at)}"
                  + (f" on infra {infra}" if infra else ""), markup=False)
        return
    table(["INFRA", "KIND", "NAME", "DEPLOYED", "SINCE", "BY", "ACTION", "RESULT"],
          [(d.infra, d.kind, d.name, d.deployed, _iso(d.since), d.by, d.action,
            styled(d.result)) for d in found], title=f"deployed at {_iso(at)}")
