"""`upstream-retry`, `upstream-outlier-detection` and `upstream-health-check`: flexgw extension
kinds bound to a Service (`upstream-retry` also to an ApiInstance: flexgw.config.compile gives
its policy to every Service the API routes to). Flex in Local Mode has none of them. Like `idle-timeout-flex` they
never run per request: each configures the Service's cluster at compile time
(flexgw.upstream.retry, .outlier, .health), through `upstream_settings` (the Upstream fields
it sets).

upstream-retry:
  retries (2), retryOn ([connect-failure, reset]; also timeout), statuses ([502, 503, 504]),
  perTryTimeoutSeconds, backoff {baseMilliseconds: 25, maxMilliseconds: 250},
  retryAfterMaxSeconds (0: a Retry-After header on a retryable status means no retry when it
  asks for a wait), maxBufferedBodyBytes (16384), budget {percent: 20, minConcurrency: 3}.
upstream-outlier-detection:
  consecutiveErrors (5), baseEjectionSeconds (30), maxEjectionSeconds (300),
  maxEjectionPercent (10).
upstream-health-check: see flexgw.upstream.health.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from flexgw.plan import PolicyConfigError
from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, PolicyContext
from flexgw.policies.registry import register
from flexgw.upstream.health import HealthPolicy
from flexgw.upstream.outlier import OutlierPolicy
from flexgw.upstream.retry import CONNECT_FAILURE, RESET, TIMEOUT, RetryPolicy

RETRY_NAME = "upstream-retry"
OUTLIER_NAME = "upstream-outlier-detection"
HEALTH_NAME = "upstream-health-check"

_STATUS = {"type": "integer", "minimum": 500, "maximum": 599}

RETRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "retries": {"type": "integer", "minimum": 1, "maximum": 10, "default": 2},
        "retryOn": {
            "type": "array",
            "items": {"enum": [CONNECT_FAILURE, RESET, TIMEOUT]},
            "uniqueItems": True,
        },
        "statuses": {"type": "array", "items": _STATUS, "uniqueItems": True},
        "perTryTimeoutSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "backoff": {
            "type": "object",
            "properties": {
                "baseMilliseconds": {"type": "number", "minimum": 1, "maximum": 60000},
                "maxMilliseconds": {"type": "number", "minimum": 1, "maximum": 60000},
            },
            "additionalProperties": False,
        },
        "retryAfterMaxSeconds": {"type": "number", "minimum": 0, "maximum": 60},
        "maxBufferedBodyBytes": {"type": "integer", "minimum": 0, "maximum": 1048576},
        "budget": {
            "type": "object",
            "properties": {
                "percent": {"type": "number", "minimum": 0, "maximum": 100},
                "minConcurrency": {"type": "integer", "minimum": 0, "maximum": 10000},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

OUTLIER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "consecutiveErrors": {"type": "integer", "minimum": 1, "maximum": 1000},
        "baseEjectionSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        "maxEjectionSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        "maxEjectionPercent": {"type": "number", "minimum": 0, "maximum": 100},
    },
    "additionalProperties": False,
}

HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"enum": ["http", "tcp"]},
        "path": {"type": "string", "pattern": "^/", "maxLength": 2048},
        "host": {"type": "string", "minLength": 1, "maxLength": 255},
        "method": {"enum": ["GET", "HEAD", "OPTIONS"]},
        "expectedStatuses": {
            "type": "array",
            "items": {"type": "integer", "minimum": 100, "maximum": 599},
            "minItems": 1,
            "uniqueItems": True,
        },
        "intervalSeconds": {"type": "number", "minimum": 0.05, "maximum": 3600},
        "jitterPercent": {"type": "number", "minimum": 0, "maximum": 100},
        "timeoutSeconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "healthyThreshold": {"type": "integer", "minimum": 1, "maximum": 100},
        "unhealthyThreshold": {"type": "integer", "minimum": 1, "maximum": 100},
    },
    "additionalProperties": False,
}


def _base_and_max(
    config: dict[str, Any], base_key: str, max_key: str, base: float, most: float, field: str = ""
) -> tuple[float, float]:
    """A (base, maximum) pair of a config, the maximum defaulting to at least the base; a
    maximum under the base is an error at `field` + `max_key`."""
    low = float(config.get(base_key, base))
    high = float(config.get(max_key, max(most, low)))
    if high < low:
        raise PolicyConfigError(f"{max_key} must be at least {base_key}", field + max_key)
    return low, high


@implementer(IPolicy)
@attrs.frozen(eq=False)
class UpstreamSetting:
    """Carries settings to the Service's cluster; never runs per request."""

    upstream_settings: dict[str, Any]
    chain_member = False
    response_phase = False

    def on_request(self, ctx: PolicyContext) -> None:
        """Not called (chain_member is False)."""

    def on_response(self, ctx: PolicyContext) -> None:
        """Not called."""


