"""``shipyard nodes``, ``shipyard node forget`` and ``shipyard events``."""

from __future__ import annotations

import contextlib
import datetime as dt

import click

from nodes.cli.common import (
    call,
    check_names,
    connected,
    human_age,
    json_option,
    nats_option,
    out,
    parse_duration,
    print_json,
    print_json_line,
    run,
    styled,
    table,
    to_builtins,
    whoami,
)
from nodes.runtime.events import StoredEvent, read_events
from protocol.registry import ONLINE, ForgetNode, ForgottenNode, ListNodes, NodeInfo, NodeList


@click.command("nodes")
@click.option("--role", help="Only nodes of this role.")
@click.option("--infra", help="Only nodes in this infrastructure.")
@nats_option
@json_option
def nodes_cmd(role: str | None, infra: str | None, nats_url: str | None, as_json: bool) -> None:
    """The node registry: every node the Deployer knows, online or lost."""
    check_names(role=role, infra=infra)
    reply: NodeList = run(call, nats_url, ListNodes(role=role, infra=infra))
    if as_json:
        print_json([
            {"name": n.name, "role": n.role, "infra": n.infra, "status": n.status,
             "last_seen_s": n.last_seen_s, "version": n.version, "host": n.host, "pid": n.pid,
             "uptime_s": n.uptime_s, "interval_s": n.interval_s, "last_seen": n.last_seen,
             "first_seen": n.first_seen, "dropped": n.dropped, "lease": _lease(n),
             "state": n.state}
            for n in reply.nodes])
        return
    if not reply.nodes:
        out.print("no nodes have sent a heartbeat yet")
        return
    rows = []
    for n in reply.nodes:
        rows.append((n.name, n.role, n.infra, styled(n.status), _lease(n),
                     f"{human_age(n.last_seen_s)} ago", n.version, n.host, n.pid))
    table(["NAME", "ROLE", "INFRA", "STATUS", "LEASE", "LAST SEEN", "VERSION", "HOST", "PID"],
          rows)


def _lease(n: NodeInfo) -> str:
    """active or standby, for an online instance of a role with one active instance."""
    lease = getattr(n.state, "lease", "")
    return lease if n.status == ONLINE and isinstance(lease, str) else ""


@click.command("forget")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Forget the node even if it is online (it comes back with its next "
                   "heartbeat).")
@nats_option
@json_option
def node_forget(name: str, force: bool, nats_url: str | None, as_json: bool) -> None:
    """Remove node NAME from the registry and its stored record (a node that is gone for
    good).  Lost nodes are also forgotten by the Deployer after --forget-after."""
    check_names(node=name)
    reply: ForgottenNode = run(call, nats_url, ForgetNode(name=name, force=force,
                                                            by=whoami()))
    if as_json:
        print_json(to_builtins(reply.node))
        return
    n = reply.node
    out.print(f"forgot node {n.name} ({n.role}, infra {n.infra}, was {n.status})",
              markup=False)


def _line(e: StoredEvent) -> str:
    if e.event is None:
        d = e.as_dict()
        ts = d.get("ts")
        kind = d.get("type", "?")
        text = f"(unknown event) {d}"
    else:
        ts = e.event.ts
        kind = e.event.__struct_config__.tag
        text = e.event.summary()
    when = (dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            if isinstance(ts, int | float) else "?")
    return f"{when}  {kind:<18} {text}"


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they arrive.")
@click.option("--since", metavar="DURATION", help="Only events newer than this (30s, 15m, 2h, 1d).")
@click.option("--last", type=click.IntRange(min=1), default=None,
              help="Only the last N events (default 100 when --since is not given).")
@nats_option
@json_option
def events_cmd(follow: bool, since: str | None, last: int | None, nats_url: str | None,
               as_json: bool) -> None:
    """Print the event stream: one line per event, or JSON lines with --json."""
    since_s = parse_duration(since) if since else None
    if since_s is None and last is None:
        last = 100

    async def main() -> None:
        async with connected(nats_url) as nc:
            async for e in read_events(nc, since_s=since_s, last=last, follow=follow):
                if as_json:
                    print_json_line(e.as_dict())
                else:
                    out.print(_line(e))

    with contextlib.suppress(KeyboardInterrupt):  # the normal way to end --follow
        run(main)
