"""``shipyard envs`` (code environments per node) and the nodes' environment options.

``shipyard node start`` and ``shipyard up`` take ``--index-url``, ``--find-links``,
``--no-index``, ``--env-build-timeout`` and ``--env-grace``; an option not given falls
back to ``SHIPYARD_INDEX_URL``, ``SHIPYARD_FIND_LINKS`` and ``SHIPYARD_NO_INDEX``
(``IndexSettings.from_env``).  ``up`` passes what it was given to every node it starts.

``shipyard envs`` reads the Deployer's registry, as ``shipyard nodes`` does: each node's
last heartbeat lists the environments it keeps (``EnvState``), with the bundles and
generations that use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click

from nodes.cli.common import (
    FloatRange,
    call,
    check_names,
    human_age,
    human_size,
    json_option,
    nats_option,
    out,
    print_json,
    run,
    styled,
    table,
)
from nodes.envs.options import DEFAULT_GRACE_S, EnvOptions
from nodes.envs.uv import DEFAULT_TIMEOUT_S, IndexSettings
from protocol.envs import EnvState
from protocol.registry import ListNodes, NodeInfo, NodeList
from protocol.state import ApiState, AutomationState, DesignState

F = TypeVar("F", bound=Callable[..., Any])

ENV_ROLES = ("automation", "api", "design")  # the roles that keep environments

_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--index-url", dict(default=None, metavar="URL",
                         help="automation, api, design: package index code environments "
                              "install from [default: $SHIPYARD_INDEX_URL, else uv's]")),
    ("--find-links", dict(multiple=True, metavar="DIR_OR_URL",
                          help="automation, api, design: also look for wheels here "
                               "(repeatable) [default: $SHIPYARD_FIND_LINKS]")),
    ("--no-index", dict(is_flag=True, default=False,
                        help="automation, api, design: use no package index, only "
                             "--find-links and wheels stored with the lock "
                             "[default: $SHIPYARD_NO_INDEX]")),
    ("--env-build-timeout", dict(type=FloatRange(min=1), default=None, metavar="SECONDS",
                                 help="automation, api, design: seconds a code environment "
                                      f"build may take [default: {DEFAULT_TIMEOUT_S:g}]")),
    ("--env-grace", dict(type=FloatRange(min=0), default=None, metavar="SECONDS",
                         help="automation, api, design: seconds an environment nothing "
                              "uses is kept before it is removed "
                              f"[default: {DEFAULT_GRACE_S:g}]")),
]
_NAMES = ("index_url", "find_links", "no_index", "env_build_timeout", "env_grace")


def env_node_options(fn: F) -> F:
    for name, kw in reversed(_OPTIONS):
        fn = click.option(name, **kw)(fn)
    return fn


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in _NAMES and v not in (None, False, ())}


def env_node_extra(role: str, options: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for ``role`` (``envs=EnvOptions``); a usage error if an
    environment option is given to a role that builds none."""
    given = _given(options)
    if role not in ENV_ROLES:
        if given:
            flag = "--" + sorted(given)[0].replace("_", "-")
            raise click.BadParameter(f"{flag} is for automation, api and design nodes",
                                     param_hint=flag)
        return {}
    index = IndexSettings.from_env()
    if "index_url" in given:
        index = replace(index, index_url=given["index_url"])
    if "find_links" in given:
        index = replace(index, find_links=[_link(x) for x in given["find_links"]])
    if "no_index" in given:
        index = replace(index, no_index=True)
    envs = EnvOptions(index=index)
    if "env_build_timeout" in given:
        envs = replace(envs, build_timeout_s=float(given["env_build_timeout"]))
    if "env_grace" in given:
        envs = replace(envs, grace_s=float(given["env_grace"]))
    return {"envs": envs}


def _link(value: str) -> str:
    """A local --find-links folder as an absolute path (nodes run uv from elsewhere)."""
    if "://" in value:
        return value
    return str(Path(value).resolve())


def env_up_argv(options: dict[str, Any]) -> list[str]:
    """``shipyard up``: the environment options to pass on to each node it starts."""
    given = _given(options)
    argv: list[str] = []
    if "index_url" in given:
        argv += ["--index-url", given["index_url"]]
    for link in given.get("find_links", ()):
        argv += ["--find-links", _link(link)]
    if given.get("no_index"):
        argv.append("--no-index")
    if "env_build_timeout" in given:
        argv += ["--env-build-timeout", str(given["env_build_timeout"])]
    if "env_grace" in given:
        argv += ["--env-grace", str(given["env_grace"])]
    return argv


# -- shipyard envs -------------------------------------------------------------------------

def node_envs(n: NodeInfo) -> list[EnvState]:
    state = n.state
    if isinstance(state, AutomationState | ApiState | DesignState):
        return list(state.envs)
    return []


@click.command("envs")
@click.option("--infra", help="Only nodes in this infrastructure.")
@nats_option
@json_option
def envs_cmd(infra: str | None, nats_url: str | None, as_json: bool) -> None:
    """Code environments per node: size, status, and the bundles and API generations that
    use each (from the nodes' last heartbeats)."""
    check_names(infra=infra)
    reply: NodeList = run(call, nats_url, ListNodes(infra=infra))
    nodes = [n for n in reply.nodes if n.role in ENV_ROLES]
    if as_json:
        print_json([{"node": n.name, "role": n.role, "infra": n.infra, "status": n.status,
                     "envs": node_envs(n)} for n in nodes])
        return
    rows = []
    for n in nodes:
        for e in node_envs(n):
            users = ", ".join(e.used_by) or (
                f"none for {human_age(max(0.0, time.time() - e.unused_since))}"
                if e.unused_since else "none")
            status = e.status + (f": {_first_line(e.reason)}" if e.reason else "")
            rows.append((n.name, ",".join(e.names) or "-", e.digest[:12], e.python,
                         e.packages, human_size(e.size), styled(status, _STYLE.get(e.status)),
                         users))
    if not rows:
        where = f" in infra {infra}" if infra else ""
        out.print(f"no code environments on any node{where}")
        return
    table(["NODE", "ENV", "DIGEST", "PYTHON", "PACKAGES", "SIZE", "STATUS", "USED BY"], rows)


_STYLE = {"ready": "green", "building": "cyan", "failed": "red"}


def _first_line(reason: str, limit: int = 100) -> str:
    """What failed, in one line (the full reason is in ``--json``, ``deployments`` and
    ``deploy --wait``)."""
    line = reason.strip().splitlines()[0].strip() if reason.strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."
