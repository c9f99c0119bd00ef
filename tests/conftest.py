"""Suite-wide settings.

Hypothesis: no per-example deadline (CI shares two cores with the daemons the integration tests
start, so a slow example is not a bug) and a fixed database-free run, so a failure prints its
reproducing example instead of depending on a local example cache."""

from hypothesis import settings

settings.register_profile("vsand", deadline=None, database=None, print_blob=True)
settings.load_profile("vsand")
