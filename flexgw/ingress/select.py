"""Choosing the protocol of a new ingress connection: HTTP/1.1, or HTTP/2 (h2c or ALPN h2).

The selector is the transport's protocol. It starts the HTTP/1.1 IngressProtocol the factory
gives it at once (so keep-alive timing, the connection set and draining work before the first
byte), and decides on the first bytes: the HTTP/2 connection preface (prior-knowledge h2c), or `h2` negotiated by ALPN
on a TLS transport, starts an H2Protocol instead. Either way the selector then rebinds its own
`dataReceived` and `connectionLost` to the chosen protocol's methods, so the transport calls the
chosen protocol directly from then on: HTTP/1.1 pays one check per connection, none per read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.ingress.h2front import H2Protocol

if TYPE_CHECKING:
    from flexgw.ingress.front import IngressFactory, IngressProtocol

#: The client connection preface of HTTP/2 (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@implementer(IHandshakeListener)
class ProtocolSelector(Protocol):
    """The protocol of a fresh ingress connection until its first bytes name HTTP/1.1 or HTTP/2."""

    def __init__(self, factory: IngressFactory, h1: IngressProtocol) -> None:
        self.factory = factory
        self.h1 = h1
        self.chosen: Any = None
        self._buffer = b""

    def makeConnection(self, transport: Any) -> None:
        """Connected: the HTTP/1.1 protocol starts its timers and joins the connection set."""
        self.transport = transport
        self.connected = 1
        self.h1.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        """The first bytes (replaced by the chosen protocol's own method once it is chosen)."""
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2" or data[:24] == PREFACE:
            self._choose_h2(data)
            return
        if len(data) < len(PREFACE) and PREFACE.startswith(data):
            self._buffer = data  # maybe the preface, in pieces
            return
        h1 = self.h1
        self.chosen = h1
        self.dataReceived = h1.dataReceived  # type: ignore[method-assign]
        self.connectionLost = h1.connectionLost  # type: ignore[method-assign]
        h1.dataReceived(data)

    def _choose_h2(self, data: bytes) -> None:
        h1 = self.h1
        if not h1.can_retire():
            return  # closed (keep-alive timeout, drain) before its first bytes
        h1.retire()
        h2 = H2Protocol(self.factory, h1)
        self.chosen = h2
        self.dataReceived = h2.dataReceived  # type: ignore[method-assign]
        self.connectionLost = h2.connectionLost  # type: ignore[method-assign]
        h2.makeConnection(self.transport)
        h2.dataReceived(data)

    def handshakeCompleted(self) -> None:
        """TLS is up (before any data): the HTTP/1.1 protocol records the client certificate,
        which an HTTP/2 protocol taking over copies."""
        self.h1.handshakeCompleted()

    def connectionLost(self, reason: Failure = None) -> None:
        """Lost before a protocol was chosen: the HTTP/1.1 protocol cleans up."""
        self.h1.connectionLost(reason)
