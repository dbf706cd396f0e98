"""``shipyard auth``: identities, credentials files and the NATS server's auth config.

Every change rewrites ``DIR/nats-auth.conf`` and, when a stack started by ``shipyard up``
runs from the same home with the same auth directory, reloads its NATS server (SIGHUP:
no restart, connections stay; a revoked identity's are closed) and publishes the
identities to the ``sy_identities`` bucket the Deployer verifies commands against.
Otherwise it says how to apply the change.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import click

from nodes.auth.keys import CredentialsError
from nodes.auth.registry import publish_identities
from nodes.auth.store import ADMIN, AuthStore, AuthStoreError, home_auth_dir
from nodes.cli.common import (
    EXIT_FAILED,
    err,
    json_option,
    out,
    print_json,
    table,
    when,
)
from nodes.runtime.connection import CannotReachNats, CredentialsRefused, close, connect
from nodes.runtime.settings import DEFAULT_HOME, NatsSettings, read_stack_file, split_servers
from protocol import subjects
from protocol.auth import HUMAN_ROLES, NODE_ROLES, Identity
from protocol.errors import OperationError

RELOAD_SETTLE_S = 5.0  # how long a server may refuse the admin right after a reload


def default_home() -> Path:
    return Path(os.environ.get("SHIPYARD_HOME") or DEFAULT_HOME)


def auth_dir(home: Path | None, directory: Path | None) -> Path:
    return (directory or home_auth_dir(home or default_home())).resolve()


def dir_options(fn: Any) -> Any:
    fn = click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
                      help="Auth directory. [default: HOME/auth]")(fn)
    return click.option("--home", type=click.Path(path_type=Path), default=None,
                        help="Stack home (its running stack is reloaded). "
                             "[default: $SHIPYARD_HOME or ./.shipyard]")(fn)


def _running_stack(home: Path, store: AuthStore) -> dict[str, Any] | None:
    """The stack running from ``home`` with this auth directory, if any."""
    stack = read_stack_file(home)
    if not stack or stack.get("auth_dir") is None:
        return None
    if Path(str(stack["auth_dir"])).resolve() != store.dir:
        return None
    pid = stack.get("nats_pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return None
    return stack


def apply(home: Path | None, store: AuthStore, *, revoking: bool = False,
          as_json: bool = False) -> None:
    """Reload the running stack's NATS server and publish the identities to it (what it
    did goes to stderr under --json, so stdout stays JSON)."""
    say = err if as_json else out
    home = (home or default_home()).resolve()
    stack = _running_stack(home, store)
    if stack is None:
        say.print(f"server config {store.server_config}: no stack runs from {home} with "
                  "this auth directory; reload your nats-server to apply "
                  "(nats-server --signal reload)")
        return
    identities = store.identities()

    async def publish() -> int:
        settings = NatsSettings(servers=split_servers(str(stack["nats_url"])),
                                creds_file=str(store.creds_path(ADMIN)))
        # Right after a reload a server may still refuse the admin for a moment (it is
        # applying the new users): retry that, briefly.
        deadline = time.monotonic() + RELOAD_SETTLE_S
        while True:
            try:
                nc = await connect(settings, name="shipyard-auth", first_connect_timeout=3.0)
                break
            except CredentialsRefused:
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.2)
        try:
            return await publish_identities(nc, identities,
                                            replicas=int(stack.get("replicas") or 1))
        finally:
            await close(nc)

    def reload() -> None:
        # Every server of a cluster includes the same auth config: reload them all.
        pids = [s.get("pid") for s in stack.get("servers") or []] or [stack["nats_pid"]]
        for pid in pids:
            if isinstance(pid, int):
                os.kill(pid, signal.SIGHUP)

    try:
        if not revoking:
            reload()  # the new user may connect before verifiers know it: harmless
        anyio.run(publish)
        if revoking:
            reload()  # verifiers refuse it first, then the server drops its connections
    except (CannotReachNats, OperationError, OSError) as exc:
        err.print(f"shipyard: the stack's NATS server was not updated: {exc}")
        raise SystemExit(EXIT_FAILED) from None
    say.print(f"applied: NATS server (pid {stack['nats_pid']}) reloaded, identities "
              "published")


def _store(home: Path | None, directory: Path | None) -> AuthStore:
    return AuthStore(auth_dir(home, directory))


def _row(i: Identity) -> dict[str, Any]:
    return {"name": i.name, "kind": i.kind, "role": i.role, "infra": i.infra,
            "public_key": i.public_key, "created_at": i.created_at,
            "revoked_at": i.revoked_at}


@click.group()
def auth() -> None:
    """Identities and credentials: who may connect to NATS and sign commands."""


@auth.command("init")
@dir_options
@json_option
def auth_init(home: Path | None, directory: Path | None, as_json: bool) -> None:
    """Create the first admin, a node identity per role and the NATS server config.

    Start nats-server with '-c DIR/nats-auth.conf' (shipyard up does), then connect with
    the credentials files under DIR/creds.
    """
    store = _store(home, directory)
    try:
        made = store.init()
    except (OperationError, AuthStoreError) as exc:
        err.print(f"shipyard: {exc}")
        raise SystemExit(EXIT_FAILED) from None
    if as_json:
        print_json({"dir": str(store.dir), "server_config": str(store.server_config),
                    "identities": [dict(_row(i), credentials=str(p)) for i, p in made]})
        return
    table(["NAME", "KIND", "ROLE", "CREDENTIALS"],
          [(i.name, i.kind, i.role, p) for i, p in made])
    out.print(f"server config {store.server_config}  (nats-server -c ...)")


def _add(kind: str, home: Path | None, directory: Path | None, name: str, role: str,
         infra: str | None, out_file: Path | None, as_json: bool) -> None:
    store = _store(home, directory)
    if kind == "node" and infra is None:
        from nodes.cli.stack import default_infra  # what 'node start' joins by default

        infra = default_infra(role)
    try:
        identity, path = store.add(name, kind=kind, role=role, infra=infra,
                                   out=out_file.resolve() if out_file else None)
    except (OperationError, AuthStoreError, CredentialsError, ValueError) as exc:
        err.print(f"shipyard: {getattr(exc, 'message', exc)}")
        raise SystemExit(EXIT_FAILED) from None
    if as_json:
        print_json({"name": identity.name, "role": identity.role, "credentials": str(path)})
    else:
        out.print(f"{kind} {identity.name} ({identity.role}) added; credentials: {path}")
    apply(home, store, as_json=as_json)


def _list(kind: str, home: Path | None, directory: Path | None, as_json: bool) -> None:
    try:
        identities = [i for i in _store(home, directory).identities() if i.kind == kind]
    except AuthStoreError as exc:
        err.print(f"shipyard: {exc}")
        raise SystemExit(EXIT_FAILED) from None
    if as_json:
        print_json([_row(i) for i in identities])
        return
    table(["NAME", "ROLE", "INFRA", "CREATED", "REVOKED", "PUBLIC KEY"],
          [(i.name, i.role, i.infra or "-", when(i.created_at), when(i.revoked_at),
            i.public_key) for i in identities])


def _revoke(kind: str, home: Path | None, directory: Path | None, name: str) -> None:
    store = _store(home, directory)
    try:
        subjects.token(name, "identity name")
        identity = store.get(name)
        if identity.kind != kind:
            raise AuthStoreError(f"{name!r} is a {identity.kind}, not a {kind}")
        if identity.name == ADMIN and kind == "user":
            raise AuthStoreError("the first admin cannot be revoked (the stack acts as it)")
        store.revoke(name)
    except (OperationError, AuthStoreError) as exc:
        err.print(f"shipyard: {getattr(exc, 'message', exc)}")
        raise SystemExit(EXIT_FAILED) from None
    out.print(f"{kind} {name} revoked")
    apply(home, store, revoking=True)


@auth.group("user")
def user() -> None:
    """Human identities: admin, deployer, reviewer, viewer."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(HUMAN_ROLES), required=True)
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None,
              help="Write the credentials file here. [default: DIR/creds/NAME.creds]")
