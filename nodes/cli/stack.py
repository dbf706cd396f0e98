"""``shipyard up`` (the embedded stack) and ``shipyard node start`` (one node worker)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import click
import nats.errors
from nats.aio.msg import Msg
from rich.text import Text

import nodes
from nodes.auth.keys import (
    Credentials,
    CredentialsError,
    is_shipyard_credentials,
    read_credentials,
)
from nodes.auth.registry import publish_identities
from nodes.auth.stack import StackAuth
from nodes.auth.stack import prepare as prepare_auth
from nodes.cli.apinodes import (
    add_http_port,
    api_node_extra,
    api_node_options,
    print_api_urls,
)
from nodes.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FloatRange,
    err,
    home_option,
    nats_option,
    out,
    parse_duration,
    styled,
    table,
)
from nodes.cli.dashboard import (
    add_dashboard,
    dashboard_node_extra,
    dashboard_node_options,
    dashboard_url,
    pick_port,
    prepare_up,
    serving,
    up_dashboard_options,
)
from nodes.cli.envs import env_node_extra, env_node_options, env_up_argv
from nodes.cli.ports import FREE, check_ports, in_use, port_type
from nodes.deployer.dashboard.access import ensure_token_file
from nodes.roles import ROLE_NAMES, role_class
from nodes.runtime.calls import Caller
from nodes.runtime.connection import CannotReachNats, connect
from nodes.runtime.embedded import (
    EmbeddedCluster,
    EmbeddedNats,
    EmbeddedNatsError,
    wait_jetstream,
)
from nodes.runtime.logs import configure_logging
from nodes.runtime.run import run_node
from nodes.runtime.settings import STACK_FILE, NatsSettings, read_stack_file, resolve
from nodes.runtime.supervisor import Child, Supervisor, describe_exit
from protocol import subjects
from protocol.deploy import CreateInfra
from protocol.errors import OperationError, ShipyardError, Unavailable
from protocol.heartbeat import HEARTBEAT, MAX_INTERVAL_S, MIN_INTERVAL_S
from protocol.reports import REPORT, NodeExit

DEFAULT_INFRA = {"automation": "automation", "api": "api"}
NATS_HOST = "127.0.0.1"
HTTP_HOST = "0.0.0.0"  # the API nodes' default --http-host
CONTROL_INFRA = "control"


def default_infra(role: str) -> str:
    return DEFAULT_INFRA.get(role, CONTROL_INFRA)


def default_node_name(role: str) -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{role}-{host or 'host'}"


# -- shipyard node start -------------------------------------------------------------------

@click.group()
def node() -> None:
    """Run node workers, and forget nodes that are gone."""


@node.command("start")
@click.argument("role", type=click.Choice(sorted(ROLE_NAMES)))
@click.option("--name", help="Node name, unique in the stack. Default: <role>-<hostname>.")
@click.option("--infra", help="Infrastructure to join. Default: automation/api for those "
                              "roles, 'control' otherwise.")
@nats_option
@click.option("--creds", metavar="FILE", default=None, type=click.Path(dir_okay=False),
              help="Credentials file of this node's identity ('shipyard auth node add'). "
                   "Default: $SHIPYARD_NATS_CREDS.")
@click.option("--heartbeat-interval", type=FloatRange(MIN_INTERVAL_S, MAX_INTERVAL_S),
              default=2.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--forget-after", metavar="DURATION", default="1d", show_default=True,
              help="deployer: forget nodes lost for this long (30s, 15m, 2h, 1d; 0: never).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests handled at once.")
@click.option("--approvals", type=click.IntRange(min=1), default=None,
              help="govern: approvals a review needs (default 1).")
@click.option("--workspace", type=click.Path(path_type=Path), default=None,
              help="design: the folder whose subfolders with a shipyard.toml are projects "
                   "(default ./projects).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="automation, api, design: where bundles, data and run logs live "
                   "(default ./.shipyard/nodes/<name>).")
@click.option("--keep-bundles", type=click.IntRange(min=2), default=5, show_default=True,
              help="automation: unpacked bundles kept per project (rollbacks to them "
                   "transfer nothing).")
@click.option("--log-level", default=None, help="debug, info, warning or error.")
@env_node_options
@api_node_options
@dashboard_node_options
def node_start(role: str, name: str | None, infra: str | None, nats_url: str | None,
               creds: str | None, heartbeat_interval: float, forget_after: str,
               max_concurrency: int, approvals: int | None,
               workspace: Path | None,
               data_dir: Path | None, keep_bundles: int, log_level: str | None,
               index_url: str | None, find_links: tuple[str, ...], no_index: bool,
               env_build_timeout: float | None, env_grace: float | None,
               dashboard_port: int | None, dashboard_host: str | None,
               dashboard_token_file: Path | None, dashboard_creds: Path | None,
               **api_options: Any) -> None:
    """Run one node worker of ROLE in the foreground (SIGINT/SIGTERM stop it gracefully)."""
    configure_logging(log_level)
    identity = node_credentials(role, name, infra, creds or os.environ.get(
        "SHIPYARD_NATS_CREDS"))
    name = name or (identity.name if identity else default_node_name(role))
    infra = infra or (identity.infra if identity and identity.infra else default_infra(role))
    try:
        subjects.token(name, "node name")
        subjects.token(infra, "infra name")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    settings = resolve(nats_url, creds=creds)
    extra: dict[str, Any] = {}
    if role == "design":
        extra["workspace"] = workspace or Path("projects")
    elif workspace is not None:
        raise click.BadParameter("--workspace is for design nodes", param_hint="--workspace")
    if role in ("automation", "api", "design"):
        extra["data_dir"] = data_dir or Path(".shipyard") / "nodes" / name
    elif data_dir is not None:
        raise click.BadParameter("--data-dir is for automation, api and design nodes",
                                 param_hint="--data-dir")
    if role == "automation":
        extra["keep_bundles"] = keep_bundles
    if role == "deployer":
        extra["forget_after"] = parse_duration(forget_after) or None
    elif forget_after != "1d":
        raise click.BadParameter("--forget-after is for deployer nodes",
                                 param_hint="--forget-after")
    if role == "govern":
        extra["approvals"] = approvals or 1
    elif approvals is not None:
        raise click.BadParameter("--approvals is for govern nodes", param_hint="--approvals")
    extra.update(api_node_extra(role, api_options))
    extra.update(dashboard_node_extra(role, name, dict(
        dashboard_port=dashboard_port, dashboard_host=dashboard_host,
        dashboard_token_file=dashboard_token_file, dashboard_creds=dashboard_creds)))
    extra.update(env_node_extra(role, dict(
        index_url=index_url, find_links=find_links, no_index=no_index,
        env_build_timeout=env_build_timeout, env_grace=env_grace)))
    build = partial(role_class(role), name=name, infra=infra, nats=settings,
                    heartbeat_interval=heartbeat_interval,
                    max_concurrency=max_concurrency, **extra)
    instance = build()  # a leased role that stops acting starts over as a standby here
    sys.exit(run_node(instance, again=build if instance.leased else None))


def node_credentials(role: str, name: str | None, infra: str | None,
                     creds: str | None) -> Credentials | None:
    """The node identity in a shipyard credentials file, checked against the options:
    its name and infra are the defaults, and a mismatch is a usage error now rather than
    a server refusal of every heartbeat later."""
    if not creds:
        return None
    if not Path(creds).is_file():
        raise click.BadParameter(f"credentials file {creds} not found", param_hint="--creds")
    if not is_shipyard_credentials(creds):
        return None  # a NATS JWT .creds file: the server decides
    try:
        identity = read_credentials(creds)
    except CredentialsError as exc:
        raise click.BadParameter(str(exc), param_hint="--creds") from None
    if identity.kind != "node" or identity.role != role:
        raise click.BadParameter(f"{creds} holds {identity.kind} {identity.name!r} with role "
                                 f"{identity.role}: it cannot run as role {role}",
                                 param_hint="--creds")
    if name is not None and name != identity.name:
        raise click.BadParameter(f"{creds} is node {identity.name!r}'s, not {name!r}'s "
                                 "(its NATS user may publish only as itself)",
                                 param_hint="--name")
    if infra is not None and identity.infra and infra != identity.infra:
        raise click.BadParameter(f"{creds} is for infra {identity.infra!r}, not {infra!r}",
                                 param_hint="--infra")
    return identity


# -- shipyard up --------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plan(automation: int, api: int, cluster: int = 1) -> list[tuple[str, str]]:
    """(role, name) of every node ``up`` runs.  On a cluster, a second Deployer and a
    second Govern node wait as standbys (one instance of each is active: a lease)."""
    plan: list[tuple[str, str]] = [("deployer", "deployer"), ("design", "design"),
                                   ("govern", "govern")]
    if cluster > 1:
        plan += [("deployer", "deployer-2"), ("govern", "govern-2")]
    plan += [("automation", f"automation-{i + 1}") for i in range(automation)]
    plan += [("api", f"api-{i + 1}") for i in range(api)]
    return plan


def _children(home: Path, url: str, *, automation: int, api: int,
              heartbeat_interval: float, workspace: Path,
              creds: dict[str, Path] | None = None,
              env_argv: list[str] | None = None, approvals: int = 1,
              cluster: int = 1) -> list[Child]:
    children = []
    for role, name in _plan(automation, api, cluster):
        # -P: the user's current folder must not shadow our packages (say, a "nodes/").
        argv = [sys.executable, "-P", "-m", "nodes.cli", "node", "start", role, "--name", name,
                "--infra", default_infra(role), "--nats", url,
                "--heartbeat-interval", str(heartbeat_interval)]
        if role == "design":
            argv += ["--workspace", str(workspace)]
        if role == "govern":
            argv += ["--approvals", str(approvals)]
        if role in ("automation", "api", "design"):
            argv += ["--data-dir", str(home / "nodes" / name), *(env_argv or [])]
        if creds is not None:
            argv += ["--creds", str(creds[name])]
        children.append(Child(name=name, role=role, argv=argv,
                              log_path=home / "logs" / f"{name}.log",
                              env={"SHIPYARD_LOG_FORMAT": "json",
                                   "SHIPYARD_REPLICAS": str(_replicas(cluster))}))
    return children


@click.command()
@home_option
@click.option("--nats-port", type=port_type(allow_free=True), default=4222, show_default=True,
              help="NATS client port (-1: pick a free one).")
@click.option("--monitor-port", type=port_type(allow_free=True), default=None,
              help="NATS monitoring port (/varz, /healthz, ...; -1: pick a free one). "
                   "[default: 8222 if free, else any free port]")
@click.option("--http-port", type=port_type(allow_free=False), default=8080,
              show_default=True, help="HTTP port for API services.")
@click.option("--automation-nodes", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--api-nodes", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--heartbeat-interval", type=FloatRange(MIN_INTERVAL_S, MAX_INTERVAL_S),
              default=2.0, show_default=True)
@click.option("--workspace", type=click.Path(path_type=Path), default=Path("projects"),
              show_default=True, help="The Design node's workspace: one project per folder.")
@click.option("--insecure", is_flag=True,
              help="No auth: anyone who reaches NATS may deploy. [default: identities, "
                   "signed commands and per-node NATS users, kept in HOME/auth]")
@click.option("--approvals", type=click.IntRange(min=1), default=1, show_default=True,
              help="Approvals a sign-off review needs before a deployment counts as "
                   "approved (the Govern node's --approvals).")
@click.option("--cluster", type=click.Choice(["1", "3", "5"]), default="1",
              show_default=True,
              help="NATS servers: 3 or 5 run a JetStream cluster on this host (client "
                   "ports from --nats-port up, every stream and bucket at R3, two "
                   "Deployers and two Govern nodes, one of each active).")
@up_dashboard_options
@env_node_options
def up(home: Path, nats_port: int, monitor_port: int | None, http_port: int,
       automation_nodes: int, api_nodes: int, heartbeat_interval: float,
       workspace: Path, insecure: bool, approvals: int, cluster: str,
       dashboard_port: int | None, dashboard_host: str,
       **env_options: Any) -> None:
    """Start the whole stack in the foreground: embedded NATS and every node role.

    Writes HOME/stack.json so other commands run in this folder find the stack.  If a
    NATS server dies it is restarted on the same ports and store.  Ctrl-C stops everything.
    """
    size = int(cluster)
    configure_logging()
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    previous = read_stack_file(home)
    if previous and isinstance(previous.get("pid"), int) and previous["pid"] != os.getpid() \
            and _pid_alive(previous["pid"]):
        err.print(f"shipyard: a stack is already running from {home} "
                  f"(pid {previous['pid']}, NATS {previous.get('nats_url')})")
        sys.exit(EXIT_FAILED)
    monitor_port = check_ports(nats_host=NATS_HOST, http_host=HTTP_HOST, nats_port=nats_port,
                               monitor_port=monitor_port, http_port=http_port)
    ports = _cluster_ports(size, nats_port, monitor_port, http_port)
    dashboard_port = pick_port(dashboard_host, dashboard_port, {
        "--nats-port": nats_port, "--http-port": http_port, "--monitor-port": monitor_port})
    auth = None
    if not insecure:
        try:
            auth = prepare_auth(home, [(role, name, default_infra(role))
                                       for role, name in _plan(automation_nodes, api_nodes,
                                                               size)])
        except ShipyardError as exc:
            err.print(f"shipyard: {exc}")
            sys.exit(EXIT_FAILED)
    board = None
    if dashboard_port:
        try:
            token_file, board_creds = prepare_up(home, auth)
        except (OSError, ValueError, ShipyardError) as exc:
            err.print(f"shipyard: {exc}")
            sys.exit(EXIT_FAILED)
        board = Board(dashboard_host, dashboard_port, token_file, board_creds)
    code = anyio.run(partial(_up, approvals=approvals, board=board), home, nats_port,
                     monitor_port, http_port, automation_nodes, api_nodes,
                     heartbeat_interval, workspace.resolve(), auth,
                     env_up_argv(env_options), ports)
    sys.exit(code)


def _replicas(cluster: int) -> int:
    """JetStream replicas of every shipyard stream, bucket and object store."""
    return min(cluster, 3)


def _cluster_ports(size: int, nats_port: int, monitor_port: int,
                   http_port: int) -> tuple[list[int], list[int]] | None:
    """Client and monitoring ports of a cluster's servers: the given ones and the next
    ``size - 1`` above each (or free ones for -1), checked like ``check_ports`` does."""
    if size == 1:
        return None
    clients = [nats_port + i if nats_port != FREE else FREE for i in range(size)]
    monitors = [monitor_port + i if monitor_port != FREE else FREE for i in range(size)]
    taken = {http_port}
    for option, ports in (("--nats-port", clients), ("--monitor-port", monitors)):
        for port in ports[1:]:
            if port == FREE:
                continue
            if port > 65535 or port in taken or port in clients[:1] + monitors[:1] \
                    or in_use(NATS_HOST, port):
                raise click.BadParameter(
                    f"--cluster {size} needs ports {ports[0]}-{ports[-1]}, and {port} is "
                    "taken: choose another base port or -1 for free ones", param_hint=option)
            taken.add(port)
    return clients, monitors


@dataclass(frozen=True)
class Board:
    """The dashboard ``up`` has the Deployer serve."""

    host: str
    port: int
    token_file: Path
    creds: Path | None

    @property
    def url(self) -> str:
        return dashboard_url(self.host, self.port)


async def _up(home: Path, nats_port: int, monitor_port: int, http_port: int,
              automation: int, api: int, heartbeat_interval: float, workspace: Path,
              auth: StackAuth | None = None, env_argv: list[str] | None = None,
              cluster_ports: tuple[list[int], list[int]] | None = None,
              approvals: int = 1, board: Board | None = None) -> int:
    config = auth.store.server_config if auth else None
    servers: list[EmbeddedNats]
    if cluster_ports is None:
        servers = [EmbeddedNats(home / "nats", host=NATS_HOST, port=nats_port,
                                monitor_port=monitor_port,
                                log_file=home / "logs" / "nats.log", server_name="shipyard",
                                config_file=config, die_with_parent=True)]
    else:
        servers = EmbeddedCluster(home / "nats", size=len(cluster_ports[0]), host=NATS_HOST,
                                  ports=cluster_ports[0], monitor_ports=cluster_ports[1],
                                  log_dir=home / "logs", config_file=config,
                                  die_with_parent=True).servers
    server = servers[0]
    try:
        for s in servers:
            s.spawn()
        for s in servers:
            await anyio.to_thread.run_sync(s.wait_ready, 20.0)
    except EmbeddedNatsError as exc:
        for s in servers:
            await s.astop()
        err.print(f"shipyard: cannot start NATS: {exc}")
        return EXIT_FAILED
    url = ",".join(s.url for s in servers)
    replicas = _replicas(len(servers))

    children = _children(home, url, automation=automation, api=api,
                         heartbeat_interval=heartbeat_interval, workspace=workspace,
                         creds=auth.creds if auth else None, env_argv=env_argv,
                         approvals=approvals, cluster=len(servers))
    add_http_port(children, http_port)
    if board is not None:
        add_dashboard(children, port=board.port, host=board.host,
                      token_file=board.token_file, creds=board.creds)
    # With auth, this process acts as the stack's admin (and signs what it sends).
    settings = NatsSettings(servers=tuple(s.url for s in servers),
                            creds_file=str(auth.admin) if auth else None, replicas=replicas)
    try:
        nc = await connect(settings, name="shipyard-up")
        await wait_jetstream(nc)  # a new cluster elects its meta leader first
        if auth:  # what the Deployer verifies commands against
            await publish_identities(nc, auth.store.identities(), replicas=replicas)
    except (CannotReachNats, OperationError, EmbeddedNatsError) as exc:
        for s in servers:
            await s.astop()
        err.print(f"shipyard: {exc}")
        return EXIT_FAILED

    async def report_exit(child: Child, code: int) -> None:
        report = NodeExit(node=child.name, role=child.role, infra=default_infra(child.role),
                          pid=child.pid or 0, reason=f"process {describe_exit(code)}")
        await nc.publish(report.subject(), REPORT.encode(report))

    supervisor = Supervisor(on_exit=report_exit)
    for child in children:
        supervisor.add(child)
    stack = {"nats_url": url, "monitor_url": server.monitor_url,
             "nats_pid": server.proc.pid if server.proc else None,
             "servers": _describe_servers(servers),
             "http_url": f"http://127.0.0.1:{http_port}", "pid": os.getpid(),
             "home": str(home), "replicas": replicas, "started_at": time.time(),
             "version": nodes.__version__, **(auth.stack_fields() if auth else {}),
             **({"dashboard_url": board.url, "dashboard_token_file": str(board.token_file)}
                if board else {})}
    await _write_stack(home, stack)

    def named(s: EmbeddedNats) -> str:
        return f" {s.server_name}" if len(servers) > 1 else ""

    def on_exit(s: EmbeddedNats) -> Callable[[int, float], Awaitable[None]]:
        async def nats_exited(code: int, delay: float) -> None:
            out.print(f"NATS        server{named(s)} {describe_exit(code)}; restarting "
                      f"in {delay:g}s on port {s.port} with store {s.store_dir}")
        return nats_exited

    def on_restart(s: EmbeddedNats) -> Callable[[], Awaitable[None]]:
        async def nats_restarted() -> None:
            pid = s.proc.pid if s.proc else None
            # stack.json first: whoever reads the line below finds the new pid there.
            stack.update(servers=_describe_servers(servers),
                         nats_restarts=sum(x.restarts for x in servers))
            if s is server:
                stack["nats_pid"] = pid
            await _write_stack(home, stack)
            out.print(f"NATS       {named(s)} restarted (pid {pid}, restart "
                      f"{s.restarts}); nodes reconnect on their own")
        return nats_restarted

    code = EXIT_OK
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                for s in servers:
                    out.print(f"NATS        {s.url}  (monitoring {s.monitor_url}, "
                              f"store {s.store_dir})")
                    tg.start_soon(partial(s.keep_running, on_exit=on_exit(s),
                                          on_restart=on_restart(s)))
                if len(servers) > 1:
                    out.print(f"cluster     {len(servers)} servers, JetStream R{replicas}; "
                              "one Deployer and one Govern node active, one standby each")
                _print_auth(auth)
                await tg.start(supervisor.run)
                ok = await _wait_online(nc, children, timeout=30.0)
                _print_children(children, home)
                await _default_infras(nc)
                await print_api_urls(nc, http_port, tg)
                await _print_dashboard(board)
                out.print(f"workspace   {workspace}  (projects: one folder each, with "
                          "shipyard.toml)")
                if not ok:
                    err.print("shipyard: some nodes did not come online; see their logs")
                out.print(f"stack file  {home / STACK_FILE}")
                out.print(Text.assemble(styled("ready", "bold"), ": run 'shipyard nodes' "
                                        "in this folder; Ctrl-C stops the stack"))
                async for _sig in signals:
                    break
                out.print("stopping nodes ...")
                await supervisor.stop()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await supervisor.stop()
            with anyio.move_on_after(2):
                await nc.close()
            out.print("stopping NATS ...")
            for s in servers:
                s.stopping = True
            for s in servers:
                await s.astop()
            if (home / STACK_FILE).exists():
                current = read_stack_file(home)
                if current and current.get("pid") == os.getpid():
                    (home / STACK_FILE).unlink()
            out.print("stopped")
    return code


def _describe_servers(servers: list[EmbeddedNats]) -> list[dict[str, Any]]:
    """Every NATS server as ``stack.json`` lists it."""
    return [{"name": s.server_name, "url": s.url, "monitor_url": s.monitor_url,
             "monitor_port": s.monitor_port,
             "cluster_port": s.cluster.port if s.cluster else None,
             "pid": s.proc.pid if s.proc else None, "restarts": s.restarts}
            for s in servers]


async def _write_stack(home: Path, stack: dict[str, Any]) -> None:
    """Write stack.json whole (a reader never sees half a file)."""
    tmp = anyio.Path(home / (STACK_FILE + ".tmp"))
    await tmp.write_text(json.dumps(stack, indent=2) + "\n")
    await tmp.replace(home / STACK_FILE)


async def _wait_online(nc: Any, children: list[Child], timeout: float) -> bool:
    """Wait until every child has sent a heartbeat (event-driven, with a deadline)."""
    waiting = {c.name for c in children}
    done = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        try:
            hb = HEARTBEAT.decode(msg.data, msg.subject)
        except Exception:
            return
        if hb.node in waiting:
            waiting.discard(hb.node)
            out.print(f"  online    {hb.node:<16} {hb.role:<11} pid {hb.pid}")
            if not waiting:
                done.set()

    sub = await nc.subscribe(subjects.HEARTBEATS_ALL, cb=on_beat)
    try:
        with anyio.move_on_after(timeout):
            await done.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return not waiting


DEPLOYER_ACTIVE_WITHIN_S = 30.0  # how long up waits for a Deployer to take the lease


async def _default_infras(nc: Any) -> None:
    """The infras ``up`` places its nodes in (kept if they already exist)."""
    caller = Caller(nc, sender="shipyard-up")
    for name, kind in (("automation", "automation"), ("api", "api")):
        # A Deployer heartbeats as a standby before it holds the lease and serves commands:
        # until one is active nothing answers, so an unanswered create is sent again (it
        # is idempotent: exist_ok) for up to DEPLOYER_ACTIVE_WITHIN_S.
        deadline = time.monotonic() + DEPLOYER_ACTIVE_WITHIN_S
        while True:
            try:
                await caller.call(CreateInfra(name=name, kind=kind, stage="development",
                                              exist_ok=True, by="shipyard up"), timeout=10)
            except Unavailable:
                if time.monotonic() < deadline:
                    await anyio.sleep(0.2)
                    continue
                err.print(f"shipyard: could not create infra {name}: no Deployer became "
                          f"active within {DEPLOYER_ACTIVE_WITHIN_S:g}s")
            except OperationError as exc:
                err.print(f"shipyard: could not create infra {name}: {exc.message}")
            break
    out.print("infras      automation (automation nodes), api (API nodes)")


async def _print_dashboard(board: Board | None) -> None:
    if board is None:
        out.print("dashboard   off (--dashboard-port 0)")
        return
    token = ensure_token_file(board.token_file, "admin")
    if not await serving(board.host, board.port):
        err.print(f"shipyard: the dashboard is not answering on {board.url}: see the "
                  "deployer's log")
    out.print(f"dashboard   {board.url}  (log in: {board.url}/login?token={token}; "
              f"logins in {board.token_file})")


def _print_auth(auth: StackAuth | None) -> None:
    if auth is None:
        out.print("auth        off (--insecure): anyone who reaches NATS may deploy")
        return
    made = "created" if auth.created else "kept"
    out.print(f"auth        on: identities {made} in {auth.store.dir}; the CLI here acts as "
              f"admin ({auth.admin}); add people with 'shipyard auth user add'")


def _print_children(children: list[Child], home: Path) -> None:
    rows = [(c.name, c.role, default_infra(c.role), c.pid, str(c.log_path.relative_to(home)))
            for c in children]
    table(["NODE", "ROLE", "INFRA", "PID", f"LOG (in {home})"], rows)
