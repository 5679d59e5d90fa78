"""GatewayMetrics counts finished exchanges a batch at a time, with the per-exchange results."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from flexgw.plan import Route
from flexgw.service import metrics as metrics_module
from flexgw.service.metrics import GatewayMetrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
ROUTES = [None, Route(name="default/a", order=50, rules=(), destinations=())]


class _Exchange:
    """The attributes of a finished exchange the metrics read."""

    def __init__(self, api: str | None, route: Any, status: int, cause: str | None,
                 started: float, upstream: float | None) -> None:
        self.api_key = api
        self.route = route
        self.response_status = status
        self.error_cause = cause
        self.started = started
        self.upstream_elapsed = upstream


def _reference(exchanges: list[tuple[_Exchange, float]]) -> tuple[dict[Any, int], dict[Any, list[float]]]:
    """The counts as one exchange at a time gives them (the former per-request code)."""
    requests: dict[Any, int] = {}
    latency: dict[Any, list[float]] = {}
    width = len(BUCKETS) + 1
    for exchange, now in exchanges:
        name = exchange.route.name if exchange.route is not None else None
        key = (exchange.api_key, name, exchange.response_status, exchange.error_cause)
        requests[key] = requests.get(key, 0) + 1
        slots = latency.setdefault((exchange.api_key, name), [0.0] * (3 * width + 3))
        elapsed = now - exchange.started
        slots[bisect_left(BUCKETS, elapsed)] += 1
        slots[width] += elapsed
        upstream = exchange.upstream_elapsed
        if upstream is not None:
            slots[width + 1 + bisect_left(BUCKETS, upstream)] += 1
            slots[2 * width + 1] += upstream
            elapsed -= upstream
        slots[2 * width + 2 + bisect_left(BUCKETS, elapsed)] += 1
        slots[-1] += elapsed
    return requests, latency


class BatchTests(SynchronousTestCase):
    """Counted when read or every _BATCH exchanges; the same counts as one at a time."""

    def test_counted_when_read(self) -> None:
        """A finished exchange is only recorded; reading `requests` or `latency` counts it."""
        clock = Clock()
        clock.advance(1.0)
        metrics = GatewayMetrics(clock, buckets=BUCKETS)
        metrics.exchange_finished(_Exchange("a", ROUTES[1], 200, None, 0.995, 0.002))
        self.assertEqual(metrics._requests, {})
        self.assertEqual(metrics.requests, {("a", "default/a", 200, None): 1})
        self.assertEqual(metrics.latency[("a", "default/a")][1], 1)  # 5 ms: the 10 ms bucket

    def test_batch_bound(self) -> None:
        """No more than _BATCH exchanges wait to be counted."""
        self.patch(metrics_module, "_BATCH", 3)
        metrics = GatewayMetrics(Clock(), buckets=BUCKETS)
        for _ in range(4):
            metrics.exchange_finished(_Exchange("a", None, 200, None, 0.0, None))
        self.assertEqual(len(metrics._pending), 1)
        self.assertEqual(metrics._requests, {("a", None, 200, None): 3})

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([None, "a", "b"]),
                st.sampled_from([0, 1]),
                st.sampled_from([0, 200, 502]),
                st.sampled_from([None, "upstream_reset"]),
                st.floats(0, 2),
                st.one_of(st.none(), st.floats(0, 1)),
                st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0]),  # (exactly at a bound too)
            ),
            min_size=1,
            max_size=40,
        )
    )
    def test_same_counts_as_one_at_a_time(self, items: list[tuple[Any, ...]]) -> None:
        """Whatever mix of APIs, routes, statuses and durations: the same requests, the same
        bucket counts, the same sums (to float rounding) as counting each exchange alone."""
        clock = Clock()
        metrics = GatewayMetrics(clock, buckets=BUCKETS)
        seen = []
        for api, route, status, cause, started, upstream, exact in items:
            clock.advance(1.0)
            now = clock.seconds()
            begun = now - exact if exact else now - started
            exchange = _Exchange(api, ROUTES[route], status, cause, begun, upstream)
            metrics.exchange_finished(exchange)
            seen.append((exchange, now))
        requests, latency = _reference(seen)
        self.assertEqual(metrics.requests, requests)
        self.assertEqual(set(metrics.latency), set(latency))
        for key, slots in latency.items():
            for got, want in zip(metrics.latency[key], slots, strict=True):
                self.assertAlmostEqual(got, want, places=6)