@implementer(IPolicyKind)
class RetryKind:
    """The `upstream-retry` kind."""

    name = RETRY_NAME
    schema = RETRY_SCHEMA
    phase = "both"  # on a Service, or on an ApiInstance (for every Service it routes to)

    def build(self, config: dict[str, Any], context: BuildContext) -> UpstreamSetting:
        """The Service's RetryPolicy."""
        base, most = _base_and_max(
            config.get("backoff") or {}, "baseMilliseconds", "maxMilliseconds", 25, 250, "backoff."
        )
        budget = config.get("budget") or {}
        policy = RetryPolicy(
            retries=int(config.get("retries", 2)),
            on=frozenset(config.get("retryOn", [CONNECT_FAILURE, RESET])),
            statuses=frozenset(int(s) for s in config.get("statuses", [502, 503, 504])),
            per_try_timeout=(
                float(config["perTryTimeoutSeconds"]) if "perTryTimeoutSeconds" in config else None
            ),
            backoff_base=base / 1000,
            backoff_max=most / 1000,
            retry_after_max=float(config.get("retryAfterMaxSeconds", 0)),
            body_limit=int(config.get("maxBufferedBodyBytes", 16384)),
            budget_percent=float(budget.get("percent", 20)),
            min_concurrency=int(budget.get("minConcurrency", 3)),
        )
        return UpstreamSetting({"retry": policy})


@implementer(IPolicyKind)
class OutlierKind:
    """The `upstream-outlier-detection` kind."""

    name = OUTLIER_NAME
    schema = OUTLIER_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> UpstreamSetting:
        """The Service's OutlierPolicy."""
        base, most = _base_and_max(
            config, "baseEjectionSeconds", "maxEjectionSeconds", 30, 300
        )
        policy = OutlierPolicy(
            consecutive_errors=int(config.get("consecutiveErrors", 5)),
            base_ejection=base,
            max_ejection=most,
            max_ejection_percent=float(config.get("maxEjectionPercent", 10)),
        )
        return UpstreamSetting({"outlier": policy})


@implementer(IPolicyKind)
class HealthKind:
    """The `upstream-health-check` kind."""

    name = HEALTH_NAME
    schema = HEALTH_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> UpstreamSetting:
        """The Service's HealthPolicy."""
        kind = config.get("type", "http")
        interval = float(config.get("intervalSeconds", 5))
        timeout = float(config.get("timeoutSeconds", min(1.0, interval)))
        if timeout > interval:
            raise PolicyConfigError(
                "timeoutSeconds must not exceed intervalSeconds", "timeoutSeconds"
            )
        if kind == "tcp" and ("path" in config or "expectedStatuses" in config):
            raise PolicyConfigError("a tcp check has no path or statuses", "type")
        policy = HealthPolicy(
            kind=kind,
            path=config.get("path", "/"),
            host=config.get("host"),
            method=config.get("method", "GET"),
            statuses=frozenset(config.get("expectedStatuses", range(200, 300))),
            interval=interval,
            jitter=float(config.get("jitterPercent", 10)) / 100,
            timeout=timeout,
            healthy_threshold=int(config.get("healthyThreshold", 1)),
            unhealthy_threshold=int(config.get("unhealthyThreshold", 2)),
        )
        return UpstreamSetting({"health": policy})


RETRY_KIND = register(RetryKind())
OUTLIER_KIND = register(OutlierKind())
HEALTH_KIND = register(HealthKind())
