"""Node options for code environments: where a node's uv finds packages.

``--index-url``, ``--find-links`` (repeatable) and ``--no-index`` override
``SHIPYARD_INDEX_URL``, ``SHIPYARD_FIND_LINKS`` and ``SHIPYARD_NO_INDEX`` (``IndexSettings``
in ``nodes/envs/uv.py``); ``INDEX_ROLES`` are the roles whose constructor takes
``index=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from nodes.envs.uv import IndexSettings

F = TypeVar("F", bound=Callable[..., Any])

INDEX_ROLES = ("design",)
_KEYS = ("index_url", "find_links", "no_index")


def index_options(fn: F) -> F:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


_OPTIONS = [
    click.option("--index-url", default=None, metavar="URL",
                 help="design: the package index code environments are locked against "
                      "(default $SHIPYARD_INDEX_URL, then uv's default)."),
    click.option("--find-links", multiple=True, metavar="PATH|URL",
                 help="design: a folder or page of wheels to lock code environments from; "
                      "repeatable (default $SHIPYARD_FIND_LINKS)."),
    click.option("--no-index", is_flag=True, default=False,
                 help="design: never ask a package index; only --find-links (default "
                      "$SHIPYARD_NO_INDEX=1)."),
]


def index_extra(role: str, options: dict[str, Any]) -> dict[str, Any]:
    """Take the index options out of ``options``; the constructor argument ``index``
    for ``role``, or a usage error if they were given to a role without one."""
    index_url, find_links, no_index = (options.pop(k, None) for k in _KEYS)
    given = index_url is not None or bool(find_links) or bool(no_index)
    if role not in INDEX_ROLES:
        if given:
            flag = "--index-url" if index_url else "--find-links" if find_links else \
                "--no-index"
            raise click.BadParameter(f"{flag} is for {', '.join(INDEX_ROLES)} nodes",
                                     param_hint=flag)
        return {}
    env = IndexSettings.from_env()
    return {"index": IndexSettings(index_url=index_url or env.index_url,
                                   find_links=list(find_links or env.find_links),
                                   no_index=bool(no_index) or env.no_index)}
