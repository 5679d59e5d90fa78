"""UpstreamPool and PoolManager in memory: reuse order, idle expiry, limits, failures, retirement."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.connection import UpstreamConnection
from flexgw.upstream.interfaces import ConnectionOwner, IUpstreamPool
from flexgw.upstream.manager import PoolManager, ThrottledLog
from flexgw.upstream.pool import UpstreamPool


def upstream(port: int = 8080) -> Upstream:
    """An Upstream value for 127.0.0.1:`port`."""
    return Upstream(key=f"default/svc-{port}", scheme="http", host="127.0.0.1", port=port)


class Waiter:
    """Records what the pool gives it."""

    def __init__(self) -> None:
        """Nothing yet."""
        self.ready: list[tuple[UpstreamConnection, bool]] = []
        self.failed: list[Failure] = []

    def upstream_ready(self, connection: UpstreamConnection, reused: bool) -> None:
        """Got a connection."""
        self.ready.append((connection, reused))

    def upstream_connect_failed(self, reason: Failure) -> None:
        """Could not connect."""
        self.failed.append(reason)


class PoolTestCase(TestCase):
    """A pool on a memory reactor whose connection attempts the test completes by hand."""

    def setUp(self) -> None:
        """A pool with a 60 s idle timeout and room for 2 idle connections."""
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(
            self.reactor,
            self.reactor,
            upstream(),
            HttpSettings(max_idle_per_upstream=2, connect_timeout=3.0),
            Timeouts(upstream_idle=60.0),
        )

    def connect(self, index: int = -1) -> tuple[UpstreamConnection, StringTransport]:
        """Complete the `index`-th connection attempt; return the connection and its transport."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        connection = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def acquire_new(self) -> tuple[Waiter, UpstreamConnection, StringTransport]:
        """Acquire with an empty pool and complete the connection."""
        waiter = Waiter()
        self.pool.acquire(waiter)
        connection, transport = self.connect()
        return waiter, connection, transport


class AcquireReleaseTests(PoolTestCase):
    """Connections are made on demand and reused most-recently-idle first."""

    def test_connects_with_timeout_when_empty(self) -> None:
        """An empty pool connects to the upstream with the configured connect timeout."""
        waiter = Waiter()
        self.pool.acquire(waiter)
        [(host, port, _, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 3.0))
        self.assertEqual((self.pool.connecting, self.pool.active), (1, 0))
        connection, _ = self.connect()
        self.assertEqual(waiter.ready, [(connection, False)])
        self.assertEqual((self.pool.connecting, self.pool.active), (0, 1))

    def test_released_connection_is_reused(self) -> None:
        """A released keep-alive connection is handed to the next waiter, marked reused."""
        _, connection, _ = self.acquire_new()
        self.pool.release(connection)
        self.assertEqual((self.pool.idle, self.pool.active), ([connection], 0))
        waiter = Waiter()
        self.pool.acquire(waiter)
        self.assertEqual(waiter.ready, [(connection, True)])
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_most_recently_idle_first(self) -> None:
        """With two idle connections, the last released is reused first (LIFO)."""
        _, first, _ = self.acquire_new()
        _, second, _ = self.acquire_new()
        self.pool.release(first)
        self.pool.release(second)
        waiter = Waiter()
        self.pool.acquire(waiter)
        self.assertIs(waiter.ready[0][0], second)

    def test_fresh_acquire_skips_idle(self) -> None:
        """acquire(fresh=True) connects anew even with idle connections (the retry path)."""
        _, connection, _ = self.acquire_new()
        self.pool.release(connection)
        waiter = Waiter()
        self.pool.acquire(waiter, fresh=True)
        self.assertEqual(waiter.ready, [])
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.pool.idle, [connection])

    def test_busy_pool_connects_again(self) -> None:
        """While every connection is in use, another acquire opens another connection."""
        self.acquire_new()
        self.pool.acquire(Waiter())
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_not_reusable_is_closed_on_release(self) -> None:
        """A connection marked not reusable (Connection: close, error) is closed, not pooled."""
        _, connection, transport = self.acquire_new()
        connection.reusable = False
        self.pool.release(connection)
        self.assertEqual(self.pool.idle, [])
        self.assertTrue(transport.disconnecting)

    def test_idle_limit(self) -> None:
        """Beyond max_idle_per_upstream, released connections are closed."""
        made = [self.acquire_new() for _ in range(3)]
        for _, connection, _ in made:
            self.pool.release(connection)
        self.assertEqual(len(self.pool.idle), 2)
        self.assertTrue(made[2][2].disconnecting)
        self.assertFalse(made[0][2].disconnecting)

    def test_default_keeps_a_burst(self) -> None:
        """By default the pool keeps idle every connection of a burst of 500 concurrent
        requests (50 HTTP/2 connections of 10 streams), so the next burst reuses them instead of
        closing and connecting a third of them again."""
        self.pool = UpstreamPool(
            self.reactor, self.reactor, upstream(), HttpSettings(), Timeouts(upstream_idle=60.0)
        )
        made = [self.acquire_new() for _ in range(500)]
        for _, connection, _ in made:
            self.pool.release(connection)
        self.assertEqual(len(self.pool.idle), 500)
        self.assertFalse(any(transport.disconnecting for _, _, transport in made))
        for _ in range(500):
            self.pool.acquire(Waiter())
        self.assertEqual(len(self.reactor.tcpClients), 500)

    def test_discard_aborts(self) -> None:
        """A discarded connection is aborted and never pooled."""
        _, connection, transport = self.acquire_new()
        self.pool.discard(connection)
        self.assertTrue(transport.disconnected)
        self.assertEqual((self.pool.idle, self.pool.active), ([], 0))

    def test_idle_connection_lost_leaves_pool(self) -> None:
        """An idle connection the upstream closes is forgotten at once."""
        _, connection, _ = self.acquire_new()
        self.pool.release(connection)
        connection.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.pool.idle, [])
        waiter = Waiter()
        self.pool.acquire(waiter)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_connect_failure_reported(self) -> None:
        """A refused connection attempt reaches the waiter; nothing is left connecting."""
        waiter = Waiter()
        self.pool.acquire(waiter)
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(waiter.failed), 1)
        self.assertEqual((self.pool.connecting, self.pool.active), (0, 0))


