"""The HTTP/2 upstream pool in memory: streams handed out once the upstream's SETTINGS are known,
no more than its SETTINGS_MAX_CONCURRENT_STREAMS per connection, and no SETTINGS in time fails."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.h2 import H2UpstreamPool


class _Waiter:
    """Records what the pool gives it."""

    def __init__(self) -> None:
        self.stream = None
        self.failure: Failure | None = None

    def upstream_ready(self, stream: object, reused: bool) -> None:
        """A stream was handed out."""
        self.stream = stream

    def upstream_connect_failed(self, reason: Failure) -> None:
        """The attempt failed."""
        self.failure = reason


class H2PoolTests(TestCase):
    """One h2c upstream on a memory reactor; its side is an h2 server connection driven here."""

    def setUp(self) -> None:
        """A pool for one h2c upstream, connect timeout 3 s."""
        self.reactor = MemoryReactorClock()
        self.pool = H2UpstreamPool(
            self.reactor, self.reactor, Upstream("default/u", "h2c", "127.0.0.1", 9000),
            HttpSettings(connect_timeout=3.0), Timeouts(),
        )

    def connect(self, index: int = -1) -> tuple[object, StringTransport]:
        """Complete a pending connection attempt."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9000))
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def test_streams_wait_for_settings_and_respect_the_limit(self) -> None:
        """Three requests on a fresh connection whose upstream allows two streams: nothing is
        handed out before its SETTINGS, then two streams, and the third opens a new connection."""
        waiters = [_Waiter() for _ in range(3)]
        for waiter in waiters:
            self.pool.acquire(waiter)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        connection, transport = self.connect()
        self.assertEqual([w.stream for w in waiters], [None, None, None])
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.local_settings = Settings(
            client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 2}
        )
        server.initiate_connection()
        server.receive_data(transport.value())
        connection.dataReceived(server.data_to_send())
        self.assertEqual([w.stream is not None for w in waiters], [True, True, False])
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.pool.active, 2)

    def test_no_settings_fails_the_waiters(self) -> None:
        """An upstream that never sends SETTINGS fails the attempt after the connect timeout."""
        waiter = _Waiter()
        self.pool.acquire(waiter)
        connection, transport = self.connect()
        self.reactor.advance(3.0)
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(Failure(ConnectionError("aborted")))
        self.assertIsNone(waiter.stream)
        self.assertIsNotNone(waiter.failure)
        self.assertEqual((self.pool.connecting, self.pool.connections), (0, []))


    def test_cancelled_waiters_give_the_attempt_up(self) -> None:
        """A waiter that gives up leaves its attempt; once no waiter is left the connect stops,
        and a connection that completes anyway is closed without a stream."""
        first, second = _Waiter(), _Waiter()
        self.pool.acquire(first)
        self.pool.acquire(second)
        [connector] = self.reactor.connectors
        self.pool.cancel(first)
        self.assertFalse(connector._disconnected)
        self.assertEqual(self.pool.connecting, 1)
        self.pool.cancel(second)
        self.assertTrue(connector._disconnected)
        self.assertEqual((self.pool.connecting, self.pool.attempts), (0, []))
        connection, transport = self.connect()
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        server.receive_data(transport.value())
        connection.dataReceived(server.data_to_send())
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.pool.connections, self.pool.active), ([], 0))
        self.assertEqual((first.stream, second.stream), (None, None))


class H2PoolIdleTimeoutTests(TestCase):
    """The HTTP/2 pool keeps idle connections as long as the plain pool would."""

    def test_service_idle_timeout_applies(self) -> None:
        """`idle-timeout-flex` on the Service (Upstream.idle_timeout) wins over the gateway's
        upstream idle timeout, as for HTTP/1.1 pools; without it, the gateway's applies."""
        reactor = MemoryReactorClock()
        bound = Upstream(key="default/up", scheme="h2c", host="127.0.0.1", port=8080, idle_timeout=7.5)
        pool = H2UpstreamPool(reactor, reactor, bound, HttpSettings(), Timeouts(upstream_idle=60.0))
        self.assertEqual(pool.idle_timeout, 7.5)
        unbound = Upstream(key="default/up", scheme="h2c", host="127.0.0.1", port=8080)
        pool = H2UpstreamPool(reactor, reactor, unbound, HttpSettings(), Timeouts(upstream_idle=60.0))
        self.assertEqual(pool.idle_timeout, 60.0)
