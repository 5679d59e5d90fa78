"""gRPC calls on flexgw's own HTTP/2 client pool, for the gateway's side calls to gRPC services:
unary ones (ext_authz's Check, OTLP export) and bidirectional streams (ext_proc's Process). One
stream per call, answers read within a size bound, their gRPC framing checked, `grpc-status`
mapped to an error.

A call is a `ConnectionWaiter` for the pool and then the `sink` of the stream it gets, as an
exchange would be: it gives the stream the request head as HTTP/2 fields and its messages as
body bytes (a streaming call's each one DATA frame), and the stream reports the response head,
DATA, trailers and end to it.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure

from flexgw.http.h2.fields import request_field
from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.h2 import H2UpstreamPool

#: A gRPC answer larger than this (framing included) aborts the stream.
DEFAULT_LIMIT = 1 << 20


class GrpcCallError(Exception):
    """A call that did not get a usable answer; `cause` is the x-flexgw-error cause suffix:
    `unavailable` (no connection), `reset` (stream or connection lost), `bad_response`
    (not gRPC, malformed framing, too large), `status` (a non-OK grpc-status), `timeout`."""

    def __init__(self, cause: str, message: str, grpc_status: int | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.grpc_status = grpc_status


def h2_pool(
    reactor: Any, clock: Any, scheme: str, host: str, port: int, connect_timeout: float,
    tls: Any = None, key: str = "grpc-side-call",
) -> H2UpstreamPool:
    """A pool of HTTP/2 connections of its own to `host:port` (`h2c`, or `h2` with `tls`, a
    flexgw.tls.contexts.ClientTLS)."""
    upstream = Upstream(key=key, scheme=scheme, host=host, port=port, tls=tls)
    return H2UpstreamPool(
        reactor, clock, upstream, HttpSettings(connect_timeout=connect_timeout), Timeouts()
    )


class GrpcChannel:
    """A policy's HTTP/2 pool to one gRPC service (`h2c`, or `h2` over TLS with the gateway's
    policy-call TLS settings), kept in the policy services' shared state across reloads and
    closed when the gateway stops (`close_with_gateway`)."""

    def __init__(
        self, reactor: Any, clock: Any, scheme: str, host: str, port: int,
        connect_timeout: float, tls_settings: Any = None, key: str = "grpc-side-call",
    ) -> None:
        tls = None
        if scheme == "h2":
            from flexgw.tls.contexts import build_client_tls
            from flexgw.tls.settings import TLSSettings

            tls = build_client_tls(tls_settings or TLSSettings(), host, http2=True)
        self.pool = h2_pool(reactor, clock, scheme, host, port, connect_timeout, tls, key=key)

    def close_with_gateway(self) -> Deferred[None]:
        """The gateway stops: close the connections (fires once they are closed)."""
        return self.pool.abort_all()


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class _Call:
    """What unary and streaming calls share: the request head, the pool's ConnectionWaiter
    side, and the stream's sink side up to the answer's bytes (subclasses take those)."""

    def __init__(
        self, pool: H2UpstreamPool, path: bytes,
        metadata: tuple[tuple[bytes, bytes], ...] = (), limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.pool = pool
        self.path = path
        self.metadata = metadata
        self.limit = limit
        self.conn: Any = None
        self.status = 0
        self.grpc_status: bytes | None = None
        self.grpc_message = b""
        self.done = False

    def _send_head(self, conn: Any, *framing: tuple[bytes, bytes]) -> None:
        """The request head on stream `conn`, with the body's `framing` field if any."""
        fields = [(b"content-type", b"application/grpc")]
        fields.extend(request_field(name.lower(), value) for name, value in self.metadata)
        fields.extend(framing)
        fields.append((b"te", b"trailers"))
        conn.send_head(
            b"POST", self.pool.upstream.authority.encode("latin-1"), self.path, fields, False
        )

    def _give_up(self) -> None:
        """Give up the stream (or the wait for one): it is reset, the connection serves on."""
        self.done = True
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.discard(conn)
        else:
            self.pool.cancel(self)

    # -- as the pool's ConnectionWaiter ----------------------------------------------------------

    def upstream_ready(self, conn: Any, reused: bool) -> None:
        """A stream: the request goes out on it (unless the call ended meanwhile)."""
        if self.done:
            self.pool.release(conn)
            return
        self.conn = conn
        conn.begin(self, False)
        self._send_request(conn)

    def _send_request(self, conn: Any) -> None:
        """Write the request on the stream `conn` (each kind of call its own way)."""
        raise NotImplementedError

    def upstream_connect_failed(self, reason: Failure) -> None:
        """No connection to the service."""
        self._end(Failure(GrpcCallError("unavailable", reason.getErrorMessage())))

    # -- as the stream's sink --------------------------------------------------------------------

    def response_interim(self, status: int, headers: Any) -> None:
        """1xx: nothing to do."""

    def response_switched(self, rest: bytes) -> None:
        """Not gRPC."""
        self.response_malformed("protocol switch")

    def response_head(self, status: int, reason: bytes, headers: Any, keep_alive: bool) -> None:
        """The response head (a trailers-only answer carries grpc-status here)."""
        self.status = status
        self._grpc(headers)
        if status == 200 and not any(
            n.lower() == b"content-type" and v.lower().startswith(b"application/grpc")
            for n, v in headers
        ):
            self.response_malformed("the answer is not application/grpc")

    def response_trailers(self, trailers: Any) -> None:
        """The trailers: grpc-status and grpc-message."""
        self._grpc(trailers)

    def _grpc(self, headers: Any) -> None:
        for name, value in headers:
            lname = name.lower()
            if lname == b"grpc-status":
                self.grpc_status = value
            elif lname == b"grpc-message":
                self.grpc_message = value[:1024]

    def flush_response(self) -> None:
        """Nothing is relayed."""

    def _status_error(self) -> GrpcCallError | None:
        """The answer ended: give the stream back; the answer's error (None: HTTP 200 with
        grpc-status 0)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.finish()
        if self.status != 200:
            return GrpcCallError("bad_response", f"HTTP status {self.status}")
        status = self.grpc_status
        if status is None or not status.isdigit():
            return GrpcCallError("bad_response", "no grpc-status")
        if status != b"0":
            text = self.grpc_message.decode("latin-1")
            return GrpcCallError("status", f"grpc-status {status.decode()} {text}".strip(),
                                 int(status))
        return None

    def response_malformed(self, message: str) -> None:
        """A broken answer: reset the stream."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.discard(conn)
        self._end(Failure(GrpcCallError("bad_response", message)))

    def upstream_lost(self, got_response_bytes: bool, message: str = "connection lost") -> None:
        """The stream or the connection ended before the answer."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.detach(conn)
        self._end(Failure(GrpcCallError("reset", message)))

    def _end(self, result: Any) -> None:
        raise NotImplementedError


class UnaryCall(_Call):
    """One unary gRPC call: `start()` fires with the answer's message bytes, or fails with
    GrpcCallError; cancelling the Deferred (a timeout) resets the stream."""

    def __init__(
        self, pool: H2UpstreamPool, path: bytes, message: bytes,
        metadata: tuple[tuple[bytes, bytes], ...] = (), limit: int = DEFAULT_LIMIT,
    ) -> None:
        super().__init__(pool, path, metadata, limit)
        self.message = message
        self.result: Deferred[bytes] = Deferred(lambda _: self._give_up())
        self.body = bytearray()

    def start(self) -> Deferred[bytes]:
        """Ask the pool for a stream."""
        self.pool.acquire(self)
        return self.result

    def _send_request(self, conn: Any) -> None:
        """The request: its head and its one message."""
        framed = frame(self.message)
        self._send_head(conn, (b"content-length", b"%d" % len(framed)))
        conn.write(framed)
        conn.end_request()

    def response_body(self, data: bytes) -> None:
        """A piece of the framed answer, within the bound."""
        if self.done:
            return
        if len(self.body) + len(data) > self.limit:
            self.response_malformed(f"an answer larger than {self.limit} bytes")
            return
        self.body += data

    def response_complete(self) -> None:
        """The answer is whole: its one message with grpc-status 0, else an error."""
        if self.done:
            return
        error = self._status_error()
        if error is not None:
            self._end(Failure(error))
            return
        body = bytes(self.body)
        if len(body) < 5 or body[0] != 0:
            self._end(Failure(GrpcCallError("bad_response", "no (uncompressed) gRPC message")))
            return
        (size,) = struct.unpack(">I", body[1:5])
        if size != len(body) - 5:
            self._end(Failure(GrpcCallError("bad_response", "gRPC message framing is wrong")))
            return
        self._end(body[5:])

    def _end(self, result: Any) -> None:
        if self.done:
            return
        self.done = True
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)


class StreamCall(_Call):
    """One bidirectional-streaming gRPC call. `open()` asks for a stream; `send(message)` sends
    a message (kept until the stream is up); `receive()` fires with the next answer message, or
    fails with GrpcCallError when the call ended without one (`closed`: the service ended it
    with grpc-status 0), was reset, broke the framing or sent a message over `limit`;
    `close(linger, clock)` half-closes and lets the service end the stream within `linger`
    seconds (then it is reset); `cancel()` resets the stream now."""

    def __init__(
        self, pool: H2UpstreamPool, path: bytes,
        metadata: tuple[tuple[bytes, bytes], ...] = (), limit: int = DEFAULT_LIMIT,
    ) -> None:
        super().__init__(pool, path, metadata, limit)
        self.outbox: list[bytes] = []  # messages written once the stream is up
        self.half_closed = False
        self.buffer = bytearray()
        self.messages: deque[bytes] = deque()
        self.waiter: Deferred[bytes] | None = None
        self.error: Failure | None = None  # how the call ended (receive() fails with it)
        self.linger: Any = None

    def open(self) -> StreamCall:
        """Ask the pool for a stream."""
        self.pool.acquire(self)
        return self

    def send(self, message: bytes) -> None:
        """Send one message (one DATA frame's worth)."""
        if self.done or self.half_closed:
            return
        framed = frame(message)
        if self.conn is None:
            self.outbox.append(framed)
        else:
            self.conn.write(framed)

    def receive(self) -> Deferred[bytes]:
        """The next message of the answer (cancelling the wait leaves the call as it is)."""
        if self.messages:
            return succeed(self.messages.popleft())
        if self.error is not None:
            return fail(self.error)
        waiter = self.waiter = Deferred(self._stop_waiting)
        return waiter

    def _stop_waiting(self, waiter: Deferred[bytes]) -> None:
        if self.waiter is waiter:
            self.waiter = None

    def close(self, linger: float, clock: Any) -> None:
        """Half-close (no more messages); the stream is reset unless the service ends it
        within `linger` seconds."""
        if self.done or self.half_closed:
            return
        self.half_closed = True
        if self.conn is not None:
            self.conn.end_request()
        self.linger = clock.callLater(linger, self.cancel)

    def cancel(self) -> None:
        """Reset the stream now (or stop waiting for one)."""
        if self.done:
            return
        self._give_up()
        self._end(Failure(GrpcCallError("reset", "cancelled")))

    def _send_request(self, conn: Any) -> None:
        """The head and every message sent so far."""
        outbox, self.outbox = self.outbox, []
        self._send_head(conn)
        for framed in outbox:
            conn.write(framed)
        if self.half_closed:
            conn.end_request()

    def response_body(self, data: bytes) -> None:
        """Answer bytes: every whole message is handed on; a message over the bound, or a
        compressed one, breaks the call."""
        if self.done:
            return
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 5:
            if buffer[0] != 0:
                self.response_malformed("a compressed gRPC message (none was offered)")
                return
            (size,) = struct.unpack(">I", buffer[1:5])
            if size > self.limit:
                self.response_malformed(f"a message larger than {self.limit} bytes")
                return
            if len(buffer) < 5 + size:
                break
            message = bytes(buffer[5:5 + size])
            del buffer[:5 + size]
            waiter = self.waiter
            if waiter is not None:
                self.waiter = None
                waiter.callback(message)
                if self.done:
                    return
            else:
                self.messages.append(message)

    def response_complete(self) -> None:
        """The service ended the call: grpc-status 0 is `closed`, anything else its error."""
        if self.done:
            return
        error = self._status_error()
        if error is None:
            error = (GrpcCallError("bad_response", "a partial gRPC message") if self.buffer
                     else GrpcCallError("closed", "the service ended the call"))
        self._end(Failure(error))

    def _end(self, result: Any) -> None:
        """The call is over: a waiting receive() fails with why; later ones too."""
        if self.error is not None:
            return
        self.done = True
        linger, self.linger = self.linger, None
        if linger is not None and linger.active():
            linger.cancel()
        self.error = result
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.errback(result)


def unary(
    pool: H2UpstreamPool, path: bytes, message: bytes, timeout: float, clock: Any,
    metadata: tuple[tuple[bytes, bytes], ...] = (), limit: int = DEFAULT_LIMIT,
) -> Deferred[bytes]:
    """A unary call within `timeout` seconds (a `grpc-timeout` is sent too); the answer's message."""
    millis = max(1, int(timeout * 1000))
    metadata = ((b"grpc-timeout", b"%dm" % millis), *metadata)
    d = UnaryCall(pool, path, message, metadata, limit).start()

    def timed_out(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return Failure(GrpcCallError("timeout", f"no answer in {timeout:g}s"))
        return failure

    d.addTimeout(timeout, clock)
    return d.addErrback(timed_out)
