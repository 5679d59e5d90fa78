"""The in-memory rate-limit store: the shared conformance tests, plus its memory bound."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.storage import memory
from flexgw.storage.interfaces import RateLimit
from flexgw.storage.memory import MemoryRateLimitStore
from tests.storage_conformance import RateLimitStoreConformanceMixin

ONE_PER_SECOND = (RateLimit(1, 1000),)


class MemoryStoreConformanceTests(RateLimitStoreConformanceMixin, TestCase):
    """MemoryRateLimitStore passes the store conformance tests."""

    def make_store(self, clock: Clock) -> Any:
        """A memory store on the fake clock."""
        return MemoryRateLimitStore(clock)


class MemoryStoreBoundTests(TestCase):
    """Ended windows are evicted and the number of keys never exceeds max_keys."""

    def setUp(self) -> None:
        """A small store on a fake clock."""
        self.clock = Clock()
        self.store = MemoryRateLimitStore(self.clock, max_keys=10)

    def test_hits_are_synchronous(self) -> None:
        """The memory store answers at once (no Deferred on the request path)."""
        result = self.store.hit("k", ONE_PER_SECOND)
        self.assertTrue(result.allowed)

    def test_ended_windows_evicted_lazily(self) -> None:
        """Keys whose windows ended are dropped by later hits, oldest first, without a timer."""
        for n in range(5):
            self.store.hit(f"old{n}", ONE_PER_SECOND)
        self.assertEqual(len(self.store), 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1.0)
        for n in range(3):
            self.store.hit(f"new{n}", ONE_PER_SECOND)
        # each hit drops up to two ended keys: five old keys gone after three hits
        self.assertEqual(len(self.store), 3)
        self.assertFalse(any(f"old{n}" in self.store for n in range(5)))

    def test_live_windows_not_evicted_by_sweep(self) -> None:
        """A key whose window is still running is kept by the lazy sweep."""
        self.store.hit("live", (RateLimit(1, 5000),))
        self.clock.advance(1.0)
        self.store.hit("other", ONE_PER_SECOND)
        self.assertIn("live", self.store)
        self.assertFalse(self.store.hit("live", (RateLimit(1, 5000),)).allowed)

    def test_recently_used_keys_kept_at_the_bound(self) -> None:
        """At max_keys the least recently used live key goes; the count never exceeds the bound."""
        limits = (RateLimit(1, 60000),)
        for n in range(10):
            self.store.hit(f"k{n}", limits)
        self.store.hit("k0", limits)  # k0 is now the most recently used
        for n in range(10, 15):
            self.store.hit(f"k{n}", limits)
            self.assertLessEqual(len(self.store), 10)
        self.assertEqual(len(self.store), 10)
        self.assertIn("k0", self.store)
        self.assertFalse(any(f"k{n}" in self.store for n in range(1, 6)))
        self.assertEqual(self.store.evicted_live, 5)
        # an evicted key starts afresh (the documented cost of the bound)
        self.assertTrue(self.store.hit("k1", limits).allowed)

    def test_bound_prefers_ended_windows(self) -> None:
        """At the bound, keys whose windows ended anywhere in the store go before live ones."""
        self.store.hit("long", (RateLimit(1, 60000),))  # least recently used, and live
        for n in range(9):
            self.store.hit(f"short{n}", ONE_PER_SECOND)
        self.clock.advance(2.0)
        # the lazy sweep stops at "long" (live); the bound forces a full sweep instead of
        # evicting it
        self.store.hit("fresh", ONE_PER_SECOND)
        self.assertIn("long", self.store)
        self.assertEqual(self.store.evicted_live, 0)
        self.assertEqual(len(self.store), 2)

    def test_full_sweep_rate_limited(self) -> None:
        """At the bound the full sweep runs at most once per FULL_SWEEP_INTERVAL."""
        calls = []
        original = self.store.sweep

        def counting() -> int:
            calls.append(self.clock.seconds())
            return original()

        self.store.sweep = counting  # type: ignore[method-assign]
        limits = (RateLimit(1, 60000),)
        for n in range(30):
            self.store.hit(f"k{n}", limits)
        self.assertEqual(calls, [0.0])
        self.clock.advance(memory.FULL_SWEEP_INTERVAL)
        self.store.hit("late", limits)
        self.assertEqual(calls, [0.0, memory.FULL_SWEEP_INTERVAL])
        self.assertEqual(len(self.store), 10)

    def test_sweep_drops_every_ended_key(self) -> None:
        """sweep() drops all ended keys at once and keeps live ones."""
        for n in range(4):
            self.store.hit(f"s{n}", ONE_PER_SECOND)
        self.store.hit("live", (RateLimit(1, 5000),))
        self.clock.advance(1.0)
        self.assertEqual(self.store.sweep(), 4)
        self.assertEqual(len(self.store), 1)

    def test_changed_limits_start_afresh(self) -> None:
        """A key asked about with a different number of limits starts new windows."""
        self.store.hit("k", ONE_PER_SECOND)
        result = self.store.hit("k", (RateLimit(1, 1000), RateLimit(5, 5000)))
        self.assertTrue(result.allowed)
        self.assertEqual([q.remaining for q in result.quotas], [0, 4])

    def test_max_keys_must_be_positive(self) -> None:
        """A bound below one key is refused."""
        self.assertRaises(ValueError, MemoryRateLimitStore, self.clock, max_keys=0)


class CountedFastPathTests(TestCase):
    """`counted` (the answer without a HitResult) decides exactly as `hit` does."""

    @given(
        steps=st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=0, max_value=700)),
            max_size=60,
        ),
        maximum=st.integers(min_value=1, max_value=4),
        two_limits=st.booleans(),
    )
    @settings(max_examples=200, deadline=None)
    def test_same_decisions_as_hit(
        self, steps: list[tuple[str, int]], maximum: int, two_limits: bool
    ) -> None:
        """Two stores given the same requests, one asked `counted` first (then `hit` when it
        says False), one only `hit`: the same requests pass, and the counters end the same."""
        limits = (RateLimit(maximum, 1000),) + ((RateLimit(maximum + 1, 1500),) if two_limits else ())
        clock = Clock()
        fast, plain = MemoryRateLimitStore(clock), MemoryRateLimitStore(clock)
        for key, advance_ms in steps:
            clock.advance(advance_ms / 1000)
            allowed = fast.counted(key, limits) or fast.hit(key, limits).allowed
            self.assertEqual(allowed, plain.hit(key, limits).allowed)
        self.assertEqual(dict(fast._entries), dict(plain._entries))
        self.assertEqual(list(fast._entries), list(plain._entries))  # the same LRU order

    def test_refused_and_unknown_are_not_counted(self) -> None:
        """`counted` is False, and changes nothing, for a new key, a spent quota and an ended
        window: `hit` then opens, refuses or restarts as always."""
        clock = Clock()
        store = MemoryRateLimitStore(clock)
        self.assertFalse(store.counted("k", ONE_PER_SECOND))
        self.assertNotIn("k", store)
        self.assertTrue(store.hit("k", ONE_PER_SECOND).allowed)
        self.assertFalse(store.counted("k", ONE_PER_SECOND))  # spent
        self.assertFalse(store.hit("k", ONE_PER_SECOND).allowed)
        clock.advance(1.0)
        self.assertFalse(store.counted("k", ONE_PER_SECOND))  # window ended
        self.assertTrue(store.hit("k", ONE_PER_SECOND).allowed)
        store2 = MemoryRateLimitStore(clock)
        store2.hit("k", (RateLimit(3, 1000),))
        self.assertTrue(store2.counted("k", (RateLimit(3, 1000),)))
        self.assertEqual(store2.hit("k", (RateLimit(3, 1000),)).quotas[0].remaining, 0)
