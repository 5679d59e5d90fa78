"""The downstream HTTP/2 protocol of an ingress listener (prior-knowledge h2c, or ALPN `h2`).

Framing, stream states, flow-control accounting and HPACK are flexgw's own codec
(flexgw.http.h2.connection, which calls this protocol's h2_* methods). Each request stream becomes an
`H2Exchange`: the HTTP/1.1 path's ProxyExchange with only its response emission overridden, whose
`front` is the stream (`H2Stream`, an IExchangeFront like the HTTP/1.1 IngressProtocol).
Routing, the policy chain, the upstream pools and the timeouts are therefore the very code
HTTP/1.1 runs, and the HTTP/1.1 path pays nothing for HTTP/2 (no indirection was added to it).

Flow control, both ways:
- request bodies: received DATA is acknowledged (WINDOW_UPDATE) only while the exchange can pass
  it on; while it waits for its upstream, or the upstream socket is full, acknowledgements stop,
  so a client can have at most one stream window of unforwarded body per stream;
- responses: body bytes go out as far as the client's stream and connection windows allow; the
  rest waits in the stream, and the upstream connection stops being read until the client opens
  its window (or, for the whole connection, until the client's socket drains).

Guards (RFC 9113 §10.5, the 2023 "rapid reset" and the 2025 "MadeYouReset" attacks): stream
resets are counted per connection in a time window, the client's RST_STREAMs and the gateway's
own alike (a stream the gateway resets or refuses for the client's error: DATA on a half-closed
stream, a window overflow, a malformed request); control frames (PING, SETTINGS, PRIORITY, empty
DATA) likewise, each counted as the codec reads it (a control frame before it is answered). Over
either limit the connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed at once, the rest of
the read unread, so that no more than the limits is ever answered. The exchanges of the streams a
read opens start only once the whole read is processed, so a stream reset within the same read
never reaches an upstream; a stream reset later gives up its pending upstream connect. Streams
whose exchange still runs count against the concurrency limit even when the codec already considers
them closed. The header list size is bounded by `max_header_bytes` (431 on the stream; far over
it, or a CONTINUATION run over it, is a connection error), concurrent streams by
SETTINGS_MAX_CONCURRENT_STREAMS.
"""

from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.compat import writebatch as batch
from flexgw.http import errors
from flexgw.http.errors import GatewayError
from flexgw.http.fastwrite import send_now
from flexgw.http.gate import BACKPRESSURE
from flexgw.http.h2 import settings as h2settings
from flexgw.http.h2.connection import H2Codec, HeaderListTooLargeError, StreamClosedError
from flexgw.http.h2.frames import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
)
from flexgw.http.h2send import send_queued
from flexgw.http.headers import HOP_BY_HOP, HeaderList, response_headers_for_downstream
from flexgw.http.request import BODY_CHUNKED, BODY_NONE, RequestHead, analyze_head
from flexgw.http.wheel import Watchdog
from flexgw.ingress.contract import IExchangeFront
from flexgw.ingress.exchange import (
    CONNECTING,
    DONE,
    NOT_TRAILERS,
    RESPONDING,
    SENDING,
    WAITING,
    ProxyExchange,
)
from flexgw.plan import HttpSettings
from flexgw.policies.base import LocalResponse

if TYPE_CHECKING:
    from flexgw.ingress.front import IngressFactory, IngressProtocol

_log = Logger(namespace="flexgw.ingress.h2")

#: A stream's gate reason while its exchange waits for the end of the read that opened it.
_STARTING = 4
@attrs.frozen
class H2Limits:
    """The HTTP/2 limits of ingress connections."""

    max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS
    initial_window: int = 65535  # per stream: request body bytes a client may send unacknowledged
    connection_window: int = 4 * 1024 * 1024  # the same for the whole connection
    max_resets: int = 200  # client RST_STREAM frames per `window_seconds`; over: GOAWAY
    max_control_frames: int = 1000  # PING, SETTINGS, PRIORITY, empty DATA per `window_seconds`
    window_seconds: float = 10.0

    @classmethod
    def from_http(cls, http: HttpSettings) -> H2Limits:
        """The limits configured in `Configuration.spec.http.http2` (defaults otherwise)."""
        return cls(
            max_concurrent_streams=http.h2_max_concurrent_streams,
            max_resets=http.h2_max_resets,
            max_control_frames=http.h2_max_control_frames,
        )


