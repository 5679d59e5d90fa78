"""The treq Agent policies' side calls (JWKS, token introspection, OAuth tokens) use behind `Configuration.spec.forwardProxy`.

Flex routes "outbound policy calls" through the forward proxy too (reference §4.2). Twisted
has a proxy agent for plain HTTP (`ProxyAgent`, absolute-form requests) but none for HTTPS
through a proxy (twisted#11347), so:
- `http://` URLs go through `ProxyAgent` to the proxy, with `Proxy-Authorization` added;
- `https://` URLs go through a CONNECT tunnel (flexgw.http.connect), with TLS inside it
  (the given IPolicyForHTTPS decides verification, as for direct calls);
- hosts matched by `noProxy` use the direct agent.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from flexgw.http.connect import ConnectTunnelFactory

#: Seconds the proxy gets to connect and answer a CONNECT.
CONNECT_TIMEOUT = 10.0


@implementer(endpoints.interfaces.IStreamClientEndpoint)
class TunnelEndpoint:
    """An endpoint whose connections reach `host:port` through the proxy's CONNECT."""

    def __init__(self, reactor: Any, proxy: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.host = host
        self.port = port

    def connect(self, protocol_factory: Any) -> Deferred[Any]:
        """Connect to the proxy, open the tunnel, then connect `protocol_factory`'s protocol."""
        handover = _Handover(protocol_factory)
        tunnel = ConnectTunnelFactory(
            handover,
            self.host,
            self.port,
            self.proxy.authorization,
            self.reactor,
            CONNECT_TIMEOUT,
            self.proxy.authority.decode("latin-1"),
            opened=handover.connected.callback,
        )
        self.reactor.connectTCP(self.proxy.host, self.proxy.port, tunnel, timeout=CONNECT_TIMEOUT)
        return handover.connected


class _Handover(ClientFactory):
    """Builds an endpoint caller's protocol for a tunnel; `connected` fires with it once the
    tunnel has connected it, or fails with why the tunnel did not open."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped
        self.connected: Deferred[Any] = Deferred()

    def buildProtocol(self, addr: Any) -> Any:
        """The caller's protocol (the tunnel connects it); a factory that refuses fails the
        connect."""
        try:
            protocol = self.wrapped.buildProtocol(addr)
        except Exception:  # noqa: BLE001 (the caller hears of any failure, as Twisted does)
            self.connected.errback()
            return None
        if protocol is None:
            self.connected.errback(NoProtocol())
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """The proxy was unreachable or refused the tunnel."""
        self.connected.errback(reason)


@implementer(IAgentEndpointFactory)
class _TunnelEndpoints:
    """Endpoints for HTTPS URLs: TLS over a CONNECT tunnel."""

    def __init__(self, reactor: Any, proxy: Any, tls_policy: Any) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.tls_policy = tls_policy

    def endpointForURI(self, uri: Any) -> Any:
        """TLS to the URI's host, inside a tunnel through the proxy."""
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        tunnel = TunnelEndpoint(self.reactor, self.proxy, host, uri.port)
        if uri.scheme == b"https":
            creator = self.tls_policy.creatorForNetloc(uri.host, uri.port)
            return wrapClientTLS(creator, tunnel)  # type: ignore[arg-type]
        return tunnel


@implementer(IAgent)
class ForwardProxyAgent:
    """Sends each side call through the proxy (or directly, for noProxy hosts)."""

    def __init__(
        self, reactor: Any, proxy: Any, direct: Any = None, tls_policy: Any = None
    ) -> None:
        self.proxy = proxy
        self.direct = direct if direct is not None else Agent(reactor)
        self.plain = ProxyAgent(TCP4ClientEndpoint(reactor, proxy.host, proxy.port), reactor)
        self.tunnelled = Agent.usingEndpointFactory(
            reactor, _TunnelEndpoints(reactor, proxy, tls_policy or BrowserLikePolicyForHTTPS())
        )

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        """Route the request: direct, absolute-form through the proxy, or tunnelled."""
        parts = urlsplit(uri.decode("ascii"))
        host = parts.hostname or ""
        if self.proxy.bypasses(host):
            return self.direct.request(method, uri, headers, bodyProducer)
        if parts.scheme == "https":
            return self.tunnelled.request(method, uri, headers, bodyProducer)
        headers = headers.copy() if headers is not None else Headers()
        if self.proxy.authorization is not None:
            headers.setRawHeaders(b"Proxy-Authorization", [self.proxy.authorization])
        return self.plain.request(method, uri, headers, bodyProducer)
