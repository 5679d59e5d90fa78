"""Deprecated: moved to flexgw.policies.forward_proxy (policies sit below egress); kept one release."""

from __future__ import annotations

import warnings
from typing import Any

from flexgw.policies import forward_proxy as _moved

warnings.warn(
    "flexgw.egress.policy is deprecated; import from flexgw.policies.forward_proxy instead",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