class IdleExpiryTests(PoolTestCase):
    """Idle connections expire after upstreamConnectionIdleSeconds."""

    def test_expired_connection_not_reused(self) -> None:
        """A connection idle for the whole idle timeout is closed at acquire; a new one is made."""
        _, connection, transport = self.acquire_new()
        self.pool.release(connection)
        self.reactor.advance(60.0)
        waiter = Waiter()
        self.pool.acquire(waiter)
        self.assertTrue(transport.disconnected)
        self.assertEqual(waiter.ready, [])
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_fresh_connection_reused_just_before_expiry(self) -> None:
        """A connection idle for less than the timeout is still reused."""
        _, connection, _ = self.acquire_new()
        self.pool.release(connection)
        self.reactor.advance(59.9)
        waiter = Waiter()
        self.pool.acquire(waiter)
        self.assertEqual(waiter.ready, [(connection, True)])

    def test_expire_idle_closes_old_keeps_recent(self) -> None:
        """expire_idle closes only connections idle longer than the timeout."""
        _, old, old_transport = self.acquire_new()
        _, recent, recent_transport = self.acquire_new()
        self.pool.release(old)
        self.reactor.advance(30.0)
        self.pool.release(recent)
        self.reactor.advance(30.0)
        self.pool.expire_idle()
        self.assertEqual(self.pool.idle, [recent])
        self.assertTrue(old_transport.disconnecting)
        self.assertFalse(recent_transport.disconnecting)

    def test_manager_reaper_uses_clock(self) -> None:
        """PoolManager.start expires idle connections periodically on the injected clock."""
        manager = PoolManager(self.reactor, self.reactor)
        manager.configure(HttpSettings(), Timeouts(upstream_idle=5.0), {upstream()})
        pool = manager.pool_for(upstream())
        self.pool = pool
        _, connection, transport = self.acquire_new()
        pool.release(connection)
        manager.start(interval=1.0)
        self.addCleanup(manager.stop)
        self.reactor.advance(4.0)
        self.assertEqual(pool.idle, [connection])
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        self.assertEqual(pool.idle, [])
        self.assertTrue(transport.disconnecting)


