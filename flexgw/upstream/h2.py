"""HTTP/2 upstreams (`h2c://` and, over TLS with ALPN h2, `h2://` Services): requests
multiplexed over pooled HTTP/2 connections.

To an exchange, a stream on an HTTP/2 connection looks like an HTTP/1.1 UpstreamConnection
(`begin`, `transport`, `gate`, `finish`, `reusable`) and reports to the same ResponseSink, but
it takes the request as HTTP/2 fields (`http2`): the exchange builds them with the rules of its
HTTP/1.1 head (flexgw.ingress.h2request: forwarded fields, host rewrite, policy changes) and
calls `send_head` (HEADERS), `write` (body bytes, DATA frames) and `end_request` (END_STREAM,
or trailers). Nothing is written as HTTP/1.1 and parsed back. Responses come back as the sink's
calls, trailers included (`response_trailers`).

Flow control: request body bytes go out as the upstream's windows allow; the rest waits in the
stream and the downstream is paused (the exchange registered its read gate as this stream's
producer). Response DATA is acknowledged only while the downstream is not pushing back, so an
upstream can send at most one stream window ahead of a slow client.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.fastwrite import send_now
from flexgw.http.h2 import batch
from flexgw.http.h2 import settings as h2settings
from flexgw.http.h2.connection import H2Codec, StreamClosedError
from flexgw.http.h2.frames import CANCEL, NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM
from flexgw.http.h2send import send_queued
from flexgw.http.headers import HeaderList
from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.connection import MAX_RESPONSE_HEAD
from flexgw.upstream.interfaces import UpstreamTLSError
from flexgw.upstream.poolbase import PoolBase, connect_upstream

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from flexgw.upstream.interfaces import ConnectionWaiter

_log = Logger(namespace="flexgw.upstream.h2")

_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_STREAM_WINDOW = 256 * 1024  # response bytes an upstream may send per stream before we acknowledge
_CONNECTION_WINDOW = 16 * 1024 * 1024
#: Our SETTINGS to every upstream (the upstream's responses are checked by the codec). No HPACK
#: dynamic table for responses: an upstream's response heads then repeat byte for byte, and the
#: codec's decoder answers them from its cache (flexgw.compat.hpackcache) instead of replaying
#: insertions. An upstream's head of a few fields costs a few dozen bytes more on the wire
#: (callgrind, nginx h2c upstream: 455.8k -> 417.0k instructions per proxied request).
_SETTINGS = {
    h2settings.HEADER_TABLE_SIZE: 0,
    h2settings.ENABLE_PUSH: 0,
    h2settings.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
    h2settings.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEAD,
}


@implementer(IPushProducer)
class _ResponseGate:
    """A stream's `gate`: the exchange registers it as the downstream's producer; while paused,
    received response data is not acknowledged, which stops the upstream's sending."""

    def __init__(self, stream: H2UpstreamStream) -> None:
        self.stream = stream
        self.paused = False

    @property
    def reasons(self) -> int:
        """Non-zero while paused (the exchange's cleanup reads it as a ReadGate's)."""
        return 1 if self.paused else 0

    def pauseProducing(self) -> None:
        """The downstream cannot take more now."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The downstream drained: acknowledge what was withheld."""
        if self.paused:
            self.paused = False
            self.stream.acknowledge()

    def stopProducing(self) -> None:
        """The downstream went away; the exchange cleans up."""


