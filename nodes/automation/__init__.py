"""Automation nodes: activate bundles atomically and run scenarios."""

from nodes.automation.node import AutomationNode

__all__ = ["AutomationNode"]
