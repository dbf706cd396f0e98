"""Signing artifacts on the Design node, and checking them where they run.

``sign_bundle`` / ``sign_package`` return the record with ``signature`` and ``signed_by``
set (unchanged when the Design node runs without shipyard credentials).  ``trust_of(node)``
is the check an Automation or API node runs on a record before it activates or loads it
(``ArtifactTrust.refusal``): pure and synchronous once the node's copy of the identities
(a ``KVCache`` of ``sy_identities``, watched, so a revoked Design key stops being trusted
within milliseconds) is open.  What is signed, and when trust is on: ``protocol.artifacts``.
"""

from __future__ import annotations

import base64
import binascii
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import nats.js.errors

from nodes.auth import keys
from nodes.auth.guard import node_identity
from nodes.runtime.kvcache import KVCache
from protocol import subjects
from protocol.api import ApiPackageInfo
from protocol.artifacts import API_PACKAGE, BUNDLE, TRUSTED_ROLE, artifact_bytes
from protocol.auth import IDENTITY, Identity
from protocol.bundles import BundleInfo


def bundle_bytes(info: BundleInfo) -> bytes:
    return artifact_bytes(BUNDLE, info.project, info.id, info.digest, info.archive_sha256,
                          (lock.digest for lock in info.envs.values()))


def package_bytes(info: ApiPackageInfo) -> bytes:
    return artifact_bytes(API_PACKAGE, info.service, info.version, info.digest,
                          info.archive_sha256, [info.env.digest] if info.env else [])


def _sign(creds: keys.Credentials, data: bytes) -> str:
    kp = creds.keypair()
    try:
        return base64.b64encode(kp.sign(data)).decode()
    finally:
        kp.wipe()


def sign_bundle(settings: Any, info: BundleInfo) -> BundleInfo:
    creds = node_identity(settings)
    if creds is None:
        return info
    return msgspec.structs.replace(info, signature=_sign(creds, bundle_bytes(info)),
                                   signed_by=creds.name)


def sign_package(settings: Any, info: ApiPackageInfo) -> ApiPackageInfo:
    creds = node_identity(settings)
    if creds is None:
        return info
    return msgspec.structs.replace(info, signature=_sign(creds, package_bytes(info)),
                                   signed_by=creds.name)


class ArtifactTrust:
    """Checks artifact signatures against the Design keys ``lookup`` knows; with no
    ``lookup`` (an insecure stack) every artifact is accepted."""

    def __init__(self, lookup: Callable[[str], Identity | None] | None) -> None:
        self.lookup = lookup

    @property
    def enabled(self) -> bool:
        return self.lookup is not None

    def refusal(self, what: str, signature: str, signed_by: str, data: bytes) -> str | None:
        """Why the artifact ``what`` ("bundle churn v3") may not run, or None."""
        if self.lookup is None:
            return None
        head = f"{what}: signature does not verify against any trusted Design key"
        if not signature or not signed_by:
            return f"{head} (the record is not signed)"
        signer = self.lookup(signed_by)
        if signer is None:
            return f"{head} (signer {signed_by!r} is not a known identity)"
        if signer.kind != "node" or signer.role != TRUSTED_ROLE:
            return (f"{head} (signer {signed_by!r} is a {signer.kind} of role "
                    f"{signer.role}, not a Design node)")
        if signer.revoked:
            return f"{head} (signer {signed_by!r} was revoked)"
        try:
            sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        if not keys.verify(signer.public_key, data, sig):
            return f"{head} (the signature of {signed_by!r} does not match the record)"
        return None

    def bundle_refusal(self, info: BundleInfo) -> str | None:
        return self.refusal(f"bundle {info.project} {info.id}", info.signature,
                            info.signed_by, bundle_bytes(info))

    def package_refusal(self, info: ApiPackageInfo) -> str | None:
        return self.refusal(f"API package {info.service} {info.version}", info.signature,
                            info.signed_by, package_bytes(info))


_TRUST: weakref.WeakKeyDictionary[Any, ArtifactTrust] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()


async def trust_of(node: Any) -> ArtifactTrust:
    """The node's artifact check, opened on first use.  On a node with shipyard
    credentials, a missing identities bucket means no Design key is trusted: every
    artifact is refused until the admin publishes the identities."""
    if node in _TRUST:
        return _TRUST[node]
    lock = _LOCKS.setdefault(node, anyio.Lock())
    async with lock:
        if node in _TRUST:
            return _TRUST[node]
        if node_identity(node.settings) is None:
            _TRUST[node] = ArtifactTrust(None)
            return _TRUST[node]
        try:
            kv = await node.js.key_value(subjects.IDENTITIES_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return ArtifactTrust(_nobody)  # looked for again next time
        cache: KVCache[Identity] = KVCache(kv, ">", IDENTITY.decode)
        await node.tg.start(cache.run)

        def lookup(name: str) -> Identity | None:
            entry = cache.get(name)
            return entry.value if entry is not None else None

        _TRUST[node] = ArtifactTrust(lookup)
        return _TRUST[node]


def _nobody(name: str) -> Identity | None:
    return None
