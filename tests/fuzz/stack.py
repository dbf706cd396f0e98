"""A stack for fuzzing: one nats-server and one real process per node, started once per
test module, probed between batches of junk.

Nodes run as subprocesses (``shipyard node start``) so a node that dies from input shows
as a dead process rather than as an exception in the test, their memory can be measured
with psutil, and no task group is held across a fixture's yield.  Tests talk to them with
a plain nats-py client opened per example.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
from nats.aio.client import Client as NATS

from nodes.roles import ROLES
from nodes.runtime.embedded import EmbeddedNats
from protocol import subjects
from protocol.base import Family, make_request
from protocol.errors import _BY_CODE
from protocol.families import ALL
from protocol.registry import ListNodes, NodeInfo, NodeList
from protocol.system import SYSTEM, Ping, Pong
from tests.helpers import Background, shipyard_argv, wait_until

HB = 0.2
ERROR_CODES = frozenset(_BY_CODE)
"""Every code an error reply may carry."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(repr=False)
class NodeProc:
    name: str
    role: str
    args: list[str]
    proc: Background
    http_url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def rss(self) -> int:
        """Resident memory of the node process (its worker children excluded)."""
        return int(psutil.Process(self.pid).memory_info().rss)


@dataclass(repr=False)
class FuzzStack:
    server: EmbeddedNats
    tmp: Path
    env: dict[str, str]
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    damaged: bool = False  # an example failed: start the next one on fresh processes
    healthy: bool = False  # the last example ended with every node up and answering

    def __repr__(self) -> str:
        return f"FuzzStack({self.server.url}, nodes={sorted(self.nodes)})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis's printer
        p.text(repr(self))

    # -- processes -------------------------------------------------------------------

    def start(self, role: str, *extra: str, http: bool = False) -> NodeProc:
        name = node_name(role)
        args = ["node", "start", role, "--name", name, "--nats", self.server.url,
                "--heartbeat-interval", str(HB)]
        if role in ("api", "automation", "design"):
            args += ["--data-dir", str(self.tmp / "nodes" / name)]
        if role == "design":
            args += ["--workspace", str(self.tmp / "ws")]
        url = None
        if role in ("api", "gateway"):
            if http:
                port = free_port()
                args += ["--http-port", str(port), "--http-host", "127.0.0.1"]
                url = f"http://127.0.0.1:{port}"
            elif role == "api":
                args += ["--no-http"]
            else:
                args += ["--http-port", str(free_port()), "--http-host", "127.0.0.1"]
        if role == "api":
            args += ["--workers", "1", "--metrics-interval", "0.5"]
        argv = shipyard_argv(*args, *extra)
        node = NodeProc(name=name, role=role, args=argv, proc=Background(argv, env=self.env),
                        http_url=url)
        self.nodes[name] = node
        return node

    def restart(self, node: NodeProc) -> None:
        """A fresh process for ``node`` (same name, ports and data), once it is ready."""
        node.proc.stop(signal.SIGKILL if node.alive() else signal.SIGTERM, timeout=10)
        node.proc = Background(node.args, env=self.env)
        node.proc.wait_line("node ready", timeout=60)

    def start_all(self, roles: Iterable[str], *, http: bool = False) -> None:
        started = [self.start(role, http=http) for role in roles]
        for node in started:
            node.proc.wait_line("node ready", timeout=60)
        wait_until(lambda: all(n.alive() for n in started), timeout=5)

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                node.proc.stop(signal.SIGTERM, timeout=20)
        self.server.stop()

    def complaints(self, limit: int = 8) -> list[str]:
        """The last warnings and errors the nodes logged (distinct, shortened)."""
        out: list[str] = []
        for node in self.nodes.values():
            seen: dict[str, None] = {}
            for line in node.proc.lines[-2000:]:
                if '"level": "warning"' in line or '"level": "error"' in line \
                        or "Traceback" in line or "Error" in line:
                    seen[line[:300]] = None
            out += [f"{node.name} logged: {x}" for x in list(seen)[-limit:]]
        return out

    def dead(self) -> list[str]:
        """Nodes whose process has ended, with their last lines of output."""
        return [f"{n.name} exited {n.proc.proc.returncode}:\n" + "\n".join(n.proc.lines[-15:])
                for n in self.nodes.values() if not n.alive()]

    # -- NATS ------------------------------------------------------------------------

    @asynccontextmanager
    async def client(self) -> AsyncIterator[NATS]:
        nc = await nats.connect(self.server.url, name="fuzz", allow_reconnect=False,
                                connect_timeout=5)
        try:
            yield nc
        finally:
            await nc.close()

    async def connections(self) -> set[str]:
        """Names of the client connections the server holds now."""
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(f"{self.server.monitor_url}/connz?limit=4096")
        return {c.get("name", "") for c in r.json().get("connections") or []}

    async def problems(self, nc: NATS, *, timeout: float = 5.0) -> list[str]:
        """What is wrong with the stack now: dead processes, nodes that lost their
        connection, nodes that do not answer a ping."""
        out = self.dead()
        conns = await self.connections()
        for node in self.nodes.values():
            if node.alive() and f"{node.role}:{node.name}" not in conns:
                out.append(f"{node.name} (pid {node.pid}) is alive but has no NATS connection")
        for node in self.nodes.values():
            if not node.alive():
                continue
            try:
                msg = await nc.request(subjects.node_command(node.name, "ping"),
                                       make_request(Ping(), sender="fuzz"), timeout=timeout)
                reply = SYSTEM.replies.decode(msg.data)
                if not isinstance(reply.ok, Pong) or reply.ok.node != node.name:
                    out.append(f"{node.name} answered ping with {msg.data[:200]!r}")
            except Exception as exc:
                out.append(f"{node.name} does not answer ping: {type(exc).__name__} {exc}")
        return out

    async def heal(self, nc: NATS) -> list[str]:
        """Restart every node that is dead, disconnected or deaf, so each example starts
        from a working stack and a failure belongs to the example that caused it."""
        if not self.damaged and self.healthy:
            return []  # the last example ended with every node answering
        broken = await self.problems(nc, timeout=2.0)
        names = {n for n in self.nodes if any(p.startswith(n + " ") for p in broken)}
        if self.damaged:
            names = set(self.nodes)
            self.damaged = False
        for name in sorted(names):
            self.restart(self.nodes[name])
        return broken

    def judge(self, failures: list[str], *, stateful: bool = True) -> None:
        """Fail the example with ``failures``.  The next example gets fresh nodes: all of
        them if the failure may have left state behind (``stateful``), else those that
        are dead, disconnected or deaf."""
        self.healthy = not failures
        if failures:
            self.damaged = stateful
            failures = [*failures, *self.complaints()]
        assert not failures, "\n".join(failures)

    async def list_nodes(self, nc: NATS, **kw: Any) -> NodeList:
        family = Family.of(ListNodes)
        msg = await nc.request(subjects.command(family.role, "nodes.list"),
                               make_request(ListNodes(**kw), sender="fuzz"), timeout=5)
        reply = family.replies.decode(msg.data)
        assert reply.error is None and isinstance(reply.ok, NodeList), reply
        return reply.ok

    async def listed(self, nc: NATS) -> dict[str, NodeInfo] | str:
        """Every node the registry lists, or why the Deployer would not say."""
        try:
            return {n.name: n for n in (await self.list_nodes(nc)).nodes}
        except Exception as exc:
            return f"ListNodes failed: {type(exc).__name__} {str(exc)[:300]}"


