"""Behaviour every rate-limit store must have: one mixin, run against each store (txacme style).

A store's test module subclasses `RateLimitStoreConformanceMixin` and `TestCase` and defines
`make_store(clock)`. Time is a `twisted.internet.task.Clock` the store must read for its windows
(a Redis store computes window boundaries from the clock it is given, so the same tests hold).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from flexgw.storage.interfaces import HitResult, IRateLimitStore, RateLimit

THREE_PER_6S = RateLimit(3, 6000)
TEN_PER_MINUTE = RateLimit(10, 60000)


class RateLimitStoreConformanceMixin:
    """Fixed windows per key started at the first request, several limits atomically."""

    # provided by TestCase
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any

    def make_store(self, clock: Clock) -> Any:
        """An empty store reading time from `clock` (subclasses implement)."""
        raise NotImplementedError

    def setUp(self) -> None:
        """A fresh store on a fake clock that does not start at zero."""
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.store = self.make_store(self.clock)

    async def hit(self, key: str, *limits: RateLimit) -> HitResult:
        """One hit, whether the store answers at once or with a Deferred."""
        result = self.store.hit(key, limits or (THREE_PER_6S,))
        if isinstance(result, Deferred):
            result = await result
        assert isinstance(result, HitResult)
        return result

    async def remaining(self, key: str, *limits: RateLimit) -> list[tuple[bool, int, int]]:
        """(allowed, remaining, reset_ms) of the first limit for several hits in a row."""
        result = await self.hit(key, *limits)
        return [(result.allowed, q.remaining, q.reset_ms) for q in result.quotas]

    def test_provides_interface(self) -> None:
        """The store provides IRateLimitStore."""
        self.assertTrue(verifyObject(IRateLimitStore, self.store))

    async def test_first_hit(self) -> None:
        """The first request is allowed and opens a full window."""
        result = await self.hit("k")
        self.assertTrue(result.allowed)
        self.assertEqual(len(result.quotas), 1)
        quota = result.quotas[0]
        self.assertEqual((quota.limit, quota.remaining, quota.reset_ms), (THREE_PER_6S, 2, 6000))

    async def test_quota_then_refusal(self) -> None:
        """maximumRequests requests pass in a window; the next ones are refused."""
        seen = [await self.remaining("k") for _ in range(5)]
        self.assertEqual(
            seen,
            [
                [(True, 2, 6000)],
                [(True, 1, 6000)],
                [(True, 0, 6000)],
                [(False, 0, 6000)],
                [(False, 0, 6000)],
            ],
        )

    async def test_window_is_fixed_from_first_request(self) -> None:
        """The window ends `period` after the key's first request, whatever came later."""
        await self.hit("k")
        self.clock.advance(2.5)
        self.assertEqual(await self.remaining("k"), [(True, 1, 3500)])
        self.clock.advance(3.499)
        self.assertEqual(await self.remaining("k"), [(True, 0, 1)])
        self.assertEqual(await self.remaining("k"), [(False, 0, 1)])
        self.clock.advance(0.001)  # exactly at the end: a new window starts now
        self.assertEqual(await self.remaining("k"), [(True, 2, 6000)])

    async def test_window_starts_at_first_request_not_at_creation(self) -> None:
        """A key's window starts when it is first seen, not when the store was made."""
        self.clock.advance(4.0)
        self.assertEqual(await self.remaining("late"), [(True, 2, 6000)])

    async def test_refused_requests_do_not_count(self) -> None:
        """Refused requests use no quota: the next window has its full quota."""
        for _ in range(10):
            await self.hit("k")
        self.clock.advance(6.0)
        self.assertEqual(await self.remaining("k"), [(True, 2, 6000)])

    async def test_new_window_after_idle_gap(self) -> None:
        """A request long after the window ended opens a new window starting then."""
        for _ in range(3):
            await self.hit("k")
        self.clock.advance(20.0)
        self.assertEqual(await self.remaining("k"), [(True, 2, 6000)])
        self.clock.advance(1.0)
        self.assertEqual(await self.remaining("k"), [(True, 1, 5000)])

    async def test_keys_are_independent(self) -> None:
        """Each key has its own counters and its own window start."""
        for _ in range(3):
            await self.hit("a")
        self.clock.advance(1.0)
        self.assertEqual(await self.remaining("b"), [(True, 2, 6000)])
        self.assertEqual(await self.remaining("a"), [(False, 0, 5000)])
        self.assertEqual(await self.remaining(""), [(True, 2, 6000)])

    async def test_several_limits_all_must_have_quota(self) -> None:
        """With several limits a request passes only if every limit has quota left."""
        short, long = RateLimit(2, 1000), RateLimit(3, 10000)
        self.assertEqual(await self.remaining("k", short, long), [(True, 1, 1000), (True, 2, 10000)])
        self.assertEqual(await self.remaining("k", short, long), [(True, 0, 1000), (True, 1, 10000)])
        # the short limit is exhausted: refused, and the long limit's count is untouched
        self.assertEqual(await self.remaining("k", short, long), [(False, 0, 1000), (False, 1, 10000)])
        self.clock.advance(1.0)
        self.assertEqual(await self.remaining("k", short, long), [(True, 1, 1000), (True, 0, 9000)])
        # now the long limit is exhausted although the short one has quota
        self.assertEqual(await self.remaining("k", short, long), [(False, 1, 1000), (False, 0, 9000)])
        self.clock.advance(9.0)
        self.assertEqual(await self.remaining("k", short, long), [(True, 1, 1000), (True, 2, 10000)])

    async def test_each_limit_has_its_own_window(self) -> None:
        """The windows of different limits start and end independently."""
        short, long = RateLimit(5, 1000), RateLimit(5, 3000)
        await self.hit("k", short, long)
        self.clock.advance(1.5)  # the short window ended; the long one runs until 3.0
        self.assertEqual(await self.remaining("k", short, long), [(True, 4, 1000), (True, 3, 1500)])

    async def test_len_counts_keys(self) -> None:
        """len(store) is the number of keys seen (nothing swept yet)."""
        self.assertEqual(len(self.store), 0)
        await self.hit("a")
        await self.hit("b")
        await self.hit("a")
        self.assertEqual(len(self.store), 2)
