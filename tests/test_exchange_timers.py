"""ProxyExchange timing in memory: upstream response timeout, stream idle timeout, aborts, no leaks."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from flexgw.ingress.front import IngressProtocol
from flexgw.plan import HttpSettings, Timeouts
from flexgw.testing.memory import connect_upstream, memory_factory, one_api_listener
from flexgw.upstream.connection import UpstreamConnection

TIMEOUTS = Timeouts(upstream_response=15.0, stream_idle=300.0, upstream_idle=60.0)
POST_HEAD = b"POST /up HTTP/1.1\r\nHost: example.test\r\nContent-Length: 6\r\n\r\n"
GET = b"GET /items HTTP/1.1\r\nHost: example.test\r\n\r\n"


class ExchangeClockTestCase(TestCase):
    """One downstream connection on a memory reactor; upstream connections completed by hand."""

    def setUp(self) -> None:
        """A one-API plan built in code, and one client connection (no YAML, no socket)."""
        self.factory = memory_factory(one_api_listener(8000, 9000), HttpSettings(), TIMEOUTS)
        self.reactor = self.factory.reactor
        self.pools = self.factory.pools
        self.front = IngressProtocol(self.factory)
        self.down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        self.front.makeConnection(self.down)

    def connect_upstream(self) -> tuple[UpstreamConnection, StringTransport]:
        """Complete the latest upstream connection attempt."""
        host, port, _, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 9000))
        return connect_upstream(self.reactor)

    def error_cause(self) -> bytes | None:
        """The x-flexgw-error of a gateway error written downstream, if one was."""
        data = self.down.value()
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"x-flexgw-error:"):
                return line.split(b":", 1)[1].strip()
        return None

    def pool_counts(self) -> tuple[int, int, int]:
        """(idle, active, connecting) of the single upstream pool."""
        [pool] = self.pools.pools.values()
        return (len(pool.idle), pool.active, pool.connecting)


class UpstreamResponseTimeoutTests(ExchangeClockTestCase):
    """upstreamResponseSeconds runs from the end of the request to the response head."""

    def test_get_times_out_after_upstream_response_seconds(self) -> None:
        """No response head 15 s after the request was sent: 504, upstream connection aborted."""
        self.front.dataReceived(GET)
        _, up = self.connect_upstream()
        self.assertTrue(up.value().startswith(b"GET /items HTTP/1.1\r\n"))
        self.reactor.advance(14.9)
        self.assertEqual(self.down.value(), b"")
        self.reactor.advance(0.1)
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(self.error_cause(), b"upstream_timeout")
        body = self.down.value().split(b"\r\n\r\n", 1)[1]
        self.assertIn("error", json.loads(body))
        self.assertTrue(up.disconnected)
        self.assertEqual(self.pool_counts(), (0, 0, 0))

    def test_timer_starts_when_request_body_ends(self) -> None:
        """A slow upload is not an upstream timeout: the 15 s count from the last body byte."""
        self.front.dataReceived(POST_HEAD)
        _, up = self.connect_upstream()
        self.reactor.advance(10)
        self.front.dataReceived(b"abc")
        self.reactor.advance(10)
        self.front.dataReceived(b"def")  # request complete at t=20
        self.reactor.advance(14.9)
        self.assertEqual(self.down.value(), b"")
        self.reactor.advance(0.1)
        self.assertEqual(self.error_cause(), b"upstream_timeout")
        self.assertTrue(up.value().endswith(b"\r\n\r\nabcdef"))

    def test_response_head_stops_the_timeout(self) -> None:
        """Once the response head arrived, a slow body is governed by the stream idle timeout."""
        self.front.dataReceived(GET)
        conn, _ = self.connect_upstream()
        self.reactor.advance(10)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.reactor.advance(100)
        conn.dataReceived(b"cd")
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.down.value().endswith(b"\r\n\r\nabcd"))
        self.assertIsNone(self.error_cause())
        self.assertEqual(self.pool_counts(), (1, 0, 0))

    def test_no_timer_left_after_exchange(self) -> None:
        """A finished exchange leaves no deadline: besides the connection's keep-alive timer,
        only the connection's watchdog timer (kept for the next exchange) is on the wheel, and
        it runs nothing; closing the connection removes both."""
        self.front.dataReceived(GET)
        conn, _ = self.connect_upstream()
        conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIsNone(self.front.watchdog.owner)
        keepalive, watchdog = sorted(
            self.factory.wheel.armed(), key=lambda t: t.func == self.front.watchdog._fire
        )
        self.assertEqual(keepalive.when, self.reactor.seconds() + HttpSettings().keepalive_timeout)
        self.assertEqual(watchdog.func, self.front.watchdog._fire)
        self.assertEqual([c.func for c in self.reactor.getDelayedCalls()], [self.factory.wheel._tick])
        self.reactor.advance(TIMEOUTS.upstream_response)
        self.assertIsNone(self.error_cause())
        self.assertFalse(self.down.disconnected)
        self.front.connectionLost(None)
        self.assertEqual(self.factory.wheel.armed(), [])

    def test_one_watchdog_timer_for_many_exchanges(self) -> None:
        """Exchanges one after another on a connection set their deadlines on its watchdog
        without arming a wheel timer each: the wheel holds two timers throughout (keep-alive and
        watchdog), and a later request still times out on time."""
        self.front.dataReceived(GET)
        conn, _ = self.connect_upstream()
        timers = {id(timer) for timer in self.factory.wheel.armed()}
        self.assertEqual(len(timers), 2)
        for _ in range(3):
            self.assertEqual({id(timer) for timer in self.factory.wheel.armed()}, timers)
            self.reactor.advance(1)
            conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.front.dataReceived(GET)
        self.down.clear()
        self.reactor.advance(TIMEOUTS.upstream_response - 0.1)
        self.assertIsNone(self.error_cause())
        self.reactor.advance(0.1)
        self.assertEqual(self.error_cause(), b"upstream_timeout")


class StreamIdleTimeoutTests(ExchangeClockTestCase):
    """streamIdleSeconds: no bytes either way for that long ends the exchange."""

    def test_idle_mid_response_aborts_client(self) -> None:
        """Bytes keep the stream alive; 300 s without any abort the client and the upstream."""
        self.front.dataReceived(GET)
        conn, up = self.connect_upstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab")
        self.reactor.advance(299)
        conn.dataReceived(b"cd")
        self.reactor.advance(299)
        self.assertFalse(self.down.disconnected)
        self.reactor.advance(1)
        self.assertTrue(self.down.disconnected)  # aborted: the head is already out
        self.assertTrue(up.disconnected)
        self.assertEqual(self.pool_counts(), (0, 0, 0))

    def test_idle_upload_answers_504(self) -> None:
        """An upload that stops before its end: after 300 s a 504 stream_idle_timeout."""
        self.front.dataReceived(POST_HEAD)
        _, up = self.connect_upstream()
        self.front.dataReceived(b"abc")
        self.reactor.advance(299.9)
        self.assertEqual(self.down.value(), b"")
        self.reactor.advance(0.1)
        self.assertEqual(self.error_cause(), b"stream_idle_timeout")
        self.assertTrue(up.disconnected)


class AbandonTests(ExchangeClockTestCase):
    """A client that goes away releases what its exchange held."""

    def test_client_gone_while_connecting(self) -> None:
        """The client leaving gives its upstream connect up (no connection is opened or kept
        for an exchange that never reached the upstream); one completing anyway is closed
        unused, not pooled."""
        self.front.dataReceived(GET)
        self.front.connectionLost(None)
        [connector] = self.reactor.connectors
        self.assertTrue(connector._disconnected)
        self.assertEqual(self.pool_counts(), (0, 0, 0))
        _, up = self.connect_upstream()
        self.assertEqual(up.value(), b"")
        self.assertTrue(up.disconnecting)
        self.assertEqual(self.pool_counts(), (0, 0, 0))

    def test_client_gone_mid_response(self) -> None:
        """The upstream connection is aborted, not pooled, and no timer is left."""
        self.front.dataReceived(GET)
        conn, up = self.connect_upstream()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab")
        self.front.connectionLost(None)
        self.assertTrue(up.disconnected)
        self.assertEqual(self.pool_counts(), (0, 0, 0))
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])
        self.assertEqual(self.factory.wheel.armed(), [])
