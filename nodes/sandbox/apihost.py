"""A user-code host: an API worker's endpoints of one code environment, run in that
environment's interpreter (the sandbox entry point ``apihost``, ``launch.argv``).

An API worker (shipyard's interpreter: NATS, serving) starts one host per code
environment on the first generation that needs it, and talks to it over two Unix
sockets in ``frames``: *calls* (``Call`` -> ``Reply``, one at a time, on this process's
main thread) and *control* (``Load`` -> ``Done``, ``Unload``), served by a thread so a
slow ``load()`` holds back no request, as in the worker.  Endpoints run through
``usercode`` with the standard library's ``json``: the same reply bodies and error codes
as in the worker.

The host is in its worker's process group (killed with it) and dies with it
(``PR_SET_PDEATHSIG``); it inherits the worker's memory limit (``RLIMIT_AS``).  A
``MemoryError`` fails that request (``REPLY_MEMORY``), and the worker retires as for its
own.  When a socket closes (the worker is gone), the host exits.

Arguments: ``CALLS_FD CONTROL_FD WORKER_PID DEBUG(0|1)``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from . import frames
from .messages import (
    REPLY_MEMORY,
    REPLY_OK,
    REPLY_REFUSED,
    TO_HOST,
    Call,
    Done,
    Load,
    Reply,
    Unload,
)
from .orphans import die_with_parent
from .usercode import OP_MULTI, Generation, JsonCodec, Refused, call, describe

CODEC = JsonCodec()


class Host:
    def __init__(self, debug: bool) -> None:
        self.debug = debug
        self.generations: dict[str, Generation] = {}

    def control(self, fd: int) -> None:
        """Loads and unloads, on their own thread, until the worker closes the socket."""
        try:
            frames.write_all(fd, frames.encode(Done()))  # started: the worker waits for it
            while True:
                msg = frames.decode(TO_HOST, *frames.read_frame(fd))
                if isinstance(msg, Load):
                    frames.write_all(fd, frames.encode(self.load(msg)))
                elif isinstance(msg, Unload):
                    self.generations.pop(msg.gen, None)
        except (EOFError, OSError, frames.FrameError):
            pass
        os._exit(0)

    def load(self, msg: Load) -> Done:
        try:
            self.generations[msg.gen] = Generation(msg.service, msg.name,
                                                   Path(msg.directory), msg.endpoints)
        except MemoryError:
            return Done(error="loading ran out of memory", memory_error=True)
        except Exception as exc:  # user code: report anything
            return Done(error=describe(exc, self.debug))
        return Done()

    def serve(self, fd: int) -> None:
        """Calls, on the main thread, until the worker closes the socket."""
        read, write, encode = frames.read_frame, frames.write_all, frames.encode
        try:
            while True:
                msg = frames.decode(TO_HOST, *read(fd))
                if isinstance(msg, Call):
                    write(fd, encode(self.call(msg)))
        except (EOFError, OSError, frames.FrameError):
            pass
        os._exit(0)

    def call(self, msg: Call) -> Reply:
        payload: Any = msg.payload
        if msg.op == OP_MULTI:
            items, at = [], 0
            for n in msg.sizes:
                items.append(payload[at:at + n])
                at += n
            payload = items
        try:
            gen = self.generations.get(msg.gen)
            if gen is None:
                raise Refused("not_found", f"generation {msg.gen} is not loaded here")
            return Reply(status=REPLY_OK, body=call(gen, msg.endpoint, msg.op, payload, CODEC))
        except Refused as exc:
            return Reply(status=REPLY_REFUSED, code=exc.code, message=exc.message)
        except MemoryError:
            return Reply(status=REPLY_MEMORY)
        except Exception as exc:
            return Reply(status=REPLY_REFUSED, code="user_code",
                         message=describe(exc, self.debug))


def main(argv: list[str]) -> None:
    calls_fd, control_fd, worker = int(argv[0]), int(argv[1]), int(argv[2])
    die_with_parent(signal.SIGKILL, parent=worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when hosts stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.dup2(2, 1)  # user code's prints go to the node's log, not into a frame
    sys.stdout = sys.stderr
    host = Host(debug=argv[3] == "1")
    threading.Thread(target=host.control, args=(control_fd,), name="control",
                     daemon=True).start()
    host.serve(calls_fd)
