"""API services on the command line: packages, keys, ``deploy api`` and ``rollback api``."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import click
from nats.aio.msg import Msg
from rich.text import Text

from nodes.cli import progress
from nodes.cli.common import (
    EXIT_FAILED,
    FloatRange,
    call,
    check_names,
    connected,
    err,
    human_size,
    json_option,
    nats_option,
    out,
    print_changes,
    print_json,
    run,
    styled,
    table,
    when,
    whoami,
)
from nodes.cli.projects import env_cell, print_envs, print_package_changes
from nodes.cli.waiting import describe_stage
from nodes.runtime.calls import Caller
from protocol import subjects
from protocol.api import (
    AUTH_MODES,
    GENERATION_REPORT,
    ApiPackageCreated,
    ApiPackageList,
    CreateApiKey,
    CreateApiPackage,
    DeployApi,
    GenerationReport,
    ListApiKeys,
    ListApiPackages,
    RevokeApiKey,
    RollbackApi,
    parse_split,
)
from protocol.capture import parse_redact
from protocol.deploy import FAILED, IN_SYNC, DeploymentView, ListDeployments
from protocol.errors import BadName, DecodeError, OperationError


@click.group()
def api() -> None:
    """API services: package versions, list them, manage API keys."""


@api.command("package")
@click.argument("project")
@click.argument("service")
@click.option("--version", "version", required=True, help="Version (immutable), e.g. v2.")
@click.option("--notes", default="", help="Release notes.")
@click.option("--wheels", is_flag=True, help="Also store every locked wheel in the cluster, "
                                             "so nodes install with no package index.")
@nats_option
@json_option
def api_package(project: str, service: str, version: str, notes: str, wheels: bool,
                nats_url: str | None, as_json: bool) -> None:
    """Package API service SERVICE of PROJECT as an immutable VERSION, with a lock of
    its code environment."""
    check_names(project=project, service=service, version=version)
    cmd = CreateApiPackage(project=project, service=service, version=version, notes=notes,
                           created_by=whoami(), wheels=wheels)
    with progress.bar(f"packaging and storing {service} {version}") as b:
        reply: ApiPackageCreated = run(call, nats_url, cmd, 600.0,
                                       b.notices(f"package {service} {version}"))
    if as_json:
        print_json(reply)
        return
    p = reply.package
    eps = ", ".join(f"{n} ({k})" for n, k in sorted(p.endpoints.items()))
    out.print(Text.assemble("API package ", styled(f"{p.service} {p.version}", "bold"),
                            f" created from {p.project}: {p.files} files, "
                            f"{human_size(p.size)}, digest {p.digest[:16]}"))
    out.print(f"endpoints: {eps}")
    print_changes(reply.previous, "first version of this service", reply.added,
                  reply.removed, reply.changed)
    if p.env is not None:
        print_envs([p.env])
    print_package_changes(reply.packages)


@api.command("versions")
@click.argument("service")
@nats_option
@json_option
def api_versions(service: str, nats_url: str | None, as_json: bool) -> None:
    """Packaged versions of SERVICE, oldest first, with their code environment (--json:
    the locked packages)."""
    check_names(service=service)
    reply: ApiPackageList = run(call, nats_url, ListApiPackages(service=service))
    if as_json:
        print_json(reply.packages)
        return
    if not reply.packages:
        out.print(f"service {service} has no packaged versions yet")
        return
    table(["VERSION", "PROJECT", "CREATED", "BY", "ENDPOINTS", "FILES", "SIZE", "DIGEST",
           "CODE ENV", "NOTES"],
          [(p.version, p.project, when(p.created_at), p.created_by,
            ",".join(sorted(p.endpoints)), p.files, human_size(p.size), p.digest[:12],
            env_cell([p.env] if p.env else []), p.notes)
           for p in reply.packages])


@api.group("key")
def api_key() -> None:
    """API keys: create (shown once), list, revoke."""


@api_key.command("create")
@click.argument("service")
@click.option("--name", default="", help="What the key is for.")
@nats_option
@json_option
def key_create(service: str, name: str, nats_url: str | None, as_json: bool) -> None:
    """Create an API key for SERVICE and print it once (only its hash is stored)."""
    check_names(service=service)
    reply = run(call, nats_url, CreateApiKey(service=service, name=name, by=whoami()))
    if as_json:
        print_json({"service": service, "id": reply.key.id, "key": reply.secret})
        return
    click.echo(reply.secret)
    click.echo(f"API key {reply.key.id} for {service}: shown once, store it now; send it as "
               "'Authorization: Bearer KEY'", err=True)


@api_key.command("list")
@click.argument("service")
@nats_option
@json_option
def key_list(service: str, nats_url: str | None, as_json: bool) -> None:
    """API keys of SERVICE (ids only: the keys themselves are not stored)."""
    check_names(service=service)
    reply = run(call, nats_url, ListApiKeys(service=service))
    if as_json:
        print_json(reply.keys)
        return
    table(["ID", "NAME", "CREATED", "BY"],
          [(k.id, k.name, when(k.created_at), k.created_by) for k in reply.keys])


@api_key.command("revoke")
@click.argument("service")
@click.argument("key_id")
@nats_option
def key_revoke(service: str, key_id: str, nats_url: str | None) -> None:
    """Revoke API key KEY_ID of SERVICE."""
    check_names(service=service, key=key_id)
    run(call, nats_url, RevokeApiKey(service=service, id=key_id, by=whoami()))
    out.print(f"API key {key_id} of {service} revoked")


@click.command("api")
@click.argument("service")
@click.argument("version", required=False)
@click.option("--infra", required=True, help="API infrastructure.")
@click.option("--split", default=None, help="Weights of several versions: v1=90,v2=10.")
@click.option("--shadow", default=None, help="A version that gets a copy of every request; "
                                             "its replies are dropped and measured.")
@click.option("--auth", type=click.Choice(AUTH_MODES), default=None,
              help="public, or api-key (requests need 'Authorization: Bearer KEY'). "
                   "Default: unchanged (public for a new deployment).")
@click.option("--wait", is_flag=True, help="Wait until every online API node serves it.")
@click.option("--timeout", type=FloatRange(min=0.1), default=120.0, show_default=True)
@click.option("--if-revision", type=int, default=None,
              help="Only deploy if the deployment is still at this revision.")
@click.option("--capture", type=FloatRange(0.0, 1.0), default=None, metavar="F",
              help="Capture this fraction of requests with their answers (0.1: 10%; 0: "
                   "off). Default: unchanged (off for a new deployment).")
@click.option("--redact", default=None, metavar="FIELD,...",
              help="Fields removed from captured requests and answers before they leave "
                   "the API node (dotted paths reach nested fields, in every item of a "
                   "list on the way; '' clears).")
@click.option("--max-error-rate", type=FloatRange(0.0, 1.0), default=None,
              help="Health is WARNING above this error rate over the last minute (0.01 is "
                   "1%), ERROR at 5 times it. Default: unchanged (0.05 for a new "
                   "deployment).")
@click.option("--max-p95-ms", type=FloatRange(0.0, 3_600_000.0, min_open=True),
              default=None,
              help="Health is WARNING above this p95 latency in milliseconds over the last "
                   "minute. Default: unchanged (1000 for a new deployment).")
@nats_option
@json_option
def deploy_api(service: str, version: str | None, infra: str, split: str | None,
               shadow: str | None, auth: str | None, wait: bool, timeout: float,
               if_revision: int | None, capture: float | None, redact: str | None,
               max_error_rate: float | None, max_p95_ms: float | None,
               nats_url: str | None, as_json: bool) -> None:
    """Serve VERSION of SERVICE on an API infra (or several versions with --split)."""
    check_names(service=service, version=version, infra=infra)
    check_names(version=shadow)
    if split:
        try:
            generations = parse_split(split)
        except BadName:
            raise  # a malformed version: refused like any other name (exit 1)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--split") from None
        if version is not None and version not in generations:
            raise click.BadParameter(f"{version} is not in --split {split}")
    elif version is None:
        raise click.UsageError("give a VERSION, or --split v1=90,v2=10")
    else:
        generations = {version: 100}
    try:
        paths = parse_redact(redact) if redact is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--redact") from None
    cmd = DeployApi(service=service, infra=infra, generations=generations, shadow=shadow,
                    auth=auth, by=whoami(), expected_revision=if_revision, capture=capture,
                    redact=paths, max_error_rate=max_error_rate, max_p95_ms=max_p95_ms)
    after_change(cmd, "deploying", wait, timeout, nats_url, as_json)


def rollback_api(service: str, infra: str, wait: bool, timeout: float, nats_url: str | None,
                 as_json: bool) -> None:
    """``shipyard rollback api SERVICE --infra I``: back to the previous mapping."""
    check_names(service=service, infra=infra)
    after_change(RollbackApi(service=service, infra=infra, by=whoami()), "rolling back",
                 wait, timeout, nats_url, as_json)


def after_change(cmd: DeployApi | RollbackApi, verb: str, wait: bool, timeout: float,
                 nats_url: str | None, as_json: bool) -> None:
    def announce(view: DeploymentView) -> None:
        if as_json:
            return
        last = view.last_update
        out.print(f"{verb} API {view.project} {(last.from_bundle if last else None) or '-'} -> "
                  f"{view.desired} on {view.infra} (update {view.update_id}, revision "
                  f"{view.revision}, auth {view.extra.get('auth')}"
                  + (f", capture {view.extra['capture']:g}" if view.extra.get("capture")
                     else "") + ")")

    if not wait:
        view: DeploymentView = run(call, nats_url, cmd)
        announce(view)
        if as_json:
            print_json(view)
        return
    final, ok, why = run(_change_and_wait, nats_url, cmd, timeout, announce, not as_json)
    if as_json:
        print_json(final)
    elif ok:
        out.print(Text.assemble(styled("done", "green"), f": every online API node of "
                                f"{final.infra} serves {final.project} {final.desired}"))
    if not ok:
        click.echo(f"shipyard: {why}", err=True)
        raise SystemExit(EXIT_FAILED)


async def _change_and_wait(nats_url: str | None, cmd: DeployApi | RollbackApi,
                           timeout: float, announce: Callable[[DeploymentView], None],
                           show: bool) -> tuple[DeploymentView, bool, str]:
    """Follow the nodes' generation reports (one line per node and stage:
    ``building env ml ...``, ``loading``, ``serving``), make the change, and wait until
    the deployment is in sync or failed."""
    async with connected(nats_url) as nc:
        caller = Caller(nc, sender="cli")
        stages: dict[str, tuple[str, str]] = {}
        early: list[GenerationReport] = []
        asked: list[str] = []
        # On a terminal, a bar of the online nodes that serve the new mapping, the
        # stage lines above it; otherwise the stage lines alone.
        bar = progress.Bar(f"{cmd.service} on {cmd.infra}: waiting for the API nodes",
                           lines=err) if show else progress.Bar("", console=progress.QUIET)

        def note(r: GenerationReport) -> None:
            if show and stages.get(r.node) != (r.stage, r.env):
                stages[r.node] = (r.stage, r.env)
                stage = describe_stage(r.stage, r.env, r.reason)
                bar.note(Text(f"  {r.node:<16} {stage}"))
                bar.update(description=f"{cmd.service} on {cmd.infra}: {r.node} {stage}")

        async def on_report(msg: Msg) -> None:
            try:
                r = GENERATION_REPORT.decode(msg.data)
            except DecodeError:
                return
            if not asked:
                if len(early) < 1000:
                    early.append(r)  # before the change's update id is known
            elif r.update_id == asked[0] and r.service == cmd.service:
                note(r)

        sub = await nc.subscribe(subjects.reports("apigen"), cb=on_report)
        try:
            view = await caller.call(cmd)
            announce(view)
            asked.append(view.update_id)
            with bar:
                for r in early:
                    if r.update_id == view.update_id and r.service == cmd.service:
                        note(r)
                return await _wait(caller, view, timeout, bar)
        finally:
            await sub.unsubscribe()


async def _wait(caller: Caller, view: DeploymentView, timeout: float,
                bar: progress.Bar) -> tuple[DeploymentView, bool, str]:
    deadline = time.monotonic() + timeout
    last = view
    while True:
        try:
            reply = await caller.call(ListDeployments(project=view.project,
                                                      infra=view.infra), timeout=5)
            last = next((v for v in reply.deployments if v.kind == "api"), last)
        except OperationError:
            pass
        online = [n for n in last.nodes if n.status == "online"]
        bar.update(total=len(online) or 1,
                   completed=sum(1 for n in online if n.running == last.desired))
        verdict = _verdict(view, last)
        if verdict is not None:
            return last, verdict[0], verdict[1]
        if time.monotonic() > deadline:
            why = "; ".join(last.reasons) or last.state
            return last, False, f"timed out after {timeout:g}s: {why}"
        await anyio.sleep(0.1)


def _verdict(asked: DeploymentView, now: DeploymentView) -> tuple[bool, str] | None:
    if now.update_id != asked.update_id:
        return False, f"superseded: {now.project} on {now.infra} now wants {now.desired}"
    if now.state == IN_SYNC:
        return True, ""
    if now.state == FAILED:
        return False, f"deployment failed: {'; '.join(now.reasons)}"
    if not any(n.status == "online" for n in now.nodes):
        return False, (f"no online API node in infra {now.infra}; the service will be "
                       "served when nodes join")
    return None


def api_summary(v: DeploymentView) -> str:
    """Traffic of an API deployment, one line, for ``shipyard deployments``."""
    parts = []
    for m in v.extra.get("metrics") or []:
        if not m.get("requests"):
            continue
        tag = f"{m['endpoint']}@{m['generation']}" + (" (shadow)" if m.get("shadow") else "")
        p95 = m.get("p95_ms")
        parts.append(f"{tag}: {m['requests']} req, {m['errors']} err, {m['rps']}/s"
                     + (f", p95<={p95}ms" if p95 is not None else ""))
    return "; ".join(parts)
