"""HTTP/2 peers for tests, built on the `h2` library: a recording h2c upstream and an h2c client.

They use `h2` (python-hyper's HTTP/2 state machine, a test dependency only) rather than
flexgw's own codec (flexgw.http.h2), which they judge: a peer built on the codec under test
would agree with its mistakes. (flexgw.testing.h2raw's raw-frame peers judge it frame by frame.)

`H2cUpstreamConnection` is what `RecordingUpstream(h2c=True)` builds per connection: every stream
is recorded as a `RecordedRequest` (headers exactly as received, pseudo-headers included; version
"2") and answered through the same `Responder` hooks as HTTP/1.1, by an `H2cExchange` that adds
`send_trailers` and `reset`. `H2Client` is a client connection whose flow control a test can
hold (`auto_ack=False`, then `ack`), that can reset streams, send PINGs or raw frames, and
records GOAWAY (read ahead of `h2`, which ends a connection at a GOAWAY: `GoAwayFilter`).
`RawH2Client` writes raw bytes and keeps the frames it receives: with
`made_you_reset`, the raw bytes of the 2025 "MadeYouReset" attack, it is that attack's client.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import hpack
from h2 import events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from flexgw.testing.recording import Exchange, RecordedRequest, _no_body_status

if TYPE_CHECKING:
    from flexgw.testing.upstream import RecordingUpstream

Headers = list[tuple[bytes, bytes]]

_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def _h2_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Lower-case names, connection-specific fields dropped."""
    return [(n.lower(), v) for n, v in headers if n.lower() not in _CONNECTION_SPECIFIC]


# --------------------------------------------------------------------------- upstream


