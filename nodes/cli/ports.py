"""``shipyard up``'s ports: checked before anything starts, so a mistake is a usage error
(exit 2) naming the option, not a half-started stack.

* Each port is 1-65535, or -1 for "any free port" (NATS and monitoring only: the HTTP
  port is printed in every endpoint URL, so it is always explicit).
* Two options may not name the same port.
* A port another process already listens on is refused up front.  The probe binds like
  the servers do (``SO_REUSEADDR``), so a port left in TIME_WAIT by a previous stack is
  free, and a port held by another stack's API nodes (``SO_REUSEPORT``) is not: without
  this check a second stack's API nodes would silently share the first one's port.
* ``--monitor-port`` defaults to 8222 when that port is free and no other option takes
  it, and to any free port otherwise, so changing ``--nats-port`` (even to 8222) or
  running a second stack never clashes on monitoring.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import click

FREE = -1
DEFAULT_MONITOR = 8222


def port_type(*, allow_free: bool) -> click.ParamType[int]:
    """A port option's type: 1-65535, and -1 (any free port) if ``allow_free``."""
    return _Port(FREE if allow_free else 1)


class _Port(click.ParamType[int]):
    name = "port"

    def __init__(self, low: int) -> None:
        self.low = low

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            port = value
        else:
            try:
                port = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a port number", param, ctx)
        if port == FREE and self.low == FREE:
            return port
        if not 1 <= port <= 65535:
            hint = " (or -1 for any free port)" if self.low == FREE else ""
            self.fail(f"{port} is not a port: expected 1-65535{hint}", param, ctx)
        return port


def in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (a bind like the servers' fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def check_ports(*, nats_host: str, http_host: str, nats_port: int,
                monitor_port: int | None, http_port: int,
                default_monitor: int = DEFAULT_MONITOR) -> int:
    """Validate ``up``'s ports together; return the monitoring port to use.

    Raises ``click.BadParameter`` (exit 2) naming the option at fault.
    """
    chosen = {"--nats-port": nats_port, "--http-port": http_port}
    if monitor_port is not None:
        chosen["--monitor-port"] = monitor_port
    seen: dict[int, str] = {}
    for option, port in chosen.items():
        if port == FREE:
            continue
        if port in seen:
            raise click.BadParameter(f"{port} is also {seen[port]}: each needs its own port",
                                     param_hint=option)
        seen[port] = option
    for option, port in chosen.items():
        host = http_host if option == "--http-port" else nats_host
        if port != FREE and in_use(host, port):
            raise click.BadParameter(f"port {port} is already in use on {host} (another "
                                     "stack?); choose another" + (
                                         " or -1 for any free port"
                                         if option != "--http-port" else ""),
                                     param_hint=option)
    if monitor_port is None:
        if default_monitor not in seen and not in_use(nats_host, default_monitor):
            return default_monitor
        return FREE
    return monitor_port