class ManagerTests(PoolTestCase):
    """PoolManager keeps pools across reloads and retires removed upstreams."""

    def test_pools_provide_the_interface(self) -> None:
        """Both pool kinds the manager makes (HTTP/1.1, HTTP/2) are IUpstreamPools."""
        manager = PoolManager(self.reactor, self.reactor)
        h2 = Upstream(key="default/h2", scheme="h2c", host="127.0.0.1", port=9001)
        for pool in (manager.pool_for(upstream()), manager.pool_for(h2)):
            self.assertIsInstance(pool, IUpstreamPool)
            self.assertIsInstance(pool, ConnectionOwner)

    def test_pool_kept_for_unchanged_upstream(self) -> None:
        """The same Upstream value maps to the same pool across configure calls."""
        manager = PoolManager(self.reactor, self.reactor)
        pool = manager.pool_for(upstream())
        manager.configure(HttpSettings(), Timeouts(), {upstream()})
        self.assertIs(manager.pool_for(upstream()), pool)

    def test_new_settings_reach_existing_pools(self) -> None:
        """A reload changing timeouts and limits updates pools already in use."""
        manager = PoolManager(self.reactor, self.reactor)
        pool = manager.pool_for(upstream())
        manager.configure(
            HttpSettings(max_idle_per_upstream=7, connect_timeout=1.5),
            Timeouts(upstream_idle=2.0),
            {upstream()},
        )
        self.assertEqual((pool.max_idle, pool.connect_timeout, pool.idle_timeout), (7, 1.5, 2.0))

    def test_removed_upstream_pool_retired(self) -> None:
        """A removed upstream's idle connections close now and its busy ones when released."""
        manager = PoolManager(self.reactor, self.reactor)
        self.pool = manager.pool_for(upstream())
        _, idle, idle_transport = self.acquire_new()
        _, busy, busy_transport = self.acquire_new()
        self.pool.release(idle)
        manager.configure(HttpSettings(), Timeouts(), {upstream(9090)})
        self.assertTrue(idle_transport.disconnecting)
        self.assertNotIn(upstream(), manager.pools)
        self.pool.release(busy)
        self.assertTrue(busy_transport.disconnecting)
        self.assertEqual(self.pool.idle, [])


class DynamicPoolTests(TestCase):
    """Pools of forward-proxy destinations (Upstream.connect_host set) are forgotten when empty."""

    def test_empty_destination_pools_are_dropped(self) -> None:
        """Expiry removes an empty forward-proxy pool, keeps a busy one and every Service pool;
        a destination's pool connects to the checked address, not the name."""
        reactor = MemoryReactorClock()
        manager = PoolManager(reactor, reactor)
        service = Upstream(key="default/s", scheme="http", host="10.0.0.1", port=80)
        idle_dest = Upstream(key="egress/a.test:80", scheme="http", host="a.test", port=80,
                             connect_host="192.0.2.1")
        busy_dest = Upstream(key="egress/b.test:80", scheme="http", host="b.test", port=80,
                             connect_host="192.0.2.2")
        manager.pool_for(service)
        manager.pool_for(idle_dest)
        busy = manager.pool_for(busy_dest)
        busy.acquire(Waiter())
        self.assertEqual(reactor.tcpClients[-1][:2], ("192.0.2.2", 80))
        manager.expire_idle()
        self.assertEqual(set(manager.pools), {service, busy_dest})


class ThrottledLogTests(TestCase):
    """Repeated failures are logged once per key, a few keys per window, with a skipped count."""

    def test_one_record_per_key_and_window(self) -> None:
        """The same key again within the window is skipped; after the window it is written,
        with the number skipped meanwhile."""
        clock = Clock()
        log = ThrottledLog(clock, interval=10.0, burst=5)
        self.assertEqual(log.admit("a.test"), 0)
        self.assertIsNone(log.admit("a.test"))
        clock.advance(9.9)
        self.assertIsNone(log.admit("a.test"))
        clock.advance(0.1)
        self.assertEqual(log.admit("a.test"), 2)
        self.assertIsNone(log.admit("a.test"))

    def test_burst_of_distinct_keys(self) -> None:
        """A flood of distinct names writes `burst` records per window, then skips the rest."""
        clock = Clock()
        log = ThrottledLog(clock, interval=10.0, burst=3)
        admitted = [log.admit(f"n{i}.test") for i in range(100)]
        self.assertEqual(admitted[:3], [0, 0, 0])
        self.assertEqual(admitted[3:], [None] * 97)
        clock.advance(10)
        self.assertEqual(log.admit("n0.test"), 97)
