"""Typed request/reply over NATS: ``await Caller(nc).call(ListNodes())`` -> ``NodeList``.

On a connection opened with shipyard credentials, role commands (``sy.cmd.<role>.<verb>``,
what Deployer and Govern verify) are signed; node-direct commands (``sy.node.<name>.>``)
are not, since no node verifies them (``Node._handle`` checks role commands only) and an
Ed25519 signature costs ~20 µs of CPU per call here.  A publish the server refuses fails
the call at once with ``Forbidden`` (``PublishDenials``), not after its timeout.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from nodes.auth.signing import signer_of
from nodes.runtime.connection import PublishDenied
from nodes.runtime.logs import get_logger
from nodes.runtime.requests import requester
from protocol import subjects
from protocol.base import Command, Family, Reply, make_request, new_id, tag_of
from protocol.errors import (
    DecodeError,
    Forbidden,
    Internal,
    InvalidMessage,
    Timeout,
    Unavailable,
    error_from_wire,
)
from protocol.progress import PROGRESS, CommandProgress

R = TypeVar("R")

DEFAULT_TIMEOUT = 5.0


@functools.cache
def _route(cls: type[Any]) -> tuple[Family, str, str]:
    """Family, verb and role subject of a command class, worked out once per class."""
    family = Family.of(cls)
    verb = tag_of(cls)
    return family, verb, "" if family.direct else subjects.command(family.role, verb)


class Caller:
    """Sends commands and returns typed replies, or raises the remote's typed error."""

    def __init__(self, nc: NATS, *, sender: str = "", identity: str | None = None) -> None:
        self.nc = nc
        self._requester = requester(nc)
        self.sender = sender
        self.identity = identity
        self._signer = signer_of(nc)  # set when nc was opened with shipyard credentials
        self.notices_dropped = 0  # malformed progress notices ignored

    async def call(self, cmd: Command[R], *, timeout: float = DEFAULT_TIMEOUT,
                   node: str | None = None, request_id: str | None = None,
                   on_progress: Callable[[CommandProgress], None] | None = None) -> R:
        """Send ``cmd`` to its role (or to ``node`` for node-direct commands).

        Raises ``Unavailable`` when nothing serves the subject, ``Timeout`` when no
        reply comes within ``timeout`` seconds, or the ``OperationError`` subclass the
        remote handler raised.  ``request_id`` makes a retry recognisable as one.
        ``on_progress`` hears the progress notices the node sends while it works (a
        malformed one is counted in ``notices_dropped`` and ignored).
        """
        family, verb, role_subject = _route(type(cmd))
        if family.direct:
            if node is None:
                raise ValueError(f"{verb} is sent to one node: pass node=")
            subject = subjects.node_command(node, verb)
        else:
            subject = role_subject
        request_id = request_id or new_id()
        if self._signer is not None and not family.direct:
            data = self._signer.request(subject, cmd, sender=self.sender,
                                        request_id=request_id)
        else:
            data = make_request(cmd, sender=self.sender, request_id=request_id,
                                identity=self.identity)
        replies = family.replies
        decoded: list[Reply[Any]] = []

        def accept(msg: Msg) -> bool:
            """This request's reply, not a late or second one to an earlier request that
            used the same reply subject (a reply without ``re`` is taken: its node could
            not read the id, or predates ``re``)."""
            if msg.data:
                try:
                    reply = replies.decode(msg.data, subject)
                except DecodeError:
                    return True  # raised below, as the answer
                if reply.re is not None and reply.re != request_id:
                    return False
                decoded.append(reply)
            return True

        try:
            msg = await self._requester.request(
                subject, data, timeout=timeout,
                on_progress=None if on_progress is None else self._notices(on_progress),
                accept=accept)
        except PublishDenied:
            raise Forbidden(f"the NATS server does not let this identity send {verb!r} "
                            f"(publish to {subject} refused): ask an admin for a role "
                            "that may", details={"reason": "nats_permission"}) from None
        except nats.errors.NoRespondersError:
            what = f"node {node} is not running" if node else f"no {family.role} node is running"
            raise Unavailable(f"{what}: nothing answers {subject}") from None
        except nats.errors.TimeoutError:
            raise Timeout(f"{family.role} did not answer {verb!r} within {timeout:g}s") from None
        reply = decoded[0] if decoded else replies.decode(msg.data, subject)
        if reply.error is not None:
            raise error_from_wire(reply.error.code, reply.error.message, reply.error.details)
        result: Any = reply.ok
        if result is None:
            raise Internal(f"{family.role} sent an empty reply to {verb!r}")
        return result  # type: ignore[no-any-return]

    def _notices(self, on_progress: Callable[[CommandProgress], None],
                 ) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            try:
                notice = PROGRESS.decode(msg.data, msg.subject)
                notice.validate(msg.subject)
            except (DecodeError, InvalidMessage) as exc:
                self.notices_dropped += 1
                get_logger(component="calls").debug(
                    "malformed progress notice ignored", subject=msg.subject, error=str(exc))
                return
            on_progress(notice)

        return on_msg
