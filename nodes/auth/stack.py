"""Auth for ``shipyard up``: the stack home's auth directory, made on first start.

The first ``shipyard up`` in a home creates ``HOME/auth`` (the admin, a node identity per
role, the server config); every start adds an identity for any node it runs that has none
yet (``--automation-nodes 3`` adds ``automation-2`` and ``automation-3``), before the
server starts, so the config the server reads already knows every node.  ``stack.json``
then names the auth directory and the admin's credentials, which the CLI uses by default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.auth.store import ADMIN, AuthStore, AuthStoreError, home_auth_dir


@dataclass(frozen=True)
class StackAuth:
    store: AuthStore
    creds: dict[str, Path]  # node name -> its credentials file
    created: bool  # this start created the auth directory

    @property
    def admin(self) -> Path:
        return self.store.creds_path(ADMIN)

    def stack_fields(self) -> dict[str, Any]:
        """What ``stack.json`` records: where the CLI finds the admin's credentials."""
        return {"auth_dir": str(self.store.dir), "credentials": str(self.admin)}


def prepare(home: Path, nodes: Iterable[tuple[str, str, str]]) -> StackAuth:
    """The auth directory of ``home``, with an identity for every ``(role, name, infra)``."""
    store = AuthStore(home_auth_dir(home))
    created = store.ensure()
    known = {i.name: i for i in store.identities()}
    creds: dict[str, Path] = {}
    for role, name, infra in nodes:
        identity = known.get(name)
        if identity is None:
            store.add(name, kind="node", role=role, infra=infra)
        elif identity.kind != "node" or identity.role != role or identity.revoked:
            state = "revoked" if identity.revoked else f"a {identity.kind} {identity.role}"
            raise AuthStoreError(f"identity {name!r} in {store.dir} is {state}: it cannot "
                                 f"run as the {role} node; rename the node or use another "
                                 "home")
        path = store.creds_path(name)
        if not path.is_file():
            raise AuthStoreError(f"no credentials file for node {name!r} at {path}")
        creds[name] = path
    if not store.creds_path(ADMIN).is_file():
        raise AuthStoreError(f"no admin credentials at {store.creds_path(ADMIN)}")
    return StackAuth(store=store, creds=creds, created=created)