class H2UpstreamStream:
    """One request on an HTTP/2 upstream connection, presented as an UpstreamConnection that
    takes its request as fields (`http2`): `send_head`, body bytes by `write`, `end_request`."""

    __slots__ = (
        "connection", "done", "end_sent", "ended", "gate", "got_bytes", "grpc", "head_only",
        "pool", "producer", "producer_paused", "queue", "request_ended", "reusable", "sink",
        "status", "stream_id", "trailers", "trailers_only", "unacked",
    )

    #: The exchange gives this connection its request as HTTP/2 fields and body bytes, never as
    #: an HTTP/1.1 head (flexgw.ingress.h2request).
    http2 = True

    def __init__(self, connection: H2UpstreamConnection) -> None:
        self.connection = connection
        self.pool = connection.pool
        self.sink: Any = None
        self.gate = _ResponseGate(self)
        self.reusable = True  # the exchange clears it when it gives up on the request midway
        self.stream_id = 0
        self.head_only = False
        self.queue: deque[bytes] = deque()  # request body waiting for the upstream's window
        self.trailers: HeaderList | None = None  # request trailers, sent after the body
        self.request_ended = False  # the request message is complete (END_STREAM due)
        self.end_sent = False
        self.producer: Any = None
        self.producer_paused = False
        self.got_bytes = False
        self.status = 0
        self.ended = False  # the response ended (END_STREAM received)
        self.trailers_only = False  # a gRPC answer whose head carried grpc-status (no body may follow)
        self.grpc = False  # the request is a gRPC one (its exchange's head says so)
        self.unacked = 0
        self.done = False  # released, reset or lost

    @property
    def transport(self) -> H2UpstreamStream:
        """The exchange writes the request body here (and registers its reader as producer)."""
        return self

    # -- as an UpstreamConnection ----------------------------------------------------------------

    def begin(self, sink: Any, head_only: bool) -> None:
        """Start serving an exchange."""
        self.sink = sink
        self.head_only = head_only
        # (a side call's sink may have no request head: not checked as a gRPC exchange then)
        self.grpc = bool(getattr(getattr(sink, "head", None), "grpc", b""))

    def finish(self) -> None:
        """The exchange is done with the stream: reset it if the request was cut short."""
        self.sink = None
        if not self.done and not (self.ended and self.end_sent):
            self.reset(CANCEL)
        self.pool.release(self)

    def abort(self) -> None:
        """The exchange failed midway: reset the stream (the connection serves on)."""
        self.sink = None
        self.reusable = False
        self.reset(CANCEL)

    def reset(self, code: int) -> None:
        """Reset the stream and forget it."""
        if self.done:
            return
        self.done = True
        connection = self.connection
        if self.stream_id:
            connection.conn.reset_stream(self.stream_id, code)
            connection.flush()
        connection.forget(self)

    # -- the request, from the exchange ----------------------------------------------------------

    def send_head(
        self, method: bytes, authority: bytes, path: bytes, fields: HeaderList, end_stream: bool
    ) -> None:
        """The request head: HEADERS on a new stream. `fields` are lower-case, without
        pseudo-headers or connection-specific fields (credentials as never-indexed tuples);
        `end_stream` when no body follows."""
        if self.done:
            return
        connection = self.connection
        conn = connection.conn
        if connection.reserved:
            connection.reserved -= 1
        stream_id = self.stream_id = conn.next_stream_id
        connection.streams[stream_id] = self
        conn.send_headers(
            stream_id,
            [
                (b":method", method),
                (b":scheme", connection.scheme),
                (b":authority", authority),
                (b":path", path),
                *fields,
            ],
            end_stream,
        )
        if end_stream:
            self.end_sent = self.request_ended = True
        batch.flush_soon(connection)

    def write(self, data: bytes) -> None:
        """Request body bytes: DATA frames as the upstream's windows allow."""
        if self.done or self.request_ended:
            return
        self.queue.append(data)
        self.pump()
        batch.flush_soon(self.connection)

    def end_request(self, trailers: HeaderList | None = None) -> None:
        """The request is complete: END_STREAM once its body is out (on a closing HEADERS
        frame with `trailers`, lower-case fields, when there are some)."""
        if self.done or self.request_ended:
            return
        self.request_ended = True
        self.trailers = trailers or None
        self.pump()
        batch.flush_soon(self.connection)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The downstream request body's reader, paused while body bytes wait for a window."""
        self.producer = producer
        self.producer_paused = False
        self._update_producer()

    def unregisterProducer(self) -> None:
        """The request body is complete."""
        self.producer = None
        self.producer_paused = False

    def _update_producer(self) -> None:
        producer = self.producer
        if producer is None:
            return
        paused = bool(self.queue)
        if paused != self.producer_paused:
            self.producer_paused = paused
            if paused:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    def pump(self) -> None:
        """Send queued body bytes as the windows allow; END_STREAM after the last."""
        if self.done or self.end_sent or not self.stream_id:
            return
        conn = self.connection.conn
        queue = self.queue
        try:
            _, self.end_sent = send_queued(
                conn, self.stream_id, queue, self.request_ended, self.trailers
            )
        except StreamClosedError:
            return  # the upstream reset the stream; the codec reports it (h2_reset)
        if queue:
            self.connection.blocked.add(self)
        else:
            self.connection.blocked.discard(self)
        self._update_producer()

    # -- response flow control -------------------------------------------------------------------

    def received(self, size: int) -> None:
        """Response bytes arrived: acknowledge now unless the downstream pushes back."""
        self.unacked += size
        if not self.gate.paused:
            self.acknowledge()

    def acknowledge(self) -> None:
        """Hand the upstream back the window of what the downstream took."""
        size = self.unacked
        if size and not self.done:
            self.unacked = 0
            self.connection.conn.acknowledge(self.stream_id, size)
            batch.flush_soon(self.connection)


