"""Balancers and clusters in memory: round robin, weights, least request, ring hash and Maglev
movement, and a cluster's name resolution (refresh, last good set kept, backoff)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from flexgw.plan import Balancing, Endpoint, Upstream
from flexgw.testing.resolver import StaticResolver
from flexgw.upstream.balancer import LeastRequest, Maglev, RingHash, RoundRobin
from flexgw.upstream.health import HealthPolicy
from flexgw.upstream.manager import PoolManager


class FakeMember:
    """A balancer member with a settable number of requests in flight."""

    def __init__(self, key: str, weight: int = 1, outstanding: int = 0) -> None:
        self.key = key
        self.weight = weight
        self.load = outstanding

    def outstanding(self) -> int:
        """Requests in flight."""
        return self.load

    def __repr__(self) -> str:
        return self.key


def members(n: int, **kwargs: Any) -> list[FakeMember]:
    """`n` members 10.0.0.1:80 ..."""
    return [FakeMember(f"10.0.0.{i + 1}:80", **kwargs) for i in range(n)]


def spread(balancer: Any, picks: int, keys: bool = False) -> Counter[str]:
    """How many of `picks` picks each member got."""
    return Counter(balancer.pick(f"user-{i}" if keys else None).key for i in range(picks))


class BalancerTests(SynchronousTestCase):
    """The balancers' choices."""

    def test_round_robin_even(self) -> None:
        """Round robin gives each of three members a third, in turn."""
        balancer = RoundRobin(members(3), random.Random(1))
        self.assertEqual(set(spread(balancer, 300).values()), {100})

    def test_round_robin_weights(self) -> None:
        """Weights 3:1 give 3 of every 4 picks to the heavier member, spread out (never more
        than three of it in a row)."""
        group = [FakeMember("a", 3), FakeMember("b", 1)]
        balancer = RoundRobin(group, random.Random(1))
        order = [balancer.pick().key for _ in range(400)]
        self.assertEqual(Counter(order), {"a": 300, "b": 100})
        self.assertNotIn("aaaa", "".join(order))

    def test_round_robin_exclude(self) -> None:
        """A retry asks for another member than the one that failed, and gets one."""
        group = members(3)
        balancer = RoundRobin(group, random.Random(1))
        for _ in range(10):
            self.assertIsNot(balancer.pick(None, group[0]), group[0])

    def test_least_request_avoids_loaded(self) -> None:
        """Power of two choices sends a loaded member only the picks where both draws are it
        (none, as the two draws are distinct): with one of three at 10 in flight it gets none."""
        group = members(3)
        group[0].load = 10
        counts = spread(LeastRequest(group, random.Random(2)), 600)
        self.assertEqual(counts[group[0].key], 0)
        self.assertEqual(counts[group[1].key] + counts[group[2].key], 600)

    def test_least_request_weights(self) -> None:
        """With equal load, a member of weight 4 wins against weight 1 members."""
        group = [FakeMember("a", 4, 2), FakeMember("b", 1, 1), FakeMember("c", 1, 1)]
        counts = spread(LeastRequest(group, random.Random(3)), 600)
        self.assertGreater(counts["a"], counts["b"] + counts["c"])

    def check_hash_movement(self, kind: Any) -> None:
        """A key always goes to the same member; with one of five gone only its keys move
        (about 1/5), and each member of five gets a fair share."""
        group = members(5)
        before = kind(group, random.Random(4))
        keys = [f"user-{i}" for i in range(5000)]
        first = {k: before.pick(k).key for k in keys}
        self.assertEqual(first, {k: before.pick(k).key for k in keys})
        shares = Counter(first.values())
        self.assertTrue(all(600 < n < 1400 for n in shares.values()), shares)
        gone = group[2].key
        after = kind([m for m in group if m.key != gone], random.Random(5))
        moved = [k for k in keys if after.pick(k).key != first[k]]
        lost = [k for k in keys if first[k] == gone]
        self.assertTrue(set(lost) <= set(moved))
        # Ring hash moves only the departed member's keys; Maglev a few more (its table is
        # refilled), both about 1/5.
        self.assertLess(len(moved) - len(lost), len(keys) * (0 if kind is RingHash else 0.03) + 1)
        self.assertLess(abs(len(moved) / len(keys) - 0.2), 0.08)

    def test_ring_hash_movement(self) -> None:
        """Ring hash: stable keys, fair shares, ~1/N movement."""
        self.check_hash_movement(RingHash)

    def test_maglev_movement(self) -> None:
        """Maglev: stable keys, fair shares, ~1/N movement."""
        self.check_hash_movement(Maglev)

    def test_hash_exclude_and_no_key(self) -> None:
        """A retry of a hashed key goes to another member; no key: a random member."""
        group = members(3)
        for kind in (RingHash, Maglev):
            balancer = kind(group, random.Random(6))
            owner = balancer.pick("k")
            self.assertIsNot(balancer.pick("k", owner), owner)
            self.assertEqual(len(spread(balancer, 300)), 3)


