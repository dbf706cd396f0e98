"""The runtime every role shares."""

from nodes.runtime.calls import Caller
from nodes.runtime.connection import CannotReachNats, connect
from nodes.runtime.logs import configure_logging, get_logger
from nodes.runtime.node import Node, handles
from nodes.runtime.settings import NatsSettings, resolve

__all__ = [
    "Caller",
    "CannotReachNats",
    "NatsSettings",
    "Node",
    "configure_logging",
    "connect",
    "get_logger",
    "handles",
    "resolve",
]
