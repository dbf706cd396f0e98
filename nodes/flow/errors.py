"""Errors the flow engine raises on purpose.

Only a flow that cannot be run at all raises: a DAG that is wrong (unknown dataset,
cycle, two writers, missing code file) or a request naming something that does not
exist.  A recipe that fails is not an exception: it is a FAILED ``RecipeRun`` in the
result, so one bad recipe never takes the caller down.
"""

from __future__ import annotations

from protocol.errors import BadRequest


class FlowError(BadRequest):
    """Raised when a project's datasets and recipes do not form a runnable DAG, or a
    build/check/scenario names a dataset, recipe or scenario the manifest does not have.

    ``problems`` lists every problem found (the message shows them all), so a user
    fixes a manifest in one pass instead of one error per try.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message, details={"problems": self.problems})
