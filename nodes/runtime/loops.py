"""Background loops that a NATS outage cannot end.

A node's long-running work (a cron schedule, a convergence loop, a metrics reporter, a
KV follower) runs for the life of the process.  If one of them raises, its task group
fails and takes the node with it; if it is caught and forgotten, the node keeps beating
while doing nothing.  Neither is acceptable: during a reconnect (a nats-server restart,
a leader election: ~5 s in a 3-server cluster) every KV call and request raises
``nats.errors.TimeoutError`` or ``ConnectionClosedError`` for a while, and then works
again.  So every background loop runs under one of the two functions here:

``forever(name, step, *args, log=..., interval=...)``
    calls ``await step(*args)`` again and again: ``interval`` seconds after a step that
    returned, after a backoff delay after a step that raised.  For loops whose body is
    one pass ("send a metrics report", "converge once").

``supervised(name, run, *args, log=...)``
    awaits ``run(*args)``; if it raises, waits a backoff delay and awaits it again from the
    start; returns when ``run()`` returns.  For loops that keep state between passes or
    start with a setup that must be redone after a failure (a cron schedule re-reads its
    mark, and so fires at most one catch-up run for slots missed during the outage).

Both log a transient error (``TRANSIENT``: nats-py and JetStream errors, timeouts,
connection errors) as a warning, any other exception with its traceback, and never let
either end the loop.  Cancellation always passes through (they catch ``Exception``
only), so a task group or cancel scope stops them at once.  Delays grow exponentially
(``Backoff``: 0.1 s doubling to at most 5 s, with jitter so that nodes reconnecting
together do not retry in step) and start over once a step succeeds, or once ``run()``
has run longer than the cap.  Waits use ``anyio.sleep``: monotonic time, so a wall-clock
step neither hurries nor stalls a loop.

Start them in a task group like any task (``functools.partial`` carries the keyword
arguments, which ``start_soon`` does not take)::

    tg.start_soon(partial(forever, "metrics", self._send_metrics, log=self.log,
                          interval=5.0))
    tg.start_soon(partial(supervised, "converge", self._converge_loop, tg, log=self.log))
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio
import nats.errors

# Errors that say "NATS is not reachable or not answering right now".  nats.js.errors and
# nats.errors.ConnectionClosedError (raised while a client reconnects) derive from
# nats.errors.Error; nats.errors.TimeoutError is a TimeoutError.
TRANSIENT: tuple[type[Exception], ...] = (nats.errors.Error, TimeoutError, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or, for an exception group, every exception in it) is transient."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_transient(e) for e in exc.exceptions)
    return isinstance(exc, TRANSIENT)


@dataclass
class Backoff:
    """Capped exponential delays: ``initial``, ``initial * factor``, ... up to ``cap``.

    ``jitter`` (a fraction) shortens each delay by a random part of up to that much.
    """

    initial: float = 0.1
    cap: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.cap) or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError("expected 0 < initial <= cap, factor >= 1 and 0 <= jitter < 1")
        self._next = self.initial

    def delay(self) -> float:
        """The next delay in seconds (and grow the one after it)."""
        current = self._next
        self._next = min(self.cap, current * self.factor)
        return current * (1.0 - self.jitter * random.random())

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self._next = self.initial


async def _failed(name: str, exc: Exception, log: Any, backoff: Backoff) -> None:
    delay = backoff.delay()
    if is_transient(exc):
        log.warning("background loop interrupted; retrying", loop=name,
                    error=f"{type(exc).__name__}: {exc}".rstrip(": "),
                    retry_in_s=round(delay, 3))
    else:
        log.error("background loop failed; retrying", loop=name, exc_info=exc,
                  retry_in_s=round(delay, 3))
    await anyio.sleep(delay)


async def forever(name: str, step: Callable[..., Awaitable[Any]], *args: Any, log: Any,
                  interval: float = 0.0, backoff: Backoff | None = None) -> NoReturn:
    """Await ``step(*args)`` repeatedly until cancelled.

    After ``step()`` returns, wait ``interval`` seconds (``0``: call it again at once,
    for a step that waits for its own work).  After it raises an ``Exception``, log it
    (a warning for ``TRANSIENT`` errors, an error with traceback for anything else) and
    wait the next ``backoff`` delay (which starts over after a step that returned, or
    that ran longer than the backoff's cap).  Never returns; raises only cancellation
    (and other ``BaseException`` such as ``KeyboardInterrupt``).
    """
    delays = backoff or Backoff()
    while True:
        started = time.monotonic()
        try:
            await step(*args)
        except Exception as exc:
            if time.monotonic() - started > delays.cap:
                delays.reset()
            await _failed(name, exc, log, delays)
            continue
        delays.reset()
        if interval > 0:
            await anyio.sleep(interval)


async def supervised(name: str, run: Callable[..., Awaitable[Any]], *args: Any, log: Any,
                     backoff: Backoff | None = None) -> None:
    """Await ``run(*args)``; restart it after a backoff delay whenever it raises.

    Returns when ``run()`` returns.  Exceptions are logged as in ``forever``; the backoff
    starts over when a run lasted longer than the backoff's cap.  Raises only
    cancellation (and other ``BaseException``).
    """
    delays = backoff or Backoff()
    while True:
        started = time.monotonic()
        try:
            await run(*args)
        except Exception as exc:
            if time.monotonic() - started > delays.cap:
                delays.reset()
            await _failed(name, exc, log, delays)
        else:
            return
