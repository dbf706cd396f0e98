"""Hypothesis settings for the fuzz suite (loaded by its conftest).

By default each fuzz test runs a small, fixed set of examples (derandomized, so CI runs
are reproducible and take seconds).  ``SHIPYARD_FUZZ_EXAMPLES=5000`` runs that many
examples per test with fresh random inputs instead.  Nothing is stored between runs
(no example database in the repository).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, Verbosity, settings

DEFAULT_EXAMPLES = 60
EXAMPLES = int(os.environ.get("SHIPYARD_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)
LONG = "SHIPYARD_FUZZ_EXAMPLES" in os.environ

settings.register_profile(
    "shipyard-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,
    database=None,
    print_blob=True,
    verbosity=Verbosity.normal,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)
settings.load_profile("shipyard-fuzz")

STATEFUL = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    verbosity=Verbosity.verbose if LONG else Verbosity.normal)
"""For examples against running nodes: no shrinking.  A node is stateful, so a failing
example is re-run many times while shrinking, each on a stack the failure damaged, and the
"minimal" example ends up being whatever ran on a broken stack.  Batches are small, so the
example as generated reads well enough."""

# Time a fuzz test may take: the stack's answers are fast, but a failing example restarts
# the nodes it damaged, and long runs scale with the number of examples.
TIMEOUT = 300 + EXAMPLES // 2
