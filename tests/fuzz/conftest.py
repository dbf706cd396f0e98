"""The fuzz suite's Hypothesis profile (see ``tests.fuzz.profile``)."""

import tests.fuzz.profile  # noqa: F401 - registers and loads the profile