def node_name(role: str) -> str:
    return f"fz-{role}"


def command_targets(roles: Iterable[str]) -> list[tuple[str, Family, str]]:
    """(subject, family, verb) of every command the nodes of ``roles`` answer: role
    commands once per family, node-direct commands once per node that serves them.
    Built from the protocol's families and the role classes, so a new verb, family or
    role is fuzzed without a change here."""
    out: list[tuple[str, Family, str]] = []
    served: set[str] = set()
    for family in ALL:
        for role in sorted(roles):
            cls = ROLES[role]
            if family.direct and family in (SYSTEM, *cls.direct_families):
                out += [(subjects.node_command(node_name(role), verb), family, verb)
                        for verb in family.verbs]
                served.add(family.role)
            elif not family.direct and cls.family is family:
                out += [(subjects.command(family.role, verb), family, verb)
                        for verb in family.verbs]
                served.add(family.role)
    missing = {f.role for f in ALL} - served
    assert not missing, f"no node of {sorted(roles)} serves the families {sorted(missing)}"
    return out


def fuzz_env(base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith("SHIPYARD_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["SHIPYARD_LOG_FORMAT"] = "json"
    return env


def start_stack(tmp: Path, roles: Iterable[str], *, http: bool = False) -> FuzzStack:
    (tmp / "ws").mkdir(parents=True, exist_ok=True)
    server = EmbeddedNats(tmp / "nats", port=-1, monitor_port=-1, log_file=tmp / "nats.log")
    server.start()
    stack = FuzzStack(server=server, tmp=tmp, env=fuzz_env(dict(os.environ)))
    try:
        stack.start_all(roles, http=http)
    except BaseException:
        stack.stop()
        raise
    return stack
