"""`circuit-breaker-flex` and `idle-timeout-flex`: outbound policies bound to a Service.

**circuit-breaker-flex** (docs `policies-outbound-circuit-breaker.adoc`, reference §2.2, §9):
Flex maps `config.thresholds` onto Envoy's cluster circuit breakers — `maxConnections`,
`maxPendingRequests`, `maxRequests`, `maxRetries`, `maxConnectionPools`, all optional — and
answers **503** when a request would exceed one. In Local Mode the limits are shared by every
API instance using the upstream, and they are per replica (here: per process).

flexgw's data path speaks HTTP/1.1 upstream, one request per connection at a time and no
request queue, so the thresholds map as follows:
- `maxRequests`: requests in flight to the Service (admitted, not yet ended) — over it, 503.
- `maxConnections`: with one request per connection, connections in use are requests in
  flight, so it bounds them the same way (idle pooled connections are not counted; their
  number is `Configuration.spec.http.maxIdleConnectionsPerUpstream`).
- `maxPendingRequests`, `maxRetries`, `maxConnectionPools`: accepted and checked, with no
  effect — nothing waits in a queue for a connection, the only retry is the single retry of a
  pooled connection found dead, and each Service has exactly one pool.
Unset thresholds take Envoy's defaults (1024 requests and connections), as Flex does.
`Configuration.spec.circuitBreaker.thresholds` gives every Service without a binding the same
thresholds (flexgw.config.compile builds one breaker per such Service); a binding replaces them.

flexgw extension (Flex in Local Mode has no outlier detection, reference §8 item 5): with
`consecutiveErrors: N` the breaker also *opens* after N consecutive failed requests
(a 5xx from the upstream, or the gateway's upstream_connect_failure / upstream_reset /
upstream_timeout / upstream_bad_response / stream_idle_timeout). While open every request
gets 503 `circuit_open` without reaching the upstream. After `openSeconds` (default 30) it is
half-open: `halfOpenRequests` (default 1) probe requests go through; a successful probe
closes the breaker, a failed one opens it again for another `openSeconds`.

Both kinds of refusal are JSON 503s with `x-flexgw-error`: `circuit_overflow` (a threshold)
or `circuit_open`. The state lives per binding and survives reloads (counts of requests in
flight stay right while old and new configurations both serve).

**idle-timeout-flex** (docs `policies-outbound-upstream-idle-timeout.adoc`): `{timeout: <s>}`,
default 60: how long a pooled upstream connection may stay idle between requests before the
gateway closes it, for that Service (overriding `Configuration.spec.timeouts.upstreamConnectionIdleSeconds`).
It configures the Service's pool at compile time and does not run per request. (The docs list
a 504 for it; an idle pooled connection has no request to answer, so nothing answers 504.)
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.registry import register

BREAKER_NAME = "circuit-breaker-flex"
IDLE_NAME = "idle-timeout-flex"

#: Envoy's circuit-breaker defaults, which Flex inherits for thresholds left unset.
DEFAULT_MAX = 1024
DEFAULT_MAX_RETRIES = 3

#: Gateway-made answers that count as a failure of the upstream.
FAILURE_CAUSES = frozenset(
    {
        "upstream_connect_failure",
        "upstream_reset",
        "upstream_timeout",
        "upstream_bad_response",
        "stream_idle_timeout",
    }
)

_COUNT = {"type": "integer", "minimum": 0}

BREAKER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "thresholds": {
            "type": "object",
            "properties": {
                "maxConnections": _COUNT,
                "maxPendingRequests": _COUNT,
                "maxRequests": _COUNT,
                "maxRetries": _COUNT,
                "maxConnectionPools": _COUNT,
            },
            "additionalProperties": False,
        },
        "consecutiveErrors": {"type": "integer", "minimum": 1},
        "openSeconds": {"type": "number", "exclusiveMinimum": 0, "default": 30},
        "halfOpenRequests": {"type": "integer", "minimum": 1, "default": 1},
    },
    "additionalProperties": False,
}

IDLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timeout": {"type": "number", "exclusiveMinimum": 0, "default": 60}},
    "additionalProperties": False,
}

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

OVERFLOW = LocalResponse.gateway_error(
    503, "circuit_overflow", "The upstream service has too many requests in flight"
)
OPEN_RESPONSE = LocalResponse.gateway_error(
    503, "circuit_open", "The upstream service is failing; the circuit breaker is open"
)


class BreakerState:
    """The mutable state one binding keeps across reloads: requests in flight and the circuit."""

    __slots__ = ("failures", "in_flight", "opened_at", "probes", "state")

    def __init__(self) -> None:
        self.in_flight = 0
        self.state = CLOSED
        self.failures = 0  # consecutive failures while closed
        self.opened_at = 0.0
        self.probes = 0  # half-open probes in flight


@implementer(IPolicy)
class CircuitBreakerPolicy(UsesRuntime):
    """One binding: its limits, and the shared state of its Service."""

    def __init__(
        self,
        max_requests: int,
        consecutive_errors: int | None,
        open_seconds: float,
        half_open_requests: int,
        state: BreakerState,
        clock: Any = None,
    ) -> None:
        self.max_requests = max_requests
        self.consecutive_errors = consecutive_errors
        self.open_seconds = open_seconds
        self.half_open_requests = half_open_requests
        self.state = state
        self._clock = clock
        self._reactor = None

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Admit the request, or answer 503 (over a threshold, or the circuit is open)."""
        state = self.state
        probe = False
        if state.state != CLOSED:
            if state.state == OPEN:
                if self.clock.seconds() - state.opened_at < self.open_seconds:
                    return OPEN_RESPONSE
                state.state = HALF_OPEN
                state.probes = 0
            if state.probes >= self.half_open_requests:
                return OPEN_RESPONSE
            probe = True
        if state.in_flight >= self.max_requests:
            return OVERFLOW
        state.in_flight += 1
        if probe:
            state.probes += 1
        if ctx.scratch is None:
            ctx.scratch = {}
        ctx.scratch[state] = probe
        return None

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response head (the outcome is judged in on_done)."""

    def on_done(self, ctx: PolicyContext, status: int, cause: str | None) -> None:
        """Free the request's slot; count its success or failure."""
        state = self.state
        probe = ctx.scratch.pop(state, None) if ctx.scratch is not None else None
        if probe is None:
            return  # not admitted by this state (cannot happen; be safe)
        state.in_flight -= 1
        if probe:
            state.probes -= 1
        if self.consecutive_errors is None:
            return
        if cause in FAILURE_CAUSES or (cause is None and status >= 500):
            if state.state == HALF_OPEN:
                self._open(state)
            elif state.state == CLOSED:
                state.failures += 1
                if state.failures >= self.consecutive_errors:
                    self._open(state)
        elif cause is None and status:
            # The upstream answered (not 5xx): a probe closes the circuit; any success resets.
            if state.state == HALF_OPEN and probe:
                state.state = CLOSED
            if state.state == CLOSED:
                state.failures = 0
        # Other endings (a later policy refused, the client went away) say nothing about the
        # upstream.

    def _open(self, state: BreakerState) -> None:
        state.state = OPEN
        state.opened_at = self.clock.seconds()
        state.failures = 0


