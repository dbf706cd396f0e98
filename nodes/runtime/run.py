"""Running a node as a process: signals, event loop, exit codes.

A node of a leased role (Deployer, Govern) whose renewals failed until it had to stop
acting (a JetStream election of the lease stream, a partition) starts over in the same
process as a standby: a fresh node (``again()``) with the same instance, which takes
the lease back if nobody else took it meanwhile (``nodes.runtime.lease``).  A restart by
the supervisor cost a second of backoff (doubling while the process kept failing) and
the Python start-up, and let another instance take the role; one whose lease another
instance *took* still exits with code 3.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio

from nodes.orphans import die_with_parent
from nodes.runtime.connection import CannotReachNats, ConnectionClosed
from nodes.runtime.lease import TAKEN, LeaseLost
from nodes.runtime.logs import get_logger
from nodes.runtime.node import Node

PARENT_PID_ENV = "SHIPYARD_PARENT_PID"


def die_with_supervisor() -> None:
    """Under a supervisor, be SIGTERMed if the supervisor dies (a graceful stop)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and parent.isdigit():
        die_with_parent(signal.SIGTERM, parent=int(parent))


async def serve_until_signalled(node: Node) -> None:
    """Serve ``node``; the first SIGINT/SIGTERM stops it gracefully, a second one exits."""
    log = get_logger(node=node.name, role=node.role)

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            count = 0
            async for sig in signals:
                count += 1
                if count == 1:
                    log.info("signal received: stopping gracefully", signal=sig.name)
                    node.stop()
                else:
                    log.warning("second signal: exiting now", signal=sig.name)
                    os._exit(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals)
        await node.serve()
        tg.cancel_scope.cancel()


def run_node(node: Node, again: Callable[[], Node] | None = None) -> int:
    """Run a node in this process until a signal; return the process exit code.

    ``again`` builds a fresh node of the same role and options: given, a leased node
    that stopped acting because its renewals failed (not because another instance took
    the lease) serves again as a standby instead of exiting."""
    die_with_supervisor()
    while True:
        code, lost = _run_once(node)
        if lost is None or again is None or lost.reason == TAKEN or node.stop_asked:
            if lost is not None:
                print(f"shipyard: {lost}", file=sys.stderr)
            return code
        get_logger(node=node.name, role=node.role).warning(
            "stopped acting (lease renewals failed); waiting as a standby again in this "
            "process", reason=lost.reason)
        fresh = again()
        fresh.instance = node.instance  # the same process: the key may still name it
        node = fresh


def _run_once(node: Node) -> tuple[int, LeaseLost | None]:
    lost: LeaseLost | None = None
    code = 0
    try:
        anyio.run(serve_until_signalled, node, backend_options=_backend_options())
    except* CannotReachNats as group:
        print(f"shipyard: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* ConnectionClosed as group:
        print(f"shipyard: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* LeaseLost as group:  # stepped down
        found = group.exceptions[0]
        assert isinstance(found, LeaseLost)
        lost, code = found, 3
    return code, lost


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
