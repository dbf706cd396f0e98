"""API node and gateway options for ``shipyard node start``, and ``shipyard up``'s
endpoint URLs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import click
import msgspec
from anyio.abc import TaskGroup
from nats.aio.msg import Msg

from nodes.api.autoscale import ScaleSettings
from nodes.api.httplimits import HttpLimits
from nodes.cli.common import FloatRange
from nodes.runtime.calls import Caller
from nodes.runtime.supervisor import Child
from protocol import subjects
from protocol.api import ApiDeploymentFinished
from protocol.deploy import DeploymentView, ListDeployments
from protocol.errors import OperationError

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--workers", dict(type=click.IntRange(min=1), default=None,
                       help="api: a fixed count of worker processes for user code, the "
                            "same as --min-workers N --max-workers N (default: one per "
                            "core but one, at least 1, at most 8).")),
    ("--min-workers", dict(type=click.IntRange(min=1), default=None,
                           help="api: the fewest worker processes the node scales down to "
                                "after a quiet period [default: 1 with --max-workers]")),
    ("--max-workers", dict(type=click.IntRange(min=1), default=None,
                           help="api: the most worker processes the node scales up to when "
                                "requests queue or latency rises [default: the default "
                                "--workers, at least --min-workers]")),
    ("--scale-down-after", dict(type=FloatRange(min=0.1), default=None,
                                help="api: seconds of quiet before the node retires "
                                     "workers [default: 60]")),
    ("--latency-target", dict(type=FloatRange(min=0.001), default=None,
                              help="api: p99 seconds of worker latency over which a loaded "
                                   "node adds workers [default: none, load alone]")),
    ("--worker-memory", dict(type=click.IntRange(min=256), default=None,
                             help="api: address-space limit of each worker process in MB "
                                  "(a worker starts at ~120 MB of address space); a request "
                                  "that allocates past it fails alone and the worker is "
                                  "replaced [default: no limit]")),
    ("--http-port", dict(type=int, default=None,
                         help="api, gateway: HTTP port, shared by every API node on the host "
                              "(SO_REUSEPORT; 0: any free port) [default: 8080]")),
    ("--http-host", dict(default=None, help="api, gateway: HTTP address [default: 0.0.0.0]")),
    ("--no-http", dict(is_flag=True, default=False, help="api: serve NATS only.")),
    ("--request-timeout", dict(type=FloatRange(min=0.01), default=None,
                               help="api, gateway: seconds before a request is answered "
                                    "'timeout' [default: 30]")),
    ("--queue-timeout", dict(type=FloatRange(min=0.001), default=None,
                             help="api: seconds a request may wait for a free worker before "
                                  "it is answered 'overloaded' [default: 1]")),
    ("--retry-after", dict(type=FloatRange(min=0.01), default=None,
                           help="api, gateway: least seconds without a reply before a "
                                "prediction is sent again [default: 0.25]")),
    ("--max-body", dict(type=click.IntRange(min=1), default=None,
                        help="api, gateway: largest request body in bytes [default: 524288]")),
    ("--max-header-bytes", dict(type=click.IntRange(min=256), default=None,
                                help="api, gateway: largest request line plus headers in "
                                     "bytes; over it: 431 [default: 16384]")),
    ("--header-timeout", dict(type=FloatRange(min=0.01), default=None,
                              help="api, gateway: seconds a client has to send a request's "
                                   "headers; then 408 and the connection is closed "
                                   "[default: 10]")),
    ("--body-timeout", dict(type=FloatRange(min=0.01), default=None,
                            help="api, gateway: seconds a client has to send a request's "
                                 "body after its headers; then 408 [default: 30]")),
    ("--keep-alive", dict(type=FloatRange(min=0.01), default=None,
                          help="api, gateway: seconds an idle connection is kept open "
                               "[default: 5]")),
    ("--max-connections", dict(type=click.IntRange(min=1), default=None,
                               help="api, gateway: open HTTP connections per node; beyond: "
                                    "503 at once [default: 1024]")),
    ("--metrics-interval", dict(type=FloatRange(min=0.1), default=None,
                                help="api: seconds between metrics reports [default: 5]")),
    ("--debug", dict(is_flag=True, default=False,
                     help="api: show user code tracebacks in error replies.")),
]
_KEYS = {"workers": "workers", "worker_memory": "worker_memory_mb",
         "http_port": "http_port", "http_host": "http_host",
         "request_timeout": "request_timeout", "queue_timeout": "queue_timeout",
         "retry_after": "retry_after", "max_body": "max_body",
         "metrics_interval": "metrics_interval"}
_LIMITS = {"max_header_bytes": "max_header_bytes", "header_timeout": "header_timeout",
           "body_timeout": "body_timeout", "keep_alive": "keep_alive",
           "max_connections": "max_connections"}
_SCALING = {"min_workers", "max_workers", "scale_down_after", "latency_target"}
_GATEWAY = {"http_port", "http_host", "request_timeout", "retry_after", "max_body", *_LIMITS}


def api_node_options(fn: F) -> F:
    for name, kw in reversed(_OPTIONS):
        fn = click.option(name, **kw)(fn)
    return fn


def api_node_extra(role: str, options: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for ``role`` from the options; usage error if misplaced."""
    given = {k: v for k, v in options.items() if v not in (None, False)}
    allowed = set(_KEYS) | set(_LIMITS) | set(_SCALING) | {"no_http", "debug"} \
        if role == "api" else (
        _GATEWAY if role == "gateway" else set())
    wrong = sorted(set(given) - allowed)
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise click.BadParameter(f"{flag} is not an option of {role} nodes", param_hint=flag)
    extra = {_KEYS[k]: v for k, v in given.items() if k in _KEYS}
    limits = {_LIMITS[k]: v for k, v in given.items() if k in _LIMITS}
    if limits:
        extra["http_limits"] = HttpLimits(**limits)
    if role == "api":
        if given.keys() & _SCALING:
            extra["scaling"] = _scaling(given)
            extra.pop("workers", None)
        if given.get("no_http"):
            extra["http_port"] = None
        extra["debug"] = bool(given.get("debug"))
    return extra