class H2cExchange(Exchange):
    """The response side of one HTTP/2 stream of the recording upstream."""

    def __init__(self, connection: Any, request: RecordedRequest, stream_id: int) -> None:
        """Bind the exchange to its stream."""
        super().__init__(connection, request)
        self.stream_id = stream_id
        self.queue: deque[bytes] = deque()
        self.trailers: Headers | None = None
        self.request_trailers: Headers = []
        self.ending = False
        self.ended = False
        self.reset_code: int | None = None  # set when the peer reset the stream

    @property
    def blocked(self) -> bool:
        """Body bytes are waiting for the stream's window."""
        return bool(self.queue)

    def send_interim(self, status: int = 100, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """An informational (1xx) HEADERS frame."""
        self.connection.send_headers(self.stream_id, [(b":status", b"%d" % status), *_h2_headers(headers)])

    def send_head(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
        reason: bytes | None = None,
    ) -> None:
        """The response HEADERS (reason phrases do not exist in HTTP/2)."""
        self.status = status
        self.head_sent = True
        self.body_allowed = not (self.request.method == b"HEAD" or _no_body_status(status))
        self.connection.send_headers(
            self.stream_id, [(b":status", b"%d" % status), *_h2_headers(headers)]
        )

    def write(self, data: bytes) -> None:
        """A piece of body, sent as the windows allow."""
        if not data or not self.body_allowed or self.ended:
            return
        self.queue.append(data)
        self.pump()

    def send_trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """End the response with trailer fields."""
        self.trailers = _h2_headers(headers)
        self.finish()

    def finish(self) -> None:
        """End the stream once the queued body is sent."""
        if self.finished:
            return
        self.finished = True
        self.ending = True
        self.pump()

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """Reset the stream."""
        self.ended = True
        self.queue.clear()
        self.connection.reset_stream(self.stream_id, code)
        self.connection.exchanges.pop(self.stream_id, None)

    def pump(self) -> None:
        """Send what the windows allow; END_STREAM (or trailers) after the last byte."""
        if self.ended or self.reset_code is not None:
            return
        conn = self.connection.conn
        try:
            while self.queue:
                window = min(
                    conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                data = self.queue.popleft()
                if len(data) > window:
                    self.queue.appendleft(data[window:])
                    data = data[:window]
                conn.send_data(self.stream_id, data)
            if self.ending and not self.queue:
                self.ended = True
                if self.trailers is not None:
                    conn.send_headers(self.stream_id, self.trailers, end_stream=True)
                else:
                    conn.end_stream(self.stream_id)
        except H2Error:
            self.ended = True
        self.connection.flush()
        if self.ended and self.request.complete:
            self.connection.exchanges.pop(self.stream_id, None)  # done: no more pumping


class H2cUpstreamConnection(protocol.Protocol):
    """One HTTP/2 (prior knowledge) connection accepted by a RecordingUpstream."""

    transport: Any

    def __init__(self, factory: RecordingUpstream, conn_id: int) -> None:
        """Set up the h2 server state."""
        self.factory = factory
        self.id = conn_id
        self.requests: list[RecordedRequest] = []
        self.exchanges: dict[int, H2cExchange] = {}
        self.bytes_received = 0
        self.connected = False
        self.write_paused = False
        self.tunnel = False
        self.parse_error: Exception | None = None
        self.close_reason: Failure | None = None
        self.on_lost: list[Any] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.goaway_received = False
        self.trailers_received: list[Headers] = []  # request trailers, in arrival order
        self._streamers: list[Any] = []
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))

    @property
    def raw(self) -> bytes:
        """Raw bytes are not kept for HTTP/2 connections."""
        return b""

    def connectionMade(self) -> None:
        """Register for write backpressure (SETTINGS go out when the client's preface arrives:
        over TLS nothing may be written before the handshake)."""
        self.connected = True
        self.transport.registerProducer(self, True)
        self.factory._connection_made(self)  # type: ignore[arg-type]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Record the close and fire waiters."""
        self.connected = False
        self.close_reason = reason
        for fn in self.on_lost:
            fn()
        for streamer in list(self._streamers):
            streamer.pump()
        self.factory._connection_lost(self)  # type: ignore[arg-type]
        self.lost.callback(None)

    def pauseProducing(self) -> None:
        """The write buffer is full."""
        self.write_paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The write buffer drained."""
        self.write_paused = False
        self.transport.resumeProducing()
        self._pump_all()

    def stopProducing(self) -> None:
        """connectionLost follows."""

    def close(self) -> None:
        """GOAWAY, then close after pending writes."""
        if self.connected:
            try:
                self.conn.close_connection()
            except H2Error:
                pass
            self.flush()
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        """Abort (RST) the connection."""
        if self.connected:
            self.transport.abortConnection()

    def flush(self) -> None:
        """Write what h2 has queued."""
        data = self.conn.data_to_send()
        if data and self.connected:
            self.transport.write(data)

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """HEADERS on a stream (ignored once the stream is gone)."""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except H2Error:
            return
        self.flush()

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM."""
        try:
            self.conn.reset_stream(stream_id, code)
        except H2Error:
            return
        self.flush()

    def _pump_all(self) -> None:
        for ex in list(self.exchanges.values()):
            ex.pump()
        for streamer in list(self._streamers):
            streamer.pump()

    def dataReceived(self, data: bytes) -> None:
        """Run h2; record and answer requests (waiters fire after the whole read)."""
        if not self.bytes_received:
            self.conn.initiate_connection()
        self.bytes_received += len(data)
        factory = self.factory
        factory._busy += 1
        try:
            try:
                received = self.conn.receive_data(data)
            except ProtocolError as exc:
                self.parse_error = exc
                factory.errors.append(exc)
                self.flush()
                self.transport.loseConnection()
                return
            for event in received:
                self._event(event)
            self.flush()
        finally:
            factory._busy -= 1
            factory._flush()

    def _event(self, event: Any) -> None:
        kind = type(event)
        responder = self.factory.responder
        if kind is events.RequestReceived:
            headers = list(event.headers)
            fields = {n: v for n, v in headers if n[:1] == b":"}
            req = RecordedRequest(
                connection=self.id,
                index=len(self.requests),
                start=0,
                method=fields.get(b":method", b""),
                target=fields.get(b":path", b""),
                version="2",
                headers=headers,
            )
            if self.factory.retain_bodies:
                req._body_buf = bytearray()
            self.requests.append(req)
            ex = H2cExchange(self, req, event.stream_id)
            self.exchanges[event.stream_id] = ex
            self.factory._request_counter += 1
            responder.on_headers(ex)
            self.factory._request_head(req)
            if event.stream_ended is not None:
                self._complete(ex)
        elif kind is events.DataReceived:
            ex = self.exchanges.get(event.stream_id)
            if event.flow_controlled_length:
                try:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                except H2Error:
                    pass
            if ex is None:
                return
            req = ex.request
            req.body_length += len(event.data)
            req._digest.update(event.data)
            if req._body_buf is not None:
                req._body_buf += event.data
            responder.on_body(ex, event.data)
            if event.stream_ended is not None:
                self._complete(ex)
        elif kind is events.TrailersReceived:
            ex = self.exchanges.get(event.stream_id)
            if ex is not None:
                ex.request_trailers = list(event.headers)
                self.trailers_received.append(ex.request_trailers)
                if event.stream_ended is not None:
                    self._complete(ex)
        elif kind is events.StreamEnded:
            ex = self.exchanges.get(event.stream_id)
            if ex is not None and not ex.request.complete:
                self._complete(ex)
        elif kind is events.StreamReset:
            ex = self.exchanges.pop(event.stream_id, None)
            if ex is not None:
                ex.reset_code = event.error_code
                ex.ended = True
                responder.on_reset(ex, event.error_code)
        elif kind in (events.WindowUpdated, events.RemoteSettingsChanged):
            self._pump_all()
        elif kind is events.ConnectionTerminated:
            self.goaway_received = True

    def _complete(self, ex: H2cExchange) -> None:
        req = ex.request
        if req.complete:
            return
        req.complete = True
        if req._body_buf is not None:
            req.body = bytes(req._body_buf)
            req._body_buf = None
        self.factory.responder.on_complete(ex)
        self.factory._request_complete(req)
        if ex.ended:
            self.exchanges.pop(ex.stream_id, None)  # answered before the request ended


