"""Everything the Deployer answers on ``sy.cmd.deployer.<verb>``."""

from __future__ import annotations

from protocol.base import Family
from protocol.deploy import (
    CreateInfra,
    DeployBundle,
    DeploymentList,
    DeploymentView,
    GetHistory,
    History,
    InfraCreated,
    InfraList,
    ListDeployments,
    ListInfras,
    RollbackBundle,
)
from protocol.registry import ListNodes, NodeList

DeployerCommand = (ListNodes | CreateInfra | ListInfras | DeployBundle | RollbackBundle
                   | ListDeployments | GetHistory)
DeployerReply = (NodeList | InfraCreated | InfraList | DeploymentView | DeploymentList
                 | History)

DEPLOYER = Family("deployer", DeployerCommand, DeployerReply)
