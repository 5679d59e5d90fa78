"""The downstream HTTP/1.1 protocol of an ingress listener: parse, check, route, proxy.

One request is proxied at a time per connection. Pipelined requests are parsed as they arrive
but wait their turn; reading stops while a response is pending, so a client that pipelines
without reading cannot make the gateway buffer without bound.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.interfaces import IHandshakeListener, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http import errors
from flexgw.http.chunked import ChunkFraming
from flexgw.http.errors import GatewayError
from flexgw.http.gate import PIPELINE, UPGRADING, ReadGate
from flexgw.http.headers import HeaderList
from flexgw.http.request import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    RequestHead,
    analyze_head,
    error_for_parser_message,
)
from flexgw.http.tunnel import Tunnel
from flexgw.http.wheel import TimingWheel, Watchdog
from flexgw.ingress.contract import IExchangeFront, IExchangeObserver
from flexgw.ingress.exchange import CHAIN_FINISH, DONE, RESPONDING, WAITING, ProxyExchange
from flexgw.ingress.h2front import H2Limits
from flexgw.ingress.peer import NOBODY, Peer
from flexgw.ingress.routing import RouteMatch, select_route
from flexgw.ingress.select import ProtocolSelector
from flexgw.ingress.upgrade import UpgradeExchange, upgrade_protocol
from flexgw.plan import HttpSettings, Listener, Timeouts
from flexgw.policies.base import LocalResponse
from flexgw.upstream.manager import PoolManager

if TYPE_CHECKING:
    from flexgw.ingress.h2front import H2Protocol

_log = Logger(namespace="flexgw.ingress")

# connection states
IDLE = 0  # waiting for the first byte of a request
HEAD = 1  # a request head is arriving
BODY = 2  # head complete; body (if any) arriving
CLOSING = 3  # an error was answered or the connection is closing: ignore further input



@implementer(IHandshakeListener, IExchangeFront)
class IngressProtocol(Protocol):
    """One downstream HTTP/1.1 connection (over TLS on https listeners)."""

    #: The make_exchange hook: builds the exchange that serves an accepted request head, called
    #: as make_exchange(front, head, started). A subclass names its own kind (the forward-proxy
    #: front: ForwardExchange). A class, not a method: no extra call per request.
    make_exchange: Callable[[IngressProtocol, RequestHead, float], ProxyExchange] = staticmethod(
        ProxyExchange  # type: ignore[assignment]
    )

    def __init__(self, factory: IngressFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.wheel = factory.wheel  # keep-alive and header timeouts, and the exchanges'
        # The exchanges' response and stream idle deadlines: one at a time, one wheel timer.
        self.watchdog = Watchdog(self.wheel)
        self.pools = factory.pools
        self.parser = httptools.HttpRequestParser(self)
        # IExchangeFront.route: the listener factory's (its current plan), called directly.
        self.route: Callable[[RequestHead], RouteMatch | None] = factory.route
        self.state = IDLE
        self.draining = False  # set when the gateway drains: responses close the connection
        self.head_bytes = 0
        self.url = b""
        self.headers: HeaderList = []
        self.parsing: ProxyExchange | None = None  # exchange whose request is being received
        self.starting: ProxyExchange | None = None  # head accepted; started when the parser returns
        self.head_tail = b""  # last bytes of a head spanning reads (its empty line may too)
        self.framing: ChunkFraming | None = None  # the chunked request body being received
        self.body_left = 0  # bytes of a Content-Length request body still to come
        self.active: ProxyExchange | None = None  # exchange being proxied
        self.queue: deque[ProxyExchange] = deque()
        self.pending_refusal: GatewayError | None = None
        # Where client bytes go once HTTP is over on this connection: an UpgradeExchange until
        # the upstream's 101, then the Tunnel (state is CLOSING for the parser meanwhile).
        self.tunnel: Any = None
        self.gate: ReadGate
        self.timer = None  # keep-alive: fires, then re-checks `idle_since` (never moved sooner)
        self.head_timer = None  # header deadline, armed only when a head spans several reads
        self.idle_since = 0.0
        self.peer = NOBODY  # set when the connection is made
        # Settings are read from the factory at connection time; a reload swaps the factory's.
        self.http: HttpSettings = factory.http
        self.timeouts: Timeouts = factory.timeouts

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Record the peer, and close the connection if no request starts in time."""
        transport = self.transport
        self.gate = ReadGate(transport)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        self.peer = Peer.of(transport, self.factory.listener.scheme, self.http.trusted_proxies)
        self.factory.connections.add(self)
        self.idle_since = self.clock.seconds()
        self.timer = self.wheel.call_later(self.http.keepalive_timeout, self._on_timer)

    def retire(self) -> None:
        """The connection turned out to be HTTP/2 (ProtocolSelector): leave it to that protocol."""
        self.state = CLOSING
        self._stop_timer()
        self.factory.connections.discard(self)

    def drain(self) -> None:
        """The gateway drains: close now if idle, else after the response in flight."""
        self.draining = True
        if self.active is None and self.state == IDLE and not self.queue:
            self.transport.loseConnection()  # idle keep-alive: nothing to wait for

    def handshakeCompleted(self) -> None:
        """TLS is up: the client certificate's details (if one was verified) are forwarded with
        every request of this connection as `x-forwarded-client-cert` (Envoy's format), and the
        certificate is kept on the Peer for policies that send it on."""
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            return
        if self.http.forward_client_cert:
            from flexgw.tls.contexts import xfcc_value

            value = xfcc_value(certificate.to_cryptography())
            self.peer = self.peer.with_client_cert(value, certificate)
        else:
            self.peer = self.peer.with_client_cert(None, certificate)

    def connectionLost(self, reason: Failure = None) -> None:
        """Abandon whatever is in flight."""
        self.state = CLOSING
        factory = self.factory
        factory.connections.discard(self)
        self._stop_timer()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            if tunnel is not self.active:
                tunnel.downstream_lost()
        if self.active is not None:
            active, self.active = self.active, None
            active.downstream_lost()
            factory.exchange_finished(active)
        self.queue.clear()
        if factory.on_connection_lost is not None:
            factory.on_connection_lost(self)

    def dataReceived(self, data: bytes) -> None:
        """Feed the request parser one message part at a time; start an accepted request.

        The bytes are cut where each request head ends (at its empty line), where a
        Content-Length body ends and where a chunked body ends (ChunkFraming, which also bounds
        chunk-size lines and trailers before the parser sees them), so every part the parser
        gets belongs to one message. A request is started (routed, sent upstream) only once
        all of `data` has been parsed, so that a malformed body in the same read refuses it
        before the upstream sees anything. A read holding one whole head costs one `find`.
        """
        if self.state == CLOSING:
            tunnel = self.tunnel
            if tunnel is not None:
                tunnel.from_downstream(data)
            return
        while True:
            state = self.state
            if state == BODY:
                framing = self.framing
                if framing is not None:
                    end = framing.scan(data)
                    if isinstance(end, GatewayError):
                        self._refuse(end)
                        break
                else:
                    end = self.body_left if self.body_left < len(data) else -1
                    self.body_left -= len(data) if end < 0 else end
            elif state == HEAD and self.head_tail:
                # The head's empty line may have begun in the previous read.
                tail = self.head_tail
                end = (tail + data).find(b"\r\n\r\n")
                end = end + 4 - len(tail) if end >= 0 else -1
            else:
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    end += 4
            piece = data if end < 0 or end >= len(data) else data[:end]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade as upgrade:
                self._on_upgrade(data, upgrade.args[0] if upgrade.args else len(piece))
                return
            except httptools.HttpParserError as exc:
                if self.state != CLOSING:
                    cause = exc.__cause__ or exc.__context__
                    if isinstance(cause, _Refused):
                        self._refuse(cause.error)
                    elif isinstance(exc, httptools.HttpParserCallbackError):
                        self.factory.log_failure(cause)
                        self._refuse(errors.INTERNAL_ERROR)
                    else:
                        self._refuse(error_for_parser_message(str(exc)))
                break
            if state == BODY:
                if end >= 0 and self.state == BODY:
                    # The body ended here by its framing, but not for the parser: refuse
                    # rather than guess which of the two the upstream would believe.
                    self._refuse(errors.bad_request("Malformed chunked body"))
                    break
            elif end < 0 and self.framing is not None and self.state == BODY:
                # A chunked body began inside this part, where no head end was seen: its
                # framing cannot be followed (cannot happen with llhttp's strict CRLF).
                self._refuse(errors.bad_request("Malformed request head"))
                break
            if piece is data or self.state == CLOSING:
                if self.state == HEAD:
                    self._head_incomplete(piece)
                break
            data = data[end:]
        if self.starting is not None:
            # A valid request came before any error: it is answered, then the refusal.
            self._start()

    def _head_incomplete(self, piece: bytes) -> None:
        """A read ended inside a head: give the head its deadline, bound it, keep its tail."""
        if self.head_timer is None and self.active is None:
            # The head did not arrive in one read: now it needs its deadline, from its first
            # byte, which came in this read (one begun in an earlier read already has its
            # deadline: armed then, or by _next when it waited behind a response). Heads that
            # arrive whole never create a timer, nor read the clock.
            self.head_timer = self.wheel.call_later(self.http.header_timeout, self._on_head_timer)
        # The part began with this head (or continues it): it counts in full.
        self.head_bytes += len(piece)
        self.head_tail = (self.head_tail + piece)[-3:]
        if self.head_bytes > self.http.max_header_bytes:
            self._refuse(errors.HEADERS_TOO_LARGE)

    def _start(self) -> None:
        """Start the exchange whose head the last feed accepted (unless already refused)."""
        exchange = self.starting
        self.starting = None
        if exchange is not None and exchange.state == WAITING:
            exchange.start()

    def _on_upgrade(self, data: bytes, offset: int) -> None:
        """llhttp stops after an Upgrade request's head (CONNECT was refused in the head).

        A body-less upgrade request being proxied now (not pipelined behind another) is
        forwarded with its Upgrade and may become a tunnel: what the client sends after it is
        kept for that tunnel, never parsed. Any other (`Upgrade: h2c`, pipelined) is proxied
        as a plain request without the Upgrade, and parsing goes on with a fresh parser.
        """
        if self.state == CLOSING:
            return
        exchange = self.starting
        if exchange is not None and exchange is self.active and not self.queue:
            protocol = upgrade_protocol(exchange.head)
            if protocol is not None:
                upgrading = UpgradeExchange(self, exchange.head, exchange.started, protocol)
                upgrading.request_complete = exchange.request_complete
                self.active = self.starting = upgrading
                self.state = CLOSING
                self.tunnel = upgrading
                self.gate.hold(UPGRADING)
                self._start()
                rest = data[offset:]
                if rest and self.tunnel is upgrading:
                    upgrading.from_downstream(rest)
                return
        self.parser = httptools.HttpRequestParser(self)
        if self.starting is not None:
            self._start()
        rest = data[offset:]
        if rest and self.state != CLOSING:
            self.dataReceived(rest)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """First byte of a request: start the header deadline."""
        self.state = HEAD
        self.head_bytes = 0
        self.head_tail = b""
        self.url = b""
        self.headers = []
        if self.active is not None:
            # Pipelined behind a pending response: stop reading more until it is done. (The
            # deadline of a head is armed by dataReceived only if it spans several reads.)
            self.gate.hold(PIPELINE)

    def on_url(self, url: bytes) -> None:
        """The request target (llhttp may deliver it in pieces)."""
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header, name case kept; trailer fields after the head are dropped."""
        if self.state == HEAD:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Check the head; start proxying it, or queue it behind the active exchange."""
        parser = self.parser
        headers = self.headers
        size = len(self.url) + 16
        for name, value in headers:
            size += len(name) + len(value) + 4
        if size > self.http.max_header_bytes:
            raise _Refused(errors.HEADERS_TOO_LARGE)
        head = analyze_head(
            parser.get_method(),
            self.url,
            parser.get_http_version(),
            headers,
            parser.should_keep_alive(),
            self.http.headers_with_underscores,
            self.http,
        )
        if isinstance(head, GatewayError):
            head = self.invalid_head(head)
        if head.body != BODY_NONE and parser.should_upgrade():
            # llhttp would hand the body over as upgraded bytes, and the fresh parser would read
            # it as the next request (or a tunnel would carry it unchecked): a smuggling vector.
            raise _Refused(errors.bad_request("An Upgrade request with a body is not accepted"))
        self.state = BODY
        if head.body == BODY_CHUNKED:  # (reset when the message completes)
            self.framing = ChunkFraming(self.http.max_header_bytes)
        elif head.body == BODY_LENGTH:
            self.body_left = head.content_length
        exchange = self.make_exchange(self, head, self.clock.seconds())
        self.parsing = exchange
        if self.active is None:
            self.active = exchange
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
            self.starting = exchange
        else:
            self.queue.append(exchange)

    def can_retire(self) -> bool:
        """True while no request has begun: another protocol (HTTP/2) may take over."""
        return self.state == IDLE

    def invalid_head(self, error: GatewayError) -> RequestHead:
        """A head analyze_head refused: refuse it (the forward-proxy front accepts CONNECT)."""
        raise _Refused(error)

    def on_body(self, body: bytes) -> None:
        """A piece of the request body for the exchange being received."""
        exchange = self.parsing
        if exchange is not None and exchange.state != DONE:
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        """The request is fully received; stop reading until its response is done."""
        exchange = self.parsing
        self.parsing = None
        self.framing = None
        if self.state != CLOSING:
            self.state = IDLE
        if exchange is not None and exchange.state != DONE:
            exchange.request_done()

    # -- what exchanges call (IExchangeFront) ---------------------------------------------------

    def finish(self, exchange: ProxyExchange, close: bool) -> None:
        """A response is complete: report it, then close or go on with the next request."""
        self.factory.exchange_finished(exchange)
        if self.active is exchange:
            self.active = None
        if close:
            # The response said `Connection: close`: nothing may follow it, not even the
            # refusal of what the client sent after the request (llhttp: "Data after close").
            self.pending_refusal = None
            self.state = CLOSING
            self.transport.loseConnection()
            return
        if self.pending_refusal is not None:
            self._refuse(self.pending_refusal)
            return
        if self.state == CLOSING:
            self.transport.loseConnection()
            return
        self._next()

    def cut_off(self, exchange: ProxyExchange) -> None:
        """The upstream failed after the response head was sent: cut the client off."""
        self.factory.exchange_finished(exchange)
        self.active = None
        self.state = CLOSING
        self.transport.abortConnection()

    def tunnel_opened(self, exchange: ProxyExchange, tunnel: Tunnel) -> None:
        """The exchange became a byte tunnel: client bytes go to it from now on."""
        self.tunnel = tunnel
        if self.active is exchange:
            self.active = None
        self.factory.tunnel_opened(exchange)

    def tunnel_closed(self, exchange: ProxyExchange) -> None:
        """The exchange's tunnel ended."""
        self.factory.tunnel_closed(exchange)

    def answer(
        self,
        exchange: ProxyExchange,
        error: GatewayError | LocalResponse,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer a gateway error or a policy's local response for an exchange that has not sent
        a response head; `extra` headers (from policies) are added."""
        keep = (
            (exchange.request_complete or exchange.head.body == BODY_NONE)
            and exchange.head.keep_alive
            and self.state != CLOSING
            and self.pending_refusal is None
            and not self.draining
        )
        if keep and exchange.head.version == b"1.0":
            # An HTTP/1.0 client assumes the connection closes unless told otherwise.
            extra = [*(extra or ()), (b"Connection", b"keep-alive")]
        data = error.render(not keep, extra or ())
        if exchange.head.method == b"HEAD":
            # Same head as for GET (Content-Length included), no body: body bytes after a HEAD
            # response would be read as the start of the next response on this connection.
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.transport.write(data)
        self.factory.exchange_finished(exchange)
        if self.active is exchange:
            self.active = None
        if not keep:
            self.state = CLOSING
            self.transport.loseConnection()
            return
        self._next()

    def _next(self) -> None:
        """Start the next pipelined request, or wait for one."""
        if self.pending_refusal is not None:
            self._refuse(self.pending_refusal)
            return
        gate = self.gate
        if gate.reasons:
            gate.release(PIPELINE)
        if self.queue:
            exchange = self.queue.popleft()
            self.active = exchange
            if exchange.state == WAITING:
                exchange.start()
            return
        if self.state == CLOSING:
            return
        if self.draining and self.state == IDLE:
            # The gateway drains and this connection has nothing in flight: close it now.
            self.state = CLOSING
            self.transport.loseConnection()
            return
        self.idle_since = self.clock.seconds()
        if self.state == HEAD and self.head_timer is None:
            # A pipelined head was partly read while the previous response was pending.
            self.head_timer = self.wheel.call_later(self.http.header_timeout, self._on_head_timer)
        if self.timer is None:
            self.timer = self.wheel.call_later(self.http.keepalive_timeout, self._on_timer)

    # -- errors and timing -----------------------------------------------------------------------

    def _refuse(self, error: GatewayError) -> None:
        """Answer a request the gateway will not proxy, then close the connection."""
        self.state = CLOSING
        parsing = self.parsing
        self.parsing = None
        self.queue.clear()
        active = self.active
        if active is not None and active.state != DONE:
            if active is parsing:
                # The request being proxied is itself malformed (its body): never let the
                # upstream see it complete. Answer the error, or cut off a response under way.
                if active.state == RESPONDING:
                    active.error_cause = error.cause
                    active.downstream_lost()
                    self.cut_off(active)
                else:
                    active.fail(error)
                return
            # A response is still pending for an earlier request: answer after it.
            self.pending_refusal = error
            return
        self.pending_refusal = None
        self.transport.write(error.render(close=True))
        self.factory.request_refused(self.peer, error)
        self.transport.loseConnection()

    def _on_timer(self) -> None:
        """Keep-alive check: close a connection idle for the whole keep-alive timeout."""
        self.timer = None
        if self.state == CLOSING:
            return
        keepalive = self.http.keepalive_timeout
        if self.active is not None or self.state != IDLE:
            # Busy (or a head is arriving, which has its own deadline): look again later.
            self.timer = self.wheel.call_later(keepalive, self._on_timer)
            return
        idle = self.clock.seconds() - self.idle_since
        if idle < keepalive:
            self.timer = self.wheel.call_later(keepalive - idle, self._on_timer)
            return
        self.state = CLOSING
        self.transport.loseConnection()

    def _on_head_timer(self) -> None:
        """Header deadline: a head still incomplete gets a 408."""
        self.head_timer = None
        if self.active is None and self.state == HEAD:
            self._refuse(errors.HEADER_TIMEOUT)

    def _stop_timer(self) -> None:
        self.watchdog.close()
        for name in ("timer", "head_timer"):
            timer = getattr(self, name)
            if timer is not None:
                if timer.active():
                    timer.cancel()
                setattr(self, name, None)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing and answer `error`."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class IngressFactory(Factory):
    """Builds IngressProtocols for one listener; holds the listener's current plan slice."""

    noisy = False

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        listener: Listener,
        http: HttpSettings,
        timeouts: Timeouts,
        pools: PoolManager,
        access_log: IExchangeObserver | None,
        rng: random.Random | None = None,
        metrics: IExchangeObserver | None = None,
        resolver: Any = None,
        observers: Sequence[IExchangeObserver] = (),
        forward_proxy: Callable[[IngressFactory], Protocol] | None = None,
    ) -> None:
        self.reactor = reactor
        # The protocol of forward-proxy listeners (egress/, above this package: injected), and
        # the IHostnameResolver for its destinations (None: the reactor's nameResolver).
        self.forward_proxy = forward_proxy
        self.resolver = resolver
        self.clock = clock
        self.wheel = TimingWheel.of(clock)  # the hot path's timeouts (100 ms granularity)
        self.listener = listener
        self.http = http
        self.timeouts = timeouts
        self.pools = pools
        # Told about every exchange that ends (see _observe); the gateway swaps the access log.
        self._access_log = access_log
        self._metrics = metrics
        self.extra_observers = tuple(observers)
        self.observers: tuple[IExchangeObserver, ...] = ()
        self._observe()
        self.rng = rng or random.Random()
        self.connections: set[IngressProtocol | H2Protocol] = set()
        self.h2_limits = H2Limits.from_http(http)
        # Called with each connection as it closes (set by the gateway while it drains).
        self.on_connection_lost: Callable[[IngressProtocol], None] | None = None

    def update(self, listener: Listener, http: HttpSettings, timeouts: Timeouts) -> None:
        """Swap in a new plan for this listener (requests in flight keep what they hold)."""
        self.listener = listener
        self.http = http
        self.timeouts = timeouts
        self.h2_limits = H2Limits.from_http(http)
        for connection in self.connections:
            connection.http = http
            connection.timeouts = timeouts

    def buildProtocol(self, addr: object) -> Protocol:
        """A protocol for one accepted connection: on a forward-proxy listener the forward-proxy
        front (HTTP/1.1, injected by the service); otherwise HTTP/1.1 or HTTP/2, chosen on its
        first bytes."""
        if self.listener.forward_proxy is not None:
            if self.forward_proxy is None:
                raise RuntimeError("a forward-proxy listener needs IngressFactory(forward_proxy=)")
            return self.forward_proxy(self)
        return ProtocolSelector(self, IngressProtocol(self))

    def route(self, head: RequestHead) -> RouteMatch | None:
        """Choose the route for a request on this listener's current plan (the fronts' route)."""
        return select_route(
            self.listener,
            head.method.decode("ascii"),
            head.path,
            head.authority,
            head.headers,
            self.rng,
        )

    @property
    def access_log(self) -> IExchangeObserver | None:
        """The access log (the gateway swaps it when the logging outputs change)."""
        return self._access_log

    @access_log.setter
    def access_log(self, access_log: IExchangeObserver | None) -> None:
        self._access_log = access_log
        self._observe()

    @property
    def metrics(self) -> IExchangeObserver | None:
        """The gateway's metrics."""
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: IExchangeObserver | None) -> None:
        self._metrics = metrics
        self._observe()

    def set_observers(self, observers: Sequence[IExchangeObserver]) -> None:
        """Replace the observers told after the metrics (the gateway's tracer, when tracing is
        configured)."""
        self.extra_observers = tuple(observers)
        self._observe()

    def _observe(self) -> None:
        """The observers, in order: the policies' on_done, the access log, the metrics, others."""
        self.observers = tuple(
            o
            for o in (CHAIN_FINISH, self._access_log, self._metrics, *self.extra_observers)
            if o is not None
        )

    def exchange_finished(self, exchange: ProxyExchange) -> None:
        """Report a finished exchange to the observers."""
        listener = self.listener
        for observer in self.observers:
            observer.exchange_finished(exchange, listener)

    def tunnel_opened(self, exchange: ProxyExchange) -> None:
        """Report an exchange that became a tunnel to the observers."""
        listener = self.listener
        for observer in self.observers:
            observer.tunnel_opened(exchange, listener)

    def tunnel_closed(self, exchange: ProxyExchange) -> None:
        """Report a tunnel that ended to the observers."""
        listener = self.listener
        for observer in self.observers:
            observer.tunnel_closed(exchange, listener)

    def request_refused(self, peer: Peer, error: GatewayError) -> None:
        """Report a request refused before it was parsed whole to the observers."""
        listener = self.listener
        for observer in self.observers:
            observer.request_refused(peer, error, listener)

    def log_failure(self, failure: BaseException | None) -> None:
        """Log an unexpected exception raised while handling a request."""
        _log.failure(
            "Unexpected error handling a request",
            Failure(failure) if failure is not None else None,
        )