# --------------------------------------------------------------------------- client


@attrs.frozen
class GoAway:
    """A GOAWAY frame the client received."""

    last_stream_id: int
    error_code: int


@attrs.define(eq=False)
class H2Response:
    """What came back on one client stream."""

    stream_id: int
    status: int = 0
    headers: Headers = attrs.Factory(list)
    informational: list[Headers] = attrs.Factory(list)
    body: bytearray = attrs.Factory(bytearray)
    trailers: Headers | None = None
    reset_code: int | None = None  # the stream was reset (by the server, or the connection died)
    done: defer.Deferred[H2Response] = attrs.Factory(defer.Deferred)
    head: defer.Deferred[H2Response] = attrs.Factory(defer.Deferred)
    unacked: int = 0

    def header(self, name: bytes) -> list[bytes]:
        """All values of a response header."""
        return [v for n, v in self.headers if n == name]

    def _finish(self) -> None:
        if not self.head.called:
            self.head.callback(self)
        if not self.done.called:
            self.done.callback(self)


# --------------------------------------------------------------------------- GOAWAY


# GOAWAY frames taken out of an HTTP/2 byte stream before the `h2` library sees them: `h2`
# treats a received GOAWAY as the end of the connection (every later frame, the DATA of streams
# the peer promised to finish included, is a protocol error); a graceful shutdown (RFC 9113
# §6.8) needs those frames, so the test client reads GOAWAY itself.
_GOAWAY = 0x7
_MAX_GOAWAY = 16384  # a longer GOAWAY is passed to h2, which refuses it by the frame size rules


class GoAwayFilter:
    """Splits GOAWAY frames out of the frames received on one connection."""

    __slots__ = ("held", "remaining")

    def __init__(self) -> None:
        self.held = b""  # an incomplete frame header, or an incomplete GOAWAY frame
        self.remaining = 0  # bytes of the current (passed-through) frame still to come

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """The bytes for h2, and the GOAWAY frames found in `data`."""
        if self.held:
            data = self.held + data
            self.held = b""
        size = len(data)
        remaining = self.remaining
        if remaining >= size:
            self.remaining = remaining - size
            return data, []
        pos = remaining
        pieces: list[bytes] | None = None
        start = 0
        goaways: list[tuple[int, int]] = []
        while pos < size:
            if size - pos < 9:
                self.held = data[pos:]
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] == _GOAWAY and 8 <= length <= _MAX_GOAWAY:
                end = pos + 9 + length
                if end > size:
                    self.held = data[pos:]
                    break
                payload = data[pos + 9 : end]
                goaways.append(
                    (
                        int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                        int.from_bytes(payload[4:8], "big"),
                    )
                )
                if pieces is None:
                    pieces = []
                pieces.append(data[start:pos])
                start = pos = end
                continue
            pos += 9 + length
        if pos > size:
            self.remaining = pos - size
            cut = size
        else:
            self.remaining = 0
            cut = pos if not self.held else size - len(self.held)
        if pieces is None:
            return (data if cut == size else data[:cut]), goaways
        pieces.append(data[start:cut])
        return b"".join(pieces), goaways


