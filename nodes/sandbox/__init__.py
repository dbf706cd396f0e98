"""The part of shipyard that runs inside a user's interpreter.

User code (recipes, scenario python steps, API endpoints) may run in a code
environment: another interpreter whose site-packages hold the project's own pins, which
may be other versions of msgspec, anyio or structlog than shipyard's, or none of them.
So what shipyard runs there -- the flow engine's fork server and job child, and the API
worker's user-code host -- lives in this package, which imports the standard library
and its own modules (relative imports) only, and is loaded under a private name without
putting shipyard on ``sys.path`` (``launch``).  ``tests/test_sandbox.py`` fails on any
other import.  The node's own interpreter (the builtin environment) runs the very same
code.

Modules: ``frames`` (the one frame layout), ``messages`` (what crosses the pipes),
``forkserver``/``child``/``context``/``measure`` (recipes and python steps),
``usercode``/``apihost`` (API endpoints), ``orphans``, ``launch`` (the command line).
This file imports nothing: each entry point loads only what it needs.
"""