@implementer(IPushProducer)
class _RequestGate:
    """A stream's `front.gate`: while any reason holds, received body data is not acknowledged.

    The exchange holds it as it holds an HTTP/1.1 connection's ReadGate (waiting for a policy or
    an upstream connection) and registers it as the producer of the upstream socket; instead of
    pausing a socket, holding it withholds WINDOW_UPDATE, which stops the client's sending.
    """

    __slots__ = ("reasons", "stream")

    def __init__(self, stream: H2Stream) -> None:
        self.stream: H2Stream | None = stream  # None once the stream is forgotten
        self.reasons = 0

    def hold(self, reason: int) -> None:
        """Stop acknowledging body data for `reason` (a bit)."""
        self.reasons |= reason

    def release(self, reason: int) -> None:
        """Drop `reason`; acknowledge what was withheld when no reason is left."""
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                stream = self.stream
                if stream is not None:  # (None: the stream was forgotten)
                    stream.acknowledge()

    def pauseProducing(self) -> None:
        """The upstream socket's buffer is full."""
        self.hold(BACKPRESSURE)

    def resumeProducing(self) -> None:
        """The upstream socket's buffer drained."""
        self.release(BACKPRESSURE)

    def stopProducing(self) -> None:
        """The upstream went away; the exchange cleans up."""


@implementer(IConsumer)
class _ResponseConsumer:
    """A stream's `transport` as its exchange sees it: the consumer of the response, on which
    the exchange registers the upstream connection as producer. The upstream is paused while
    response bytes wait for a flow-control window or for the client's socket; bytes themselves
    reach the stream only through H2Exchange's methods (start_response, queue_data)."""

    __slots__ = ("paused", "producer", "stream")

    def __init__(self, stream: H2Stream) -> None:
        self.stream: H2Stream | None = stream  # None once the stream is forgotten
        self.producer: Any = None
        self.paused = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The upstream connection whose reading this stream's response may pause."""
        self.producer = producer
        self.paused = False
        self.update()

    def unregisterProducer(self) -> None:
        """The response body is complete: no producer any more."""
        producer = self.producer
        self.producer = None
        if producer is not None and self.paused:
            self.paused = False
            producer.resumeProducing()

    def write(self, data: bytes) -> None:
        """Never used: an H2Exchange hands the stream its response through its own methods."""
        raise RuntimeError("raw bytes written to an HTTP/2 stream")

    def update(self) -> None:
        """Pause the upstream while response bytes wait for a window or the client's socket."""
        producer = self.producer
        stream = self.stream
        if producer is None or stream is None:
            return
        paused = bool(stream.queue) or stream.protocol.paused
        if paused != self.paused:
            self.paused = paused
            if paused:
                producer.pauseProducing()
            else:
                producer.resumeProducing()


