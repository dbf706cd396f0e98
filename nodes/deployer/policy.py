"""Per-infrastructure govern policy: what a deployment of an unapproved artifact meets.

Each infra has a policy (``Infra.govern``): ``none`` deploys, ``warn`` deploys and records
why on the update (shown as a WARNING reason in the deployment's health), ``prevent``
refuses with ``not_approved`` naming every artifact that is missing its approval.

The check reads the review records in the ``sy_govern`` KV bucket directly rather than
asking the Govern node: an approval is a fact stored in JetStream, a KV read costs one
round trip to the server the Deployer already depends on, and a deployment neither waits
for nor fails with the Govern node (which may be restarting).  The read is bounded by
``READ_TIMEOUT_S``: if the records cannot be read, ``prevent`` refuses (an unknown
approval is not an approval) and ``warn`` deploys with a warning saying so.

Deploys, API deploys (every version of the mapping, the shadow too) and rollbacks (to the
bundle or mapping rolled back to) all pass through ``GovernPolicy.check``.
"""

from __future__ import annotations

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from nodes.deployer.host import DeskHost
from nodes.runtime.jetstream import ensure_kv
from nodes.runtime.kvcache import read
from protocol import subjects
from protocol.deploy import Infra
from protocol.errors import NotApproved
from protocol.govern import NONE, PREVENT, REVIEW_VALUE, approval_problem, label, review_key

READ_TIMEOUT_S = 3.0  # the CLI waits 10 s for the whole deploy

Artifact = tuple[str, str, str]  # (kind, name, version)


class GovernPolicy:
    def __init__(self, host: DeskHost) -> None:
        self.host = host
        self._kv: KeyValue | None = None

    async def setup(self) -> None:
        self._kv = await ensure_kv(self.host.js, subjects.GOVERN_BUCKET,
                                   replicas=self.host.settings.replicas,
                                   description="shipyard sign-off reviews")

    async def _problems(self, artifacts: list[Artifact]) -> list[str]:
        assert self._kv is not None
        problems: list[str] = []
        for kind, name, version in artifacts:
            try:
                review, _ = await read(self._kv, review_key(kind, name, version),
                                       REVIEW_VALUE.decode)
            except msgspec.DecodeError:
                problems.append(f"{label(kind, name, version)} is not approved (its review "
                                "record is unreadable)")
                continue
            problem = approval_problem(kind, name, version, review)
            if problem is not None:
                problems.append(problem)
        return problems

    async def check(self, infra: Infra, artifacts: list[Artifact]) -> list[str]:
        """The warnings to record (``warn``), or ``NotApproved`` (``prevent``)."""
        if infra.govern == NONE or not artifacts:
            return []
        try:
            with anyio.fail_after(READ_TIMEOUT_S):
                problems = await self._problems(artifacts)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            what = ", ".join(label(*a) for a in artifacts)
            problems = [f"the approvals of {what} could not be read from "
                        f"{subjects.GOVERN_BUCKET} ({type(exc).__name__}: {exc}) and are "
                        "unknown"]
        if not problems:
            return []
        if infra.govern == PREVENT:
            raise NotApproved(f"{'; '.join(problems)}: infra {infra.name} deploys only "
                              "approved artifacts (govern policy prevent)",
                              details={"infra": infra.name, "missing": problems})
        self.host.log.warning("deploying unapproved artifacts", infra=infra.name,
                              warnings=problems)
        return problems
