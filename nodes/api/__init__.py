"""API nodes: serve API service generations over NATS (nats.micro, one queue group per
service) and HTTP, with user code in worker processes.

``node``         the ApiNode: convergence on desired state, HTTP, metrics reports
``workers``      the node's side of its worker processes: start, load, route, watch
``worker``       a worker process; ``serving`` its queue-group endpoints, ``usercode``
                 loading and calling a generation's code, ``wire`` the control frames
``generations``  fetching, verifying and unpacking packages
``gateway``      the HTTP side (shared with the HTTP-only ``gateway`` role), ``http`` its
                 ASGI app, ``keys`` API keys
``metrics``      counters, histograms, Prometheus text and reports to the Deployer

Attributes are imported lazily: worker processes import ``nodes.api.worker`` without
paying for the node's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.api.gateway import GatewayNode
    from nodes.api.node import ApiNode

__all__ = ["ApiNode", "GatewayNode"]


def __getattr__(name: str) -> Any:
    if name == "ApiNode":
        from nodes.api.node import ApiNode

        return ApiNode
    if name == "GatewayNode":
        from nodes.api.gateway import GatewayNode

        return GatewayNode
    raise AttributeError(f"module 'nodes.api' has no attribute {name!r}")
