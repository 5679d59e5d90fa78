"""The forward-proxy front: absolute-form requests and CONNECT on a `forward-proxy` listener.

Applications set `HTTP_PROXY` / `HTTPS_PROXY` to this listener. Per request:

1. the target is parsed and normalised (`http://host[:port]/...` or `CONNECT host:port`; any
   other form is a 400), and checked against the binding's allowlist, CONNECT ports and
   plain-HTTP setting; a literal address is checked against the blocked ranges;
2. the ApiInstance's other policies run as usual (basic auth in its proxy form: 407), and for a
   destination matching the address of a Service the binding names in `services`, that
   Service's outbound chain after them; a denial
   from step 1 is answered only after the policies let the request on (so an unauthenticated
   client learns nothing about the allowlist);
3. a name is resolved once through the injected resolver; every address must pass the blocked
   ranges; the connection goes to a checked address (no second lookup: DNS rebinding safe);
4. absolute-form requests are forwarded with the HTTP/1.1 streaming core (ProxyExchange), with
   a pool per destination; CONNECT answers `200 Connection established` once the destination
   is connected and the two connections become a byte tunnel (flexgw.http.tunnel).

Denied → 403 `egress_denied`; unresolvable → 502 `dns_failure`; connection refused → 503
`upstream_connect_failure`. A destination matching a Service named in the binding's
`services` goes to that Service's upstream with its settings (the operator named it, so its
address is not re-checked against the blocked ranges; it must still be allowed by
`allowedDestinations`). Other Services are never matched: their addresses are ordinary
destinations, so a protected API's Service cannot be reached around the API's policies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import httptools
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from flexgw.egress.resolver import resolve_all
from flexgw.http import errors
from flexgw.http.errors import GatewayError
from flexgw.http.fastwrite import send_now
from flexgw.http.gate import UPGRADING, ReadGate
from flexgw.http.headers import HeaderList
from flexgw.http.request import _AUTHORITY, BODY_NONE, RequestHead
from flexgw.http.tunnel import Tunnel
from flexgw.ingress.contract import IExchangeFront
from flexgw.ingress.exchange import CONNECTING, DONE, POLICIES, ProxyExchange
from flexgw.ingress.front import CLOSING, IngressProtocol, _Refused
from flexgw.ingress.upgrade import MAX_EARLY_BYTES
from flexgw.plan import Api, Destination, Upstream
from flexgw.policies.destinations import BadHost, IPAddress, parse_authority

if TYPE_CHECKING:
    from flexgw.policies.forward_proxy import ForwardProxyConfig

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def analyze_connect(
    target: bytes, version: str, headers: HeaderList, keep_alive: bool
) -> RequestHead | GatewayError:
    """Validate a CONNECT head: authority-form target with a port, no body, HTTP/1.x."""
    if version not in ("1.1", "1.0"):
        return errors.bad_request(f"Unsupported HTTP version {version}")
    if not _AUTHORITY.fullmatch(target) or target.rpartition(b":")[2] in (b"", target):
        return errors.bad_request("CONNECT needs a host:port target")
    connection_values = []
    for name, value in headers:
        lname = name.lower()
        if lname in (b"content-length", b"transfer-encoding"):
            return errors.bad_request("A CONNECT request has no body")
        if lname == b"connection":
            connection_values.append(value)
    return RequestHead(
        method=b"CONNECT",
        target=target,
        version=version.encode("ascii"),
        headers=headers,
        path=target.decode("latin-1"),
        query=b"",
        authority=target.decode("latin-1"),
        keep_alive=keep_alive,
        body=BODY_NONE,
        content_length=0,
        connection_values=connection_values,
        expect_continue=False,
    )


def match_service(api: Api, host: str | IPAddress, port: int) -> Destination | None:
    """The Service destination (one the binding names in `services`) a proxied
    `http://host:port` request stands for: same host and port, or an `https://host:443` Service
    reached as `http://host` (TLS-originated)."""
    name = host if isinstance(host, str) else str(host)
    for destination in api.proxy_services:
        upstream = destination.upstream
        if upstream.host.lower().rstrip(".") != name:
            continue
        if upstream.port == port or (
            port == 80 and upstream.scheme == "https" and upstream.port == 443
        ):
            return destination
    return None


class IForwardProxyFront(IExchangeFront):
    """What a ForwardExchange needs from its front besides what every exchange does."""

    forward_api = Attribute("The listener's forward-proxy Api on its current plan, or None.")

    def resolve(host, port):  # type: ignore[no-untyped-def]
        """A Deferred of the addresses `host` resolves to (bounded by the connect timeout)."""

    def connect_tcp(address, port, client_factory):  # type: ignore[no-untyped-def]
        """Connect a CONNECT tunnel's destination (bounded by the connect timeout)."""


