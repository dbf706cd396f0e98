"""Signing commands with the key of the connection's identity.

``connect()`` attaches a ``Signer`` to every connection it opens with shipyard
credentials, and ``Caller`` signs whatever it sends on such a connection, so every CLI
command (and every call a node makes) is signed by the identity whose credentials file
opened the connection, without each call site knowing.
"""

from __future__ import annotations

import base64
import os
import time
import weakref
from typing import Any

import msgspec
import nkeys

from nodes.auth.keys import Credentials
from protocol.auth import signed_bytes
from protocol.base import Command, Request, encode, new_id


class Signer:
    """Signs command envelopes as one identity."""

    def __init__(self, creds: Credentials) -> None:
        self.identity = creds.name
        self._kp: nkeys.KeyPair = creds.keypair()

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._kp.sign(data)).decode()

    def request(self, subject: str, body: Command[Any], *, sender: str = "",
                request_id: str | None = None) -> bytes:
        """A signed request envelope for ``body`` sent on ``subject``.  The body is
        encoded once and those exact bytes are both signed and sent."""
        raw = encode(body)
        rid = request_id or new_id()
        ts = time.time()
        nonce = base64.urlsafe_b64encode(os.urandom(12)).decode()
        sig = self.sign(signed_bytes(subject, rid, ts, nonce, self.identity, raw))
        return encode(Request(body=msgspec.Raw(raw), id=rid, ts=ts, sender=sender,
                              identity=self.identity, signature=sig, nonce=nonce))


_SIGNERS: weakref.WeakKeyDictionary[Any, Signer] = weakref.WeakKeyDictionary()


def attach(nc: Any, signer: Signer) -> None:
    _SIGNERS[nc] = signer


def signer_of(nc: Any) -> Signer | None:
    """The signer of a connection opened with shipyard credentials, else None."""
    return _SIGNERS.get(nc)
