"""The in-memory rate-limit store: fixed windows per key in one process, with bounded memory.

Memory bound
------------
Keys are kept in least-recently-used order (an `OrderedDict`). Each hit costs O(1):

- *Lazy eviction*: every hit that adds a key or starts a new window (any hit but the common
  "known key, window running, one limit" fast path) first looks at the (at most
  `SWEEP_PER_HIT`) least recently used keys and drops those whose every window has ended. Such
  a key holds no information: its next request would open fresh windows anyway. Because each
  new key comes with such a sweep, eviction keeps pace with arrivals whenever old windows have
  ended.
- *Hard bound*: the store never holds more than `max_keys` keys (default 100 000; each costs
  roughly 250-300 bytes with one limit, so about 30 MB at the bound, in line with Flex's own
  "about 250 bytes per bucket"). When a new key would exceed it, the store first sweeps every
  key once (at most once per `FULL_SWEEP_INTERVAL` seconds, so an attacker cannot make each
  request O(n)), then evicts the least recently used key even if its window is still running.
  That key then starts with a fresh quota on its next request: under a flood of distinct keys the
  store errs on the side of letting a forgotten client through rather than growing without
  bound. `evicted_live` counts such evictions.

When traffic stops, ended windows stay in memory until the next hits sweep them (still within
`max_keys`); `sweep()` drops them all at once for callers that want to.

Time comes from the injected clock (`IReactorTime.seconds()`), in whole milliseconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from zope.interface import implementer

from flexgw.storage.interfaces import HitResult, IRateLimitStore, Quota, RateLimit

#: Default bound on the number of keys one store holds.
DEFAULT_MAX_KEYS = 100_000
#: Least recently used keys checked for ended windows on every hit.
SWEEP_PER_HIT = 2
#: Minimum clock seconds between two full sweeps forced by reaching `max_keys`.
FULL_SWEEP_INTERVAL = 1.0


def now_ms(clock: Any) -> int:
    """The clock's current time in whole milliseconds."""
    return round(clock.seconds() * 1000)


@implementer(IRateLimitStore)
class MemoryRateLimitStore:
    """Fixed-window counters in a dict, bounded by `max_keys` (see the module docstring).

    An entry is a flat list `[end_0, count_0, end_1, count_1, ...]`: for each limit, the
    millisecond at which its current window ends and the requests counted in it.
    """

    def __init__(self, clock: Any, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.clock = clock
        self.max_keys = max_keys
        self.evicted_live = 0  # keys dropped while a window was still running (bound reached)
        self._entries: OrderedDict[str, list[int]] = OrderedDict()
        self._last_full_sweep: float | None = None

    def __len__(self) -> int:
        """How many keys are held (ended windows included until swept)."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """True when `key` is held."""
        return key in self._entries

    def counted(self, key: str, limits: Sequence[RateLimit]) -> bool:
        """`hit`'s common case without its result: True when the request was counted (one
        limit, a known key, its window running, quota left); False when it was not, and
        nothing changed: the caller then calls `hit` for the whole answer. For a caller that
        needs no quota figures (rate-limiting-flex without exposeHeaders)."""
        if len(limits) != 1:
            return False
        entry = self._entries.get(key)
        if entry is None or len(entry) != 2 or entry[1] >= limits[0].maximum_requests:
            return False
        if entry[0] <= round(self.clock.seconds() * 1000):
            return False
        self._entries.move_to_end(key)
        entry[1] += 1
        return True

    def hit(self, key: str, limits: Sequence[RateLimit]) -> HitResult:
        """Check and count one request for `key` against every limit (atomically)."""
        now = round(self.clock.seconds() * 1000)
        entries = self._entries
        if len(limits) == 1:
            # Fast path: one limit, a known key, its window still running.
            entry = entries.get(key)
            if entry is not None and len(entry) == 2 and entry[0] > now:
                entries.move_to_end(key)
                limit = limits[0]
                count = entry[1]
                if count >= limit.maximum_requests:
                    return HitResult(False, (Quota(limit, 0, entry[0] - now),))
                entry[1] = count + 1
                return HitResult(True, (Quota(limit, limit.maximum_requests - count - 1, entry[0] - now),))
        return self._hit(key, limits, now)

    def _hit(self, key: str, limits: Sequence[RateLimit], now: int) -> HitResult:
        """The general path: new keys, ended windows, several limits; sweeps as it goes."""
        entries = self._entries
        self._sweep_some(now)  # first: it may drop this very key, whose windows then restart
        entry = entries.get(key)
        if entry is not None and len(entry) != 2 * len(limits):
            del entries[key]  # asked with other limits than before: start afresh
            entry = None
        if entry is None:
            if len(entries) >= self.max_keys:
                self._make_room(now)
            entry = []
            for limit in limits:
                entry.append(now + limit.period_ms)
                entry.append(0)
            entries[key] = entry
        else:
            entries.move_to_end(key)
            for index in range(0, len(entry), 2):
                if entry[index] <= now:  # that window has ended: this request opens the next
                    entry[index] = now + limits[index // 2].period_ms
                    entry[index + 1] = 0
        allowed = True
        for index, limit in enumerate(limits):
            if entry[2 * index + 1] >= limit.maximum_requests:
                allowed = False
                break
        quotas = []
        for index, limit in enumerate(limits):
            count = entry[2 * index + 1]
            if allowed:
                count += 1
                entry[2 * index + 1] = count
            quotas.append(Quota(limit, max(limit.maximum_requests - count, 0), entry[2 * index] - now))
        return HitResult(allowed, tuple(quotas))

    def sweep(self) -> int:
        """Drop every key whose windows have all ended; returns how many were dropped."""
        now = now_ms(self.clock)
        entries = self._entries
        ended = [key for key, entry in entries.items() if max(entry[0::2]) <= now]
        for key in ended:
            del entries[key]
        return len(ended)

    def _sweep_some(self, now: int) -> None:
        """Drop up to SWEEP_PER_HIT least recently used keys whose windows have all ended."""
        entries = self._entries
        for _ in range(SWEEP_PER_HIT):
            if not entries:
                return
            key = next(iter(entries))
            entry = entries[key]
            if len(entry) == 2:
                if entry[0] > now:
                    return
            elif max(entry[0::2]) > now:
                return
            del entries[key]

    def _make_room(self, now: int) -> None:
        """At the bound: sweep everything (rate-limited), then evict least recently used keys."""
        seconds = now / 1000
        last = self._last_full_sweep
        if last is None or seconds - last >= FULL_SWEEP_INTERVAL:
            self._last_full_sweep = seconds
            self.sweep()
        entries = self._entries
        while len(entries) >= self.max_keys:
            entries.popitem(last=False)
            self.evicted_live += 1
