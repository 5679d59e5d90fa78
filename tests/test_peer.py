"""The Peer value: one client address, trust and scheme per connection, for every front."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.ingress.front import IngressProtocol
from flexgw.ingress.h2front import H2Protocol, H2Stream
from flexgw.ingress.peer import Peer
from tests.test_exchange_contract import _factory

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


class PeerTests(SynchronousTestCase):
    """Peer.of reads the transport's peer once; the forwarded lines are precomputed."""

    def test_ipv4_mapped_and_trusted(self) -> None:
        """An IPv4 client on a dual-stack socket is its IPv4 address, checked against the
        trusted proxies in that form."""
        transport = StringTransport(peerAddress=IPv6Address("TCP", "::ffff:10.1.2.3", 5))
        peer = Peer.of(transport, "https", TRUSTED)
        self.assertEqual((peer.address, peer.address_bytes, peer.trusted), ("10.1.2.3", b"10.1.2.3", True))
        self.assertEqual(peer.proto_line, b"X-Forwarded-Proto: https\r\n")

    def test_untrusted_and_client_cert(self) -> None:
        """Outside the trusted ranges the peer is not trusted; a client certificate adds its
        XFCC line after the X-Forwarded-Proto line."""
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5))
        peer = Peer.of(transport, "https", TRUSTED).with_client_cert(b"Hash=ab")
        self.assertFalse(peer.trusted)
        self.assertEqual(peer.xfcc_line, b"X-Forwarded-Client-Cert: Hash=ab\r\n")
        self.assertEqual(
            peer.proto_line, b"X-Forwarded-Proto: https\r\nX-Forwarded-Client-Cert: Hash=ab\r\n"
        )

    def test_fronts_share_the_connection_peer(self) -> None:
        """The HTTP/1.1 front builds the Peer when connected; the HTTP/2 protocol taking over
        and its streams use that very object; the forward-proxy front builds it the same way."""
        factory = _factory()
        h1 = IngressProtocol(factory)
        h1.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5)))
        self.assertEqual(h1.peer.address, "10.0.0.9")
        h2 = H2Protocol(factory, h1)
        self.assertIs(h2.peer, h1.peer)
        self.assertIs(H2Stream(h2, 1).peer, h1.peer)
        forward = _factory(forward=True).buildProtocol(None)
        forward.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5)))
        self.assertEqual(forward.peer, h1.peer)
