"""PROXY protocol (v1 and v2) on ingress listeners: `Configuration.spec.proxyProtocol.enabled`.

A load balancer in front of the gateway (HAProxy, AWS NLB, ...) opens each connection with a
PROXY header carrying the real client's address. With the setting on, every accepted
connection must start with a valid v1 or v2 header; the gateway then sees the client address it
carries everywhere the socket peer would be used: policies (`ip-allowlist-flex`, `#[attributes.
remoteAddress]`), `X-Forwarded-For`, the trusted-proxy check and the access log. A connection
that does not start with one (or not within `Configuration.spec.http.headerTimeoutSeconds`) is
closed without an answer: answering HTTP to whatever sent it would be wrong for a load balancer
and useless for anyone else. `PROXY UNKNOWN` (v1) and `LOCAL` (v2, health checks) headers are
valid and keep the socket peer.

Built on Twisted's `twisted.protocols.haproxy` (its wrapper and its v1/v2 parsers), with two
changes that matter here: the wrapped protocol's `connectionMade` runs only once the header is
parsed (Twisted's wrapper runs it at once, so the front would record the load balancer's
address), and a header split across reads is buffered rather than refused.

Once the header is parsed the wrapper steps aside: the TCP transport itself reports the carried
addresses (`getPeer`/`getHost` set on that transport object) and delivers to the wrapped
protocol directly, so after the header a PROXY connection costs the same as any other.

`wrap_proxy_protocol(factory, enabled, clock, timeout)` wraps any server factory (also one that
is itself a TLS wrapper: the PROXY header comes before the handshake). `enabled` is asked per
connection, so a reload can switch the setting without rebinding; connections of a listener
with the setting off get the wrapped factory's protocol directly, without any wrapper cost.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import ILoggingContext, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from flexgw.compat.haproxy import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
    InvalidProxyHeader,
    ProxyInfo,
    V1Parser,
    V2Parser,
)

_V1 = V1Parser.PROXYSTR  # b"PROXY"
_V2 = V2Parser.PREFIX  # the 12-byte v2 signature


class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol with the address it carries."""

    factory: ProxyProtocolFactory  # type: ignore[assignment]
    transport: Any
    wrappedProtocol: Any

    def __init__(self, factory: ProxyProtocolFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._buffer = b""
        self._timer: Any = None
        self._made = False

    def makeConnection(self, transport: Any) -> None:
        """Connected: wait for the header (the wrapped protocol is not connected yet)."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(self.factory.timeout(), self._expired)

    def dataReceived(self, data: bytes) -> None:
        """Header bytes until it is complete; then everything goes to the wrapped protocol."""
        if self._made:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            buffer = self._buffer + data
            if buffer[:12] == _V2[: len(buffer)] and len(buffer) < 16:
                self._buffer = buffer  # maybe v2: the signature and version need 16 bytes
                return
            if buffer[:5] == _V1[: len(buffer)] and len(buffer) < 8:
                self._buffer = buffer
                return
            self._buffer = b""
            if len(buffer) >= 16 and buffer[:12] == _V2 and buffer[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif buffer[:6] == _V1 + b" ":
                self._parser = V1Parser()
            else:
                self._refuse()
                return
            data = buffer
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._refuse()
            return
        if info is None:
            return  # incomplete (the parsers refuse a v1 line over 107 bytes)
        source: Any = info.source
        if source is not None:
            # Twisted's v1 parser takes any word as an address, and its v2 parser writes IPv6
            # uncompressed: accept only IP literals, written the usual (compressed) way.
            try:
                host = ipaddress.ip_address(source.host)
            except ValueError:
                self._refuse()
                return
            if str(host) != source.host:
                info = ProxyInfo(
                    info.header, attrs.evolve(source, host=str(host)), info.destination
                )
        self._proxyInfo = info
        self._made = True
        self._cancel_timer()
        transport = self.transport
        wrapped = self.wrappedProtocol
        if type(transport) is tcp.Server:
            # Step aside: the TCP transport reports the carried addresses and talks to the
            # wrapped protocol directly, so a PROXY connection costs nothing per read or write
            # afterwards (the front's direct-send path applies, as without PROXY protocol).
            self.factory.unregisterProtocol(self)
            if info.source is not None:
                transport.getPeer = lambda: info.source  # type: ignore[method-assign]
            if info.destination is not None:
                transport.getHost = lambda: info.destination  # type: ignore[method-assign]
            transport.protocol = wrapped
            wrapped.makeConnection(transport)
        else:
            wrapped.makeConnection(self)
        if remaining and transport.connected:
            wrapped.dataReceived(remaining)

    def _refuse(self) -> None:
        """Not a valid PROXY header: close without a word."""
        self._cancel_timer()
        self.transport.abortConnection()

    def _expired(self) -> None:
        self._timer = None
        if not self._made:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Closed: the wrapped protocol hears of it only if it was ever connected."""
        self._cancel_timer()
        if self._made:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ProxyProtocolFactory(HAProxyWrappingFactory):
    """Wraps connections in `ProxyHeaderWrapper` while `enabled()` says so."""

    protocol = ProxyHeaderWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        enabled: Callable[[], bool],
        clock: Any,
        timeout: Callable[[], float],
    ) -> None:
        super().__init__(wrapped)
        self.enabled = enabled
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        """The wrapped factory's log prefix, marked `(PROXY)` only while the setting is on (the
        listening port's "... starting on PORT" line is written with it)."""
        wrapped = self.wrappedFactory
        prefix = (
            wrapped.logPrefix() if ILoggingContext.providedBy(wrapped) else type(wrapped).__name__
        )
        return f"{prefix} (PROXY)" if self.enabled() else prefix

    def buildProtocol(self, addr: Any) -> Any:
        """A wrapper around the wrapped factory's protocol, or that protocol alone when off."""
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None or not self.enabled():
            return inner
        return self.protocol(self, inner)


def wrap_proxy_protocol(
    factory: IProtocolFactory,
    enabled: Callable[[], bool],
    clock: IReactorTime,
    timeout: Callable[[], float],
) -> ProxyProtocolFactory:
    """`factory` behind PROXY protocol handling that applies while `enabled()` is true; a
    connection must send its header within `timeout()` seconds."""
    return ProxyProtocolFactory(factory, enabled, clock, timeout)
