"""structlog, configured once per process.

JSON lines when stderr is not a terminal (collectors, files, CI), a readable console on
one.  Context is carried in contextvars: ``node``/``role`` are bound once per process,
``subject``/``msg_id`` per handled request (``current_request``).
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

_configured = False

# The request a worker is handling: (subject, request id, reply subject).  Set per request
# on the hot path (a ContextVar.set is cheap); read only when something is actually logged,
# or when a handler tells its requester how it is getting on (``Node.progress``).
current_request: ContextVar[tuple[str, str, str] | None] = ContextVar("sy_request",
                                                                      default=None)


def _add_request(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    req = current_request.get()
    if req is not None:
        event.setdefault("subject", req[0])
        if req[1]:
            event.setdefault("msg_id", req[1])
    return event


def configure_logging(level: str | None = None, *, json: bool | None = None,
                      stream: TextIO | None = None) -> None:
    """Configure structlog for this process.  Later calls are no-ops."""
    global _configured
    if _configured:
        return
    _configured = True
    out = stream or sys.stderr
    level_name = (level or os.environ.get("SHIPYARD_LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    if json is None:
        env = os.environ.get("SHIPYARD_LOG_FORMAT")
        json = (env == "json") if env else not out.isatty()

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (uvicorn, asyncio) go to the same stream.
    logging.basicConfig(stream=out, level=max(numeric, logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger().bind(**bound)
