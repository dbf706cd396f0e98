"""shipyard nodes: the shared runtime and one module (or package) per role.

``nodes.runtime``     the Node base class, connection, logging, embedded NATS, supervisor
``nodes.deployer``    the Deployer: node registry (and bundle / API deployments, run history)
``nodes.design``      the Design node (and its API packages)
``nodes.automation``  Automation nodes
``nodes.api``         API nodes
``nodes.govern``      the Govern node
``nodes.cli``         the ``shipyard`` admin command line
``nodes.project``     manifests, bundle packing, project files (pure: no NATS)
``nodes.flow``        the flow engine (builds, scenario runs, user code in job processes)
"""

from functools import cache


@cache
def _version() -> str:
    # Looked up on first use: importlib.metadata costs ~18 ms at import, and recipe
    # worker processes import this package without needing it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shipyard")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0+local"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'nodes' has no attribute {name!r}")
