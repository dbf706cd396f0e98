"""Projects, bundles, infrastructures, deployments: the Project Deployer's commands."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import click
from rich.text import Text

from nodes.cli import progress
from nodes.cli.common import (
    EXIT_FAILED,
    FloatRange,
    call,
    check_names,
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
from nodes.cli.waiting import call_with, change_and_wait
from nodes.runtime.calls import Caller
from protocol.bundles import BundleCreated, BundleList, CreateBundle, ListBundles, ListProjects
from protocol.deploy import (
    KINDS,
    STAGES,
    CreateInfra,
    DeployBundle,
    DeploymentList,
    DeploymentView,
    GetHistory,
    ListDeployments,
    ListInfras,
    RollbackBundle,
    SetInfra,
)
from protocol.envs import EnvSummary
from protocol.govern import POLICIES
from protocol.health import check_webhooks

# -- projects and bundles --------------------------------------------------------------------

@click.command("projects")
@nats_option
@json_option
def projects_cmd(nats_url: str | None, as_json: bool) -> None:
    """Projects in the Design node's workspace, and whether their manifests are valid."""
    reply = run(call, nats_url, ListProjects())
    if as_json:
        print_json(reply.projects)
        return
    if not reply.projects:
        out.print(f"no projects in {reply.workspace} (a project is a folder with shipyard.toml)")
        return
    table(["KEY", "NAME", "DATASETS", "RECIPES", "SCENARIOS", "API SERVICES", "STATUS"],
          [(p.key, p.name, p.datasets, p.recipes, p.scenarios, ",".join(p.api_services),
            "ok" if p.ok else styled(p.error, "red")) for p in reply.projects])


@click.group()
def bundle() -> None:
    """Make and list project bundles."""


@bundle.command("create")
@click.argument("project")
@click.option("--id", "bundle_id", required=True, help="Bundle id (immutable), e.g. v3.")
@click.option("--notes", default="", help="Release notes.")
@click.option("--wheels", is_flag=True, help="Also store every locked wheel in the cluster, "
                                             "so nodes install with no package index.")
@nats_option
@json_option
def bundle_create(project: str, bundle_id: str, notes: str, wheels: bool,
                  nats_url: str | None, as_json: bool) -> None:
    """Pack PROJECT into a new bundle, locking its code environments, and show what
    changed since the previous one (files and locked packages)."""
    check_names(project=project, bundle=bundle_id)
    cmd = CreateBundle(project=project, bundle_id=bundle_id, notes=notes, created_by=whoami(),
                       wheels=wheels)
    with progress.bar(f"packing and storing {project} as bundle {bundle_id}") as bar:
        reply: BundleCreated = run(call, nats_url, cmd, 600.0,
                                   bar.notices(f"bundle {project} {bundle_id}"))
    if as_json:
        print_json(reply)
        return
    b, d = reply.bundle, reply.diff
    out.print(Text.assemble("bundle ", styled(f"{b.project} {b.id}", "bold"),
                            f" created: {b.files} files, {human_size(b.size)}, digest "
                            f"{b.digest[:16]}"))
    print_changes(d.previous, "first bundle of this project", d.added, d.removed, d.changed)
    print_envs(b.envs.values())
    print_package_changes(d.packages)


def env_line(e: EnvSummary) -> str:
    """``ml: 12 packages, python 3.11, x86_64-manylinux_2_28, digest 1a2b3c4d5e6f``."""
    return (f"{e.name}: {len(e.packages)} package{'s' if len(e.packages) != 1 else ''}, "
            f"python {e.python}, {e.platform}, digest {e.digest[:12]}"
            + (", wheels stored" if e.wheels_stored else ""))


def print_envs(envs: Iterable[EnvSummary]) -> None:
    for e in sorted(envs, key=lambda e: e.name):
        out.print(f"code env {env_line(e)}")


def print_package_changes(lines: Sequence[str]) -> None:
    """Changed locked packages (``protocol.envs.diff_envs`` lines), one per line."""
    if lines:
        out.print(f"locked packages: {len(lines)} change{'s' if len(lines) != 1 else ''}")
    for line in lines:
        style = "green" if " + " in f" {line}" else "red" if " - " in f" {line}" else "yellow"
        out.print(styled(f"  {line}", style))


def env_cell(envs: Iterable[EnvSummary]) -> str:
    """A table cell: ``ml (2 pkgs, 1a2b3c4d)``, comma-separated; ``-`` for none."""
    return ", ".join(f"{e.name} ({len(e.packages)} pkgs, {e.digest[:8]})"
                     for e in sorted(envs, key=lambda e: e.name)) or "-"


