"""The upstream request head, built in steps chosen per exchange kind (in memory, no sockets)."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.egress.front import ForwardExchange, ForwardProxyProtocol
from flexgw.http.request import RequestHead, analyze_head
from flexgw.ingress.exchange import ProxyExchange
from flexgw.ingress.front import IngressProtocol
from flexgw.ingress.upgrade import UpgradeExchange
from flexgw.plan import Destination, HttpSettings, Upstream
from flexgw.testing.memory import memory_factory

UPSTREAM = Upstream(key="default/b", scheme="http", host="10.9.9.9", port=9000)  # routed to
HEADERS = [
    (b"Host", b"api.example"),
    (b"X-Forwarded-For", b"203.0.113.5"),
    (b"Forwarded", b"for=203.0.113.5"),
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Accept", b"*/*"),
]


def _front(protocol: type[IngressProtocol] = IngressProtocol) -> IngressProtocol:
    """A connected front whose client (10.0.0.1) is a trusted proxy."""
    http = HttpSettings(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    front = protocol(memory_factory(http=http))
    front.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5)))
    return front


def _head() -> RequestHead:
    head = analyze_head(b"GET", b"/chat?x=1", "1.1", list(HEADERS), True)
    assert isinstance(head, RequestHead)
    return head


def _lines(exchange: ProxyExchange) -> list[bytes]:
    """The exchange's upstream head, routed to UPSTREAM, as lines."""
    exchange.destination = Destination(upstream=UPSTREAM)
    exchange.upstream_target = b"/chat?x=1"
    data = exchange._upstream_head()
    assert data.endswith(b"\r\n\r\n")
    return data[:-4].split(b"\r\n")


class UpstreamHeadTests(SynchronousTestCase):
    """Which X-Forwarded-* lines and which hop-by-hop lines each kind of exchange sends."""

    def test_reverse_proxy_relays_and_adds_forwarded_lines(self) -> None:
        """A trusted client's claims are kept, the gateway's appended; hop-by-hop dropped."""
        lines = _lines(ProxyExchange(_front(), _head(), 0.0))
        self.assertEqual(
            lines,
            [
                b"GET /chat?x=1 HTTP/1.1",
                b"Host: 10.9.9.9:9000",
                b"Forwarded: for=203.0.113.5",
                b"Accept: */*",
                b"X-Forwarded-For: 203.0.113.5, 10.0.0.1",
                b"X-Forwarded-Proto: http",
                b"X-Forwarded-Host: api.example",
            ],
        )

    def test_upgrade_adds_its_hop_by_hop_lines_last(self) -> None:
        """An upgrade asks for its protocol after the framing, the forwarded lines as usual."""
        lines = _lines(UpgradeExchange(_front(), _head(), 0.0, b"websocket"))
        self.assertEqual(lines[-2:], [b"Connection: Upgrade", b"Upgrade: websocket"])
        self.assertIn(b"X-Forwarded-For: 203.0.113.5, 10.0.0.1", lines)

    def test_forward_proxy_sends_no_forwarded_lines(self) -> None:
        """An egress request carries neither the client's claims nor the gateway's lines."""
        front = _front(ForwardProxyProtocol)
        lines = _lines(ForwardExchange(front, _head(), 0.0))  # type: ignore[arg-type]
        self.assertEqual(lines, [b"GET /chat?x=1 HTTP/1.1", b"Host: 10.9.9.9:9000", b"Accept: */*"])
