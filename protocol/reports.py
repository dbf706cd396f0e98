"""Reports from nodes (and the supervisor) to the Deployer, on ``sy.rpt.<kind>.<node>``."""

from __future__ import annotations

from protocol import checks, subjects
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

    def validate(self, subject: str) -> None:
        """Raise ``InvalidMessage`` unless the names and pid are in bounds and the node
        is the one ``subject`` names."""
        checks.name(self.node, "node name")
        checks.name(self.role, "role")
        checks.name(self.infra, "infra name")
        checks.count(self.pid, "pid")
        checks.text(self.reason, "reason", limit=1024)
        checks.label(self.instance, "instance", empty=True)
        checks.same_subject(subject, self.subject(), "exit report")


AnyReport = NodeExit

REPORT = Codec[AnyReport](AnyReport)
