"""Deprecated: moved to flexgw.policies.destinations (policies sit below egress); kept one release."""

from __future__ import annotations

import warnings
from typing import Any

from flexgw.policies import destinations as _moved

warnings.warn(
    "flexgw.egress.destinations is deprecated; import from flexgw.policies.destinations instead",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
