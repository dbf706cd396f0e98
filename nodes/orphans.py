"""No orphans: ask Linux to signal a process when its parent dies.

The one implementation lives in ``nodes.sandbox.orphans`` (standard library only, so
processes in user environments use it too); shipyard's processes import it from here.
"""

from __future__ import annotations

from nodes.sandbox.orphans import PR_SET_PDEATHSIG as PR_SET_PDEATHSIG
from nodes.sandbox.orphans import die_with_parent as die_with_parent
