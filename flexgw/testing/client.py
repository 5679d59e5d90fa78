"""A raw-socket HTTP/1.1 client for integration tests: send exact bytes, parse responses with llhttp."""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

import attrs
import httptools
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.testing.recording import HeadersAndDigest, pattern_slice

Headers = list[tuple[bytes, bytes]]


class IncompleteResponse(Exception):
    """The connection closed before a response was complete; ``partial`` holds what arrived."""

    def __init__(self, partial: Response | None, reason: Failure | None) -> None:
        """Keep the partial response and the close reason."""
        super().__init__(partial, reason)
        self.partial = partial
        self.reason = reason


class BodyNotSent(Exception):
    """The connection closed before the whole body was sent; ``sent`` bytes went out."""

    def __init__(self, sent: int, reason: Failure | None) -> None:
        """Keep the count and the close reason."""
        super().__init__(sent, reason)
        self.sent = sent
        self.reason = reason


class ResponseParseError(Exception):
    """llhttp rejected the response bytes; ``raw`` holds the unparsed data."""

    def __init__(self, error: Exception, raw: bytes) -> None:
        """Keep the parser error and the bytes."""
        super().__init__(error, raw)
        self.error = error
        self.raw = raw


@attrs.define(eq=False)
class Response(HeadersAndDigest):
    """One parsed response: status, headers as sent (case, order, duplicates) and body."""

    status: int = 0
    reason: bytes = b""
    version: str = ""
    headers: Headers = attrs.Factory(list)
    body: bytes = b""
    body_length: int = 0
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bool = False
    close_delimited: bool = False
    interim: list[Response] = attrs.Factory(list)
    _digest: Any = attrs.field(factory=hashlib.sha256, repr=False)



@attrs.define
class _Read:
    head: bool
    deferred: defer.Deferred[Response]


