"""``shipyard auth publish``: the auth directory's identities, copied to the stack.

The ``sy_identities`` bucket is what the Deployer and Govern verify signed commands
against, and where Automation and API nodes find the trusted Design keys.  ``shipyard
up`` and every ``shipyard auth`` change fill it for the stack running from the same home;
on hosts where nats-server runs on its own, this command is the step after loading the
servers' new ``nats-auth.conf`` (a reload), after every ``shipyard auth`` change.  It
puts only the records that differ, so running it again is harmless.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import anyio
import click

from nodes.auth.registry import publish_identities
from nodes.auth.store import ADMIN, AuthStore, AuthStoreError
from nodes.cli.auth import auth_dir
from nodes.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliState,
    err,
    json_option,
    nats_option,
    out,
    print_json,
    settings_for,
)
from nodes.runtime.connection import close, connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.auth import Identity


@click.command("publish")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Auth directory. [default: HOME/auth]")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="Stack home. [default: $SHIPYARD_HOME or ./.shipyard]")
@nats_option
@json_option
def auth_publish(directory: Path | None, home: Path | None, nats_url: str | None,
                 as_json: bool) -> None:
    """Publish the auth directory's identities to the stack's sy_identities bucket.

    Connects as the directory's admin (DIR/creds/admin.creds) unless --identity or
    $SHIPYARD_IDENTITY names another admin; a bucket it creates gets $SHIPYARD_REPLICAS
    replicas.  Run it once the NATS servers have loaded DIR/nats-auth.conf.
    """
    store = AuthStore(auth_dir(home, directory))
    try:
        identities = store.identities()
    except AuthStoreError as exc:
        err.print(f"shipyard: {exc}")
        sys.exit(EXIT_FAILED)
    settings = settings_for(nats_url)
    ctx = click.get_current_context()
    state = ctx.find_object(CliState)
    if not ((state is not None and state.identity) or os.environ.get("SHIPYARD_IDENTITY")):
        admin = store.creds_path(ADMIN)
        if not admin.is_file():
            err.print(f"shipyard: no admin credentials at {admin}: pass --identity FILE "
                      "of an admin")
            sys.exit(EXIT_USAGE)
        settings = replace(settings, creds_file=str(admin))
    changed = anyio.run(_publish, settings, identities)
    if as_json:
        print_json({"identities": len(identities), "changed": changed,
                    "nats_url": settings.url})
    else:
        out.print(f"published {changed} changed of {len(identities)} identities to "
                  f"{subjects.IDENTITIES_BUCKET} on {settings.url}")


async def _publish(settings: NatsSettings, identities: list[Identity]) -> int:
    nc = await connect(settings, name="shipyard-auth", first_connect_timeout=3.0)
    try:
        return await publish_identities(nc, identities, replicas=settings.replicas)
    finally:
        await close(nc)
