"""Settings for the whole test run."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Property tests assert logic, not speed: on a loaded 2-core CI machine input generation
# can be slow, which must not fail the run (benchmarks measure speed, tests do not).
settings.register_profile("donor", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("donor")
