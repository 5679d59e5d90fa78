"""One HTTP/1.1 client connection to an upstream, parsed with httptools, serving one exchange at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.gate import ReadGate
from flexgw.http.headers import HeaderList

if TYPE_CHECKING:
    from flexgw.upstream.interfaces import ConnectionOwner


class ResponseSink(TypingProtocol):
    """What an upstream connection reports to: the exchange currently using it."""

    def response_interim(self, status: int, headers: HeaderList) -> None: ...
    def response_head(
        self, status: int, reason: bytes, headers: HeaderList, keep_alive: bool
    ) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_trailers(self, trailers: HeaderList) -> None: ...
    def response_complete(self) -> None: ...
    def flush_response(self) -> None: ...
    def response_malformed(self, message: str) -> None: ...
    def upstream_lost(self, got_response_bytes: bool) -> None: ...
    def response_switched(self, rest: bytes) -> None: ...


#: Bytes of response head (status line, headers, interim responses) an upstream may send.
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamConnection(Protocol):
    """A keep-alive HTTP/1.1 connection to one upstream, owned by an UpstreamPool."""

    def __init__(self, pool: ConnectionOwner) -> None:
        self.pool = pool
        self.sink: ResponseSink | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.gate: ReadGate | None = None
        self.connected_ok = False
        self.reusable = True
        self.idle_since = 0.0
        self.requests = 0
        self.got_bytes = False
        self._reason = b""
        self._headers: HeaderList = []
        self._trailers: HeaderList | None = None
        self._in_head = True
        self._head_only = False
        self._interim = False
        self._complete = False  # the final response ended inside the current dataReceived
        self._head_bytes = 0
        self._body_seen = False
        self.tunnel: Any = None  # a flexgw.http.tunnel.Tunnel once the connection is upgraded

    #: True on a TLS connection lost before its handshake completed (see TLSUpstreamConnection).
    tls_failed = False
    #: The exchange writes the request as HTTP/1.1 bytes (an HTTP/2 stream takes fields).
    http2 = False

    # -- lifecycle -------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Connected: hand the connection to whoever asked for it."""
        self.connected_ok = True
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.gate = ReadGate(self.transport)
        self.pool.connection_made(self)

    def begin(self, sink: ResponseSink, head_only: bool) -> None:
        """Start serving an exchange; `head_only` for HEAD requests (no response body follows)."""
        self.sink = sink
        self.requests += 1
        self.got_bytes = False
        self._head_only = head_only
        self._in_head = True
        self._head_bytes = 0
        self._headers = []

    def finish(self) -> None:
        """The exchange is done with this connection; reuse it or close it."""
        self.sink = None
        gate = self.gate
        if gate is not None and gate.reasons:
            gate.reasons = 0
            self.transport.resumeProducing()
        self.pool.release(self)

    def abort(self) -> None:
        """Drop the connection at once (the exchange failed midway)."""
        self.reusable = False
        self.sink = None
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Feed the response parser; a byte while idle means the upstream is broken: close.

        The end of a response is reported only once the parser has returned, so that bytes
        following it in the same read (which no request asked for) mark the connection unusable
        instead of being taken as the answer to the next request.
        """
        sink = self.sink
        if sink is None:
            tunnel = self.tunnel
            if tunnel is not None:
                tunnel.from_upstream(data)
                return
            self.reusable = False
            self.transport.abortConnection()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A 101 (its head reported as interim): the rest is the upgraded protocol's. Only an
            # exchange that asked for an upgrade takes it; the connection is never reused.
            self.reusable = False
            sink = self.sink
            if sink is not None and not self._complete:
                offset = exc.args[0] if exc.args else len(data)
                sink.response_switched(data[offset:])
            return
        except httptools.HttpParserError as exc:
            self.reusable = False
            if self.sink is not None and not self._complete:
                self.sink.response_malformed(str(exc))
        if self.sink is not None and not self._complete:
            if self._in_head or not self._body_seen:
                # Still in the head after this read, or a read that carried no body byte (chunk
                # framing, trailer fields, which httptools buffers whole): bound them.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_RESPONSE_HEAD:
                    self.reusable = False
                    self.sink.response_malformed("Response head or trailers too large")
                    return
            else:
                self._head_bytes = 0
        self._body_seen = False
        sink = self.sink
        if sink is not None and not self._complete:
            sink.flush_response()  # (a complete response is flushed by response_complete)
        if self._complete:
            self._complete = False
            if self._head_only:
                # llhttp does not know the request was HEAD and would wait for a body.
                self.parser = httptools.HttpResponseParser(self)
            sink = self.sink
            if sink is not None:
                sink.response_complete()

    def connectionLost(self, reason: Failure = None) -> None:
        """Tell the exchange (if any) and leave the pool."""
        self.reusable = False
        self.pool.connection_lost(self, reason)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.upstream_lost()
            return
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.upstream_lost(self.got_bytes)

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A response starts; one starting right after a complete response is unsolicited."""
        if self._complete:
            raise _Unsolicited()

    def on_status(self, reason: bytes) -> None:
        """Status line reason phrase."""
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        """One response header, or a trailer field of a chunked response."""
        if self._in_head:
            self._headers.append((name, value))
        elif self._trailers is None:
            self._trailers = [(name, value)]
        else:
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        """Response head done: interim (1xx) or final."""
        sink = self.sink
        if sink is None:
            return
        status = self.parser.get_status_code()
        headers = self._headers
        self._headers = []
        if 100 <= status < 200:
            self._interim = True
            sink.response_interim(status, headers)
            return
        self._in_head = False
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            self.reusable = False
        sink.response_head(status, self._reason, headers, keep_alive)
        if self._head_only:
            # A HEAD response has no body whatever its framing says: it is complete here.
            self._complete = True

    def on_body(self, data: bytes) -> None:
        """A piece of the (de-chunked) response body."""
        self._body_seen = True
        if self._complete:
            raise _Unsolicited()  # bytes after a HEAD response's head
        sink = self.sink
        if sink is not None and not self._in_head:
            sink.response_body(data)

    def on_message_complete(self) -> None:
        """End of a response message (an interim 1xx one is skipped)."""
        if self._interim:
            self._interim = False
            return
        if self.sink is not None and not self._in_head:
            self._complete = True
            if self._trailers is not None:
                trailers, self._trailers = self._trailers, None
                self.sink.response_trailers(trailers)


class _Unsolicited(Exception):
    """Raised from a parser callback: the upstream sent bytes after a complete response."""


@implementer(IHandshakeListener)
class TLSUpstreamConnection(UpstreamConnection):
    """An upstream connection over TLS: handed to its exchange only once the handshake (and
    the certificate and host name checks) completed, so a failed check is told apart from a
    reset: the exchange answers 502 `upstream_tls`."""

    _handshake_timer: Any = None

    def connectionMade(self) -> None:
        """TCP is up; TLS is not yet: wait for the handshake, bounded by the connect timeout."""
        self.connected_ok = True
        self.tls_failed = True  # until the handshake completes
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.gate = ReadGate(self.transport)
        pool = self.pool
        self._handshake_timer = pool.clock.callLater(pool.connect_timeout, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        self.transport.abortConnection()  # reported as a failed handshake (upstream_tls)

    def handshakeCompleted(self) -> None:
        """TLS is up: hand the connection to whoever asked for it."""
        self.tls_failed = False
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None:
            timer.cancel()
        self.pool.connection_made(self)

    def connectionLost(self, reason: Failure = None) -> None:
        """Stop the handshake timer, then as any upstream connection."""
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        super().connectionLost(reason)
