"""Identities published where verifiers read them: the ``sy_identities`` KV bucket.

``shipyard auth`` and ``shipyard up`` write it as the admin after each change of the auth
directory (the directory is the source of truth; this is its copy for the Deployer and
Govern, which may run on other hosts).  Only the admin may write it: every node's NATS
permissions deny ``$KV.sy_identities.>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.aio.client import Client as NATS

from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import snapshot
from protocol import subjects
from protocol.auth import IDENTITY, Identity, identity_key
from protocol.base import encode


async def publish_identities(nc: NATS, identities: Iterable[Identity], *,
                             replicas: int = 1) -> int:
    """Put every identity whose record differs from the bucket's; returns how many."""
    kv = await ensure_kv(nc.jetstream(), subjects.IDENTITIES_BUCKET, replicas=replicas,
                         description="identities that may connect and sign")
    current = await snapshot(kv, ">")
    changed = 0
    for identity in identities:
        data = encode(identity)
        key = identity_key(identity.name)
        old = current.get(key)
        if old is not None and IDENTITY.decode(old[1]) == identity:
            continue
        await kv.put(key, data)
        changed += 1
    return changed