class H2UpstreamConnection(Protocol):
    """One HTTP/2 connection to an upstream (prior knowledge), owned by an H2UpstreamPool."""

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.scheme = b"https" if pool.upstream.tls is not None else b"http"
        self.conn = H2Codec(
            self,
            client=True,
            local_settings=_SETTINGS,
            max_header_list=MAX_RESPONSE_HEAD,
            header_block_limit=MAX_RESPONSE_HEAD,
        )
        # An upstream that keeps its 4096-byte table in spite of our SETTINGS (it must shrink
        # it to 0, RFC 7541 §4.2; nginx, grpcio, Go and nghttp2 do) is still understood.
        self.conn.min_decoder_table = 4096
        self.touched: dict[int, H2UpstreamStream] = {}  # streams with response bytes in this read
        self.ended: list[H2UpstreamStream] = []  # streams whose response ended in this read
        self.flush_queued = False  # (flexgw.http.h2.batch)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0  # streams handed out whose HEADERS are not sent yet
        self.blocked: set[H2UpstreamStream] = set()
        self.connected_ok = False
        self.usable = True  # no GOAWAY received, not closing
        self.lost = False
        self.settings_timer: Any = None
        self.idle_since = 0.0
        self.first_bytes = b""  # the upstream's first bytes, until its SETTINGS is seen

    def connectionMade(self) -> None:
        """Send the preface and SETTINGS; streams are handed out once the upstream's SETTINGS
        arrive (its SETTINGS_MAX_CONCURRENT_STREAMS known), within the connect timeout."""
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        conn = self.conn
        conn.initiate()
        conn.increase_window(_CONNECTION_WINDOW - 65535)
        self.flush()
        pool = self.pool
        self.idle_since = pool.clock.seconds()
        self.settings_timer = pool.clock.callLater(pool.connect_timeout, self._no_settings)

    def _settings_received(self) -> None:
        """The upstream's first SETTINGS: the connection is ready for streams."""
        timer, self.settings_timer = self.settings_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.connected_ok = True
        self.pool.connection_made(self)

    def _no_settings(self) -> None:
        """No SETTINGS from the upstream in time: not an HTTP/2 server (the attempt fails)."""
        self.settings_timer = None
        _log.warn(
            "HTTP/2 upstream {upstream} sent no SETTINGS within the connect timeout",
            upstream=self.pool.upstream.key,
        )
        self.transport.abortConnection()

    def _preface_seen(self, data: bytes) -> bool:
        """Before the upstream's SETTINGS: its first frame must be SETTINGS (RFC 9113 §3.4), or
        this is not an HTTP/2 server (h2 itself would wait for whatever length the first bytes
        announce): abort then, so the attempt fails at once. True: feed `data` on."""
        head = self.first_bytes = self.first_bytes + data[:9]
        if len(head) < 9:
            return True
        length = int.from_bytes(head[:3], "big")
        if head[3] == 0x4 and not head[4] & ~0x1 and head[5:9] == b"\0\0\0\0" and length % 6 == 0:
            return True
        _log.info("Upstream {upstream} is not an HTTP/2 server (no SETTINGS first)",
                  upstream=self.pool.upstream.key)
        self.usable = False
        self.transport.abortConnection()
        return False

    def capacity(self) -> int:
        """How many more streams the upstream accepts now."""
        limit = self.conn.remote_max_streams
        return limit - len(self.streams) - self.reserved

    def new_stream(self) -> H2UpstreamStream:
        """A stream for one exchange (its id is taken when its HEADERS go out)."""
        self.reserved += 1
        stream = H2UpstreamStream(self)
        return stream

    def flush(self) -> None:
        """Write what the codec has queued."""
        if self.transport is None:
            return
        data = self.conn.data_to_send()
        if data:
            send_now(self.transport, data)

    def forget(self, stream: H2UpstreamStream) -> None:
        """A stream is finished (ended, reset or abandoned)."""
        if stream.stream_id:
            self.streams.pop(stream.stream_id, None)
        self.blocked.discard(stream)
        if not self.streams:
            self.idle_since = self.pool.clock.seconds()
            if not self.usable and not self.lost and self.transport is not None:
                self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """Feed the codec (which calls the h2_* methods below); then flush each stream's
        response to its exchange and end the completed ones."""
        if not self.connected_ok and not self._preface_seen(data):
            return
        batch.begin()
        try:
            self._read(data)
        finally:
            batch.end()

    def _read(self, data: bytes) -> None:
        touched: dict[int, H2UpstreamStream] = {}
        ended: list[H2UpstreamStream] = []
        self.touched = touched
        self.ended = ended
        conn = self.conn
        conn.receive(data)
        if conn.closed:
            _log.info(
                "HTTP/2 protocol error from upstream {upstream}: {error}",
                upstream=self.pool.upstream.key, error=conn.error,
            )
            self.usable = False
            self.flush()  # the codec's GOAWAY with the error's code
            # The upstream broke the protocol (an oversize frame, a header block that does not
            # decode, a window overflow...): every exchange on the connection fails as for a
            # malformed response (502 `upstream_bad_response`, or the client's stream reset once
            # its head went out), not as a reset an idempotent request could be retried after.
            message = conn.error[1] if conn.error else ""
            for stream in list(self.streams.values()):
                sink = stream.sink
                stream.sink = None
                if sink is not None:
                    sink.response_malformed(f"HTTP/2 protocol error: {message}")
            self.transport.abortConnection()
            return
        if self.lost:
            return
        self.flush()
        for stream in touched.values():
            sink = stream.sink
            if sink is not None and not stream.ended:
                # (an ended stream's response_complete flushes: a head that ends the stream,
                # a trailers-only gRPC answer say, goes out as one HEADERS with END_STREAM)
                sink.flush_response()
        for stream in ended:
            sink = stream.sink
            if sink is not None and not stream.done:
                if not stream.end_sent:
                    # The upstream answered before reading the whole request.
                    stream.reusable = False
                sink.response_complete()
        if not self.usable and not self.streams and not self.lost:
            self.transport.loseConnection()

    # -- what the codec calls (flexgw.http.h2.connection) ---------------------------------------

    def h2_headers(self, stream_id: int, headers: list, end_stream: bool) -> None:
        """A response head (informational ones relayed as such)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.sink is None:
            return
        conn = self.conn
        status = conn.status
        fields = headers[1:]  # (the codec checked that :status comes first, and alone)
        if status < 200:
            stream.sink.response_interim(status, fields)
            return
        stream.got_bytes = True
        if conn.length < 0 and not (stream.head_only or status in (204, 304)):
            # The body ends with the stream, not with the connection: chunked, to the exchange.
            fields.append((b"transfer-encoding", b"chunked"))
        stream.status = status
        stream.sink.response_head(status, _REASONS.get(status, b"Status"), fields, True)
        self.touched[stream_id] = stream
        if end_stream:
            stream.ended = True
            self.ended.append(stream)
        elif stream.grpc and any(n == b"grpc-status" for n, _ in fields):
            stream.trailers_only = True

    def h2_trailers(self, stream_id: int, headers: list) -> None:
        """The response's trailer fields (its end)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.sink is None:
            return
        stream.sink.response_trailers(list(headers))
        self.touched[stream_id] = stream
        stream.ended = True
        self.ended.append(stream)

    def h2_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        """Response body bytes (and maybe the end)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.sink is None:
            if flow:
                self.conn.acknowledge(stream_id, flow)
            return
        stream.got_bytes = True
        if stream.trailers_only and data:
            self.touched.pop(stream_id, None)
            self._malformed(stream, "a trailers-only gRPC answer followed by a body")
            return
        if data:
            stream.sink.response_body(data)
            self.touched[stream_id] = stream
        if flow:
            stream.received(flow)
        if end_stream:
            stream.ended = True
            self.ended.append(stream)

    def h2_reset(self, stream_id: int, code: int, remote: bool) -> None:
        """The upstream reset a stream; or the codec did, for the upstream's stream error (a
        malformed response head or trailers, DATA after the end...): the exchange fails as for
        a malformed response, and the connection's other streams go on."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended:
            # The response has ended: it is whole (a stray frame after it; or the upstream's
            # RST_STREAM after END_STREAM, done with a request it did not read: RFC 9113 §8.1).
            return
        self.touched.pop(stream_id, None)
        if stream in self.ended:
            self.ended.remove(stream)
        if not remote:
            self._malformed(stream, f"malformed HTTP/2 response: {self.conn.reason}")
            return
        # Only a refused stream was certainly not processed: the exchange may retry.
        self._lost(stream, retry=code == REFUSED_STREAM)

    def h2_window(self, stream_id: int) -> None:
        """A window opened: send the request bodies waiting for it."""
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.pump()
            return
        for blocked in list(self.blocked):
            blocked.pump()

    def h2_settings(self) -> None:
        """The upstream's SETTINGS: the first makes the connection ready."""
        if not self.connected_ok:
            self.flush()  # our SETTINGS ACK goes before the first request
            self._settings_received()
        for blocked in list(self.blocked):
            blocked.pump()

    def h2_goaway(self, last_stream_id: int, code: int) -> None:
        """The upstream goes away (streams up to its last id still finish)."""
        self._goaway(last_stream_id)

    def h2_control(self) -> None:
        """Control frames from an upstream are not limited."""

    def _malformed(self, stream: H2UpstreamStream, message: str) -> None:
        """A stream error in the upstream's response: the upstream stream is reset
        (PROTOCOL_ERROR) and the exchange fails as for a malformed response (502
        `upstream_bad_response` before its head went out, the client's stream reset after);
        the connection's other streams go on."""
        _log.info(
            "Malformed response from HTTP/2 upstream {upstream}: {message}",
            upstream=self.pool.upstream.key, message=message,
        )
        sink = stream.sink
        stream.sink = None
        stream.reset(PROTOCOL_ERROR)
        if sink is not None:
            sink.response_malformed(message)

    def _goaway(self, last_stream_id: int) -> None:
        """The upstream is going away: no new streams; those above `last_stream_id` were never
        processed (their exchanges may retry them); the others finish."""
        self.usable = False
        for stream in [s for i, s in self.streams.items() if i > last_stream_id]:
            self._lost(stream, retry=True)
        if not self.streams and not self.reserved and not self.lost:
            self.transport.loseConnection()

    def _lost(self, stream: H2UpstreamStream, retry: bool) -> None:
        """The upstream reset the stream (or refused it); with `retry` it never processed it."""
        sink = stream.sink
        stream.sink = None
        stream.done = True
        self.forget(stream)
        if sink is not None:
            # Reported as "response bytes seen" when the upstream may have acted on the request,
            # which rules out the exchange's retry.
            sink.upstream_lost(stream.got_bytes or not retry)

    def connectionLost(self, reason: Failure = None) -> None:
        """Every stream still open is lost; leave the pool."""
        timer, self.settings_timer = self.settings_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.lost = True
        self.usable = False
        self.pool.connection_lost(self, reason)
        streams, self.streams = self.streams, {}
        self.blocked.clear()
        for stream in streams.values():
            sink = stream.sink
            stream.sink = None
            stream.done = True
            if sink is not None:
                sink.upstream_lost(stream.got_bytes)


