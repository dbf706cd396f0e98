"""``shipyard govern``: the registry of artifacts and their sign-off reviews.

An artifact is named ``PROJECT BUNDLE_ID`` (a bundle) or ``api SERVICE VERSION`` (an API
version).  Who requests or answers a review is the identity the CLI signs with
(``--identity`` or the stack home's admin).
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from rich.text import Text

from nodes.cli.common import (
    call,
    check_names,
    json_option,
    nats_option,
    out,
    print_json,
    run,
    styled,
    table,
    when,
    whoami,
)
from protocol.govern import (
    API,
    APPROVED,
    ARTIFACT_KINDS,
    BUNDLE,
    PENDING,
    REJECTED,
    ArtifactList,
    GetReview,
    ListArtifacts,
    RequestReview,
    ReviewArtifact,
    ReviewView,
    label,
)

STATUS_STYLE = {APPROVED: "green", REJECTED: "red", PENDING: "yellow"}
ARTIFACT_HELP = "PROJECT BUNDLE_ID, or: api SERVICE VERSION"


def parse_artifact(parts: Sequence[str]) -> tuple[str, str, str]:
    """(kind, name, version) from ``PROJECT BUNDLE_ID`` or ``api SERVICE VERSION``."""
    if len(parts) == 2:
        check_names(project=parts[0], bundle=parts[1])
        return BUNDLE, parts[0], parts[1]
    if len(parts) == 3 and parts[0] == API:
        check_names(service=parts[1], version=parts[2])
        return API, parts[1], parts[2]
    raise click.UsageError(f"expected {ARTIFACT_HELP}; got {' '.join(parts) or 'nothing'}")


def _status(text: str) -> Text:
    return styled(text, STATUS_STYLE.get(text, "dim"))


def print_review(view: ReviewView) -> None:
    what = label(view.kind, view.name, view.version)
    review = view.review
    if review is None:
        out.print(Text.assemble(f"{what}: ", _status(view.status), " (request a review with "
                                f"'shipyard govern request "
                                f"{'api ' if view.kind == API else ''}{view.name} "
                                f"{view.version}')"))
        return
    out.print(Text.assemble(f"{what}: ", _status(review.status),
                            f" ({review.approvals}/{review.required} approvals)"))
    note = f": {review.comment}" if review.comment else ""
    out.print(f"  requested by {review.requested_by} at {when(review.requested_at)}{note}")
    for d in review.decisions:
        note = f": {d.comment}" if d.comment else ""
        out.print(f"  {d.verdict}d by {d.by} at {when(d.at)}{note}")


@click.group()
def govern() -> None:
    """Sign-off reviews of bundles and API versions (the Govern node)."""


@govern.command("list")
@click.option("--kind", type=click.Choice(ARTIFACT_KINDS), default=None,
              help="Only bundles or only API versions.")
@click.option("--name", default=None, help="Only this project or service.")
@nats_option
@json_option
def govern_list(kind: str | None, name: str | None, nats_url: str | None,
                as_json: bool) -> None:
    """Every project, bundle and API version, with its review status."""
    check_names(project=name)
    reply: ArtifactList = run(call, nats_url, ListArtifacts(kind=kind, name=name))
    if as_json:
        print_json(reply)
        return
    table(["KIND", "NAME", "VERSION", "CREATED", "BY", "REVIEW", "APPROVALS", "REQUESTED BY"],
          [(r.kind, r.name, r.version, when(r.created_at), r.created_by, _status(r.status),
            f"{r.approvals}/{r.required}" if r.required else "-", r.requested_by or "-")
           for r in reply.artifacts])


@govern.command("request")
@click.argument("artifact", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("--comment", default="", help="Why it should be approved.")
@nats_option
@json_option
def govern_request(artifact: tuple[str, ...], comment: str, nats_url: str | None,
                   as_json: bool) -> None:
    """Open a review of ARTIFACT (PROJECT BUNDLE_ID, or: api SERVICE VERSION)."""
    kind, name, version = parse_artifact(artifact)
    view: ReviewView = run(call, nats_url, RequestReview(kind=kind, name=name, version=version,
                                                         comment=comment, by=whoami()))
    if as_json:
        print_json(view)
        return
    if not view.changed:
        out.print(f"a review of {label(kind, name, version)} was already open")
    print_review(view)


@govern.command("review")
@click.argument("artifact", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("--approve", is_flag=True, help="Approve it.")
@click.option("--reject", is_flag=True, help="Reject it (one rejection rejects).")
@click.option("--comment", default="", help="What you say with your answer.")
@nats_option
@json_option
def govern_review(artifact: tuple[str, ...], approve: bool, reject: bool, comment: str,
                  nats_url: str | None, as_json: bool) -> None:
    """Approve or reject ARTIFACT (PROJECT BUNDLE_ID, or: api SERVICE VERSION)."""
    if approve == reject:
        raise click.UsageError("give exactly one of --approve or --reject")
    kind, name, version = parse_artifact(artifact)
    view: ReviewView = run(call, nats_url, ReviewArtifact(
        kind=kind, name=name, version=version, approve=approve, comment=comment,
        by=whoami()))
    if as_json:
        print_json(view)
    else:
        print_review(view)


@govern.command("status")
@click.argument("artifact", nargs=-1, required=True, metavar="ARTIFACT...")
@nats_option
@json_option
def govern_status(artifact: tuple[str, ...], nats_url: str | None, as_json: bool) -> None:
    """Where the review of ARTIFACT stands, and who said what."""
    kind, name, version = parse_artifact(artifact)
    view: ReviewView = run(call, nats_url, GetReview(kind=kind, name=name, version=version))
    if as_json:
        print_json(view)
    else:
        print_review(view)
