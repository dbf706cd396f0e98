"""The Deployer: node registry, Project Deployer and API Deployer."""

from nodes.deployer.node import DeployerNode

__all__ = ["DeployerNode"]