@implementer(IForwardProxyFront)
class ForwardProxyProtocol(IngressProtocol):
    """One client connection to a forward-proxy listener."""

    def invalid_head(self, error: GatewayError) -> RequestHead:
        """CONNECT is what a forward proxy is for: accept it (checked by analyze_connect)."""
        parser = self.parser
        if error is errors.METHOD_NOT_ALLOWED and parser.get_method() == b"CONNECT":
            head = analyze_connect(
                self.url, parser.get_http_version(), self.headers, parser.should_keep_alive()
            )
            if isinstance(head, GatewayError):
                raise _Refused(head)
            return head
        raise _Refused(error)

    # Every request on a forward-proxy listener is a ForwardExchange (set below the class).

    # -- what a ForwardExchange needs besides IExchangeFront -----------------------------------

    @property
    def forward_api(self) -> Api | None:
        """The listener's forward-proxy ApiInstance on its current plan (None after a reload
        that made it something else)."""
        return self.factory.listener.forward_proxy

    def resolve(self, host: str, port: int) -> Any:
        """A Deferred of every address `host` resolves to (bounded by the connect timeout)."""
        factory = self.factory
        resolver = factory.resolver if factory.resolver is not None else factory.reactor.nameResolver
        return resolve_all(resolver, self.clock, host, port, self.http.connect_timeout)

    def connect_tcp(self, address: str, port: int, client_factory: ClientFactory) -> Any:
        """Connect a CONNECT tunnel's destination (bounded by the connect timeout)."""
        return self.factory.reactor.connectTCP(
            address, port, client_factory, timeout=self.http.connect_timeout
        )

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        """After a CONNECT head: what follows is the tunnel's (held until it is established).

        Other upgrade requests are proxied as plain requests (their Upgrade dropped).
        """
        if self.state == CLOSING:
            return
        exchange = self.starting
        rest = data[offset:]
        if isinstance(exchange, ForwardExchange) and exchange.head.method == b"CONNECT":
            self.state = CLOSING
            self.tunnel = exchange
            self.gate.hold(UPGRADING)
            self._start()
            if rest and self.tunnel is exchange:
                exchange.from_downstream(rest)
            return
        if self.queue and self.queue[-1].head.method == b"CONNECT":
            # Pipelined behind another request: the bytes after it cannot be told apart. The
            # request before it is still answered (then the connection closes).
            self._refuse(errors.bad_request("A CONNECT request must not be pipelined"))
            if self.starting is not None:
                self._start()
            return
        self.parser = httptools.HttpRequestParser(self)
        if self.starting is not None:
            self._start()
        if rest and self.state != CLOSING:
            self.dataReceived(rest)