class H2Client(protocol.Protocol):
    """A test HTTP/2 client connection (prior knowledge, or over TLS with ALPN h2)."""

    transport: Any

    def __init__(
        self, auto_ack: bool = True, initial_window: int | None = None, prefix: bytes = b""
    ) -> None:
        """With `auto_ack` False, received DATA is acknowledged only by `ack` (a slow reader);
        `prefix` is written before the connection preface (a PROXY protocol header, say)."""
        self.prefix = prefix
        self.auto_ack = auto_ack
        self.initial_window = initial_window
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.responses: dict[int, H2Response] = {}
        # GOAWAY is read before h2 (which would end the connection at once): GoAwayFilter.
        self.goaway_filter = GoAwayFilter()
        self.goaway: GoAway | None = None
        self.goaway_received: defer.Deferred[GoAway] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.connected = False
        self.pings_acked = 0
        self.errors: list[Exception] = []
        self._send_queues: dict[int, deque[bytes]] = {}
        self._ending: set[int] = set()
        self._trailers: dict[int, Headers] = {}

    def connectionMade(self) -> None:
        """Preface and SETTINGS."""
        self.connected = True
        if self.prefix:
            self.transport.write(self.prefix)
        self.conn.initiate_connection()
        if self.initial_window is not None:
            self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.initial_window})
        self.flush()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Every unfinished stream ends as reset."""
        self.connected = False
        for response in self.responses.values():
            if response.reset_code is None and not response.done.called:
                response.reset_code = -1
            response._finish()
        self.lost.callback(None)

    def flush(self) -> None:
        """Write what h2 has queued."""
        data = self.conn.data_to_send()
        if data and self.connected:
            self.transport.write(data)

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        end: bool = True,
        authority: bytes = b"example.test",
    ) -> H2Response:
        """Open a stream; send `body` (if any); end the request unless `end` is False."""
        stream_id = self.conn.get_next_available_stream_id()
        response = self.responses[stream_id] = H2Response(stream_id)
        fields = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
            *headers,
        ]
        self.conn.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.send(stream_id, body, end=end)
        self.flush()
        return response

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Body bytes for a stream, sent as the server's windows allow."""
        queue = self._send_queues.setdefault(stream_id, deque())
        if data:
            queue.append(data)
        if end:
            self._ending.add(stream_id)
        self._pump(stream_id)

    def send_trailers(self, stream_id: int, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        """End a request stream with trailer fields (after its queued body)."""
        self._trailers[stream_id] = list(trailers)
        self.send(stream_id, b"", end=True)

    def end(self, stream_id: int) -> None:
        """End a request stream."""
        self.send(stream_id, b"", end=True)

    def _pump(self, stream_id: int) -> None:
        queue = self._send_queues.get(stream_id)
        if queue is None:
            return
        conn = self.conn
        try:
            while queue:
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                data = queue.popleft()
                if len(data) > window:
                    queue.appendleft(data[window:])
                    data = data[:window]
                conn.send_data(stream_id, data)
            if not queue and stream_id in self._ending:
                self._ending.discard(stream_id)
                del self._send_queues[stream_id]
                trailers = self._trailers.pop(stream_id, None)
                if trailers is not None:
                    conn.send_headers(stream_id, trailers, end_stream=True)
                else:
                    conn.end_stream(stream_id)
        except H2Error as exc:
            self.errors.append(exc)
            self._send_queues.pop(stream_id, None)
        self.flush()

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM a stream."""
        self.conn.reset_stream(stream_id, code)
        self.flush()

    def ack(self, stream_id: int, size: int | None = None) -> None:
        """Acknowledge received DATA (all of it by default): opens the server's window."""
        response = self.responses[stream_id]
        size = response.unacked if size is None else size
        response.unacked -= size
        try:
            self.conn.acknowledge_received_data(size, stream_id)
        except H2Error:
            pass
        self.flush()

    def ping(self, count: int = 1) -> None:
        """Send PING frames."""
        for i in range(count):
            self.conn.ping(b"%08d" % (i % 10**8))
        self.flush()

    def write_raw(self, data: bytes) -> None:
        """Bytes straight to the socket (hand-made frames)."""
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        """Run h2 and record what arrives."""
        data, goaways = self.goaway_filter.feed(data)
        for last, code in goaways:
            self.goaway = GoAway(last, code)
            if not self.goaway_received.called:
                self.goaway_received.callback(self.goaway)
        try:
            received = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.errors.append(exc)
            self.transport.loseConnection()
            return
        for event in received:
            kind = type(event)
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if kind is events.ResponseReceived and response is not None:
                for name, value in event.headers:
                    if name == b":status":
                        response.status = int(value)
                    else:
                        response.headers.append((name, value))
                response.head.callback(response)
            elif kind is events.InformationalResponseReceived and response is not None:
                response.informational.append(list(event.headers))
            elif kind is events.DataReceived and response is not None:
                response.body += event.data
                if self.auto_ack:
                    if event.flow_controlled_length:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    response.unacked += event.flow_controlled_length
            elif kind is events.TrailersReceived and response is not None:
                response.trailers = list(event.headers)
            elif kind is events.StreamEnded and response is not None:
                response._finish()
            elif kind is events.StreamReset and response is not None:
                response.reset_code = event.error_code
                response._finish()
            elif kind is events.WindowUpdated:
                for stream_id in list(self._send_queues):
                    self._pump(stream_id)
            elif kind is events.PingAckReceived:
                self.pings_acked += 1
        self.flush()


async def connect(reactor: Any, host: str, port: int, **options: Any) -> H2Client:
    """An H2Client connected to host:port (prior knowledge)."""
    client = H2Client(**options)
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=5), client)
    return client


