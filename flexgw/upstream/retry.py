"""Retries of failed tries (the `upstream-retry` policy, a flexgw extension): what may be
retried, after how long (exponential backoff with full jitter, `Retry-After`), and the retry
budget (Envoy's `retry_budget`, Gateway API GEP-3388): retries in flight stay under a percentage
of the Service's requests in flight, with a floor of a few concurrent retries."""

from __future__ import annotations

import random
from typing import Any

import attrs

#: Methods retried without a body (RFC 9110 §9.2.2 idempotent methods).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

_RNG = random.Random()

CONNECT_FAILURE = "connect-failure"
RESET = "reset"
TIMEOUT = "timeout"


@attrs.frozen
class RetryPolicy:
    """One Service's retry settings (`upstream-retry` config)."""

    retries: int = 2  # retries after the first try
    on: frozenset[str] = frozenset({CONNECT_FAILURE, RESET})  # gateway-seen failures retried
    statuses: frozenset[int] = frozenset({502, 503, 504})  # upstream statuses retried
    per_try_timeout: float | None = None  # seconds from request sent to response head
    backoff_base: float = 0.025  # seconds; the n-th retry waits up to base * 2**(n-1)
    backoff_max: float = 0.25
    retry_after_max: float = 0.0  # honour Retry-After up to this many seconds (0: never wait for it)
    body_limit: int = 16384  # a request body up to this size, received whole, may be replayed
    budget_percent: float = 20.0  # retries in flight at most this % of requests in flight
    min_concurrency: int = 3  # ... but always allow this many

    def delay(self, attempt: int, rng: random.Random = _RNG) -> float:
        """How long to wait before retry number `attempt` (1 for the first): full jitter over
        an exponentially growing window."""
        window = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return rng.uniform(0, window)

    def retry_after(self, headers: Any) -> float | None:
        """The `Retry-After` delay in seconds of a response (delta-seconds only), when within
        `retry_after_max`; None: absent, a date, or too long to wait for (no retry)."""
        for name, value in headers:
            if name.lower() == b"retry-after":
                try:
                    seconds = float(int(value.strip()))
                except ValueError:
                    return None
                return seconds if 0 <= seconds <= self.retry_after_max else None
        return 0.0


class RetryBudget:
    """A Service's retries in flight against its requests in flight."""

    __slots__ = ("active", "exhausted", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.active = 0  # retries in flight
        self.exhausted = 0  # retries refused by the budget (metrics)

    def admit(self, requests_in_flight: int) -> bool:
        """Whether one more retry fits; counts it in flight when it does."""
        policy = self.policy
        allowed = max(policy.min_concurrency, requests_in_flight * policy.budget_percent / 100)
        if self.active + 1 > allowed:
            self.exhausted += 1
            return False
        self.active += 1
        return True

    def done(self) -> None:
        """A retry ended (answered, failed, or abandoned)."""
        self.active -= 1
