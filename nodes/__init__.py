"""shipyard nodes: the shared runtime and one module (or package) per role.

``nodes.runtime``     the Node base class, connection, logging, embedded NATS, supervisor
``nodes.deployer``    the Deployer: node registry (and project / API deployments)
``nodes.design``      the Design node
``nodes.automation``  Automation nodes
``nodes.api``         API nodes
``nodes.govern``      the Govern node
``nodes.cli``         the ``shipyard`` admin command line
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shipyard")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