@implementer(IPolicyKind)
class CircuitBreakerKind:
    """The `circuit-breaker-flex` kind."""

    name = BREAKER_NAME
    schema = BREAKER_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> CircuitBreakerPolicy:
        """The limits, and the binding's state (kept across reloads in the runtime)."""
        thresholds = config.get("thresholds") or {}
        max_requests = min(
            int(thresholds.get("maxRequests", DEFAULT_MAX)),
            int(thresholds.get("maxConnections", DEFAULT_MAX)),
        )
        shared = context.services.shared
        key = f"{BREAKER_NAME}:{context.binding}"
        if shared is not None:
            state = shared.setdefault(key, BreakerState())
        else:
            state = BreakerState()  # `flexgw validate`: nothing runs
        errors = config.get("consecutiveErrors")
        return CircuitBreakerPolicy(
            max_requests=max_requests,
            consecutive_errors=None if errors is None else int(errors),
            open_seconds=float(config.get("openSeconds", 30)),
            half_open_requests=int(config.get("halfOpenRequests", 1)),
            state=state,
            clock=context.clock,
        )


@implementer(IPolicy)
@attrs.frozen
class IdleTimeoutPolicy:
    """Carries the Service's upstream idle timeout to its pool; never runs per request."""

    upstream_idle_timeout: float
    chain_member = False
    response_phase = False

    def on_request(self, ctx: PolicyContext) -> None:
        """Not called (chain_member is False)."""

    def on_response(self, ctx: PolicyContext) -> None:
        """Not called."""


@implementer(IPolicyKind)
class IdleTimeoutKind:
    """The `idle-timeout-flex` kind."""

    name = IDLE_NAME
    schema = IDLE_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> IdleTimeoutPolicy:
        """The configured (or default) timeout."""
        return IdleTimeoutPolicy(float(config.get("timeout", 60)))


BREAKER_KIND = register(CircuitBreakerKind())
IDLE_KIND = register(IdleTimeoutKind())
