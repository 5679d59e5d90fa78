"""Upstream HTTP/1.1 servers for tests and benchmarks: a recording upstream and a fast hello/echo one."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import httptools
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.testing.recording import (  # noqa: F401 (still importable from here, as before)
    Exchange,
    HeadersAndDigest,
    RecordedRequest,
    Responder,
    _BodyStreamer,
    _has_token,
    _no_body_status,
    pattern_sha256,
    pattern_slice,
)

_log = Logger()


# --------------------------------------------------------------------------- responders


@attrs.define
class FixedResponder(Responder):
    """Always the same response; Content-Length added unless given or chunked; HEAD/204/304 bodiless."""

    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"Content-Type", b"text/plain"),)
    body: bytes = b"ok\n"
    reason: bytes | None = None
    chunked: bool = False

    def respond(self, ex: Exchange) -> None:
        """Write the fixed response."""
        headers = list(self.headers)
        names = {k.lower() for k, _ in headers}
        if self.chunked:
            if b"transfer-encoding" not in names:
                headers.append((b"Transfer-Encoding", b"chunked"))
        elif not names & {b"content-length", b"transfer-encoding"} and not _no_body_status(
            self.status
        ):
            headers.append((b"Content-Length", b"%d" % len(self.body)))
        ex.send_head(self.status, headers, self.reason)
        ex.write(self.body)
        ex.finish()


def fixed(
    status: int = 200,
    headers: Sequence[tuple[bytes, bytes]] = ((b"Content-Type", b"text/plain"),),
    body: bytes = b"ok\n",
    reason: bytes | None = None,
    chunked: bool = False,
) -> FixedResponder:
    """A responder answering every request with the same status, headers and body."""
    return FixedResponder(status, headers, body, reason, chunked)


class EchoResponder(Responder):
    """Echoes the request body back as it arrives (Content-Length kept, else chunked)."""

    def __init__(self, status: int = 200, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Set the status and any extra response headers."""
        self.status = status
        self.extra_headers = list(extra_headers)

    def on_headers(self, ex: Exchange) -> None:
        """Send the head at once so the body can stream back."""
        headers = [(b"Content-Type", b"application/octet-stream"), *self.extra_headers]
        lengths = ex.request.header(b"content-length")
        if lengths and not ex.request.chunked and not ex.request.header(b"transfer-encoding"):
            headers.append((b"Content-Length", lengths[0]))
        else:
            headers.append((b"Transfer-Encoding", b"chunked"))
        ex.send_head(self.status, headers)

    def on_body(self, ex: Exchange, data: bytes) -> None:
        """Write the piece straight back (reading pauses when the write buffer is full)."""
        ex.write(data)

    def on_complete(self, ex: Exchange) -> None:
        """Finish the echoed response."""
        ex.finish()


