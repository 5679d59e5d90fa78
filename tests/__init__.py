"""Tests for flexgw.

Hypothesis runs without its per-example deadline and too-slow health check: the suite runs on
shared, busy machines (two trial workers, CI), where a slow example is load, not a bug. Tests
that need bounded time say so with their own timeouts.

grpcio's fork support is off in the test process: with it on, a child forked while grpcio's
threads exist (the ext_authz/ext_proc test servers, the grpcio clients of test_grpc) restarts
grpcio's poller, which aborts the child (SIGABRT, "epoll_wait error: Bad file descriptor") when
Twisted closes the child's descriptors before exec: `twistd` children died before READY=1.
The tests never use grpcio in a child; children exec at once.
"""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # (before any test imports grpc)

settings.register_profile(
    "flexgw", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("flexgw")