@bundle.command("list")
@click.argument("project")
@nats_option
@json_option
def bundle_list(project: str, nats_url: str | None, as_json: bool) -> None:
    """Bundles of PROJECT, oldest first, with their code environments (--json: the
    locked packages)."""
    check_names(project=project)
    reply: BundleList = run(call, nats_url, ListBundles(project=project))
    if as_json:
        print_json(reply.bundles)
        return
    if not reply.bundles:
        out.print(f"project {project} has no bundles yet")
        return
    table(["ID", "CREATED", "BY", "FILES", "SIZE", "DIGEST", "CODE ENVS", "NOTES"],
          [(b.id, when(b.created_at), b.created_by, b.files, human_size(b.size),
            b.digest[:12], env_cell(b.envs.values()), b.notes) for b in reply.bundles])


# -- infrastructures ---------------------------------------------------------------------

GOVERN_HELP = ("What a deployment of an artifact not approved on the Govern node meets: "
               "prevent refuses it, warn deploys it with a warning, none deploys it.")


@click.group()
def infra() -> None:
    """Create and list infrastructures (groups of Automation or API nodes)."""


@infra.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), required=True)
@click.option("--stage", type=click.Choice(STAGES), default="development", show_default=True)
@click.option("--description", default="")
@click.option("--govern", "policy", type=click.Choice(POLICIES), default="none",
              show_default=True, help=GOVERN_HELP)
@nats_option
@json_option
def infra_create(name: str, kind: str, stage: str, description: str, policy: str,
                 nats_url: str | None, as_json: bool) -> None:
    """Create infrastructure NAME.  Nodes join it with --infra NAME."""
    check_names(infra=name)
    reply = run(call, nats_url, CreateInfra(name=name, kind=kind, stage=stage,
                                            description=description, by=whoami(),
                                            govern=policy))
    if as_json:
        print_json(reply.infra)
    else:
        out.print(f"infra {name} created ({kind}, {stage}, govern {policy})")


@infra.command("set")
@click.argument("name")
@click.option("--govern", "policy", type=click.Choice(POLICIES), default=None,
              help=GOVERN_HELP)
@click.option("--webhook", "webhooks", multiple=True, metavar="URL",
              help="Where alerts about this infra are POSTed: repeat it or give a comma "
                   "separated list (it replaces the current list); --webhook '' clears it.")
@nats_option
@json_option
def infra_set(name: str, policy: str | None, webhooks: tuple[str, ...], nats_url: str | None,
              as_json: bool) -> None:
    """Change settings of infrastructure NAME."""
    check_names(infra=name)
    if policy is None and not webhooks:
        raise click.UsageError("nothing to change: give --govern prevent|warn|none or "
                               "--webhook URL")
    urls = None if not webhooks else [
        u.strip() for w in webhooks for u in w.split(",") if u.strip()]
    if urls is not None:
        check_webhooks(urls)
    reply = run(call, nats_url, SetInfra(name=name, govern=policy, webhooks=urls,
                                         by=whoami()))
    if as_json:
        print_json(reply.infra)
        return
    settings = f"govern {reply.infra.govern}, {len(reply.infra.webhooks)} webhook(s)"
    if reply.changed:
        out.print(f"infra {name}: {settings}")
    else:
        out.print(f"infra {name} already has {settings}")


@infra.command("list")
@nats_option
@json_option
def infra_list(nats_url: str | None, as_json: bool) -> None:
    """Every infrastructure."""
    reply = run(call, nats_url, ListInfras())
    if as_json:
        print_json(reply.infras)
        return
    table(["NAME", "KIND", "STAGE", "GOVERN", "WEBHOOKS", "CREATED", "BY", "DESCRIPTION"],
          [(i.name, i.kind, i.stage, i.govern, len(i.webhooks), when(i.created_at),
            i.created_by, i.description)
           for i in reply.infras])


# -- deployments -------------------------------------------------------------------------

@click.group()
def deploy() -> None:
    """Deploy a bundle to an automation infra (or an API service to an API infra)."""


