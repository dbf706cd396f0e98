"""Everything the Deployer answers on ``sy.cmd.deployer.<verb>``."""

from __future__ import annotations

from protocol.base import Family
from protocol.registry import ListNodes, NodeList

DeployerCommand = ListNodes
DeployerReply = NodeList

DEPLOYER = Family("deployer", DeployerCommand, DeployerReply)