def cluster_upstream(host: str = "api.internal", **balancing: Any) -> Upstream:
    """An http upstream on port 8080 with the given Balancing settings."""
    return Upstream(
        key="default/api", scheme="http", host=host, port=8080, balancing=Balancing(**balancing)
    )


class ClusterResolutionTests(SynchronousTestCase):
    """A named Service's address set follows its name (strict DNS)."""

    def setUp(self) -> None:
        """A pool manager on a memory clock whose connections go nowhere."""
        self.clock = Clock()
        self.connects: list[tuple[str, int]] = []
        test = self

        class Reactor:
            def connectTCP(self, host: str, port: int, factory: Any, timeout: float) -> Any:
                test.connects.append((host, port))
                return None

        self.answers: list[list[str]] = [["127.0.0.2", "127.0.0.3"]]
        self.resolver = StaticResolver({"api.internal": self.answers})
        self.manager = PoolManager(Reactor(), self.clock, self.resolver)  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def addresses(self, upstream: Upstream) -> list[str]:
        """The cluster's addresses now."""
        return sorted(self.manager.clusters[upstream].members)  # type: ignore[arg-type]

    def test_refresh_follows_name(self) -> None:
        """Resolved on first use, again every dnsRefreshSeconds; a new answer replaces the set
        (kept addresses keep their pool)."""
        self.answers.append(["127.0.0.3", "127.0.0.4"])
        upstream = cluster_upstream(dns_refresh=2.0)
        self.manager.pick(upstream)
        self.assertEqual(self.addresses(upstream), [("127.0.0.2", 8080), ("127.0.0.3", 8080)])
        kept = self.manager.clusters[upstream].members[("127.0.0.3", 8080)].pool
        self.clock.advance(1.9)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.resolver.lookups), 2)
        self.assertEqual(self.addresses(upstream), [("127.0.0.3", 8080), ("127.0.0.4", 8080)])
        self.assertIs(self.manager.clusters[upstream].members[("127.0.0.3", 8080)].pool, kept)
        self.assertTrue(self.manager.clusters[upstream].members[("127.0.0.4", 8080)].pool)

    def test_nothing_keeps_last_good_with_backoff(self) -> None:
        """A name that then resolves to nothing keeps its last good set, with a warning, and is
        asked again after 0.5, 1, 2 ... seconds (capped by dnsFailureRefreshSeconds); a good
        answer restores the normal refresh."""
        self.answers.extend([[], [], [], [], ["127.0.0.5"]])
        upstream = cluster_upstream(dns_refresh=10.0, dns_failure_refresh=1.0)
        self.manager.pick(upstream)
        self.clock.advance(10)  # second lookup: nothing
        self.assertEqual(len(self.resolver.lookups), 2)
        self.assertEqual(self.addresses(upstream), [("127.0.0.2", 8080), ("127.0.0.3", 8080)])
        warned = [e for e in self.events if "Name lookup" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        self.assertIn("keeping its last 2 address(es)", warned[0]["note"])
        for delay, lookups in ((0.5, 3), (1.0, 4), (1.0, 5), (1.0, 6)):
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(self.resolver.lookups), lookups - 1)
            self.clock.advance(0.01)
            self.assertEqual(len(self.resolver.lookups), lookups)
        self.assertEqual(self.addresses(upstream), [("127.0.0.5", 8080)])
        self.clock.advance(9.9)
        self.assertEqual(len(self.resolver.lookups), 6)

    def test_pick_connects_to_addresses_in_turn(self) -> None:
        """Requests go to the resolved addresses in turn, by IP, with the Service's port."""

        class Waiter:
            pool: Any = None

            def upstream_connect_failed(self, reason: Any) -> None:
                raise AssertionError(reason)

        upstream = cluster_upstream()
        for _ in range(4):
            self.manager.pick(upstream).acquire(Waiter())
        self.assertEqual(Counter(self.connects), {("127.0.0.2", 8080): 2, ("127.0.0.3", 8080): 2})

    def test_explicit_addresses(self) -> None:
        """`spec.addresses` are used as given, never resolved."""
        upstream = cluster_upstream(
            endpoints=(Endpoint("127.0.0.7", 81), Endpoint("127.0.0.8", 82, 2))
        )
        self.manager.pick(upstream)
        self.assertEqual(self.addresses(upstream), [("127.0.0.7", 81), ("127.0.0.8", 82)])
        self.assertEqual(self.resolver.lookups, [])

    def test_retired_cluster_stops_resolving(self) -> None:
        """A Service that leaves the configuration stops being resolved."""
        upstream = cluster_upstream(dns_refresh=1.0)
        self.manager.pick(upstream)
        self.manager.configure(self.manager.http, self.manager.timeouts, set())
        self.clock.advance(5)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_panic_threshold(self) -> None:
        """Three of four addresses unhealthy (25 % in rotation, under the 50 % threshold):
        failOpen uses all four (panic mode); reject keeps to the healthy one; none healthy
        with reject: no address (503 no_healthy_upstream)."""
        endpoints = tuple(Endpoint(f"127.0.0.{i}", 80) for i in range(2, 6))
        for fail_open, expected in ((True, 4), (False, 1)):
            upstream = cluster_upstream(endpoints=endpoints, fail_open=fail_open)
            self.manager.pick(upstream)
            cluster = self.manager.clusters[upstream]
            for member in list(cluster.members.values())[1:]:
                member.healthy = False
            cluster.rebuild()
            self.assertTrue(cluster.panic)
            picked = {id(self.manager.pick(upstream)) for _ in range(40)}
            self.assertEqual(len(picked), expected)
        next(iter(cluster.members.values())).healthy = False
        cluster.rebuild()
        self.assertIsNone(self.manager.pick(upstream))


