"""Reports from nodes (and the supervisor) to the Deployer, on ``sy.rpt.<kind>.<node>``."""

from __future__ import annotations

from protocol import subjects
from protocol.base import Codec, Message


class NodeExit(Message, frozen=True, kw_only=True, tag="node.exit"):
    """A node process ended: sent by the node on a graceful stop, or by its supervisor
    when the process died.  ``pid`` names the process, so a late report about an old
    process never marks its restarted successor lost."""

    node: str
    role: str
    infra: str
    pid: int
    reason: str
    instance: str = ""  # empty when the supervisor reports (it knows only the pid)

    def subject(self) -> str:
        return subjects.report("exit", self.node)


AnyReport = NodeExit

REPORT = Codec[AnyReport](AnyReport)
