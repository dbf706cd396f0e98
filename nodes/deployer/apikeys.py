"""API keys, managed by the Deployer: created (the key is returned once), listed, revoked.

Only the SHA-256 of each key's secret is stored (``sy_api_keys``, ``<service>.<id>``).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from nodes.api.keys import digest, new_key
from nodes.deployer.host import DeskHost
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import snapshot
from nodes.runtime.node import handles
from protocol import subjects
from protocol.api import (
    API_KEY_VALUE,
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyIssued,
    ApiKeyList,
    ApiKeyRecord,
    ApiKeyRevoked,
    CreateApiKey,
    ListApiKeys,
    RevokeApiKey,
    key_record_key,
    key_record_keys,
)
from protocol.base import Request, encode
from protocol.errors import BadRequest, NotFound


def _info(r: ApiKeyRecord) -> ApiKeyInfo:
    return ApiKeyInfo(service=r.service, id=r.id, name=r.name, created_at=r.created_at,
                      created_by=r.created_by)


class ApiKeys:
    def __init__(self, host: DeskHost) -> None:
        self.host = host
        self._kv: KeyValue | None = None
        self._packages: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None
        return self._kv

    async def setup(self) -> None:
        self._kv = await ensure_kv(self.host.js, subjects.API_KEYS_BUCKET,
                                   replicas=self.host.settings.replicas,
                                   description="shipyard API key hashes")
        self._packages = await ensure_kv(self.host.js, subjects.API_PACKAGE_BUCKET,
                                         replicas=self.host.settings.replicas,
                                         description="shipyard API package records")

    @handles(CreateApiKey)
    async def create(self, cmd: CreateApiKey, req: Request[Any]) -> ApiKeyCreated:
        try:
            subjects.token(cmd.service, "service")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        assert self._packages is not None
        if not await snapshot(self._packages, f"{cmd.service}.>"):
            raise NotFound(f"unknown API service {cmd.service!r}: it has no packaged version "
                           f"(see: shipyard api package PROJECT {cmd.service} --version V)")
        key_id, secret, whole = new_key()
        by = cmd.by or req.sender
        record = ApiKeyRecord(service=cmd.service, id=key_id, sha256=digest(secret),
                              created_at=time.time(), created_by=by, name=cmd.name)
        await self.kv.create(key_record_key(cmd.service, key_id), encode(record))
        await self.host.emit(ApiKeyIssued(service=cmd.service, id=key_id, by=by))
        return ApiKeyCreated(key=_info(record), secret=whole)

    @handles(ListApiKeys)
    async def list(self, cmd: ListApiKeys, req: Request[Any]) -> ApiKeyList:
        try:
            snap = await snapshot(self.kv, key_record_keys(cmd.service))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        keys = []
        for _rev, raw in snap.values():
            try:
                keys.append(_info(API_KEY_VALUE.decode(raw)))
            except msgspec.DecodeError:
                continue
        return ApiKeyList(service=cmd.service, keys=sorted(keys, key=lambda k: k.created_at))

    @handles(RevokeApiKey)
    async def revoke(self, cmd: RevokeApiKey, req: Request[Any]) -> ApiKeyRevoked:
        try:
            key = key_record_key(cmd.service, cmd.id)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        if entry is None or not entry.value:
            raise NotFound(f"service {cmd.service} has no API key {cmd.id!r}")
        await self.kv.delete(key)
        await self.host.emit(ApiKeyIssued(service=cmd.service, id=cmd.id,
                                          by=cmd.by or req.sender, revoked=True))
        return ApiKeyRevoked(service=cmd.service, id=cmd.id)
