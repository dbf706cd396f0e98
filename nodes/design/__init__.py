"""The Design node: the workspace of projects, test builds, and API packages.

``node`` is the node itself (projects, bundles, test builds); ``api_packages`` packs one
API service of a project as an immutable version and stores it for the Deployer.
"""

from nodes.design.node import DesignNode

__all__ = ["DesignNode"]