def _scaling(given: dict[str, Any]) -> ScaleSettings:
    """Elastic workers from the options: ``--workers N`` is ``--min-workers N
    --max-workers N``; one bound alone takes the other from the defaults; tuning options
    alone leave the default fixed count."""
    from nodes.api.node import default_workers

    fixed = given.get("workers")
    if fixed is not None and ({"min_workers", "max_workers"} & given.keys()):
        raise click.BadParameter("--workers is a fixed count: give it, or --min-workers "
                                 "and --max-workers, not both", param_hint="--workers")
    default = default_workers()
    low = fixed or given.get("min_workers") or (1 if "max_workers" in given else default)
    high = fixed or given.get("max_workers") or max(low, default)
    if high < low:
        raise click.BadParameter(f"--max-workers {high} is below --min-workers {low}: "
                                 "expected max >= min", param_hint="--max-workers")
    tuning: dict[str, Any] = {"min_workers": low, "max_workers": high}
    if "scale_down_after" in given:
        tuning["down_after_s"] = given["scale_down_after"]
    if "latency_target" in given:
        tuning["latency_target_s"] = given["latency_target"]
    return ScaleSettings(**tuning)


def add_http_port(children: list[Child], port: int) -> None:
    """``shipyard up``: every API node serves HTTP on the one port (SO_REUSEPORT)."""
    for child in children:
        if child.role == "api":
            child.argv += ["--http-port", str(port)]


def endpoint_urls(base: str, view: DeploymentView) -> list[str]:
    endpoints: dict[str, str] = view.extra.get("endpoints") or {}
    return [f"{base}/public/api/v1/{view.project}/{name}/"
            f"{'run' if kind == 'function' else 'predict'}"
            for name, kind in sorted(endpoints.items())]


async def print_api_urls(nc: Any, http_port: int, tg: TaskGroup) -> None:
    """Print the URL of every deployed endpoint now, and of each new deployment later."""
    from nodes.cli.common import out

    base = f"http://127.0.0.1:{http_port}"
    caller = Caller(nc, sender="shipyard-up")

    async def show(service: str | None) -> None:
        try:
            reply = await caller.call(ListDeployments(project=service), timeout=10)
        except OperationError:
            return
        for view in reply.deployments:
            if view.kind == "api":
                for url in endpoint_urls(base, view):
                    out.print(f"endpoint    {url}  ({view.desired})")

    out.print(f"http        {base}  (API services: POST "
              f"{base}/public/api/v1/SERVICE/ENDPOINT/predict)")
    await show(None)
    decoder = msgspec.json.Decoder(ApiDeploymentFinished)

    async def on_event(msg: Msg) -> None:
        try:
            event = decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if event.result == "succeeded":
            tg.start_soon(show, event.service)

    sub = await nc.subscribe(subjects.events_of("api"), cb=on_event)

    async def keep() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await sub.unsubscribe()

    tg.start_soon(keep)
