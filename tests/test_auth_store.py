"""The auth directory: what ``shipyard up`` keeps across starts, and the server config
it writes for each identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.auth.keys import read_credentials
from nodes.auth.permissions import permissions_for
from nodes.auth.stack import prepare
from nodes.auth.store import AuthStore, AuthStoreError
from protocol import subjects
from protocol.auth import Identity

NODES = [("deployer", "deployer", "control"), ("automation", "automation-1", "automation")]


def test_a_second_start_keeps_the_identities_and_adds_new_nodes(tmp_path: Path) -> None:
    first = prepare(tmp_path, NODES)
    assert first.created
    admin_key = read_credentials(first.admin).seed
    second = prepare(tmp_path, [*NODES, ("automation", "automation-2", "automation")])
    assert not second.created
    assert read_credentials(second.admin).seed == admin_key  # nothing re-made
    made = read_credentials(second.creds["automation-2"])
    assert (made.name, made.kind, made.role, made.infra) == (
        "automation-2", "node", "automation", "automation")
    assert second.stack_fields()["credentials"] == str(second.admin)


def test_a_start_refuses_a_revoked_node_or_one_of_another_role(tmp_path: Path) -> None:
    auth = prepare(tmp_path, NODES)
    auth.store.revoke("automation-1")
    with pytest.raises(AuthStoreError, match="revoked"):
        prepare(tmp_path, NODES)
    with pytest.raises(AuthStoreError, match="cannot run as the design node"):
        prepare(tmp_path, [("design", "deployer", "control")])


def test_revoked_identities_leave_the_server_config_and_names_are_never_reused(
        tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    store.init()
    vera, _ = store.add("vera", kind="user", role="viewer")
    assert vera.public_key in store.server_config.read_text()
    store.revoke("vera")
    assert vera.public_key not in store.server_config.read_text()
    with pytest.raises(Exception, match="never re-used"):
        store.add("vera", kind="user", role="viewer")


def test_a_node_may_publish_heartbeats_and_reports_only_under_its_own_name() -> None:
    node = Identity(name="a7", kind="node", role="automation", public_key="U", infra="prod")
    p = permissions_for(node)
    assert subjects.heartbeat("automation", "a7") in p.pub_allow
    assert subjects.node_reports("a7") in p.pub_allow
    assert not any(s.startswith("sy.hb.") and s != subjects.heartbeat("automation", "a7")
                   for s in p.pub_allow)
    assert subjects.COMMANDS_ALL in p.pub_deny
    assert p.sub_allow[0] == "_INBOX.a7.>"