class ForwardExchange(ProxyExchange):
    """One proxied request (absolute-form or CONNECT) on a forward-proxy listener."""

    __slots__ = (
        "config",
        "connector",
        "denial",
        "early",
        "resolved",
        "resolving",
        "service",
        "target_host",
        "target_port",
        "tunnel",
    )

    front: ForwardProxyProtocol

    # The request head for the destination carries no X-Forwarded-* or Forwarded line (neither
    # the client's nor the gateway's): an egress proxy does not tell outside APIs the internal
    # addresses and names of its clients.
    relay_forwarded = False

    def __init__(self, front: ForwardProxyProtocol, head: RequestHead, started: float) -> None:
        super().__init__(front, head, started)
        self.config: ForwardProxyConfig | None = None
        self.connector: Any = None
        self.denial: GatewayError | None = None
        self.early = b""
        self.resolved = False
        self.resolving: Any = None
        self.service: Destination | None = None
        self.target_host: str | IPAddress = ""
        self.target_port = 0
        self.tunnel: Tunnel | None = None

    # -- the request -------------------------------------------------------------------------

    def start(self) -> None:
        """Parse and check the target, then run the policies (or answer an error)."""
        front = self.front
        head = self.head
        api = front.forward_api
        if api is None:  # the listener stopped being a forward proxy (reload)
            self.fail(errors.NO_ROUTE)
            return
        config = self.config = api.forward_proxy
        self.api_key = api.key
        connect = head.method == b"CONNECT"
        if not connect and head.target[:7].lower() != b"http://":
            self.fail(errors.NOT_A_PROXY_REQUEST)
            return
        try:
            host, port = parse_authority(head.authority, None if connect else 80)
        except BadHost as exc:
            self.fail(errors.bad_request(f"Malformed destination: {exc}"))
            return
        self.target_host, self.target_port = host, port
        name = host if isinstance(host, str) else str(host)
        service = None if connect else match_service(api, host, port)
        self.denial = config.check(host, port, connect, guarded=service is None)
        if self.denial is None:
            self.service = service
        else:
            service = None
        if service is not None:
            destination = service
        else:
            upstream = Upstream(key=f"egress/{_authority(name, port)}", scheme="http", host=name, port=port)
            destination = Destination(
                upstream=upstream,
                chain=api.policies,
                chain_has_rules=any(bound.rules for bound in api.policies),
            )
        self.destination = destination
        self.upstream_target = head.path.encode("latin-1") + head.query
        if destination.chain and self._select_policies(api, destination):
            self._start_chain()
            return
        self._connect()

    def from_downstream(self, data: bytes) -> None:
        """Client bytes after a CONNECT head, before the tunnel exists: kept for it."""
        if self.state == DONE:
            return
        self.early += data
        if len(self.early) > MAX_EARLY_BYTES:
            self.fail(errors.bad_request("Too many bytes sent before the tunnel was established"))

    def _connect(self) -> None:
        """The policies let the request on: answer a denial, or resolve, check, connect."""
        if self.resolved:
            super()._connect()
            return
        if self.denial is not None:
            self.fail(self.denial)
            return
        if self.service is not None:
            self.resolved = True
            super()._connect()
            return
        front = self.front
        self._await_io()
        host = self.target_host
        if not isinstance(host, str):
            self._addresses([host])
            return
        self.resolving = front.resolve(host, self.target_port)
        self.resolving.addCallbacks(self._addresses, self._resolution_failed)

    def _resolution_failed(self, failure: Failure) -> None:
        self.resolving = None
        if self.state == POLICIES:
            self.dns_failed(failure)

    def _addresses(self, addresses: list[IPAddress]) -> None:
        """Every address the destination resolved to: all must pass; connect to the first."""
        self.resolving = None
        if self.state != POLICIES:
            return  # the client went away meanwhile
        assert self.config is not None
        guard = self.config.guard
        if not addresses or any(guard.blocked_address(a) for a in addresses):
            self.fail(errors.EGRESS_DENIED)
            return
        address = addresses[0]
        if address.version == 6 and address.ipv4_mapped is not None:  # type: ignore[union-attr]
            address = address.ipv4_mapped  # type: ignore[union-attr]
        self.resolved = True
        if self.head.method == b"CONNECT":
            self._open_tunnel(str(address))
            return
        assert self.destination is not None
        self.destination = attrs.evolve(
            self.destination,
            upstream=attrs.evolve(self.destination.upstream, connect_host=str(address)),
        )
        super()._connect()

    # -- CONNECT -----------------------------------------------------------------------------

    def _open_tunnel(self, address: str) -> None:
        front = self.front
        self._connecting()
        self.connector = front.connect_tcp(address, self.target_port, _TunnelConnect(self))

    def tunnel_connected(self, upstream: TunnelUpstream) -> None:
        """The destination accepted the connection: tell the client, join the connections."""
        self.connector = None
        if self.state != CONNECTING:
            upstream.transport.abortConnection()
            return
        front = self.front
        self.upstream_elapsed = front.clock.seconds() - self.upstream_started
        self._tunnelled(200)
        send_now(front.transport, CONNECT_ESTABLISHED)
        tunnel = self.tunnel = Tunnel(
            front.clock,
            self._stream_idle_timeout(),
            front.transport,
            front.gate,
            upstream.transport,
            upstream.gate,
            self._tunnel_ended,
        )
        upstream.tunnel = tunnel
        front.tunnel_opened(self, tunnel)
        early, self.early = self.early, b""
        tunnel.start(early_up=early)

    def tunnel_connect_failed(self, reason: Failure) -> None:
        """The destination refused (or did not answer in time): 503."""
        self.connector = None
        if self.state == CONNECTING:
            self.fail(errors.UPSTREAM_CONNECT_FAILURE)

    def downstream_lost(self) -> None:
        """The client went away: stop a lookup or a connection attempt in progress."""
        super().downstream_lost()
        self.early = b""
        resolving, self.resolving = self.resolving, None
        if resolving is not None:
            resolving.cancel()
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.stopConnecting()


ForwardProxyProtocol.make_exchange = staticmethod(ForwardExchange)  # type: ignore[assignment]


def _authority(name: str, port: int) -> str:
    host = f"[{name}]" if ":" in name else name
    return f"{host}:{port}"


class TunnelUpstream(Protocol):
    """The destination side of a CONNECT tunnel."""

    def __init__(self, exchange: ForwardExchange) -> None:
        self.exchange = exchange
        self.tunnel: Tunnel | None = None
        self.gate: ReadGate

    def connectionMade(self) -> None:
        """Connected: the exchange answers the client and starts the tunnel."""
        self.gate = ReadGate(self.transport)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.exchange.tunnel_connected(self)

    def dataReceived(self, data: bytes) -> None:
        """Destination bytes: to the client."""
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_upstream(data)

    def connectionLost(self, reason: Failure = None) -> None:
        """The destination closed: the tunnel closes the client side."""
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.upstream_lost()


class _TunnelConnect(ClientFactory):
    """Connects the destination of one CONNECT."""

    noisy = False

    def __init__(self, exchange: ForwardExchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: object) -> TunnelUpstream:
        """The destination side protocol."""
        return TunnelUpstream(self.exchange)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        """Refused, unreachable or timed out."""
        self.exchange.tunnel_connect_failed(reason)
