"""Start a sandbox entry point in any Python interpreter.

``argv(python, "forkserver", [...])`` is the command line: ``python -I -c <bootstrap>
forkserver ...``.  The bootstrap loads this directory as a package under the private
name ``_shipyard_sandbox`` (``importlib.util.spec_from_file_location`` with
``submodule_search_locations``), so its relative imports work, and runs the entry
module's ``main(argv)``.  Nothing of shipyard is put on ``sys.path``, and ``-I``
(isolated mode) keeps out ``PYTHONPATH``, the user site and the current directory: in a
code environment's interpreter, user code sees that environment's packages and the
standard library, never shipyard's dependencies, whatever versions either side pins.

The node's own interpreter (the builtin environment, ``isolated=False``) runs the same
code the same way, but without ``-I``: user code there has always seen the node's
packages and ``PYTHONPATH``, and keeps seeing them.
"""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent
PACKAGE = "_shipyard_sandbox"

BOOTSTRAP = f"""\
import importlib, importlib.util, sys
d = sys.argv[1]
s = importlib.util.spec_from_file_location(
    "{PACKAGE}", d + "/__init__.py", submodule_search_locations=[d])
m = importlib.util.module_from_spec(s)
sys.modules["{PACKAGE}"] = m
s.loader.exec_module(m)
entry = importlib.import_module("{PACKAGE}." + sys.argv[2])
del d, s, m
entry.main(sys.argv[3:])
"""


def argv(python: str, entry: str, args: list[str], *, isolated: bool = True) -> list[str]:
    """The command that runs sandbox module ``entry``'s ``main(args)`` in ``python``."""
    return [python, *(["-I"] if isolated else []), "-c", BOOTSTRAP, str(DIR), entry, *args]
