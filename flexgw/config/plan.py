"""Deprecated: the plan moved to `flexgw.plan`; this module re-exports it for one release."""

from __future__ import annotations

import warnings

from flexgw.plan import (  # noqa: F401  (re-exported for old imports)
    Api,
    BoundPolicy,
    Destination,
    GatewayPlan,
    HttpSettings,
    IPNetwork,
    Listener,
    LoggingSettings,
    LogOutput,
    PolicyConfigError,
    ProbeSettings,
    Problem,
    RedisSentinel,
    Route,
    Rule,
    SharedStorage,
    Template,
    Timeouts,
    Upstream,
)

warnings.warn(
    "flexgw.config.plan is deprecated; import from flexgw.plan instead",
    DeprecationWarning,
    stacklevel=2,
)