@implementer(IHandshakeListener)
class RawConnection(protocol.Protocol):
    """A client connection that sends raw bytes and parses responses on demand.

    Bytes are parsed only while a :meth:`read_response` is pending, so each response
    is parsed knowing whether it answers a HEAD request. Over TLS, :meth:`wait_handshake`
    fires once the handshake completes (or fails with the reason the connection was lost).
    """

    transport: Any

    def __init__(self, retain_body: bool = True) -> None:
        """With ``retain_body`` False, bodies and raw bytes are counted and hashed, not kept."""
        self.retain_body = retain_body
        self._raw = bytearray()
        self.bytes_received = 0
        self.connected = False
        self.close_reason: Failure | None = None
        self.upgraded = False
        self.tunnel_data = bytearray()
        self._tunnel_waiters: list[tuple[int, defer.Deferred[bytes]]] = []
        self._closed: defer.Deferred[None] = defer.Deferred()
        self._made: defer.Deferred[RawConnection] = defer.Deferred()
        self._buf = bytearray()
        self._reads: deque[_Read] = deque()
        self._ready: deque[Response] = deque()
        self._fired: list[tuple[defer.Deferred[Response], Any]] = []
        self._pumping = False
        self._fed = b""
        self._close_waiters: list[defer.Deferred[None]] = []
        self._parser: Any = None
        self._cur: Response | None = None
        self._body_parts: list[bytes] = []
        self._headers_done = False
        self._message_done = False
        self._error: Exception | None = None
        self._write_paused = False
        self._sender: _BodySender | None = None
        self.handshake_done = False
        self._handshake_waiters: list[defer.Deferred[None]] = []

    # -- twisted
    def connectionMade(self) -> None:
        """Register for write backpressure and report the connection."""
        self.connected = True
        self.transport.registerProducer(self, True)
        self._made.callback(self)

    def handshakeCompleted(self) -> None:
        """The TLS handshake completed."""
        self.handshake_done = True
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.callback(None)

    def wait_handshake(self) -> defer.Deferred[None]:
        """Fires when the TLS handshake has completed; fails if the connection is lost first."""
        if self.handshake_done:
            return defer.succeed(None)
        if not self.connected and self.close_reason is not None:
            return defer.fail(self.close_reason)
        d: defer.Deferred[None] = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def dataReceived(self, data: bytes) -> None:
        """Keep the bytes and parse them if a read is pending."""
        self.bytes_received += len(data)
        if self.retain_body:
            self._raw += data
        if self.upgraded:
            self.tunnel_data += data
            self._tunnel_check()
            return
        self._buf += data
        self._pump()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Finish close-delimited bodies, fail pending reads, fire ``wait_closed``."""
        self.connected = False
        self.close_reason = reason
        if self._sender is not None:
            self._sender.pump()
        self._pump()
        self._closed.callback(None)
        self._tunnel_check()
        handshake_waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in handshake_waiters:
            d.errback(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def pauseProducing(self) -> None:
        """The send buffer is full: pause the body sender."""
        self._write_paused = True

    def resumeProducing(self) -> None:
        """The send buffer drained: continue the body sender."""
        self._write_paused = False
        if self._sender is not None:
            self._sender.pump()

    def stopProducing(self) -> None:
        """Nothing to do; connectionLost follows."""

    # -- public API
    @property
    def received_raw(self) -> bytes:
        """Every byte received so far (empty when bodies are not retained)."""
        return bytes(self._raw)

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self._closed.called

    def send(self, data: bytes) -> None:
        """Write bytes exactly as given."""
        self.transport.write(data)

    def send_body(self, size: int, chunked: bool = False, chunk_size: int = 65536) -> defer.Deferred[int]:
        """Send ``size`` pattern bytes (chunk-encoded if asked) with backpressure; fires with bytes sent."""
        if self._sender is not None:
            raise RuntimeError("a body is already being sent")
        self._sender = _BodySender(self, size, chunked, chunk_size)
        self._sender.pump()
        return self._sender.done

    def stop_body(self) -> None:
        """Stop a :meth:`send_body` in progress (e.g. once an early response arrived)."""
        if self._sender is not None:
            self._sender.stop()

    def read_response(self, head: bool = False) -> defer.Deferred[Response]:
        """The next response message (1xx included); ``head`` when it answers a HEAD request."""
        if self._ready:
            return defer.succeed(self._ready.popleft())
        d: defer.Deferred[Response] = defer.Deferred()
        self._reads.append(_Read(head, d))
        self._pump()
        return d

    @defer.inlineCallbacks
    def read_final_response(self, head: bool = False) -> Any:
        """The next final (non-1xx) response, with interim responses in ``.interim``."""
        interim: list[Response] = []
        while True:
            resp = yield self.read_response(head)
            if 100 <= resp.status < 200 and resp.status != 101:
                interim.append(resp)
                continue
            resp.interim = interim
            return resp

    def wait_tunnel_bytes(self, size: int) -> defer.Deferred[bytes]:
        """Fires with the tunnel bytes once at least ``size`` arrived after an upgrade (or with
        what there is when the connection closes first); the bytes are taken from ``tunnel_data``."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._tunnel_waiters.append((size, d))
        self._tunnel_check()
        return d

    def _tunnel_check(self) -> None:
        while self._tunnel_waiters:
            size, d = self._tunnel_waiters[0]
            if len(self.tunnel_data) < size and not self._closed.called:
                return
            self._tunnel_waiters.pop(0)
            data = bytes(self.tunnel_data[:size])
            del self.tunnel_data[:size]
            d.callback(data)

    def wait_closed(self) -> defer.Deferred[None]:
        """Fires when the connection has closed (by either side)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._closed.called:
            d.callback(None)
        else:
            self._close_waiters.append(d)
        return d

    def close(self) -> defer.Deferred[None]:
        """Close cleanly; fires when closed."""
        if self.connected:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
        return self.wait_closed()

    def abort(self) -> defer.Deferred[None]:
        """Abort (RST); fires when closed."""
        if self.connected:
            self.transport.abortConnection()
        return self.wait_closed()

    def half_close(self) -> None:
        """Shut down the write side (FIN) keeping the read side open."""
        self.transport.loseWriteConnection()

    # -- parsing
    def _new_message(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._cur = None

    def _pump(self) -> None:
        """Parse buffered bytes for pending reads; results fire after the parser returns."""
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_once()
        finally:
            self._pumping = False
        fired, self._fired = self._fired, []
        for d, result in fired:
            if isinstance(result, Response):
                d.callback(result)
            else:
                d.errback(result)
        if fired and self._reads:
            self._pump()

    def _pump_once(self) -> None:
        """Parse for pending reads; handle EOF once the buffer is used up."""
        while self._reads:
            if self._error is not None:
                self._fired.append((self._reads.popleft().deferred, self._error))
                continue
            if not self._buf:
                if not self.connected and self._made.called:
                    self._eof()
                    continue
                return
            read = self._reads[0]
            if self._parser is None:
                self._new_message()
            try:
                if read.head:
                    if not self._feed_head():
                        if self.connected:
                            return
                        self._feed_all()
                elif any(r.head for r in list(self._reads)[1:]):
                    self._feed_bytewise()
                else:
                    self._feed_all()
            except httptools.HttpParserUpgrade as exc:
                self._upgrade(exc.args[0] if exc.args else 0)
            except httptools.HttpParserError as exc:
                self._error = ResponseParseError(exc, bytes(self._buf))
                del self._buf[:]

    def _feed(self, data: bytes) -> None:
        self._fed = data
        self._parser.feed_data(data)

    def _feed_all(self) -> None:
        data = bytes(self._buf)
        del self._buf[:]
        self._feed(data)

    def _feed_head(self) -> bool:
        """Feed exactly one head (for HEAD responses); False if it is not all here yet."""
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        data = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        self._feed(data)
        if self._cur is not None and self._headers_done and not self._message_done:
            self.on_message_complete()
        return True

    def _feed_bytewise(self) -> None:
        """Feed one message's bytes one at a time so a following HEAD response is not misparsed."""
        self._message_done = False
        while self._buf and not self._message_done:
            byte = bytes(self._buf[:1])
            del self._buf[:1]
            self._feed(byte)

    def _upgrade(self, offset: int) -> None:
        """A 101 (or upgrade) response: the rest of the fed bytes and the buffer are tunnel data."""
        self.upgraded = True
        self.tunnel_data += self._fed[offset:]
        self.tunnel_data += self._buf
        del self._buf[:]
        self._tunnel_check()

    def _eof(self) -> None:
        """The peer closed: complete a close-delimited body or fail the read."""
        read = self._reads.popleft()
        cur = self._cur
        if cur is not None and self._headers_done and cur.close_delimited:
            self._message_done = True
            self._cur = None
            self._parser = None
            self._finish_body(cur)
            self._fired.append((read.deferred, cur))
            return
        reason = self.close_reason
        if cur is not None:
            self._finish_body(cur)
        self._fired.append((read.deferred, IncompleteResponse(cur, reason)))

    def _finish_body(self, resp: Response) -> None:
        if self.retain_body:
            resp.body = b"".join(self._body_parts)
        self._body_parts = []

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        """A response starts."""
        self._cur = Response()
        self._headers_done = False
        self._message_done = False
        self._body_parts = []

    def on_status(self, status: bytes) -> None:
        """Collect the reason phrase."""
        assert self._cur is not None
        self._cur.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        """Record a header as sent."""
        assert self._cur is not None
        self._cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Note status, version and framing."""
        cur = self._cur
        assert cur is not None
        parser = self._parser
        cur.status = parser.get_status_code()
        cur.version = parser.get_http_version()
        cur.keep_alive = parser.should_keep_alive()
        cur.upgrade = parser.should_upgrade()
        names = {k.lower() for k, _ in cur.headers}
        cur.close_delimited = not (
            names & {b"content-length", b"transfer-encoding"}
            or cur.status < 200
            or cur.status in (204, 304)
        )
        self._headers_done = True

    def on_chunk_header(self) -> None:
        """Note chunked framing."""
        if self._cur is not None:
            self._cur.chunked = True

    def on_body(self, data: bytes) -> None:
        """Count, hash and maybe keep body bytes."""
        cur = self._cur
        assert cur is not None
        cur.body_length += len(data)
        cur._digest.update(data)
        if self.retain_body:
            self._body_parts.append(data)

    def on_message_complete(self) -> None:
        """Hand the response to the oldest pending read."""
        cur = self._cur
        assert cur is not None
        self._message_done = True
        self._cur = None
        self._finish_body(cur)
        if not self._reads:
            self._ready.append(cur)
            return
        read = self._reads.popleft()
        if read.head and self._headers_done and cur.status >= 200:
            # the parser expects a body that a HEAD response never has
            self._parser = None
        self._fired.append((read.deferred, cur))


class _BodySender:
    """Writes pattern bytes while the transport accepts them."""

    def __init__(self, conn: RawConnection, size: int, chunked: bool, chunk_size: int) -> None:
        """Remember what to send."""
        self.conn = conn
        self.remaining = size
        self.offset = 0
        self.chunked = chunked
        self.chunk_size = chunk_size
        self.done: defer.Deferred[int] = defer.Deferred()
        self._pumping = False

    def pump(self) -> None:
        """Write until paused, finished or disconnected."""
        if self._pumping or self.done.called:
            return
        self._pumping = True
        conn = self.conn
        try:
            while self.remaining > 0 and not conn._write_paused and conn.connected:
                take = min(self.chunk_size, self.remaining)
                data = pattern_slice(self.offset, take)
                if self.chunked:
                    data = b"%x\r\n%s\r\n" % (take, data)
                conn.transport.write(data)
                self.offset += take
                self.remaining -= take
            if self.remaining == 0 and self.chunked and conn.connected:
                conn.transport.write(b"0\r\n\r\n")
        finally:
            self._pumping = False
        if self.remaining == 0:
            conn._sender = None
            self.done.callback(self.offset)
        elif not conn.connected:
            conn._sender = None
            self.done.errback(BodyNotSent(self.offset, conn.close_reason))

    def stop(self) -> None:
        """Stop sending (the body stays incomplete); ``done`` fires with the bytes sent."""
        if not self.done.called:
            self.conn._sender = None
            self.done.callback(self.offset)


def connect(
    reactor: Any,
    host: str,
    port: int,
    retain_body: bool = True,
    timeout: float = 10,
    tls: Any = None,
) -> defer.Deferred[RawConnection]:
    """Connect to ``host:port``; fires with a :class:`RawConnection`.

    With ``tls`` (a client connection creator, e.g. ``flexgw.testing.certs.client_options``)
    the connection speaks TLS; it fires once connected (writes wait for the handshake).
    """
    conn = RawConnection(retain_body=retain_body)
    endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    d = connectProtocol(endpoint, conn)
    d.addCallback(lambda _: conn._made)
    return d


@defer.inlineCallbacks
def request(
    reactor: Any,
    host: str,
    port: int,
    raw_bytes: bytes,
    head: bool = False,
    final: bool = True,
    tls: Any = None,
) -> Any:
    """Connect, send ``raw_bytes``, read one response (the final one unless ``final`` is False), close."""
    conn = yield connect(reactor, host, port, tls=tls)
    try:
        conn.send(raw_bytes)
        if final:
            resp = yield conn.read_final_response(head)
        else:
            resp = yield conn.read_response(head)
    finally:
        yield conn.abort()
    return resp


@attrs.frozen
class StreamResult:
    """Outcome of a streamed exchange: bytes sent and the (not retained) response."""

    sent: int
    response: Response


@defer.inlineCallbacks
def stream_exchange(
    reactor: Any,
    host: str,
    port: int,
    head: bytes,
    body_size: int,
    chunked: bool = False,
    chunk_size: int = 65536,
    tls: Any = None,
) -> Any:
    """Send ``head`` then ``body_size`` pattern bytes with backpressure; count and hash the response.

    ``head`` must carry the matching framing header (``Content-Length: body_size`` or
    ``Transfer-Encoding: chunked``). Neither body is kept in memory. If the final response
    arrives before the body is all sent (say a 413), sending stops there; if the peer closes
    mid-body, the response (if any) is still read. Fires with a :class:`StreamResult`
    (``sent`` = body bytes actually written); the connection is closed afterwards.
    """
    conn = yield connect(reactor, host, port, retain_body=False, tls=tls)
    try:
        conn.send(head)
        read = conn.read_final_response()

        def early(resp: Response) -> Response:
            conn.stop_body()
            return resp

        read.addCallback(early)
        try:
            sent = yield conn.send_body(body_size, chunked=chunked, chunk_size=chunk_size)
        except BodyNotSent as exc:
            sent = exc.sent
        resp = yield read
    finally:
        yield conn.abort()
    return StreamResult(sent, resp)


__all__ = [
    "BodyNotSent",
    "ConnectionDone",
    "IncompleteResponse",
    "RawConnection",
    "Response",
    "ResponseParseError",
    "StreamResult",
    "connect",
    "request",
    "stream_exchange",
]
