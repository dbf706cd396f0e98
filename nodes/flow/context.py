"""What user code sees: the ``ctx`` passed to a recipe's or a script's ``run(ctx)``.

Defined in ``nodes.sandbox.context`` (it is built inside the job process, in the
user's interpreter); re-exported here for the engine's callers.
"""

from __future__ import annotations

from nodes.sandbox.context import RecipeContext as RecipeContext
from nodes.sandbox.context import RecipeLog as RecipeLog
from nodes.sandbox.context import ScriptContext as ScriptContext