@implementer(IHandshakeListener)
class TLSH2UpstreamConnection(H2UpstreamConnection):
    """An HTTP/2 upstream connection over TLS: its streams are handed out once the handshake
    (certificate and host name checked) completed with ALPN `h2`; anything else is a 502
    `upstream_tls` for the exchanges waiting on it."""

    tls_failed = False

    def connectionMade(self) -> None:
        """TCP is up; TLS is not yet: wait for the handshake."""
        self.tls_failed = True  # until the handshake completes

    def handshakeCompleted(self) -> None:
        """TLS is up: HTTP/2 if ALPN chose it."""
        protocol = getattr(self.transport, "negotiatedProtocol", None)
        if protocol != b"h2":
            self.alpn_refused = protocol
            self.transport.abortConnection()
            return
        self.tls_failed = False
        super().connectionMade()


class _Connect(ClientFactory):
    """One connection attempt for an H2UpstreamPool."""

    noisy = False

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.waiters: list[ConnectionWaiter] = []
        self.connection: H2UpstreamConnection | None = None
        self.connector: Any = None

    def buildProtocol(self, addr: object) -> H2UpstreamConnection:
        """The connection; the pool hands out its streams once connected (over TLS: once the
        handshake completed with ALPN h2)."""
        kind = TLSH2UpstreamConnection if self.pool.upstream.tls is not None else H2UpstreamConnection
        connection = self.connection = kind(self.pool)
        connection.connect_attempt = self  # type: ignore[attr-defined]
        return connection

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        """Connect refused, unreachable or timed out: every waiter fails."""
        self.pool.attempt_failed(self, reason)