@implementer(IExchangeFront)
class H2Stream:
    """One request stream: what its exchange sees as `front`, and its response's send side."""

    def __init__(self, protocol: H2Protocol, stream_id: int) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        # What ProxyExchange reads from its front (the same values as the HTTP/1.1 front's).
        self.clock = protocol.clock
        self.wheel = protocol.wheel
        self.watchdog = Watchdog(protocol.wheel, reuse=False)  # this stream's exchange's timeouts
        self.pools = protocol.pools
        self.http = protocol.http
        self.timeouts = protocol.timeouts
        self.peer = protocol.peer
        self.gate = _RequestGate(self)
        self.transport = _ResponseConsumer(self)  # the upstream is registered on it as producer
        self.route = protocol.factory.route  # routing is the listener factory's, as for HTTP/1.1
        self.exchange: H2Exchange | None = None
        self.request_ended = False
        self.unacked = 0  # received flow-controlled bytes not yet acknowledged
        # response side
        self.head: HeaderList | None = None  # response head not yet sent
        self.head_sent = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.ending = False  # the response is complete upstream; end the stream once sent
        self.trailers: HeaderList | None = None
        self.ended = False  # END_STREAM sent
        self.closed = False  # reset, or the connection is gone

    @property
    def draining(self) -> bool:
        """The gateway is draining (ProxyExchange reads it from its front)."""
        return self.protocol.draining

    # -- what the exchange calls ---------------------------------------------------------------

    def answer(
        self,
        exchange: ProxyExchange,
        error: GatewayError | LocalResponse,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer a gateway error or a policy's local response on this stream."""
        if isinstance(error, GatewayError):
            body = json.dumps({"error": error.message}).encode("ascii")
            headers = [
                (b"content-type", b"application/json"),
                (b"x-flexgw-error", error.cause.encode("ascii")),
            ]
        else:
            body = error.body
            headers = [(n.lower(), v) for n, v in error.headers]
        if extra:
            headers.extend((n.lower(), v) for n, v in extra)
        headers = [(n, v) for n, v in headers if n not in HOP_BY_HOP and n != b"content-length"]
        if body:  # (none on an empty answer: a trailers-only gRPC one carries no length)
            headers.append((b"content-length", b"%d" % len(body)))
        if exchange.head.method == b"HEAD":
            body = b""
        self.respond(error.status, headers, body)
        self.protocol.factory.exchange_finished(exchange)

    def finish(self, exchange: ProxyExchange, close: bool) -> None:
        """The exchange is complete (its response may still be waiting for the client's window)."""
        self.protocol.factory.exchange_finished(exchange)
        self._maybe_done()

    def cut_off(self, exchange: ProxyExchange) -> None:
        """The upstream failed after the response head was sent: reset the stream
        (PROTOCOL_ERROR when the upstream's response was malformed, as a trailers-only gRPC
        answer followed by a body)."""
        self.protocol.factory.exchange_finished(exchange)
        malformed = exchange.error_cause == errors.UPSTREAM_BAD_RESPONSE.cause
        self.reset(PROTOCOL_ERROR if malformed else INTERNAL_ERROR)

    def tunnel_opened(self, exchange: ProxyExchange, tunnel: Any) -> None:
        """Never: an HTTP/2 stream carries no upgrade (and CONNECT is refused)."""
        raise RuntimeError("an HTTP/2 stream cannot become a tunnel")

    def tunnel_closed(self, exchange: ProxyExchange) -> None:
        """Never: see tunnel_opened."""
        raise RuntimeError("an HTTP/2 stream cannot become a tunnel")

    # -- request body flow control ---------------------------------------------------------------

    def received(self, size: int) -> None:
        """Flow-controlled bytes arrived for this stream: acknowledge now, unless held."""
        self.unacked += size
        if not self.gate.reasons:
            self.acknowledge()

    def acknowledge(self) -> None:
        """Hand back the window for what was received and passed on (a closed stream's data:
        the connection window's share only, as for closed streams)."""
        size = self.unacked
        if size and not self.protocol.closing:
            self.unacked = 0
            protocol = self.protocol
            protocol.conn.acknowledge(self.stream_id, size)
            batch.flush_soon(protocol)

    # -- response side ---------------------------------------------------------------------------

    def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        """A whole response made by the gateway."""
        self.head = [(b":status", b"%d" % status), *headers]
        if body:
            self.queue.append(body)
            self.queued += len(body)
        self.ending = True
        self.flush()
        self._maybe_done()

    def start_response(self, headers: HeaderList) -> None:
        """The response head, sent with the next flush (withdrawn if the upstream fails first)."""
        self.head = headers

    def queue_data(self, data: bytes) -> None:
        """A piece of the response body, sent as the windows allow (dropped once reset)."""
        if data and not self.closed:
            self.queue.append(data)
            self.queued += len(data)

    def discard_pending(self) -> None:
        """Forget a response head (and body) not sent yet: the client gets an error instead."""
        self.head = None
        self.queue.clear()
        self.queued = 0
        self.trailers = None
        self.ending = False

    def end_response(self) -> None:
        """The response is complete: end the stream (with trailers, if any) once all is sent."""
        self.ending = True

    def flush(self) -> None:
        """Send the head, then body bytes as the flow-control windows allow, then the end."""
        if self.closed or self.ended:
            return
        protocol = self.protocol
        conn = protocol.conn
        try:
            head = self.head
            queue = self.queue
            # The whole response at once (the common case): HEADERS and DATA in one piece.
            if (
                head is not None
                and self.ending
                and self.trailers is None
                and len(queue) < 2
                and conn.send_response(self.stream_id, head, queue[0] if queue else b"")
            ):
                self.head = None
                self.head_sent = self.ended = True
                queue.clear()
                self.queued = 0
                if self.transport.producer is not None:
                    self.update_producer()
                batch.flush_soon(protocol)
                self._maybe_done()
                return
            if head is not None:
                self.head = None
                self.head_sent = True
                end = self.ending and not self.queue and self.trailers is None
                conn.send_headers(self.stream_id, head, end_stream=end)
                if end:
                    self.ended = True
            if not self.ended:
                sent, self.ended = send_queued(
                    conn, self.stream_id, self.queue, self.ending, self.trailers
                )
                self.queued -= sent
        except StreamClosedError as exc:
            # The stream was closed under us (the client reset it in this same read), or the codec
            # refused the response's head or trailers (over the client's
            # SETTINGS_MAX_HEADER_LIST_SIZE): reset it; what the exchange still sends is dropped
            # (queue_data) until it completes, and then the stream is forgotten.
            if isinstance(exc, HeaderListTooLargeError):
                _log.info("HTTP/2 response to {client} not sent: {error}", client=self.peer.address, error=exc)
            self.closed = True
            self.queue.clear()
            self.queued = 0
            protocol.blocked.discard(self)
            conn.reset_stream(self.stream_id, INTERNAL_ERROR)
            protocol.flush()
            self._maybe_done()
            return
        if self.queue:
            protocol.blocked.add(self)
        else:
            protocol.blocked.discard(self)
        self.update_producer()
        batch.flush_soon(protocol)
        if self.ended:
            self._maybe_done()

    def update_producer(self) -> None:
        """Pause the upstream while response bytes wait for a window or the client's socket."""
        self.transport.update()

    def _maybe_done(self) -> None:
        """Forget the stream once its response has ended and its exchange is done."""
        exchange = self.exchange
        if not (self.ended or self.closed) or (exchange is not None and exchange.state != DONE):
            return
        if not self.request_ended and not self.closed:
            # Answered before the request was complete: ask the client to stop sending it
            # (RFC 9113 §8.1).
            self.reset(NO_ERROR)
            return
        self.protocol.forget(self)

    def reset(self, code: int) -> None:
        """Reset the stream (the exchange, if still running, is abandoned by the caller)."""
        protocol = self.protocol
        if not self.closed:
            self.closed = True
            protocol.conn.reset_stream(self.stream_id, code)
            protocol.flush()
        protocol.forget(self)


class H2Exchange(ProxyExchange):
    """A ProxyExchange whose response goes out on an HTTP/2 stream (and whose request may end
    with trailer fields, passed on in the last chunk of the chunked upstream request)."""

    __slots__ = ("request_trailers",)

    front: H2Stream  # type: ignore[assignment]

    def __init__(self, front: Any, head: RequestHead, started: float) -> None:
        super().__init__(front, head, started)
        self.request_trailers: HeaderList | None = None

    def upstream_ready(self, conn: Any, reused: bool) -> None:
        """As ProxyExchange's; a request already complete with trailers gets them in its last
        chunk (ProxyExchange would write a bare terminator)."""
        if (
            self.request_trailers
            and self.request_complete
            and self.head.body == BODY_CHUNKED
            and self.state == CONNECTING
        ):
            self.request_complete = False
            super().upstream_ready(conn, reused)
            self.request_complete = True
            if self.state == SENDING and self.conn is conn:
                self._finish_request()
            return
        super().upstream_ready(conn, reused)

    def _finish_request(self, terminated: bool = False) -> None:
        trailers = self.request_trailers
        if trailers and self.head.body == BODY_CHUNKED and not terminated:
            conn = self.conn
            if conn.http2:  # type: ignore[union-attr]
                conn.end_request(trailers)  # type: ignore[union-attr]
            else:
                lines = [b"0\r\n"]
                lines.extend(name + b": " + value + b"\r\n" for name, value in trailers)
                lines.append(b"\r\n")
                send_now(conn.transport, b"".join(lines))  # type: ignore[union-attr]
            terminated = True
        super()._finish_request(terminated)

    def response_interim(self, status: int, headers: HeaderList) -> None:
        """Relay 100 Continue and 103 Early Hints as informational HEADERS."""
        if status == 101:
            self.response_malformed("Unexpected 101 Switching Protocols")
            return
        stream = self.front
        if status in (100, 103) and self.response_status == 0 and not stream.closed:
            kept = [(n.lower(), v) for n, v in response_headers_for_downstream(headers, ())]
            try:
                stream.protocol.conn.send_headers(
                    stream.stream_id, [(b":status", b"%d" % status), *kept]
                )
            except StreamClosedError:
                return
            stream.protocol.flush()

    def response_head(
        self, status: int, reason: bytes, headers: HeaderList, keep_alive: bool
    ) -> None:
        """The final response head: held until this upstream read's flush, then sent."""
        accepted = self._accept_response_head(status, headers)
        if accepted is None:
            return
        status, kept, content_length, chunked = accepted
        self._send_head(status, reason, kept, content_length, chunked)

    def _send_head(
        self, status: int, reason: bytes, kept: HeaderList, content_length: bytes | None,
        chunked: bool,
    ) -> None:
        """Start the stream's response (HEADERS go out with this read's flush)."""
        front = self.front
        if chunked:
            content_length = None  # the stream's end delimits the body
        out = [(b":status", b"%d" % status)]
        out.extend([(n.lower(), v) for n, v in kept])
        if content_length is not None:
            out.append((b"content-length", content_length))
        front.start_response(out)
        if self.head.method == b"HEAD" or status in (204, 304):
            front.end_response()
        # The upstream becomes the stream's producer only if the response outlives this read
        # (flush_response): one that completes in it has nothing left to pause.

    def response_body(self, data: bytes) -> None:
        """A piece of the response body, queued on the stream."""
        self.bytes_out += len(data)
        self.last_activity = self.front.clock.seconds()
        if self.tap is not None:
            self.tap.feed(data)
        self.front.queue_data(data)

    def response_trailers(self, trailers: HeaderList) -> None:
        """Trailer fields of the upstream response: sent as the stream's closing HEADERS."""
        if self.tap is not None:
            self.tap.abandon()  # a response with trailers is not kept whole (never cached)
        kept = [(n.lower(), v) for n, v in trailers if n.lower() not in NOT_TRAILERS]
        if kept:
            self.front.trailers = kept

    def flush_response(self) -> None:
        """Send what this upstream read produced, as far as the client's windows allow; a
        response not complete after it makes the upstream connection the stream's producer (its
        reading paused while bytes wait for the client's window or socket)."""
        front = self.front
        consumer = front.transport
        if consumer.producer is None and not front.ending and self.state == RESPONDING:
            conn = self.conn
            if conn is not None:
                consumer.registerProducer(conn.gate, True)
        front.flush()
        if front.head_sent:
            self.flushed = True

    def _complete(self, conn: Any) -> None:
        self.front.end_response()
        super()._complete(conn)

    def _upstream_failed(self, error: GatewayError, conn_gone: bool = False) -> None:
        if self.state == RESPONDING and not self.flushed:
            self.front.discard_pending()
        super()._upstream_failed(error, conn_gone)


@implementer(IPushProducer)
class H2Protocol(Protocol):
    """One downstream HTTP/2 connection (taken over from the selector's HTTP/1.1 protocol)."""

    def __init__(self, factory: IngressFactory, h1: IngressProtocol) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.wheel = h1.wheel  # keep-alive timer (and the streams' exchanges')
        self.pools = factory.pools
        self.http = h1.http
        self.timeouts = h1.timeouts
        self.limits: H2Limits = factory.h2_limits
        self.peer = h1.peer  # the connection's client (with its XFCC line over mTLS)
        self.draining = False
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams with response bytes waiting for a window
        self.paused = False  # the client's socket is full
        self.closing = False
        self.goaway_last: int | None = None  # last stream id of a graceful GOAWAY
        self.client_goaway = False  # the client sent GOAWAY: finish its streams, then close
        self.window_start = 0.0
        self.resets = 0
        self.control_frames = 0
        self.idle_since = 0.0
        self.timer: Any = None
        self.flush_queued = False  # (flexgw.http.h2.batch)
        self.starting: list[H2Stream] = []  # streams the current read opened
        limits = self.limits
        http = self.http
        # Over twice the limit the header list is a connection error; between the limit and
        # that, the stream gets a 431 (see _head). A header block still waiting for its
        # CONTINUATION frames past the limit is a flood.
        self.conn = H2Codec(
            self,
            client=False,
            local_settings={
                h2settings.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2settings.MAX_HEADER_LIST_SIZE: http.max_header_bytes,
                h2settings.INITIAL_WINDOW_SIZE: limits.initial_window,
                h2settings.ENABLE_PUSH: 0,
            },
            max_header_list=2 * http.max_header_bytes + 1024,
            header_block_limit=http.max_header_bytes,
        )

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Send our SETTINGS and the connection window; start the keep-alive timer."""
        factory = self.factory
        factory.connections.add(self)
        self.transport.registerProducer(self, True)
        conn = self.conn
        conn.initiate()
        extra = self.limits.connection_window - 65535
        if extra > 0:
            conn.increase_window(extra)
        self.flush()
        self.window_start = self.idle_since = self.clock.seconds()
        self.timer = self.wheel.call_later(self.http.keepalive_timeout, self._on_timer)

    def connectionLost(self, reason: Failure = None) -> None:
        """Abandon every stream in flight."""
        self.closing = True
        factory = self.factory
        factory.connections.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        for stream in streams.values():
            stream.closed = True
            self._abandon(stream)
        if factory.on_connection_lost is not None:
            factory.on_connection_lost(self)

    def dataReceived(self, data: bytes) -> None:
        """Feed the codec (which calls the h2_* methods below); then start the exchanges of the
        streams this read opened and that are still alive."""
        if self.closing:
            return
        batch.begin()
        try:
            self._read(data)
        finally:
            batch.end()

    def _read(self, data: bytes) -> None:
        starting: list[H2Stream] = []
        self.starting = starting
        conn = self.conn
        conn.receive(data)
        if conn.closed and not self.closing:
            # A connection error of the client's: the codec queued GOAWAY with its code.
            code, message = conn.error or (PROTOCOL_ERROR, "")
            if code == ENHANCE_YOUR_CALM:
                self._flood(message, queued=True)
                return
            _log.debug("HTTP/2 protocol error from {client}: {error}", client=self.peer.address, error=message)
            self._close(abort_streams=True)
            return
        for stream in starting:
            # A stream reset in this read (or a connection closed in it) has its exchange DONE.
            exchange = stream.exchange
            if exchange is not None and exchange.state == WAITING:
                exchange.start()
                stream.gate.release(_STARTING)
        if not self.closing:
            if self.client_goaway:
                self.drain()
            self.flush()

    def flush(self) -> None:
        """Write what the codec has queued."""
        data = self.conn.data_to_send()
        if data:
            send_now(self.transport, data)

    # -- producer (the client's socket) ----------------------------------------------------------

    def pauseProducing(self) -> None:
        """The client does not read: stop reading it, and pause every upstream feeding it."""
        if self.paused:
            return
        self.paused = True
        self.transport.pauseProducing()
        for stream in list(self.streams.values()):
            stream.update_producer()

    def resumeProducing(self) -> None:
        """The client's socket drained: read it again, resume the upstreams."""
        if not self.paused:
            return
        self.paused = False
        if not self.closing:
            self.transport.resumeProducing()
        for stream in list(self.streams.values()):
            stream.update_producer()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost cleans up."""

    # -- what the codec calls (flexgw.http.h2.connection) ---------------------------------------

    def h2_headers(self, stream_id: int, headers: list, end_stream: bool) -> None:
        """A new stream: its exchange starts at the end of the read (unless answered now)."""
        if self.closing:
            return
        stream = self._request(stream_id, headers, end_stream)
        if stream is not None:
            self.starting.append(stream)

    def h2_trailers(self, stream_id: int, headers: list) -> None:
        """The request's trailer fields (its end)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.exchange is not None:
            kept = [(n, v) for n, v in headers if n not in NOT_TRAILERS]
            stream.exchange.request_trailers = kept or None
        self._ended(stream_id)

    def h2_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        """Request body bytes (and maybe its end)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            # A stream already answered and forgotten: give the window back.
            if flow:
                self.conn.acknowledge(stream_id, flow)
            return
        exchange = stream.exchange
        if data and exchange is not None and exchange.state != DONE:
            exchange.request_body(data)
        if flow:
            stream.received(flow)
        if end_stream:
            self._ended(stream_id)

    def h2_reset(self, stream_id: int, code: int, remote: bool) -> None:
        """A stream reset by the client, or by the codec for the client's stream error (DATA or
        HEADERS on a half-closed stream, a window overflow): counted against the reset budget
        (over it: GOAWAY ENHANCE_YOUR_CALM); its exchange is abandoned."""
        if self.closing:
            return
        if self.counted_reset():
            self._flood("stream resets")
            return
        self._reset(stream_id)

    def h2_window(self, stream_id: int) -> None:
        """A window opened: send what waits for it."""
        self._window(stream_id)

    def h2_settings(self) -> None:
        """The client's SETTINGS (its initial window may have grown)."""
        self._window(0)

    def h2_goaway(self, last_stream_id: int, code: int) -> None:
        """The client goes away (RFC 9113 §6.8): its open streams still get their responses,
        then the connection closes (drained at the end of the read)."""
        self.client_goaway = True

    def h2_control(self) -> None:
        """A control frame (PING, SETTINGS, PRIORITY, unknown, empty DATA), before it is
        answered: over the limit, GOAWAY ENHANCE_YOUR_CALM (the codec then reads no further)."""
        if self.counted_control() and not self.closing:
            self._flood("control frames")

    def _request(self, stream_id: int, headers: list, ended: bool) -> H2Stream | None:
        """A new stream: its exchange, to start at the end of the read (None: answered now)."""
        if (self.goaway_last is not None and stream_id > self.goaway_last) or len(
            self.streams
        ) >= self.limits.max_concurrent_streams:
            # After a graceful GOAWAY; or while streams the codec considers closed (reset by the
            # gateway) still have their exchange running: they count against the concurrency limit.
            self.conn.reset_stream(stream_id, REFUSED_STREAM)
            return None
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        stream.request_ended = ended
        now = self.clock.seconds()
        head = self._head(headers, ended)
        if isinstance(head, GatewayError):
            body = json.dumps({"error": head.message}).encode("ascii")
            stream.respond(
                head.status,
                [
                    (b"content-type", b"application/json"),
                    (b"x-flexgw-error", head.cause.encode("ascii")),
                    (b"content-length", b"%d" % len(body)),
                    *((n.lower(), v) for n, v in head.headers),
                ],
                body,
            )
            self.factory.request_refused(self.peer, head)
            # A malformed request is a stream error (RFC 9113 §8.1.1), answered with a 4xx
            # rather than a reset, but counted as one.
            if self.counted_reset():
                self._flood("stream resets")
            return None
        exchange = H2Exchange(stream, head, now)  # type: ignore[arg-type]
        stream.exchange = exchange
        if ended:
            exchange.request_complete = True
        else:
            # Body data arriving in the same read is kept, not acknowledged, until the exchange
            # has started and says whether it can take it.
            stream.gate.hold(_STARTING)
        return stream

    def _head(self, headers: list[tuple[bytes, bytes]], ended: bool) -> RequestHead | GatewayError:
        """The request head of a stream's HEADERS, as an HTTP/1.1 head would give it (from what
        the codec's checks read of it: `conn.request`)."""
        _, method, path, authority, host, pseudo, size, special = self.conn.request  # type: ignore[misc]
        if size > self.http.max_header_bytes:
            return errors.HEADERS_TOO_LARGE
        if method == b"CONNECT":
            return errors.METHOD_NOT_ALLOWED
        if path is None:
            return errors.bad_request("Missing :method or :path")
        if not path.startswith(b"/"):
            return errors.bad_request("Malformed :path")
        if special:  # a Host field (kept only as :authority), or cookies (joined)
            cookies = []
            regular: HeaderList = []
            for field in headers[pseudo:]:
                name = field[0]
                if name == b"cookie":
                    cookies.append(field[1])
                elif name != b"host":
                    regular.append(field)
            if authority is None:
                authority = host
            elif host is not None and host.lower() != authority.lower():
                return errors.bad_request("Host header and :authority disagree")
            fields: HeaderList = [(b"host", authority), *regular]  # type: ignore[list-item]
            if cookies:
                fields.append((b"cookie", b"; ".join(cookies)))  # RFC 9113 §8.2.3
        else:
            fields = [(b"host", authority), *headers[pseudo:]]  # type: ignore[list-item]
        http = self.http
        head = analyze_head(method, path, "1.1", fields, True, http.headers_with_underscores, http)
        if isinstance(head, GatewayError):
            return head
        head.version = b"2"
        if head.body == BODY_NONE and not ended:
            head.body = BODY_CHUNKED  # no content-length: the body ends with the stream
        return head

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.request_ended:
            return
        stream.request_ended = True
        exchange = stream.exchange
        if exchange is not None and exchange.state != DONE:
            exchange.request_done()
        stream._maybe_done()

    def _window(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream in self.blocked:
                stream.flush()
            return
        for stream in list(self.blocked):
            stream.flush()

    def _reset(self, stream_id: int) -> None:
        """A stream reset by the client, or by the codec for the client's stream error: abandon
        its exchange."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.closed = True
        self._abandon(stream)
        self.forget(stream)
        stream.acknowledge()  # body data withheld for it: the connection window's share back

    def _new_window(self) -> None:
        """Start the counts over once the guards' time window has passed."""
        now = self.clock.seconds()
        if now - self.window_start > self.limits.window_seconds:
            self.window_start = now
            self.resets = self.control_frames = 0

    def counted_reset(self) -> bool:
        """Count a stream reset; True over the budget."""
        self._new_window()
        self.resets += 1
        return self.resets > self.limits.max_resets

    def counted_control(self) -> bool:
        """Count a control frame; True over the limit."""
        self._new_window()
        self.control_frames += 1
        return self.control_frames > self.limits.max_control_frames

    def _flood(self, what: str, queued: bool = False) -> None:
        """Over a guard's limit: log it, and GOAWAY(ENHANCE_YOUR_CALM) (see _calm)."""
        _log.warn(
            "HTTP/2 flood of {what} from {client}: GOAWAY ENHANCE_YOUR_CALM",
            what=what,
            client=self.peer.address,
        )
        self._calm(queued)

    # -- streams ---------------------------------------------------------------------------------

    def _abandon(self, stream: H2Stream) -> None:
        """The client reset the stream or left: abandon its exchange (logged as a reset)."""
        exchange = stream.exchange
        stream.transport.producer = None
        if exchange is not None and exchange.state != DONE:
            exchange.downstream_lost()
            self.factory.exchange_finished(exchange)

    def forget(self, stream: H2Stream) -> None:
        """A stream is finished on our side."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        # The stream, its gate, its response consumer and its exchange refer to each other: cut
        # the links so that reference counting frees them now, not the cycle collector later.
        stream.exchange = None
        stream.gate.stream = stream.transport.stream = None
        self.blocked.discard(stream)
        if not self.streams:
            self.idle_since = self.clock.seconds()
            if self.draining:
                self._close(abort_streams=False)

    # -- closing ---------------------------------------------------------------------------------

    def drain(self) -> None:
        """The gateway drains: GOAWAY now (streams in flight finish), close when none is left."""
        self.draining = True
        if self.closing or self.goaway_last is not None:
            return
        self.flush()
        self.goaway_last = self.conn.highest_inbound
        self.conn.goaway(NO_ERROR, self.goaway_last)  # streams in flight go on
        self.flush()
        if not self.streams:
            self._close(abort_streams=False)

    def _calm(self, queued: bool = False) -> None:
        """A flood: GOAWAY(ENHANCE_YOUR_CALM) (unless the codec `queued` it), abandon every stream,
        close (abort if the client does not read the GOAWAY within a second)."""
        if not queued:
            self.conn.close(ENHANCE_YOUR_CALM, "flood")
        self._close(abort_streams=True)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.wheel.call_later(1.0, self.transport.abortConnection)

    def _close(self, abort_streams: bool) -> None:
        if self.closing:
            return
        if not abort_streams and self.goaway_last is None:
            self.conn.close(NO_ERROR)
        self.flush()
        self.closing = True
        if abort_streams:
            streams, self.streams = self.streams, {}
            for stream in streams.values():
                stream.closed = True
                self._abandon(stream)
        # A TLS transport closes only once no producer is registered (TCP would close anyway).
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _on_timer(self) -> None:
        """Keep-alive: close (GOAWAY NO_ERROR) a connection without streams for the timeout."""
        self.timer = None
        if self.closing:
            return
        keepalive = self.http.keepalive_timeout
        idle = self.clock.seconds() - self.idle_since
        if self.streams or idle < keepalive:
            self.timer = self.wheel.call_later(
                keepalive if self.streams else keepalive - idle, self._on_timer
            )
            return
        self._close(abort_streams=False)
