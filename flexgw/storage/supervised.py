"""Counters shared by the `--workers` processes, held by the supervisor and reached over AMP.

The supervisor keeps `SupervisorCounters`: one `MemoryRateLimitStore` per rate-limit namespace
(`api:binding:limits fingerprint`) and one sliding window per spike-control namespace. A worker's
policies use `SupervisedRateLimitStore` / `SupervisedSpikeWindow`, which ask the supervisor with
one AMP command per check, so N workers share one exact quota (the supervisor's single reactor
serialises the checks). Time is the supervisor's clock, so windows do not depend on which worker
answers. With `--workers 1` none of this exists: the policies keep their counters in process.

A check whose answer does not come (the supervisor is gone) fails the Deferred: rate limiting then
decides by `blockOnUnknownQuota`, spike control refuses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from flexgw.storage.ampcommands import RateLimitHit, SpikeTake
from flexgw.storage.interfaces import HitResult, IRateLimitStore, Quota, RateLimit
from flexgw.storage.memory import MemoryRateLimitStore

#: Namespaces the supervisor keeps (least recently used dropped beyond it: a reload that changes
#: a binding's limits makes a new namespace; the old one is forgotten eventually).
MAX_NAMESPACES = 4096
#: Longer rate-limit keys are sent as their SHA-256 (an AMP value holds at most 65 535 bytes).
MAX_KEY_CHARS = 1024


class SupervisorCounters:
    """The supervisor's rate-limit stores and spike-control windows, by namespace."""

    def __init__(self, clock: Any, max_namespaces: int = MAX_NAMESPACES) -> None:
        self.clock = clock
        self.max_namespaces = max_namespaces
        self.stores: OrderedDict[str, MemoryRateLimitStore] = OrderedDict()
        self.windows: OrderedDict[str, deque[int]] = OrderedDict()

    @staticmethod
    def _get(table: OrderedDict[str, Any], namespace: str, make: Any, bound: int) -> Any:
        value = table.get(namespace)
        if value is None:
            if len(table) >= bound:
                table.popitem(last=False)
            value = table[namespace] = make()
        else:
            table.move_to_end(namespace)
        return value

    def store(self, namespace: str) -> MemoryRateLimitStore:
        """The rate-limit store of `namespace` (made on first use)."""
        return self._get(  # type: ignore[no-any-return]
            self.stores, namespace, lambda: MemoryRateLimitStore(self.clock), self.max_namespaces
        )

    def hit(self, namespace: str, key: str, limits: Sequence[RateLimit]) -> tuple[HitResult, int]:
        """One rate-limit check; with the namespace's key count."""
        store = self.store(namespace)
        return store.hit(key, limits), len(store)

    def spike_take(self, namespace: str, maximum: int, period_ms: int) -> tuple[bool, int, int]:
        """(taken, remaining, reset_ms) for one request in the sliding window `namespace`."""
        window: deque[int] = self._get(self.windows, namespace, deque, self.max_namespaces)
        now = round(self.clock.seconds() * 1000)
        horizon = now - period_ms
        while window and window[0] <= horizon:
            window.popleft()
        while len(window) > maximum:  # the binding's maximum was lowered by a reload
            window.popleft()
        taken = len(window) < maximum
        if taken:
            window.append(now)
        remaining = maximum - len(window)
        reset = 0 if remaining > 0 else window[0] + period_ms - now
        return taken, remaining, reset

    # AMP responders (the supervisor's protocol delegates here)

    def amp_hit(self, namespace: str, key: str, limits: list[int]) -> dict[str, Any]:
        """`RateLimitHit` answered."""
        parsed = [RateLimit(limits[i], limits[i + 1]) for i in range(0, len(limits) - 1, 2)]
        result, keys = self.hit(namespace, key, parsed)
        quotas: list[int] = []
        for quota in result.quotas:
            quotas += (quota.remaining, quota.reset_ms)
        return {"allowed": result.allowed, "quotas": quotas, "keys": keys}

    def amp_spike(self, namespace: str, maximum: int, period_ms: int) -> dict[str, Any]:
        """`SpikeTake` answered."""
        taken, remaining, reset = self.spike_take(namespace, maximum, period_ms)
        return {"taken": taken, "remaining": remaining, "reset_ms": reset}


@implementer(IRateLimitStore)
class SupervisedRateLimitStore:
    """A worker's view of one namespace of the supervisor's rate-limit counters."""

    def __init__(self, supervisor: Any, namespace: str) -> None:
        self.supervisor = supervisor  # an AMP protocol connected to the supervisor
        self.namespace = namespace
        self._keys = 0  # the namespace's key count, as of the last answer

    def __len__(self) -> int:
        """The namespace's key count as of the last answer (approximate, as the interface allows)."""
        return self._keys

    def hit(self, key: str, limits: Sequence[RateLimit]) -> Deferred[HitResult]:
        """Ask the supervisor to check and count one request."""
        if len(key) > MAX_KEY_CHARS:  # AMP values are bounded: long keys go as their digest
            key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        flat: list[int] = []
        for limit in limits:
            flat += (limit.maximum_requests, limit.period_ms)
        d = self.supervisor.callRemote(RateLimitHit, namespace=self.namespace, key=key, limits=flat)
        return d.addCallback(self._result, limits)  # type: ignore[no-any-return]

    def _result(self, answer: dict[str, Any], limits: Sequence[RateLimit]) -> HitResult:
        self._keys = answer["keys"]
        flat = answer["quotas"]
        quotas = tuple(
            Quota(limit, flat[2 * i], flat[2 * i + 1]) for i, limit in enumerate(limits)
        )
        return HitResult(answer["allowed"], quotas)


class SupervisedSpikeWindow:
    """A worker's view of one spike-control sliding window held by the supervisor."""

    def __init__(self, supervisor: Any, namespace: str) -> None:
        self.supervisor = supervisor
        self.namespace = namespace

    def take(self, maximum: int, period_ms: int) -> Deferred[tuple[bool, int, int]]:
        """(taken, remaining, reset_ms), from the supervisor."""
        d = self.supervisor.callRemote(
            SpikeTake, namespace=self.namespace, maximum=maximum, period_ms=period_ms
        )
        return d.addCallback(  # type: ignore[no-any-return]
            lambda answer: (answer["taken"], answer["remaining"], answer["reset_ms"])
        )
