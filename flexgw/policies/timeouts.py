"""`response-timeout-flex` and `stream-idle-timeout-flex`: per-API overrides of the gateway's upstream timeouts.

Flex (docs `policies-included-response-timeout.adoc`, `policies-included-stream-idle-timeout.adoc`,
1.9+): `config: {timeout: <seconds>}`, documented as "REQUIRED" with "Default Value" 15 (response)
and 300 (stream idle), which are the gateway-wide defaults the policy overrides. A timeout that
fires answers **504**. The exchange does the timing: these policies only set
`ctx.response_timeout` / `ctx.stream_idle_timeout` for the request, and the gateway answers
504 `upstream_timeout` / `stream_idle_timeout` (its usual JSON error) when they fire.

Deliberate differences from Flex:
- `timeout` may be omitted (the documented default then applies) instead of failing the binding.
- `timeout` must be greater than 0: Envoy reads a 0 route timeout as "no timeout", which Flex does
  not document; a 0 here is a config error rather than a guess. Fractions of a second are allowed
  (the docs type it `number`).
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, PolicyContext
from flexgw.policies.registry import register

#: Flex's defaults, in seconds (the gateway-wide defaults the policies override).
RESPONSE_TIMEOUT_DEFAULT = 15.0
STREAM_IDLE_TIMEOUT_DEFAULT = 300.0


def _schema(default: float) -> dict[str, Any]:
    """The config schema shared by both kinds: one positive `timeout` in seconds."""
    return {
        "type": "object",
        "properties": {
            "timeout": {"type": "number", "exclusiveMinimum": 0, "default": default},
        },
        "additionalProperties": False,
    }


@implementer(IPolicy)
@attrs.frozen
class ResponseTimeoutPolicy:
    """Sets how long the gateway waits for the upstream's response (from the end of the request)."""

    timeout: float

    def on_request(self, ctx: PolicyContext) -> None:
        """Override the upstream response timeout for this request."""
        ctx.response_timeout = self.timeout

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


@implementer(IPolicy)
@attrs.frozen
class StreamIdleTimeoutPolicy:
    """Sets how long the request's stream may stay idle in either direction."""

    timeout: float

    def on_request(self, ctx: PolicyContext) -> None:
        """Override the stream idle timeout for this request."""
        ctx.stream_idle_timeout = self.timeout

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


@implementer(IPolicyKind)
class ResponseTimeoutKind:
    """The `response-timeout-flex` kind."""

    name = "response-timeout-flex"
    schema = _schema(RESPONSE_TIMEOUT_DEFAULT)
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> ResponseTimeoutPolicy:
        """A policy with the configured (or default) timeout."""
        return ResponseTimeoutPolicy(float(config.get("timeout", RESPONSE_TIMEOUT_DEFAULT)))


@implementer(IPolicyKind)
class StreamIdleTimeoutKind:
    """The `stream-idle-timeout-flex` kind."""

    name = "stream-idle-timeout-flex"
    schema = _schema(STREAM_IDLE_TIMEOUT_DEFAULT)
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> StreamIdleTimeoutPolicy:
        """A policy with the configured (or default) timeout."""
        return StreamIdleTimeoutPolicy(float(config.get("timeout", STREAM_IDLE_TIMEOUT_DEFAULT)))


register(ResponseTimeoutKind())
register(StreamIdleTimeoutKind())