@dir_options
@json_option
def user_add(name: str, role: str, out_file: Path | None, home: Path | None,
             directory: Path | None, as_json: bool) -> None:
    """Add a human identity and write its credentials file."""
    _add("user", home, directory, name, role, None, out_file, as_json)


@user.command("list")
@dir_options
@json_option
def user_list(home: Path | None, directory: Path | None, as_json: bool) -> None:
    """List human identities, revoked ones too."""
    _list("user", home, directory, as_json)


@user.command("revoke")
@click.argument("name")
@dir_options
def user_revoke(name: str, home: Path | None, directory: Path | None) -> None:
    """Revoke a human identity: its commands are refused and its connections closed."""
    _revoke("user", home, directory, name)


@auth.group("node")
def node_group() -> None:
    """Node identities: one per node, with its role's NATS permissions."""


@node_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(NODE_ROLES), required=True)
@click.option("--infra", default=None, help="The node's infra (its heartbeats, events and "
                                             "desired state).")
@click.option("--out", "out_file", type=click.Path(path_type=Path), default=None,
              help="Write the credentials file here. [default: DIR/creds/NAME.creds]")
@dir_options
@json_option
def node_add(name: str, role: str, infra: str | None, out_file: Path | None,
             home: Path | None, directory: Path | None, as_json: bool) -> None:
    """Add a node identity; run the node with 'shipyard node start --creds FILE'."""
    _add("node", home, directory, name, role, infra, out_file, as_json)


@node_group.command("list")
@dir_options
@json_option
def node_list(home: Path | None, directory: Path | None, as_json: bool) -> None:
    """List node identities, revoked ones too."""
    _list("node", home, directory, as_json)


@node_group.command("revoke")
@click.argument("name")
@dir_options
def node_revoke(name: str, home: Path | None, directory: Path | None) -> None:
    """Revoke a node identity: the server closes its connections."""
    _revoke("node", home, directory, name)
