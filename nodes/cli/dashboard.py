"""The web dashboard's options: ``shipyard node start deployer --dashboard-port P`` and
``shipyard up --dashboard-port P``.

``node start deployer`` serves no dashboard unless ``--dashboard-port`` is given (a bare
worker opens no port it was not asked to).  ``up`` serves it on 8081 when that port is
free and on any free port otherwise, like the NATS monitoring port, so a second stack
never clashes; a port given explicitly that is taken is a usage error naming the option;
``--dashboard-port 0`` serves none.  ``up`` keeps a login token in
``HOME/dashboard.token`` and, with auth, a user identity ``dashboard`` (role deployer)
whose credentials the Deployer signs the page's commands with
(``nodes.deployer.dashboard.access`` says why).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from nodes.auth.keys import CredentialsError, is_shipyard_credentials, read_credentials
from nodes.auth.stack import StackAuth
from nodes.cli.ports import in_use
from nodes.deployer.dashboard.access import (
    DASHBOARD_IDENTITY,
    TOKEN_FILE,
    TokenFileError,
    ensure_token_file,
)
from nodes.deployer.dashboard.config import DEFAULT_HOST, DEFAULT_PORT, DashboardConfig
from nodes.runtime.supervisor import Child

F = TypeVar("F", bound=Callable[..., Any])
ACTING_ROLES = ("deployer", "admin")


def dashboard_node_options(fn: F) -> F:
    options = [
        click.option("--dashboard-port", type=click.IntRange(0, 65535), default=None,
                     help="deployer: serve the web dashboard and /metrics on this port "
                          "(0: any free port) [default: not served]"),
        click.option("--dashboard-host", default=None,
                     help=f"deployer: the dashboard's address [default: {DEFAULT_HOST}]"),
        click.option("--dashboard-token-file", type=click.Path(path_type=Path), default=None,
                     help="deployer: dashboard logins, NAME:TOKEN[:ROLE] per line (created with "
                          "one 'operator' token if missing) [default: "
                          ".shipyard/nodes/<name>/dashboard.token]"),
        click.option("--dashboard-creds", type=click.Path(path_type=Path, dir_okay=False),
                     default=None,
                     help="deployer: credentials of the user identity (role deployer) the "
                          "dashboard signs rollbacks and deploys with, on a stack with "
                          "auth [default: the page is read-only there]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def dashboard_node_extra(role: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The Deployer's ``dashboard`` argument from the options; usage error if misplaced."""
    port = options.get("dashboard_port")
    given = [k for k, v in options.items() if v is not None]
    if role != "deployer":
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise click.BadParameter(f"{flag} is for deployer nodes", param_hint=flag)
        return {}
    if port is None:
        extra = [k for k in given if k != "dashboard_port"]
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise click.BadParameter(f"{flag} needs --dashboard-port", param_hint=flag)
        return {}
    host = options.get("dashboard_host") or DEFAULT_HOST
    token_file = options.get("dashboard_token_file") or (
        Path(".shipyard") / "nodes" / name / TOKEN_FILE)
    try:
        ensure_token_file(token_file, "operator")
    except (OSError, TokenFileError) as exc:
        raise click.BadParameter(str(exc), param_hint="--dashboard-token-file") from None
    creds = options.get("dashboard_creds")
    if creds is not None:
        _check_creds(creds)
    return {"dashboard": DashboardConfig(token_file=token_file, host=host, port=port,
                                         creds=creds)}


def _check_creds(path: Path) -> None:
    hint = "--dashboard-creds"
    if not path.is_file():
        raise click.BadParameter(f"credentials file {path} not found", param_hint=hint)
    if not is_shipyard_credentials(str(path)):
        raise click.BadParameter(f"{path} is not a shipyard credentials file",
                                 param_hint=hint)
    try:
        identity = read_credentials(str(path))
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None
    if identity.kind != "user" or identity.role not in ACTING_ROLES:
        raise click.BadParameter(f"{path} holds {identity.kind} {identity.name!r} with role "
                                 f"{identity.role}: the dashboard acts as a user with role "
                                 "deployer (or admin)", param_hint=hint)


# -- shipyard up -----------------------------------------------------------------------------

def up_dashboard_options(fn: F) -> F:
    fn = click.option("--dashboard-host", default=DEFAULT_HOST, show_default=True,
                      help="The web dashboard's address (the Deployer serves it).")(fn)
    return click.option(
        "--dashboard-port", type=click.IntRange(-1, 65535), default=None,
        help=f"Web dashboard and /metrics port (0: no dashboard; -1: any free port). "
             f"[default: {DEFAULT_PORT} if free, else any free port]")(fn)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_port(host: str, port: int | None, taken: dict[str, int]) -> int:
    """The dashboard port ``up`` uses (0: none).  Raises ``click.BadParameter``."""
    hint = "--dashboard-port"
    if port == 0:
        return 0
    if port is None:
        if DEFAULT_PORT not in taken.values() and not in_use(host, DEFAULT_PORT):
            return DEFAULT_PORT
        return _free_port(host)
    if port == -1:
        return _free_port(host)
    for option, other in taken.items():
        if other == port:
            raise click.BadParameter(f"{port} is also {option}: each needs its own port",
                                     param_hint=hint)
    if in_use(host, port):
        raise click.BadParameter(f"port {port} is already in use on {host} (another stack?): "
                                 "choose another, -1 for any free port, or 0 for no "
                                 "dashboard", param_hint=hint)
    return port


def prepare_up(home: Path, auth: StackAuth | None) -> tuple[Path, Path | None]:
    """The token file (``admin`` may log in) and, with auth, the dashboard identity's
    credentials; both kept across restarts.  Call before the NATS server starts, so its
    config knows the identity."""
    token_file = home / TOKEN_FILE
    ensure_token_file(token_file, "admin")
    if auth is None:
        return token_file, None
    known = {i.name: i for i in auth.store.identities()}
    identity = known.get(DASHBOARD_IDENTITY)
    if identity is None:
        auth.store.add(DASHBOARD_IDENTITY, kind="user", role="deployer")
    elif identity.kind != "user" or identity.role not in ACTING_ROLES or identity.revoked:
        state = "revoked" if identity.revoked else f"a {identity.kind} {identity.role}"
        raise click.ClickException(
            f"identity {DASHBOARD_IDENTITY!r} in {auth.store.dir} is {state}: the dashboard "
            "cannot act as it; run with --dashboard-port 0 or use another home")
    return token_file, auth.store.creds_path(DASHBOARD_IDENTITY)


def add_dashboard(children: list[Child], *, port: int, host: str, token_file: Path,
                  creds: Path | None) -> None:
    """The Deployer child's dashboard arguments."""
    if not port:
        return
    for child in children:
        if child.role == "deployer":
            child.argv += ["--dashboard-port", str(port), "--dashboard-host", host,
                           "--dashboard-token-file", str(token_file)]
            if creds is not None:
                child.argv += ["--dashboard-creds", str(creds)]


def dashboard_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


async def serving(host: str, port: int, timeout: float = 10.0) -> bool:
    """Whether the dashboard accepts connections within ``timeout`` seconds."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    with anyio.move_on_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp(target, port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return True
    return False