def made_you_reset(
    count: int, path: bytes = b"/", authority: bytes = b"example.test", first: int = 1
) -> bytes:
    """The "MadeYouReset" pattern for `count` streams from stream id `first` (odd): per stream,
    HEADERS (END_STREAM|END_HEADERS, `GET path`), then DATA (no flags, 1 byte) on the now
    half-closed stream, which the server has to reset.

    Encoded with a fresh HPACK encoder: send it (connection preface first) on a connection whose
    client has sent no header block yet.
    """
    encoder = hpack.Encoder()
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]
    out = []
    for stream_id in range(first, first + 2 * count, 2):
        out.append(
            HeadersFrame(stream_id, encoder.encode(fields), flags=["END_STREAM", "END_HEADERS"]).serialize()
        )
        out.append(DataFrame(stream_id, b"x").serialize())
    return b"".join(out)


def split_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of `data` (what a peer wrote, after the connection
    preface), and the incomplete rest."""
    frames = []
    pos = 0
    while len(data) - pos >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        if len(data) - pos - 9 < length:
            break
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames, data[pos:]


class RawH2Client(protocol.Protocol):
    """A client that speaks HTTP/2 as bytes only: the connection preface and SETTINGS, then
    whatever is written (`made_you_reset`, hand-made frames). It keeps every frame the
    server sends, in `frames`; a GOAWAY fires `goaway_received` with it (an h2 client would
    refuse the resets of streams it never opened). `lost` fires when the connection closes."""

    transport: Any

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.buffer = b""
        self.goaway_received: defer.Deferred[GoAwayFrame] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        """Preface and SETTINGS (h2's, as a client connection starts)."""
        conn = H2Connection(H2Configuration(client_side=True))
        conn.initiate_connection()
        self.transport.write(conn.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        """Keep the frames; report the first GOAWAY."""
        frames, self.buffer = split_frames(self.buffer + data)
        self.frames.extend(frames)
        for frame in frames:
            if isinstance(frame, GoAwayFrame) and not self.goaway_received.called:
                self.goaway_received.callback(frame)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """The server closed (or the test aborted) the connection."""
        self.lost.callback(None)

    def count(self, kind: type[Frame]) -> int:
        """How many frames of one type the server sent."""
        return sum(1 for frame in self.frames if isinstance(frame, kind))
