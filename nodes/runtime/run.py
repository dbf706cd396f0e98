"""Running a node as a process: signals, event loop, exit codes."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import anyio

from nodes.orphans import die_with_parent
from nodes.runtime.connection import CannotReachNats, ConnectionClosed
from nodes.runtime.lease import LeaseLost
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


def run_node(node: Node) -> int:
    """Run a node in this process until a signal; return the process exit code."""
    die_with_supervisor()
    code = 0
    try:
        anyio.run(serve_until_signalled, node, backend_options=_backend_options())
    except* CannotReachNats as group:
        print(f"shipyard: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* ConnectionClosed as group:
        print(f"shipyard: {group.exceptions[0]}", file=sys.stderr)
        code = 2
    except* LeaseLost as group:  # stepped down: a restart waits as a standby
        print(f"shipyard: {group.exceptions[0]}", file=sys.stderr)
        code = 3
    return code


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
