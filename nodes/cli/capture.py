"""``shipyard api queries`` and ``shipyard api replay``: captured calls of a service, and
sending them again to another version (``nodes.api.replay`` says how)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
import msgspec

from nodes.api.capture import Captures, read_captures
from nodes.api.replay import ReplayReport, replay
from nodes.cli.audit import parse_time
from nodes.cli.common import (
    EXIT_FAILED,
    FloatRange,
    check_names,
    connected,
    err,
    json_option,
    nats_option,
    out,
    print_json,
    run,
    styled,
    table,
)
from nodes.runtime.calls import Caller
from protocol import subjects
from protocol.capture import CapturedCall
from protocol.deploy import IN_SYNC, DeploymentView, ListDeployments

MAX_LIMIT = 100_000


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _short(raw: Any, width: int = 48) -> str:
    text = bytes(raw).decode(errors="replace") if isinstance(raw, (bytes, msgspec.Raw)) \
        else msgspec.json.encode(raw).decode()
    return text if len(text) <= width else text[:width - 1] + "…"


def _call_json(seq: int, c: CapturedCall) -> dict[str, Any]:
    d: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(c))
    d["seq"] = seq
    d["time"] = _iso(c.ts)
    return d


def _check_endpoint(endpoint: str | None) -> None:
    if endpoint is not None:
        subjects.token(endpoint, "endpoint")  # BadName: exit 1 with the rule


def _limits(fn: Any) -> Any:
    for option in reversed([
        click.option("--since", metavar="T",
                     help="Only calls from T on: ISO 8601, seconds since the epoch, or a "
                          "duration ago (10m, 2h, 1d). Default: the oldest kept."),
        click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=100,
                     show_default=True, help="At most this many calls, oldest first."),
        click.option("--endpoint", default=None, help="Only this endpoint."),
        click.option("--timeout", type=FloatRange(min=0.1), default=10.0,
                     show_default=True, help="Stop reading the stream after this long "
                                             "(replay: also each request's deadline)."),
    ]):
        fn = option(fn)
    return fn


def _read(nats_url: str | None, service: str, since: str | None, generation: str | None,
          endpoint: str | None, limit: int, timeout: float) -> Captures:
    start = parse_time(since) if since else None

    async def main() -> Captures:
        async with connected(nats_url) as nc:
            return await read_captures(nc, service, since=start, generation=generation,
                                       endpoint=endpoint, limit=limit, timeout=timeout)

    found = run(main)
    if found.timed_out:
        err.print(f"shipyard: stopped reading captured calls after {timeout:g}s; showing "
                  f"what was read (raise --timeout, or narrow with --since)", markup=False)
    if found.unreadable:
        err.print(f"shipyard: {found.unreadable} captured calls could not be read (written "
                  "by a newer version?)", markup=False)
    return found


@click.command("queries")
@click.argument("service")
@click.option("--generation", "generation", default=None, metavar="G",
              help="Only calls answered by this version.")
@_limits
@nats_option
@json_option
def api_queries(service: str, generation: str | None, since: str | None, limit: int,
                endpoint: str | None, timeout: float, nats_url: str | None,
                as_json: bool) -> None:
    """Captured calls of SERVICE (deploy it with --capture F to record a fraction F of
    its requests): request, answer, version, status and latency, oldest first."""
    check_names(service=service, version=generation)
    _check_endpoint(endpoint)
    found = _read(nats_url, service, since, generation, endpoint, limit, timeout)
    if as_json:
        print_json([_call_json(seq, c) for seq, c in found.entries])
        return
    if not found.entries:
        out.print(f"no captured calls of {service}"
                  + (" match" if since or generation or endpoint else
                     " (deploy it with --capture 0.1 to record 10% of its requests)"),
                  markup=False)
        return
    table(["TIME", "ENDPOINT", "VERSION", "STATUS", "LATENCY", "NODE", "REQUEST", "ANSWER"],
          [(_iso(c.ts), c.endpoint, c.generation,
            styled(str(c.status), "green" if c.status == 200 else "red"),
            f"{c.latency_s * 1000:.2f} ms", c.node, _short(c.request), _short(c.response))
           for _, c in found.entries])
    if found.more:
        out.print(f"(first {limit}; more follow: raise --limit or use --since)",
                  markup=False)


@click.command("replay")
@click.argument("service")
@click.option("--version", "version", required=True,
              help="The version to send captured requests to; it must be loaded on the "
                   "service's API nodes (live, shadow, or weight 0).")
@click.option("--generation", "generation", default=None, metavar="G",
              help="Only calls that version G answered.")
@click.option("--rate", type=FloatRange(min=0.1, max=10_000), default=20.0,
              show_default=True, help="Requests per second at most (live traffic shares "
                                      "the nodes).")
@_limits
@nats_option
@json_option
def api_replay(service: str, version: str, generation: str | None, rate: float,
               since: str | None, limit: int, endpoint: str | None, timeout: float,
               nats_url: str | None, as_json: bool) -> None:
    """Send captured calls of SERVICE again to VERSION and report how many answers
    differ, with examples and latencies side by side.  Answers go to this command only,
    never to clients; replayed requests are not captured."""
    check_names(service=service, version=version)
    check_names(version=generation)
    _check_endpoint(endpoint)

    async def main() -> ReplayReport | str:
        async with connected(nats_url) as nc:
            problem = await replay_refusal(nc, service, version)
            if problem:
                return problem
            start = parse_time(since) if since else None
            found = await read_captures(nc, service, since=start, generation=generation,
                                        endpoint=endpoint, limit=limit, timeout=timeout)
            if not found.entries:
                return _nothing_captured(service, since, generation, endpoint)
            return await replay(nc, [c for _, c in found.entries], version, rate=rate,
                                timeout=timeout)

    result = run(main)
    if isinstance(result, str):
        err.print(f"shipyard: {result}", markup=False)
        raise SystemExit(EXIT_FAILED)
    result.service = service
    summary = result.summary()
    if as_json:
        print_json(summary)
    else:
        _print_report(summary)
    if summary["unanswered"]:  # answers that differ are a result; no answer is a failure
        raise SystemExit(EXIT_FAILED)


def _nothing_captured(service: str, since: str | None, generation: str | None,
                      endpoint: str | None) -> str:
    which = "".join(f" {label} {value}" for label, value in (
        ("since", since), ("of generation", generation), ("to endpoint", endpoint)) if value)
    return (f"no captured calls of {service}{which}: nothing to replay (capture is turned "
            f"on per deployment: shipyard deploy api {service} --capture RATE)")


async def replay_refusal(nc: Any, service: str, version: str) -> str:
    """Why ``version`` cannot be replayed to (not deployed, not loaded), or ""."""
    reply = await Caller(nc, sender="cli").call(ListDeployments(project=service))
    views: list[DeploymentView] = [v for v in reply.deployments if v.kind == "api"]
    if not views:
        return f"API service {service} is not deployed on any infra"
    view = views[0]
    loaded = set(view.extra.get("generations") or {})
    if view.extra.get("shadow"):
        loaded.add(view.extra["shadow"])
    if version not in loaded:
        live = ",".join(f"{g}={w}" for g, w in sorted(
            (view.extra.get("generations") or {}).items()))
        return (f"version {version} of {service} is not loaded on infra {view.infra} "
                f"(it serves {view.desired}); load it without traffic first, then replay: "
                f"shipyard deploy api {service} --split {live},{version}=0 --infra "
                f"{view.infra} --wait")
    if view.state != IN_SYNC:
        err.print(f"warning: {service} on {view.infra} is {view.state}: nodes that do not "
                  f"serve {version} yet answer not_found", markup=False)
    return ""


def _print_report(s: dict[str, Any]) -> None:
    head = (f"replayed {s['replayed']} captured calls of {s['service']} against "
            f"{s['version']}: ")
    out.print(head + f"{s['differ']} differ, {s['same']} same, {s['unanswered']} unanswered",
              markup=False)
    if s["redacted"]:
        out.print(f"{s['redacted']} had redacted fields and were sent without them",
                  markup=False)
    lat = s["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} ms"

    table(["LATENCY (in the worker)", "CAPTURED", "REPLAYED"],
          [(q, ms(lat["captured"][q]), ms(lat["replayed"][q])) for q in ("p50", "p99")])
    if s["examples"]:
        table(["ENDPOINT", "REQUEST", "CAPTURED", "REPLAYED"],
              [(e["endpoint"], _short(e["request"]),
                f"{e['captured']['generation']} {e['captured']['status']}: "
                + _short(e["captured"]["answer"]),
                f"{s['version']} {e['replayed']['status']}: " + _short(e["replayed"]["answer"]))
               for e in s["examples"]], title="answers that differ (first few)")
    for e in s["unanswered_examples"][:3]:
        out.print(f"unanswered: {e['endpoint']} {e['id']}: {e['replayed']['error']}",
                  markup=False)