class HealthWheelTests(SynchronousTestCase):
    """The health checker's timing on a memory clock (checks that never connect)."""

    def setUp(self) -> None:
        """A cluster of one address, checked every second (timeout 0.5 s, no jitter, two
        failures make it unhealthy), whose check connections never complete."""
        self.clock = Clock()
        self.connects: list[float] = []
        test = self

        class Reactor:
            def connectTCP(self, host: str, port: int, factory: Any, timeout: float) -> Any:
                test.connects.append(test.clock.seconds())
                return None

        manager = PoolManager(Reactor(), self.clock, StaticResolver({}))  # type: ignore[arg-type]
        upstream = Upstream(
            key="default/api",
            scheme="http",
            host="127.0.0.2",
            port=8080,
            health=HealthPolicy(interval=1.0, jitter=0.0, timeout=0.5, unhealthy_threshold=2),
        )
        manager.configure(manager.http, manager.timeouts, {upstream})
        self.cluster = manager.clusters[upstream]
        [self.member] = self.cluster.members.values()

    def check_unhealthy_in_time(self, step: float, late: bool = False) -> None:
        """Advanced `step` seconds at a time: healthy at 1.5 s (two checks with their
        timeouts take at least 0.05 + 0.5 + 1), unhealthy at 2.5 s (at most 1 + 0.5 + 1;
        `late`: a turn later, a timeout coming due in a late turn being judged at the next),
        a check every second."""
        for _ in range(round(1.5 / step)):
            self.clock.advance(step)
        self.assertTrue(self.member.healthy)
        for _ in range(round((1.0 + (step if late else 0)) / step)):
            self.clock.advance(step)
        self.clock.advance(0.05)  # (one more tick: the sums of float steps fall short of 2.5)
        self.assertFalse(self.member.healthy)
        gaps = [b - a for a, b in zip(self.connects, self.connects[1:])]
        self.assertTrue(all(abs(gap - 1.0) <= step + 1e-9 for gap in gaps), self.connects)

    def test_on_time(self) -> None:
        """The reactor on time (every 50 ms tick runs)."""
        self.check_unhealthy_in_time(0.05)

    def test_late_reactor_catches_up(self) -> None:
        """The reactor late by ten ticks each time (a loaded machine): the wheel turns the
        ticks it missed, so checks and timeouts keep to wall-clock time."""
        self.check_unhealthy_in_time(0.5, late=True)

    def test_answer_read_after_a_stall_is_not_a_timeout(self) -> None:
        """A check in flight when the reactor stalls past its timeout: the timeout is judged a
        tick later, so an answer that arrived during the stall (read after the timers ran)
        counts, not the timeout."""
        while not self.connects:
            self.clock.advance(0.05)
        self.clock.advance(0.6)  # one late turn of 12 ticks: the 0.5 s timeout came due
        self.assertEqual((self.member.health_failures, self.member.health_successes), (0, 0))
        check = self.cluster.health.checks[self.member]
        check.answered(None, 200)  # the reactor then reads the answer
        self.clock.advance(0.05)
        self.assertEqual((self.member.health_failures, self.member.health_successes), (0, 1))
