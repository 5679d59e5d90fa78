"""Upgrades and CONNECT in memory: the switch to a tunnel, pool accounting, bounds, refusals."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from flexgw.config.pipeline import load_config
from flexgw.egress.front import ForwardProxyProtocol
from flexgw.ingress.front import IngressFactory
from flexgw.ingress.upgrade import MAX_EARLY_BYTES
from flexgw.plan import HttpSettings, Timeouts
from flexgw.service.metrics import GatewayMetrics
from flexgw.upstream.manager import PoolManager
from tests.conftools import write_conf
from tests.harness import simple_api
from tests.test_egress_proxy import proxy_conf

TIMEOUTS = Timeouts(upstream_response=15.0, stream_idle=30.0, upstream_idle=60.0)
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class _Transport(StringTransport):
    """A StringTransport that records aborts."""

    aborted = False

    def abortConnection(self) -> None:
        """Record the abort."""
        self.aborted = True
        self.disconnecting = True


class FrontCase(TestCase):
    """One downstream connection on a memory reactor; upstream connections completed by hand."""

    def make(self, conf: str, resolver: Any = None) -> None:
        """Compile `conf` and accept one client connection."""
        root = write_conf(self, {"api.yaml": conf})
        plan = load_config([root], {}).plan
        self.reactor = MemoryReactorClock()
        self.pools = PoolManager(self.reactor, self.reactor)
        self.factory = IngressFactory(
            self.reactor, self.reactor, plan.listeners[0], HttpSettings(), TIMEOUTS, self.pools,
            None, resolver=resolver, forward_proxy=ForwardProxyProtocol,
        )
        self.front = self.factory.buildProtocol(None)
        # An ingress connection starts behind the HTTP/1.1-or-HTTP/2 selector.
        self.h1 = getattr(self.front, "h1", self.front)
        self.down = _Transport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        self.front.makeConnection(self.down)

    def connect_upstream(self) -> tuple[Any, _Transport]:
        """Complete the latest upstream connection attempt."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        connection = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = _Transport()
        connection.makeConnection(transport)
        return connection, transport


