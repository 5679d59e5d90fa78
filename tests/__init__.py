"""Tests for flexgw.

Hypothesis runs without its per-example deadline and too-slow health check: the suite runs on
shared, busy machines (two trial workers, CI), where a slow example is load, not a bug. Tests
that need bounded time say so with their own timeouts.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "flexgw", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("flexgw")