def echo(status: int = 200, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> EchoResponder:
    """A responder that streams the request body back with backpressure."""
    return EchoResponder(status, extra_headers)


@attrs.define
class StreamResponder(Responder):
    """A large body of ``size`` pattern bytes written by a producer (bounded memory)."""

    size: int
    chunked: bool = False
    chunk_size: int = 65536
    status: int = 200

    def respond(self, ex: Exchange) -> None:
        """Send the head, then stream the pattern body and finish when written."""
        headers = [(b"Content-Type", b"application/octet-stream")]
        if self.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            headers.append((b"Content-Length", b"%d" % self.size))
        ex.send_head(self.status, headers)
        if not ex.body_allowed:
            ex.finish()
            return
        ex.stream_body(self.size, self.chunk_size).addCallback(lambda _: ex.finish())


def stream(size: int, chunked: bool = False, chunk_size: int = 65536) -> StreamResponder:
    """A responder that streams ``size`` bytes of the test pattern (see :func:`pattern_sha256`)."""
    return StreamResponder(size, chunked, chunk_size)


class DelayedResponder(Responder):
    """Waits ``delay`` seconds on the injected clock after the request, then delegates."""

    def __init__(self, inner: Responder, delay: float, clock: Any) -> None:
        """Wrap ``inner``; ``clock`` schedules the delay."""
        self.inner = inner
        self.delay = delay
        self.clock = clock

    def on_complete(self, ex: Exchange) -> None:
        """Schedule the inner responder; cancelled if the connection goes away."""
        def fire() -> None:
            if ex.connection.connected:
                self.inner.on_complete(ex)

        call = self.clock.callLater(self.delay, fire)

        def cancel() -> None:
            if call.active():
                call.cancel()

        ex.connection.on_lost.append(cancel)


def delayed(inner: Responder, delay: float, clock: Any) -> DelayedResponder:
    """A responder that answers like ``inner`` after ``delay`` seconds on ``clock``."""
    return DelayedResponder(inner, delay, clock)


class NeverResponder(Responder):
    """Never answers; the connection stays open (for upstream timeout tests)."""

    def on_complete(self, ex: Exchange) -> None:
        """Do nothing."""


def never() -> NeverResponder:
    """A responder that reads the request and never responds."""
    return NeverResponder()


@attrs.define
class CloseResponder(Responder):
    """Closes the connection: before any byte, after the status line, or mid-body."""

    when: str = "before_status"  # before_status | after_status | after_headers | mid_body
    abort: bool = False
    at: str = "complete"  # complete | headers: when to act

    def on_headers(self, ex: Exchange) -> None:
        """Act as soon as the head arrives when asked to."""
        if self.at == "headers":
            self._act(ex)

    def on_complete(self, ex: Exchange) -> None:
        """Act once the request is complete."""
        if self.at == "complete":
            self._act(ex)

    def _act(self, ex: Exchange) -> None:
        if self.when == "after_status":
            ex.write_raw(b"HTTP/1.1 200 OK\r\n")
        elif self.when == "after_headers":
            ex.write_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        elif self.when == "mid_body":
            ex.write_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        if self.abort:
            ex.abort()
        else:
            ex.close()


def close_connection(when: str = "before_status", abort: bool = False, at: str = "complete") -> CloseResponder:
    """A responder that closes (or with ``abort``, resets) the connection at ``when``."""
    if when not in ("before_status", "after_status", "after_headers", "mid_body"):
        raise ValueError(f"unknown close point {when!r}")
    return CloseResponder(when, abort, at)


#: Malformed responses by name, for upstream-error tests.
MALFORMED: dict[str, bytes] = {
    "garbage": b"this is not http\r\n\r\n",
    "bad_status_line": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "bad_version": b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http09": b"hello without a status line",
    "duplicate_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "bad_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\nok",
    "cl_and_te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "bad_chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "header_no_colon": b"HTTP/1.1 200 OK\r\nX-Broken\r\nContent-Length: 0\r\n\r\n",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
}


@attrs.define
class RawResponder(Responder):
    """Writes fixed bytes verbatim (any framing, valid or not), optionally closing after."""

    data: bytes
    close: bool = True

    def respond(self, ex: Exchange) -> None:
        """Write the bytes, then close if asked."""
        ex.write_raw(self.data)
        ex.finished = True
        if self.close:
            ex.close()


def raw(data: bytes, close: bool = True) -> RawResponder:
    """A responder writing ``data`` verbatim, then closing unless ``close`` is False."""
    return RawResponder(data, close)


def malformed(kind: str, close: bool = True) -> RawResponder:
    """A responder writing one of the :data:`MALFORMED` responses."""
    return RawResponder(MALFORMED[kind], close)


class ContinueResponder(Responder):
    """Sends ``100 Continue`` when the head arrives (only if asked for, unless ``always``), then delegates."""

    def __init__(self, final: Responder, always: bool = False) -> None:
        """Wrap the final responder."""
        self.final = final
        self.always = always

    def on_headers(self, ex: Exchange) -> None:
        """Send the interim response, then pass the head on."""
        if self.always or _has_token(ex.request.headers, b"expect", b"100-continue"):
            ex.send_interim(100)
        self.final.on_headers(ex)

    def on_body(self, ex: Exchange, data: bytes) -> None:
        """Pass body pieces on."""
        self.final.on_body(ex, data)

    def on_complete(self, ex: Exchange) -> None:
        """Pass completion on."""
        self.final.on_complete(ex)


def continue_then(final: Responder, always: bool = False) -> ContinueResponder:
    """A responder that answers ``Expect: 100-continue`` with a 100, then like ``final``."""
    return ContinueResponder(final, always)


class FunctionResponder(Responder):
    """Calls ``fn(exchange)`` once the request is complete."""

    def __init__(self, fn: Callable[[Exchange], None]) -> None:
        """Remember the function."""
        self.fn = fn

    def respond(self, ex: Exchange) -> None:
        """Call the function."""
        self.fn(ex)


def function(fn: Callable[[Exchange], None]) -> FunctionResponder:
    """A responder calling ``fn(exchange)`` for each complete request."""
    return FunctionResponder(fn)


class SequenceResponder(Responder):
    """Uses the n-th responder for the n-th request on the factory (the last one repeats)."""

    def __init__(self, responders: Sequence[Responder]) -> None:
        """Keep the list (must not be empty)."""
        if not responders:
            raise ValueError("at least one responder")
        self.responders = list(responders)

    def _pick(self, ex: Exchange) -> Responder:
        pos = ex.state.get("seq")
        if pos is None:
            pos = ex.state["seq"] = ex.connection.factory._request_counter - 1
        return self.responders[min(pos, len(self.responders) - 1)]

    def on_headers(self, ex: Exchange) -> None:
        """Delegate to this request's responder."""
        self._pick(ex).on_headers(ex)

    def on_body(self, ex: Exchange, data: bytes) -> None:
        """Delegate to this request's responder."""
        self._pick(ex).on_body(ex, data)

    def on_complete(self, ex: Exchange) -> None:
        """Delegate to this request's responder."""
        self._pick(ex).on_complete(ex)

    def on_tunnel_data(self, ex: Exchange, data: bytes) -> None:
        """Delegate to this request's responder."""
        self._pick(ex).on_tunnel_data(ex, data)


def sequence(*responders: Responder) -> SequenceResponder:
    """A responder using ``responders[i]`` for the i-th request (the last one repeats)."""
    return SequenceResponder(responders)


# --------------------------------------------------------------------------- recording server


class UpstreamConnection(protocol.Protocol):
    """One accepted connection of a :class:`RecordingUpstream`: parses requests with llhttp."""

    transport: Any

    factory: RecordingUpstream

    def __init__(self, factory: RecordingUpstream, conn_id: int) -> None:
        """Create the parser; the connection id is its index in ``factory.connections``."""
        self.factory = factory
        self.id = conn_id
        self.requests: list[RecordedRequest] = []
        self.bytes_received = 0
        self.connected = False
        self.write_paused = False
        self.parse_error: Exception | None = None
        self.close_reason: Failure | None = None
        self.tunnel = False
        self.on_lost: list[Callable[[], Any]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._streamers: list[_BodyStreamer] = []
        self._parser = httptools.HttpRequestParser(self)
        self._win = bytearray()
        self._win_start = 0
        self._cur: RecordedRequest | None = None
        self._ex: Exchange | None = None
        self._last_done: RecordedRequest | None = None
        self._url: list[bytes] = []
        self._in_head = False

    # -- twisted
    def connectionMade(self) -> None:
        """Register for write backpressure and tell waiters."""
        self.connected = True
        self.transport.registerProducer(self, True)
        self.factory._connection_made(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Record the close and fire waiters."""
        self.connected = False
        self.close_reason = reason
        for fn in self.on_lost:
            fn()
        for streamer in list(self._streamers):
            streamer.pump()
        if self._cur is not None and not self._cur.complete:
            self._seal_raw(self._cur, self.bytes_received)
        self.factory._connection_lost(self)
        self.lost.callback(None)

    def pauseProducing(self) -> None:
        """The write buffer is full: stop reading and stop streaming bodies."""
        self.write_paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The write buffer drained: read again and continue streaming bodies."""
        self.write_paused = False
        self.transport.resumeProducing()
        for streamer in list(self._streamers):
            streamer.pump()

    def stopProducing(self) -> None:
        """Nothing to do; connectionLost follows."""

    @property
    def raw(self) -> bytes:
        """Every byte received on this connection (only when the factory retains bodies)."""
        return bytes(self._win) if self.factory.retain_bodies else b""

    def close(self) -> None:
        """Close cleanly after pending writes."""
        if self.connected and self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        """Abort (RST) the connection."""
        if self.connected and self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Feed the parser, keeping raw bytes for head location (and all of them if retaining)."""
        if self.tunnel:
            self.bytes_received += len(data)
            if self._ex is not None:
                self.factory.responder.on_tunnel_data(self._ex, data)
            return
        if self.parse_error is not None:
            return
        self.factory._busy += 1
        try:
            self._feed(data)
        finally:
            self.factory._busy -= 1
            self.factory._flush()

    def _feed(self, data: bytes) -> None:
        """Feed one read to llhttp (waiters fire only after it returns)."""
        chunk_start = self.bytes_received
        self.bytes_received += len(data)
        self._win += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0] :]
            if self._cur is not None:
                self._seal_raw(self._cur, chunk_start + exc.args[0])
            if rest and self._ex is not None:
                self.factory.responder.on_tunnel_data(self._ex, bytes(rest))
            return
        except httptools.HttpParserCallbackError as exc:
            # a responder (or this module) raised: that is a test bug, not bad input
            cause = exc.__context__ if exc.__context__ is not None else exc
            self.parse_error = cause if isinstance(cause, Exception) else exc
            self.factory.errors.append(self.parse_error)
            _log.failure(
                "recording upstream: responder raised", Failure(self.parse_error)
            )
            self.abort()
            return
        except httptools.HttpParserError as exc:
            self.parse_error = exc
            self.factory.errors.append(exc)
            if self.connected:
                self.transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                self.close()
            return
        if not self.factory.retain_bodies and not self._in_head:
            del self._win[:]
            self._win_start = self.bytes_received

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        """A new request starts."""
        self._in_head = True
        self._url = []
        req = RecordedRequest(
            connection=self.id,
            index=len(self.requests),
            start=-1,
            body=None,
        )
        if self.factory.retain_bodies:
            req._body_buf = bytearray()
        self._cur = req

    def on_url(self, url: bytes) -> None:
        """Collect the (possibly split) request target."""
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Record a header as sent."""
        assert self._cur is not None
        self._cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Locate the raw head, record the request, tell the responder."""
        req = self._cur
        assert req is not None
        self._in_head = False
        parser = self._parser
        req.method = parser.get_method()
        req.target = b"".join(self._url)
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade()
        self._locate_head(req)
        self.requests.append(req)
        ex = self._ex = Exchange(self, req)
        self.factory._request_counter += 1
        self.factory.responder.on_headers(ex)
        self.factory._request_head(req)

    def on_chunk_header(self) -> None:
        """Note that the body is chunked."""
        if self._cur is not None:
            self._cur.chunked = True

    def on_body(self, data: bytes) -> None:
        """Count, hash and maybe keep body bytes; pass them to the responder."""
        req = self._cur
        assert req is not None
        req.body_length += len(data)
        req._digest.update(data)
        if req._body_buf is not None:
            req._body_buf += data
        if self._ex is not None:
            self.factory.responder.on_body(self._ex, data)

    def on_message_complete(self) -> None:
        """Seal the request and tell the responder and waiters."""
        req = self._cur
        assert req is not None
        req.complete = True
        if req._body_buf is not None:
            req.body = bytes(req._body_buf)
            req._body_buf = None
        self._seal_raw(req, self.bytes_received)
        self._last_done = req
        self._cur = None
        ex = self._ex
        if ex is not None:
            self.factory.responder.on_complete(ex)
        self.factory._request_complete(req)

    # -- raw-byte bookkeeping
    def _locate_head(self, req: RecordedRequest) -> None:
        """Find this request's head in the window: exact unless several requests share a read."""
        win = self._win
        prev = self._last_done
        search_from = 0
        if prev is not None:
            prev_min_end = prev.start + len(prev.raw_head) + prev.body_length
            search_from = max(0, prev_min_end - self._win_start)
        pos = win.find(req.method + b" " + req.target + b" ", search_from)
        if pos < 0:
            pos = search_from
        end = win.find(b"\r\n\r\n", pos)
        end = len(win) if end < 0 else end + 4
        req.start = self._win_start + pos
        req.raw_head = bytes(win[pos:end])
        if prev is not None and prev.raw is not None and prev.start + len(prev.raw) > req.start:
            prev.raw = prev.raw[: max(0, req.start - prev.start)]

    def _seal_raw(self, req: RecordedRequest, end: int) -> None:
        """Set the request's raw bytes (from its start to ``end``) when retaining."""
        if self.factory.retain_bodies and req.start >= self._win_start:
            req.raw = bytes(self._win[req.start - self._win_start : end - self._win_start])


class RecordingUpstream(protocol.ServerFactory):
    """A test upstream that records exactly what arrived and answers through a pluggable responder."""

    def __init__(
        self,
        responder: Responder | None = None,
        reactor: Any = None,
        retain_bodies: bool = True,
        h2c: bool = False,
    ) -> None:
        """``reactor`` is used for listening and by time-based responders; bodies kept unless told.

        With ``h2c`` the upstream speaks HTTP/2 with prior knowledge (flexgw.testing.h2): each
        stream is recorded as a request and answered by the same responders.
        """
        self.h2c = h2c
        self.responder: Responder = responder if responder is not None else fixed()
        self.reactor = reactor
        self.retain_bodies = retain_bodies
        self.received: list[RecordedRequest] = []
        self.completed: list[RecordedRequest] = []
        self.connections: list[UpstreamConnection] = []
        self.errors: list[Exception] = []
        self.port: Any = None
        self._request_counter = 0
        self._lost_count = 0
        self._waiters: list[tuple[str, int, defer.Deferred[Any]]] = []
        self._busy = 0
        self._pending: set[str] = set()

    def buildProtocol(self, addr: Any) -> Any:
        """A new recording connection (HTTP/2 with prior knowledge when `h2c` is set)."""
        if self.h2c:
            from flexgw.testing.h2 import H2cUpstreamConnection  # (`h2`: a test dependency)

            h2conn = H2cUpstreamConnection(self, len(self.connections))
            self.connections.append(h2conn)  # type: ignore[arg-type]
            return h2conn
        conn = UpstreamConnection(self, len(self.connections))
        self.connections.append(conn)
        return conn

    # -- lifecycle
    def listen(
        self, reactor: Any = None, host: str = "127.0.0.1", port: int = 0, tls: Any = None
    ) -> Any:
        """Listen on ``host:port`` (ephemeral by default) and return the listening port.

        With ``tls`` (a Twisted context factory or server connection creator, e.g.
        ``flexgw.testing.certs.server_options``) the upstream speaks TLS.
        """
        reactor = reactor if reactor is not None else self.reactor
        if self.reactor is None:
            self.reactor = reactor
        assert reactor is not None, "a reactor is needed to listen"
        if tls is not None:
            self.port = reactor.listenSSL(port, self, tls, interface=host)
        else:
            self.port = reactor.listenTCP(port, self, interface=host)
        return self.port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) being listened on."""
        assert self.port is not None
        addr = self.port.getHost()
        return addr.host, addr.port  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening port."""
        host, port = self.address
        return f"http://{host}:{port}"

    def open_connections(self) -> list[UpstreamConnection]:
        """Connections not yet closed."""
        return [c for c in self.connections if c.connected]

    def close_connections(self, abort: bool = True) -> defer.Deferred[Any]:
        """Abort (or close) every open connection; fires when all are gone."""
        conns = self.open_connections()
        waits = [c.lost for c in conns]
        for c in conns:
            if abort:
                c.abort()
            else:
                c.close()
        return defer.gatherResults(waits)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and drop all connections; use as a trial cleanup."""
        waits: list[defer.Deferred[Any]] = [self.close_connections()]
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(defer.maybeDeferred(port.stopListening))
        return defer.gatherResults(waits)

    # -- waiting
    def wait_for_requests(self, n: int) -> defer.Deferred[list[RecordedRequest]]:
        """Fires with ``completed`` once ``n`` requests have fully arrived."""
        return self._wait("requests", n)

    def wait_for_heads(self, n: int) -> defer.Deferred[list[RecordedRequest]]:
        """Fires with ``received`` once ``n`` request heads have arrived."""
        return self._wait("heads", n)

    def wait_for_connections(self, n: int) -> defer.Deferred[list[UpstreamConnection]]:
        """Fires with ``connections`` once ``n`` connections have been accepted."""
        return self._wait("connections", n)

    def wait_for_disconnections(self, n: int) -> defer.Deferred[list[UpstreamConnection]]:
        """Fires with ``connections`` once ``n`` connections have closed."""
        return self._wait("lost", n)

    def _count(self, kind: str) -> int:
        return {
            "requests": len(self.completed),
            "heads": len(self.received),
            "connections": len(self.connections),
            "lost": self._lost_count,
        }[kind]

    def _value(self, kind: str) -> Any:
        if kind == "requests":
            return list(self.completed)
        if kind == "heads":
            return list(self.received)
        return list(self.connections)

    def _wait(self, kind: str, n: int) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        if self._count(kind) >= n:
            d.callback(self._value(kind))
        else:
            self._waiters.append((kind, n, d))
        return d

    def _flush(self) -> None:
        """Fire waiters whose events happened while the parser was running."""
        while self._pending and not self._busy:
            self._notify(self._pending.pop())

    def _notify(self, kind: str) -> None:
        if self._busy:
            self._pending.add(kind)
            return
        count = self._count(kind)
        ready = [w for w in self._waiters if w[0] == kind and count >= w[1]]
        for w in ready:
            self._waiters.remove(w)
        for _, _, d in ready:
            d.callback(self._value(kind))

    # -- events from connections
    def _connection_made(self, conn: UpstreamConnection) -> None:
        self._notify("connections")

    def _connection_lost(self, conn: UpstreamConnection) -> None:
        self._lost_count += 1
        self._notify("lost")

    def _request_head(self, req: RecordedRequest) -> None:
        self.received.append(req)
        self._notify("heads")

    def _request_complete(self, req: RecordedRequest) -> None:
        self.completed.append(req)
        self._notify("requests")


# --------------------------------------------------------------------------- fast upstream

_HELLO_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"
)


class HelloProtocol(protocol.Protocol):
    """Answers every request with ``hello\\n`` as fast as CPython allows (keep-alive, pipelining)."""

    transport: Any

    def connectionMade(self) -> None:
        """Create the parser with only the completion callback (fewer Python calls)."""
        self._parser = httptools.HttpRequestParser(self)
        self._pending = 0
        self._close = False

    def on_message_complete(self) -> None:
        """Count one answer to write after this read."""
        self._pending += 1
        if not self._parser.should_keep_alive():
            self._close = True

    def dataReceived(self, data: bytes) -> None:
        """Parse, then write all answers in one call."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()
            return
        if self._pending:
            n, self._pending = self._pending, 0
            self.transport.write(_HELLO_RESPONSE * n if n > 1 else _HELLO_RESPONSE)
            if self._close:
                self.transport.loseConnection()


class EchoProtocol(protocol.Protocol):
    """Answers every request with a JSON description: method, path, headers, body length."""

    transport: Any

    def connectionMade(self) -> None:
        """Create the parser."""
        self._parser = httptools.HttpRequestParser(self)
        self._out: list[bytes] = []
        self._close = False
        self._url = b""
        self._headers: list[list[str]] = []
        self._body_length = 0

    def on_message_begin(self) -> None:
        """Reset per-request state."""
        self._url = b""
        self._headers = []
        self._body_length = 0

    def on_url(self, url: bytes) -> None:
        """Collect the target."""
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header."""
        self._headers.append([name.decode("latin-1"), value.decode("latin-1")])

    def on_body(self, data: bytes) -> None:
        """Count body bytes."""
        self._body_length += len(data)

    def on_message_complete(self) -> None:
        """Queue the JSON answer."""
        parser = self._parser
        body = json.dumps(
            {
                "method": parser.get_method().decode("latin-1"),
                "path": self._url.decode("latin-1"),
                "headers": self._headers,
                "body_length": self._body_length,
            }
        ).encode() + b"\n"
        self._out.append(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body if parser.get_method() != b"HEAD" else b"")
        )
        if not parser.should_keep_alive():
            self._close = True

    def dataReceived(self, data: bytes) -> None:
        """Parse, then write all answers in one call."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()
            return
        if self._out:
            self.transport.write(b"".join(self._out))
            self._out = []
            if self._close:
                self.transport.loseConnection()


class HelloUpstream(protocol.ServerFactory):
    """Factory for the fast ``hello`` upstream."""

    protocol = HelloProtocol


class EchoUpstream(protocol.ServerFactory):
    """Factory for the JSON-describing echo upstream (``make run`` example)."""

    protocol = EchoProtocol


def make_factory(mode: str) -> protocol.ServerFactory:
    """The fast upstream factory for ``mode`` (``hello`` or ``echo``)."""
    if mode == "hello":
        return HelloUpstream()
    if mode == "echo":
        return EchoUpstream()
    raise ValueError(f"unknown mode {mode!r}")


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def main(argv: Sequence[str] | None = None) -> None:
    """Run a fast upstream: ``python -m flexgw.testing.upstream --listen HOST:PORT --mode hello|echo``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8082", help="HOST:PORT (default %(default)s)")
    parser.add_argument("--mode", choices=("hello", "echo"), default="hello")
    args = parser.parse_args(argv)
    host, port = _parse_listen(args.listen)

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    reactor.listenTCP(port, make_factory(args.mode), interface=host, backlog=1024)
    print(f"flexgw test upstream ({args.mode}) listening on {host}:{port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
