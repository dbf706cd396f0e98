"""shipyard benchmarks: each measures a ratio against a baseline in one run."""
