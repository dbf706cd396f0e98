"""API keys: ``sy_<id>_<secret>``, shown once; only the SHA-256 of the secret is stored.

The secret is 32 random bytes, so a plain SHA-256 is enough (a slow password hash only
helps against guessable secrets).  Records live in the ``sy_api_keys`` KV bucket under
``<service>.<id>``; gateways keep a watched, periodically re-read copy (``KVCache``),
so a key works, or stops working when revoked, within moments on every gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from nodes.runtime.kvcache import KVCache
from protocol.api import (
    API_KEY_VALUE,
    KEY_PREFIX,
    ApiKeyRecord,
    key_record_key,
    key_record_keys,
)


def new_key() -> tuple[str, str, str]:
    """(key id, secret, the whole key to hand to the user)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}_{key_id}_{secret}"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class KeyCache:
    """Checks ``Authorization: Bearer`` values against the stored hashes."""

    def __init__(self, kv: Any, resync_interval: float = 5.0) -> None:
        self.cache: KVCache[ApiKeyRecord] = KVCache(kv, key_record_keys(), API_KEY_VALUE.decode,
                                                    resync_interval=resync_interval)

    def check(self, service: str, authorization: str | None) -> str | None:
        """None if the header carries a valid key of ``service``; else why not."""
        if not authorization:
            return "this service requires an API key: send 'Authorization: Bearer KEY'"
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "expected 'Authorization: Bearer KEY'"
        parsed = parse(value.strip())
        if parsed is None:
            return "malformed API key"
        key_id, secret = parsed
        try:
            entry = self.cache.get(key_record_key(service, key_id))
        except ValueError:
            entry = None
        if entry is None or not hmac.compare_digest(entry.value.sha256, digest(secret)):
            return f"invalid API key for service {service}"
        return None
