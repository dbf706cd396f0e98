"""The worker's side of its user-code hosts (``nodes.sandbox.apihost``): one process per
code environment, in that environment's interpreter, started on the first ``Load`` that
names its ``python``.

A request to a generation loaded in a host is one blocking round trip on the host's
*calls* socket, made where the worker would have called the endpoint itself (the worker
runs one request at a time, and its busy page says so meanwhile).  The payload is
checked here first (``check_payload``), so a bad request is refused with the very words
the worker uses, and never reaches the host.  Loads go over the *control* socket from a
thread, beside serving.

A host that dies takes its worker with it: the worker exits at once (a call that finds
the socket closed, or the watcher thread that reaps the host), and its node answers the
request in flight and replaces the worker, as when user code kills a worker itself.

The hop costs ~45-70 us per request at p50 (``bench/sandbox.py``: a no-op predict
called in the worker takes 1.2-1.9 us, through a host 44-73 us, on a loaded 2-core
box); over NATS end to end it added 84 us to a 340 us request in the calmest run.  A
generation without an environment never pays it: the worker calls it directly.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import subprocess
import threading
from typing import Any

from nodes.api.usercode import OP_MULTI, Failed, check_payload
from nodes.api.wire import EndpointCode
from nodes.flow.wire import decode
from nodes.runtime.logs import get_logger
from nodes.sandbox import frames, launch
from nodes.sandbox.messages import (
    FROM_HOST,
    REPLY_MEMORY,
    REPLY_OK,
    Call,
    Done,
    Load,
    Reply,
    Unload,
)

START_TIMEOUT = 60.0
EXIT_HOST_DIED = 75  # the worker's exit code when one of its hosts died
_GEN_IDS = itertools.count(1)


class HostError(Exception):
    """A host could not be started."""


class Host:
    """One user-code host process and its two sockets."""

    def __init__(self, python: str, *, debug: bool) -> None:
        self.python = python
        self.log = get_logger(component="api-host", python=python)
        calls, self._calls_child = socket.socketpair()
        control, self._control_child = socket.socketpair()
        self.calls, self.control = calls, control
        self._calls_fd, self._control_fd = calls.fileno(), control.fileno()
        self._load_lock = threading.Lock()   # one Load (send, then its Done) at a time
        self._write_lock = threading.Lock()  # Unload frames between them
        self.proc: subprocess.Popen[bytes] | None = None
        self.debug = debug
        self.closing = False

    def spawn(self) -> None:
        """Start the host process.  Call it on the worker's main thread: Linux signals
        a child whose *thread* of a parent ends (``PR_SET_PDEATHSIG``), and a pool
        thread may end any time.  Raises ``HostError``."""
        child_fds = (self._calls_child.fileno(), self._control_child.fileno())
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        argv = launch.argv(self.python, "apihost",
                           [*map(str, child_fds), str(os.getpid()), "1" if self.debug else "0"])
        try:
            self.proc = subprocess.Popen(argv, pass_fds=child_fds, env=env, cwd="/",
                                         stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise HostError(f"cannot start a user-code host with {self.python}: {exc}") \
                from None
        finally:
            self._calls_child.close()
            self._control_child.close()

    def ready(self) -> None:
        """Wait until the host answers (blocking; run in a thread).  Raises
        ``HostError``."""
        assert self.proc is not None
        try:
            if not select.select([self._control_fd], [], [], START_TIMEOUT)[0]:
                raise TimeoutError
            frames.read_frame(self._control_fd)
        except (EOFError, OSError) as exc:
            self.proc.kill()
            self.proc.wait()
            why = "timed out" if isinstance(exc, TimeoutError) else \
                f"exited with code {self.proc.returncode}"
            raise HostError(f"the user-code host with {self.python} {why} at start") \
                from None
        threading.Thread(target=self._watch, name=f"host-watch-{self.proc.pid}",
                         daemon=True).start()

    def _watch(self) -> None:
        """The host is gone: so is this worker (its node replaces it)."""
        assert self.proc is not None
        code = self.proc.wait()
        if not self.closing:
            self.died(code)

    def died(self, code: int | None = None) -> None:
        self.log.error("the user-code host died; the worker exits", code=code)
        os._exit(EXIT_HOST_DIED)

    def load(self, gen: str, service: str, name: str, directory: str,
             endpoints: list[EndpointCode]) -> Done:
        """Load a generation in the host (blocking; run in a thread)."""
        msg = Load(gen=gen, service=service, name=name, directory=directory,
                   endpoints=[[e.name, e.kind, e.code, e.function] for e in endpoints])
        with self._load_lock:
            with self._write_lock:
                frames.write_all(self._control_fd, frames.encode(msg))
            try:
                done: Done = decode(FROM_HOST, *frames.read_frame(self._control_fd))
            except EOFError:
                self.died()
                raise
        return done

    def close(self) -> None:
        """Stop the host on purpose (it exits when its sockets close; blocking)."""
        self.closing = True
        self.calls.close()
        self.control.close()
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def unload(self, gen: str) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            frames.write_all(self._control_fd, frames.encode(Unload(gen=gen)))

    def call(self, gen: str, endpoint: str, op: int, payload: Any) -> bytes:
        """One request, blocking.  Raises ``Failed``, ``MemoryError``; exits the worker
        if the host is gone."""
        if op == OP_MULTI:
            msg = Call(gen=gen, endpoint=endpoint, op=op, sizes=[len(p) for p in payload],
                       payload=b"".join(payload))
        else:
            msg = Call(gen=gen, endpoint=endpoint, op=op, payload=bytes(payload))
        fd = self._calls_fd
        try:
            frames.write_all(fd, frames.encode(msg))
            reply: Reply = decode(FROM_HOST, *frames.read_frame(fd))
        except (EOFError, OSError):
            self.died()
            raise
        if reply.status == REPLY_OK:
            return reply.body
        if reply.status == REPLY_MEMORY:
            raise MemoryError
        raise Failed(reply.code, reply.message)


class RemoteGeneration:
    """A generation whose code runs in a user-code host (``usercode.Runnable``)."""

    def __init__(self, host: Host, gen: str, name: str) -> None:
        self.host = host
        self.gen = gen
        self.name = name

    @classmethod
    def load(cls, host: Host, service: str, name: str, directory: str,
             endpoints: list[EndpointCode]) -> RemoteGeneration:
        """Load it (blocking; run in a thread).  Raises ``HostError`` with the load's
        error text, ``MemoryError`` if loading ran out of memory."""
        gen = f"{service}/{name}/{next(_GEN_IDS)}"
        done = host.load(gen, service, name, directory, endpoints)
        if done.memory_error:
            raise MemoryError(done.error)
        if done.error:
            raise HostError(done.error)
        return cls(host, gen, name)

    def call(self, endpoint: str, op: int, payload: Any) -> bytes:
        check_payload(op, payload)
        return self.host.call(self.gen, endpoint, op, payload)

    def close(self) -> None:
        self.host.unload(self.gen)
