"""``shipyard status`` (the health rollup, for people and for cron jobs and CI) and
``shipyard alerts test`` (a test alert through the real delivery path)."""

from __future__ import annotations

import click
from rich.text import Text

from nodes.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    call,
    check_names,
    err,
    json_option,
    nats_option,
    out,
    print_json,
    run,
    styled,
    table,
    whoami,
)
from protocol.deploy import ERROR, HEALTHY
from protocol.errors import Timeout, Unavailable
from protocol.health import (
    AlertTested,
    GetHealth,
    HealthReport,
    InfraHealth,
    SendTestAlert,
)


def _health(value: str) -> Text:
    return styled(value)


def _reasons(reasons: list[str]) -> str:
    return "\n".join(reasons) if reasons else "-"


def has_error(report: HealthReport) -> bool:
    """Whether anything in ``report`` is ERROR (what makes ``status`` exit 1)."""
    return any(i.health == ERROR for i in report.infras) or report.health == ERROR


def _infra_reasons(infra: InfraHealth) -> str:
    """Its nodes' reasons, and one line per deployment that is not HEALTHY (whose own
    reasons are in the deployments table below)."""
    lines = [r for n in infra.nodes for r in n.reasons] if infra.nodes else infra.reasons[:1]
    lines += [f"{d.kind} {d.name} is {d.health}" for d in infra.deployments
              if d.health != HEALTHY]
    return _reasons(lines)


def render(report: HealthReport) -> None:
    out.print(Text.assemble("fleet: ", _health(report.health)))
    if not report.infras:
        out.print("no infrastructure and no node yet (see: shipyard infra create)")
        return
    table(["INFRA", "KIND", "STAGE", "HEALTH", "NODES", "REASONS"],
          [(i.name, i.kind or "-", i.stage or "-", _health(i.health),
            f"{sum(n.status == 'online' for n in i.nodes)}/{len(i.nodes)} online",
            _infra_reasons(i))
           for i in report.infras])
    deployments = report.deployments()
    if deployments:
        out.print()
        table(["KIND", "NAME", "INFRA", "DESIRED", "STATE", "HEALTH", "REASONS"],
              [(d.kind, d.name, d.infra, d.desired, d.state, _health(d.health),
                _reasons(d.reasons)) for d in deployments])


@click.command("status")
@click.option("--infra", default=None, help="Only this infrastructure.")
@nats_option
@json_option
def status_cmd(infra: str | None, nats_url: str | None, as_json: bool) -> None:
    """Health of every infrastructure, its nodes and deployments, with reasons.

    Exit code 1 when anything is ERROR (for cron jobs and CI), 0 otherwise (HEALTHY,
    WARNING or UNKNOWN), 2 on a usage error or when NATS or the Deployer cannot be
    reached (health is then not known, which is no ERROR of the fleet's).
    """
    check_names(infra=infra)
    try:
        report: HealthReport = run(call, nats_url, GetHealth(infra=infra))
    except (Timeout, Unavailable) as exc:
        err.print(f"shipyard: health unknown: {exc.message} (the Deployer judges health: "
                  "is it running? shipyard up, or shipyard node start deployer)",
                  markup=False)
        raise SystemExit(EXIT_USAGE) from None
    if as_json:
        print_json(report)
    else:
        render(report)
    if has_error(report):
        raise SystemExit(EXIT_FAILED)


@click.group("alerts")
def alerts() -> None:
    """Alerts sent to the webhooks of an infrastructure (see: infra set --webhook)."""


@alerts.command("test")
@click.argument("infra")
@nats_option
@json_option
def alerts_test(infra: str, nats_url: str | None, as_json: bool) -> None:
    """Send a test alert to every webhook of INFRA; exit 1 if any was not delivered."""
    check_names(infra=infra)
    reply: AlertTested = run(call, nats_url, SendTestAlert(infra=infra, by=whoami()), 30.0)
    if as_json:
        print_json(reply)
    else:
        out.print(f"test alert {reply.alert_id} for infra {reply.infra}:")
        table(["WEBHOOK", "DELIVERED", "ATTEMPTS", "STATUS", "ERROR"],
              [(r.url, styled("yes", "green") if r.delivered else styled("no", "red"),
                r.attempts, r.status if r.status is not None else "-", r.error or "-")
               for r in reply.results])
    if not all(r.delivered for r in reply.results):
        raise SystemExit(EXIT_FAILED)
