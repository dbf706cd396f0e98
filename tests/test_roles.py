"""Role names are static and role classes are imported on use: the CLI stays quick to
start (every command is a new process) and still names every role a node can run."""

from __future__ import annotations

import subprocess
import sys

from nodes.roles import ROLE_NAMES, ROLES, role_class
from nodes.runtime.node import Node

NODE_MODULES = ("nodes.api.node", "nodes.api.gateway", "nodes.automation.node",
                "nodes.deployer.node", "nodes.design.node", "nodes.govern.node")


def test_each_role_name_is_the_role_its_class_runs() -> None:
    assert len(set(ROLE_NAMES)) == len(ROLE_NAMES)
    for role in ROLE_NAMES:
        cls = role_class(role)
        assert issubclass(cls, Node) and cls.role == role
    assert list(ROLES) == list(ROLE_NAMES)


def test_loading_the_cli_imports_no_node_class() -> None:
    code = ("import sys, nodes.cli; "
            f"print(','.join(m for m in {NODE_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
