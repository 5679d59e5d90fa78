"""The rate-limit store interface: an atomic fixed-window "check and count" for several limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from zope.interface import Interface


@attrs.frozen
class RateLimit:
    """One limit: at most `maximum_requests` per fixed window of `period_ms` milliseconds."""

    maximum_requests: int
    period_ms: int


@attrs.define(eq=True)
class Quota:
    """One limit's state for a key right after a hit (the request counted when allowed).

    Not frozen: one is made per request, and a frozen attrs class costs three times as much to
    build. Treat it as a value all the same.
    """

    limit: RateLimit
    remaining: int  # requests still allowed in the current window
    reset_ms: int  # milliseconds until the current window ends (> 0)

    @property
    def exhausted(self) -> bool:
        """True when this limit has no quota left in its window."""
        return self.remaining <= 0


@attrs.define(eq=True)
class HitResult:
    """The outcome of one `hit`: allowed or not, and every limit's quota (in the order given).

    Not frozen, for the same reason as Quota; treat it as a value.
    """

    allowed: bool
    quotas: tuple[Quota, ...]


class StoreUnavailable(Exception):
    """The store cannot answer because it is known down (flexgw.storage.breaker): the outage is
    logged by the store, once, so a caller does not log each such failure."""


class IRateLimitStore(Interface):
    """Fixed-window counters per key, shared by every request of one policy binding (or, for a
    shared store such as Redis, by every gateway replica).

    A window per (key, limit) starts at the first request that finds none (or finds it ended) and
    lasts exactly `period_ms`; counts reset when it ends. A hit is atomic across all the limits:
    either every limit has quota left and the request is counted in every window, or nothing is
    counted and the request is refused.
    """

    def hit(key: str, limits: Sequence[RateLimit]) -> Any:  # type: ignore[misc]
        """Check and count one request for `key` against every limit in `limits`.

        Returns a `HitResult`, or a Deferred firing with one (stores that do I/O, such as Redis).
        Callers must handle both: a synchronous store must never create a Deferred. A store that
        cannot answer raises (synchronously or through the Deferred's errback); one that knows
        it is down raises `StoreUnavailable` at once, without waiting.
        """

    def __len__() -> int:  # type: ignore[misc]
        """How many keys the store currently holds (for bounds and tests; may be approximate)."""
