"""Everything the Deployer answers on ``sy.cmd.deployer.<verb>``."""

from __future__ import annotations

from protocol.api import (
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRevoked,
    CreateApiKey,
    DeployApi,
    ListApiKeys,
    RevokeApiKey,
    RollbackApi,
)
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
    InfraUpdated,
    ListDeployments,
    ListInfras,
    RollbackBundle,
    SetInfra,
)
from protocol.health import AlertTested, GetHealth, HealthReport, SendTestAlert
from protocol.registry import ForgetNode, ForgottenNode, ListNodes, NodeList
from protocol.scenarios import (
    CancelRun,
    GetRunLog,
    ListRuns,
    RunAccepted,
    RunCancelled,
    RunList,
    RunLog,
    RunScenario,
)

DeployerCommand = (ListNodes | ForgetNode | CreateInfra | SetInfra | ListInfras | DeployBundle
                   | RollbackBundle
                   | ListDeployments | GetHistory
                   | RunScenario | ListRuns | GetRunLog | CancelRun
                   | DeployApi | RollbackApi | CreateApiKey | ListApiKeys | RevokeApiKey
                   | GetHealth | SendTestAlert)
DeployerReply = (NodeList | ForgottenNode | InfraCreated | InfraUpdated | InfraList | DeploymentView
                 | DeploymentList | History
                 | RunAccepted | RunList | RunLog | RunCancelled
                 | ApiKeyCreated | ApiKeyList | ApiKeyRevoked
                 | HealthReport | AlertTested)

DEPLOYER = Family("deployer", DeployerCommand, DeployerReply)
