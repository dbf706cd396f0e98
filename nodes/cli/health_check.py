"""``shipyard node health``: a liveness check for one node, for supervisors and probes.

``node health ROLE --name NAME`` exits 0 once a valid heartbeat of that node arrives and 1
if none arrives within ``--within`` seconds.  A heartbeat proves what a supervisor wants
to know of a node that serves no HTTP (Deployer, Govern, Design, Automation): its process
runs, its event loop turns and its NATS connection works.  Heartbeats are core NATS
messages, not stored, so the check listens for the next one; at the default 2 s interval
the default ``--within 10`` covers four missed beats (a node counts as lost after three).
Kubernetes exec probes and monitoring scripts run it; ``--name`` defaults to
``$SHIPYARD_NODE_NAME`` so a probe needs no shell to expand the pod's name.

The identity it connects as must be allowed to read heartbeats: any human identity is (a
``viewer`` is enough); a node identity is not (it publishes its own heartbeats and reads
no one's), and is refused before connecting rather than waiting out ``--within``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import click
import msgspec
from nats.aio.msg import Msg

from nodes.auth.keys import CredentialsError, is_shipyard_credentials, read_credentials
from nodes.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliState,
    FloatRange,
    check_names,
    connected,
    err,
    identity_file,
    json_option,
    nats_option,
    out,
    print_json,
)
from nodes.roles import ROLE_NAMES
from protocol import subjects
from protocol.errors import ProtocolError
from protocol.heartbeat import HEARTBEAT, Heartbeat


@click.command("health")
@click.argument("role", type=click.Choice(sorted(ROLE_NAMES)))
@click.option("--name", envvar="SHIPYARD_NODE_NAME", required=True,
              help="The node's name. [default: $SHIPYARD_NODE_NAME]")
@click.option("--within", type=FloatRange(min=0.1, max=600.0), default=10.0,
              show_default=True, help="Seconds to wait for a heartbeat.")
@nats_option
@json_option
def node_health(role: str, name: str, within: float, nats_url: str | None,
                as_json: bool) -> None:
    """Exit 0 when node NAME of ROLE sends a heartbeat within --within seconds, else 1.

    Connects as the CLI's identity (--identity, $SHIPYARD_IDENTITY, ...), which must be a
    human identity (a viewer is enough): node identities may not read heartbeats.
    """
    check_names(node=name)
    _refuse_node_identity()
    beat = anyio.run(_next_heartbeat, nats_url, role, name, within)
    if beat is None:
        err.print(f"shipyard: no heartbeat from {role} node {name!r} within {within:g}s")
        sys.exit(EXIT_FAILED)
    if as_json:
        print_json({"node": beat.node, "role": beat.role, "infra": beat.infra,
                    "host": beat.host, "pid": beat.pid, "version": beat.version,
                    "seq": beat.seq, "uptime_s": beat.uptime_s,
                    "interval_s": beat.interval_s})
    else:
        out.print(f"{role} node {name} alive: host {beat.host}, pid {beat.pid}, up "
                  f"{beat.uptime_s:.0f}s, heartbeat every {beat.interval_s:g}s")
    sys.exit(EXIT_OK)


def _refuse_node_identity() -> None:
    path = identity_file(_cli_identity())
    if not path or not Path(path).is_file() or not is_shipyard_credentials(path):
        return  # no credentials, or a NATS .creds file: the server decides
    try:
        identity = read_credentials(path)
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint="--identity") from None
    if identity.kind == "node":
        err.print(f"shipyard: {path} is node {identity.name!r}'s identity, which may not "
                  "read heartbeats; check as a human identity, e.g. a viewer made with "
                  "'shipyard auth user add probe --role viewer', passed with --identity "
                  "or $SHIPYARD_IDENTITY")
        sys.exit(EXIT_USAGE)


def _cli_identity() -> str | None:
    ctx = click.get_current_context(silent=True)
    state = ctx.find_object(CliState) if ctx is not None else None
    return state.identity if state is not None else None


async def _next_heartbeat(nats_url: str | None, role: str, name: str,
                          within: float) -> Heartbeat | None:
    """The first heartbeat of ``role``/``name`` that decodes and validates, or None."""
    got: list[Heartbeat] = []
    arrived = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        try:
            beat = HEARTBEAT.decode(msg.data)
            beat.validate(msg.subject)
        except (msgspec.DecodeError, msgspec.ValidationError, ProtocolError, ValueError):
            return  # not a heartbeat this node would be registered by: keep waiting
        got.append(beat)
        arrived.set()

    async with connected(nats_url) as nc:
        await nc.subscribe(subjects.heartbeat(role, name), cb=on_beat)
        with anyio.move_on_after(within):
            await arrived.wait()
    return got[0] if got else None