@deploy.command("bundle")
@click.argument("project")
@click.argument("bundle_id")
@click.option("--infra", required=True, help="Automation infrastructure.")
@click.option("--wait", is_flag=True, help="Wait until every online node runs the bundle.")
@click.option("--timeout", type=FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds to wait with --wait.")
@click.option("--if-revision", type=int, default=None,
              help="Only deploy if the deployment is still at this revision (see "
                   "'deployments --json'; 0: not deployed yet).")
@nats_option
@json_option
def deploy_bundle(project: str, bundle_id: str, infra: str, wait: bool, timeout: float,
                  if_revision: int | None, nats_url: str | None, as_json: bool) -> None:
    """Make BUNDLE_ID the desired bundle of PROJECT on an infrastructure."""
    check_names(project=project, bundle=bundle_id, infra=infra)
    cmd = DeployBundle(project=project, bundle_id=bundle_id, infra=infra, by=whoami(),
                       expected_revision=if_revision)
    _change(cmd, "deploying", wait, timeout, nats_url, as_json)


def _change(cmd: DeployBundle | RollbackBundle, verb: str, wait: bool, timeout: float,
            nats_url: str | None, as_json: bool) -> None:
    async def send(caller: Caller) -> DeploymentView:
        view: DeploymentView = await caller.call(cmd, timeout=10.0)
        last = view.last_update
        if not as_json:
            out.print(f"{verb} {view.project} {(last.from_bundle if last else None) or '-'} "
                      f"-> {view.desired} on {view.infra} (update {view.update_id}, "
                      f"revision {view.revision})")
        return view

    if not wait:
        view = run(call_with, nats_url, send)
        if as_json:
            print_json(view)
        return
    final, ok, why = run(change_and_wait, nats_url, send, timeout, not as_json)
    view = final
    if as_json:
        print_json(final)
    elif ok:
        out.print(Text.assemble(styled("done", "green"), f": every online node of "
                                f"{view.infra} runs {view.project} {view.desired}"))
    if not ok:
        click.echo(f"shipyard: {why}", err=True)
        raise SystemExit(EXIT_FAILED)


@click.command("rollback")
@click.argument("target", nargs=-1, required=True)
@click.option("--infra", required=True)
@click.option("--to", "to", default=None, help="Bundle id to go back to (default: the "
                                                "bundle that was deployed before).")
@click.option("--wait", is_flag=True, help="Wait until every online node runs it.")
@click.option("--timeout", type=FloatRange(min=0.1), default=120.0, show_default=True)
@nats_option
@json_option
def rollback(target: tuple[str, ...], infra: str, to: str | None, wait: bool, timeout: float,
             nats_url: str | None, as_json: bool) -> None:
    """Roll back: 'rollback PROJECT --infra I [--to ID]' or 'rollback api SERVICE --infra I'."""
    check_names(infra=infra, bundle=to)
    if len(target) == 2 and target[0] == "api":
        from nodes.cli.apis import rollback_api

        if to is not None:
            raise click.UsageError("--to is for bundles; API rollback returns to the "
                                   "previous mapping")
        rollback_api(target[1], infra, wait, timeout, nats_url, as_json)
        return
    if len(target) != 1:
        raise click.UsageError("expected PROJECT, or 'api SERVICE'")
    check_names(project=target[0])
    cmd = RollbackBundle(project=target[0], infra=infra, to=to, by=whoami())
    _change(cmd, "rolling back", wait, timeout, nats_url, as_json)


def deployment_json(v: DeploymentView) -> dict[str, Any]:
    from nodes.cli.common import to_builtins
    d: dict[str, Any] = to_builtins(v)
    d.pop("type", None)
    return d


@click.command("deployments")
@click.option("--project", default=None)
@click.option("--infra", default=None)
@nats_option
@json_option
def deployments(project: str | None, infra: str | None, nats_url: str | None,
                as_json: bool) -> None:
    """Every deployment: desired vs running bundle per node, state and health."""
    check_names(project=project, infra=infra)
    reply: DeploymentList = run(call, nats_url, ListDeployments(project=project, infra=infra))
    views = list(reply.deployments)
    if as_json:
        print_json([deployment_json(v) for v in views])
        return
    if not views:
        out.print("nothing is deployed yet")
        return
    rows = []
    for v in views:
        nodes = ", ".join(f"{n.node}={n.running or '-'}" + ("" if n.status == "online" else
                                                            " (lost)") for n in v.nodes)
        reasons = "; ".join(v.reasons)
        if v.kind == "api":  # traffic per endpoint and generation, from the nodes' metrics
            from nodes.cli.apis import api_summary
            reasons = "; ".join(x for x in (reasons, api_summary(v)) if x)
        rows.append((v.kind, v.project, v.infra, v.desired, v.state,
                     styled(v.health), nodes or "-", reasons))
    table(["KIND", "NAME", "INFRA", "DESIRED", "STATE", "HEALTH", "NODES", "REASONS"], rows)


@click.command("history")
@click.argument("project")
@click.option("--infra", required=True)
@nats_option
@json_option
def history(project: str, infra: str, nats_url: str | None, as_json: bool) -> None:
    """Every update of PROJECT on an infra: who, when, from -> to, result."""
    check_names(project=project, infra=infra)
    reply = run(call, nats_url, GetHistory(project=project, infra=infra))
    if as_json:
        print_json(reply.updates)
        return
    table(["WHEN", "WHO", "ACTION", "FROM", "TO", "RESULT", "DETAIL"],
          [(when(u.at), u.by, u.action, u.from_bundle or "-", u.to_bundle, u.result,
            "; ".join(filter(None, [u.detail, *(f"govern warning: {w}" for w in u.warnings)])))
           for u in reply.updates])