class H2UpstreamPool(PoolBase):
    """The HTTP/2 connections to one upstream: streams multiplexed, connections opened as the
    upstream's SETTINGS_MAX_CONCURRENT_STREAMS fill up."""

    #: Streams assumed available on a connection still connecting (before its SETTINGS).
    ASSUMED_STREAMS = 100

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        upstream: Upstream,
        http: HttpSettings,
        timeouts: Timeouts,
    ) -> None:
        super().__init__(reactor, clock, upstream, http, timeouts)
        # Over TLS: the creator whose ALPN offers h2 (an h2:// Service's; an https:// Service's
        # `h2_creator` under an AlpnUpstreamPool, which sets `on_http1`: the waiters of a
        # connection whose upstream picked HTTP/1.1 instead go to it, not to a 502).
        self.tls_creator = upstream.tls.creator if upstream.tls is not None else None
        self.on_http1: Any = None
        self.connections: list[H2UpstreamConnection] = []
        self.attempts: list[_Connect] = []
        self.active = 0
        self.connecting = 0

    @property
    def idle(self) -> list[H2UpstreamConnection]:
        """Connections with no stream open."""
        return [c for c in self.connections if not c.streams and not c.reserved]

    def acquire(self, waiter: ConnectionWaiter, fresh: bool = False) -> None:
        """Give `waiter` a stream on a connection with room, or on a connection being made."""
        if not fresh:
            for connection in reversed(self.connections):
                if connection.usable and connection.capacity() > 0:
                    self.active += 1
                    waiter.upstream_ready(connection.new_stream(), True)  # type: ignore[arg-type]
                    return
            for attempt in self.attempts:
                if len(attempt.waiters) < self.ASSUMED_STREAMS:
                    attempt.waiters.append(waiter)
                    return
        attempt = _Connect(self)
        attempt.waiters.append(waiter)
        self.attempts.append(attempt)
        self.connecting += 1
        factory: Any = attempt
        tls = self.upstream.tls
        if tls is not None:
            from flexgw.tls.contexts import QuietTLSFactory

            factory = QuietTLSFactory(self.tls_creator, True, attempt)
        # Through Configuration.spec.forwardProxy's CONNECT tunnel when there is one.
        attempt.connector = connect_upstream(
            self.reactor, self.clock, self.upstream, factory, self.connect_timeout
        )

    def cancel(self, waiter: ConnectionWaiter) -> None:
        """`waiter` gave up before its stream was handed over; an attempt nobody waits for any
        more is given up (its connection, should it complete anyway, is closed)."""
        for attempt in self.attempts:
            if waiter in attempt.waiters:
                attempt.waiters.remove(waiter)
                if not attempt.waiters:
                    self._end_attempt(attempt)
                    if attempt.connection is not None and attempt.connection.transport is not None:
                        attempt.connection.transport.abortConnection()
                    elif attempt.connector is not None:
                        attempt.connector.disconnect()
                return

    def connection_made(self, connection: H2UpstreamConnection) -> None:
        """Connected (the upstream's SETTINGS known): streams for those waiting on this attempt,
        as many as the upstream accepts; the others ask again (another connection, say)."""
        attempt = connection.connect_attempt  # type: ignore[attr-defined]
        if attempt not in self.attempts:
            # Given up (every waiter cancelled) while the upstream's SETTINGS were on their way.
            self._close(connection)
            return
        self._end_attempt(attempt)
        self.connections.append(connection)
        waiters, attempt.waiters = attempt.waiters, []
        room = connection.capacity()
        for waiter in waiters[:room]:
            self.active += 1
            waiter.upstream_ready(connection.new_stream(), False)  # type: ignore[arg-type]
        for waiter in waiters[room:]:
            self.acquire(waiter)

    def attempt_failed(self, attempt: _Connect, reason: Failure) -> None:
        """A connection attempt failed: every waiter on it fails."""
        self._end_attempt(attempt)
        waiters, attempt.waiters = attempt.waiters, []
        for waiter in waiters:
            waiter.upstream_connect_failed(reason)

    def _end_attempt(self, attempt: _Connect) -> None:
        if attempt in self.attempts:
            self.attempts.remove(attempt)
            self.connecting -= 1

    def release(self, stream: Any) -> None:
        """An exchange is done with a stream (or never used it)."""
        self.active -= 1
        connection = stream.connection
        if not stream.stream_id and connection.reserved:
            connection.reserved -= 1
        if not stream.stream_id:
            stream.done = True
            connection.forget(stream)
            return
        if not stream.done:
            stream.done = True
            connection.forget(stream)
        if not self.max_idle and not connection.streams and not connection.reserved:
            connection.usable = False
            if connection.transport is not None:
                connection.transport.loseConnection()

    def discard(self, stream: Any) -> None:
        """An exchange abandons a stream midway: reset it (the connection serves on)."""
        self.active -= 1
        connection = stream.connection
        if not stream.stream_id and connection.reserved:
            connection.reserved -= 1
        stream.abort()

    def detach(self, stream: Any) -> None:
        """A stream leaves the pool's account: it was lost under its exchange."""
        self.active -= 1

    def connection_lost(
        self, connection: H2UpstreamConnection, reason: Failure | None = None
    ) -> None:
        """Forget a closed connection; one lost before it was handed out fails its attempt."""
        attempt = getattr(connection, "connect_attempt", None)
        if not connection.connected_ok and attempt is not None and attempt in self.attempts:
            if getattr(connection, "tls_failed", False):
                refused = getattr(connection, "alpn_refused", False)
                if refused in (None, b"http/1.1") and self.on_http1 is not None:
                    # The upstream picked HTTP/1.1 (or no ALPN): its waiters go to HTTP/1.1.
                    self._end_attempt(attempt)
                    waiters, attempt.waiters = attempt.waiters, []
                    self.on_http1(waiters)
                    if connection in self.connections:
                        self.connections.remove(connection)
                    return
                cause: Any = (
                    f"ALPN chose {refused!r}, not h2" if refused is not False
                    else (reason.value if reason is not None else None)
                )
                _log.warn(
                    "TLS handshake with HTTP/2 upstream {upstream} ({host}:{port}) failed: {cause!r}",
                    upstream=self.upstream.key,
                    host=self.upstream.host,
                    port=self.upstream.port,
                    cause=cause,
                )
                failure = Failure(UpstreamTLSError(cause))
            else:
                failure = Failure(ConnectionError("connection lost at connect"))
            self.attempt_failed(attempt, failure)
        if connection in self.connections:
            self.connections.remove(connection)

    def expire_idle(self) -> None:
        """Close connections without streams for longer than the upstream idle timeout."""
        limit = self.clock.seconds() - self.idle_timeout
        for connection in list(self.connections):
            if not connection.streams and not connection.reserved and connection.idle_since <= limit:
                self._close(connection)

    def _close(self, connection: H2UpstreamConnection) -> None:
        connection.usable = False
        if connection in self.connections:
            self.connections.remove(connection)
        connection.conn.close(NO_ERROR)
        connection.flush()
        if connection.transport is not None:
            connection.transport.loseConnection()

    def retire(self) -> None:
        """The upstream left the configuration: close idle connections now, busy ones when done."""
        self.max_idle = 0
        self.close_all()

    def abort_all(self) -> Deferred[None]:
        """Abort every connection and connection attempt now (the streams on them fail): the
        pool's owner stops. Fires once they are closed (the aborts complete in a reactor turn)."""
        from twisted.internet.task import deferLater

        self.max_idle = 0
        for attempt in list(self.attempts):  # their waiters fail as for any lost attempt
            if attempt.connection is not None and attempt.connection.transport is not None:
                attempt.connection.transport.abortConnection()
            elif attempt.connector is not None:
                attempt.connector.disconnect()
        for connection in list(self.connections):
            connection.usable = False
            if connection.transport is not None:
                connection.transport.abortConnection()
        return deferLater(self.reactor, 0, lambda: None)

    def close_all(self) -> None:
        """Close connections without streams; the others close once their streams finish."""
        for connection in list(self.connections):
            if not connection.streams and not connection.reserved:
                self._close(connection)
            else:
                connection.usable = False