class UpgradeInMemoryTests(FrontCase):
    """An upgrade request on an ingress listener."""

    def setUp(self) -> None:
        """A one-API listener."""
        self.make(simple_api(8000, 9000))

    def test_switch_leaves_the_pool_and_idles_out(self) -> None:
        """After the 101 the upstream connection is no longer counted by its pool, bytes flow
        both ways, and the stream idle timeout aborts both sides."""
        self.front.dataReceived(HANDSHAKE + b"early")
        conn, up = self.connect_upstream()
        head = up.value()
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", head)
        self.assertFalse(head.endswith(b"early"))  # held until the switch
        conn.dataReceived(SWITCH + b"server-first")
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertTrue(self.down.value().endswith(b"\r\n\r\nserver-first"))
        self.assertTrue(up.value().endswith(b"\r\n\r\nearly"))
        [pool] = self.pools.pools.values()
        self.assertEqual((pool.active, pool.idle, conn.reusable), (0, [], False))
        self.front.dataReceived(b"frame")
        self.assertTrue(up.value().endswith(b"earlyframe"))
        self.reactor.advance(29)
        self.assertFalse(self.down.aborted)
        self.reactor.advance(2)
        self.assertTrue(self.down.aborted and up.aborted)

    def test_metrics_count_the_switch_not_the_lifetime(self) -> None:
        """A tunnel is counted once, at the 101, with the latency to the switch: a tunnel open
        for minutes is not minutes of request latency or of time the gateway added."""
        metrics = self.factory.metrics = GatewayMetrics(self.reactor, buckets=(1.0,))
        self.front.dataReceived(HANDSHAKE)
        conn, _ = self.connect_upstream()
        self.reactor.advance(0.2)
        conn.dataReceived(SWITCH)
        [(key, count)] = metrics.requests.items()
        self.assertEqual((key[2], count), (101, 1))
        self.reactor.advance(25)
        self.front.connectionLost(None)
        self.assertEqual(list(metrics.requests.values()), [1])
        [slots] = metrics.latency.values()
        self.assertEqual(slots[:2], [1, 0])  # total latency: under 1 s, nothing above
        self.assertAlmostEqual(slots[2], 0.2)

    def test_http10_upgrade_is_a_plain_request(self) -> None:
        """Upgrade is HTTP/1.1's: an HTTP/1.0 request carrying it goes upstream without it."""
        self.front.dataReceived(HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"))
        _, up = self.connect_upstream()
        self.assertNotIn(b"Upgrade", up.value())
        self.assertIsNone(self.h1.tunnel)

    def test_too_many_early_bytes(self) -> None:
        """More than the early-bytes bound before the 101: 400 and the upstream is dropped."""
        self.front.dataReceived(HANDSHAKE)
        _, up = self.connect_upstream()
        self.front.dataReceived(b"x" * (MAX_EARLY_BYTES + 1))
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(up.aborted)

    def test_101_without_upgrade_is_502(self) -> None:
        """A 101 that names no protocol is a bad upstream response."""
        self.front.dataReceived(HANDSHAKE)
        conn, up = self.connect_upstream()
        conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n")
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(up.aborted)

    def test_101_to_a_plain_request_is_502(self) -> None:
        """An upstream switching protocols uninvited: 502, never a tunnel."""
        self.front.dataReceived(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        conn, _up = self.connect_upstream()
        conn.dataReceived(SWITCH + b"junk")
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 502 "))
        self.assertIsNone(self.h1.tunnel)


@implementer(IHostnameResolver)
class _PendingResolver:
    """A resolver that never answers (records receivers)."""

    def __init__(self) -> None:
        self.receivers: list[Any] = []

    def resolveHostName(self, receiver: Any, host: str, *args: Any, **kwargs: Any) -> Any:
        """Keep the receiver; answer nothing."""
        self.receivers.append(receiver)
        return receiver


class ConnectInMemoryTests(FrontCase):
    """CONNECT on a forward-proxy listener."""

    def setUp(self) -> None:
        """A forward proxy allowing anything on 443, names never answered."""
        self.resolver = _PendingResolver()
        self.make(proxy_conf(3128, ["*:443"], exceptions=None), resolver=self.resolver)
        self.assertIsInstance(self.front, ForwardProxyProtocol)

    def test_connect_with_a_body_is_refused(self) -> None:
        """CONNECT with Content-Length: 400, nothing looked up."""
        self.front.dataReceived(
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.resolver.receivers, [])

    def test_connect_without_port_is_refused(self) -> None:
        """CONNECT needs host:port."""
        self.front.dataReceived(b"CONNECT a.test HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 400 "))

    def test_pipelined_connect_is_refused(self) -> None:
        """A CONNECT behind another request on the same read: that one is answered (and the
        connection closed), the CONNECT never looked up."""
        self.front.dataReceived(
            b"GET http://a.test:8080/ HTTP/1.1\r\nHost: a.test:8080\r\n\r\n"
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"
        )
        data = self.down.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "))
        self.assertIn(b"Connection: close\r\n", data)
        self.assertTrue(self.down.disconnecting)
        self.assertEqual(self.resolver.receivers, [])

    def test_client_gone_during_lookup(self) -> None:
        """The client closing while its destination is being looked up: no connection is ever
        attempted, and the lookup times out quietly."""
        self.front.dataReceived(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
        self.assertEqual(len(self.resolver.receivers), 1)
        self.front.connectionLost(None)
        self.reactor.advance(60)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_lookup_timeout_is_502(self) -> None:
        """A resolver that never answers: 502 dns_failure after the connect timeout."""
        self.front.dataReceived(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n")
        self.reactor.advance(HttpSettings().connect_timeout + 0.1)
        self.assertTrue(self.down.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"x-flexgw-error: dns_failure", self.down.value())
