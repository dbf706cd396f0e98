"""Which class runs which role."""

from __future__ import annotations

from nodes.api import ApiNode, GatewayNode
from nodes.automation import AutomationNode
from nodes.deployer import DeployerNode
from nodes.design import DesignNode
from nodes.govern import GovernNode
from nodes.runtime.node import Node

ROLES: dict[str, type[Node]] = {
    cls.role: cls for cls in (DeployerNode, DesignNode, AutomationNode, ApiNode, GovernNode,
                              GatewayNode)
}
