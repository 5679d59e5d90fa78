"""Unary gRPC calls (and one bidirectional stream form) on flexgw's own HTTP/2 client pool, for
the gateway's side calls to gRPC services (ext_authz's Check): one stream per call, the answer
read within a size bound, its gRPC framing checked, `grpc-status` mapped to an error.

A call is a `ConnectionWaiter` for the pool and then the `sink` of the stream it gets, as an
exchange would be: it writes the request as HTTP/1.1 bytes (the stream sends HTTP/2 frames) and
the stream reports the response head, DATA, trailers and end to it.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

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


class _GrpcHead:
    """What the HTTP/2 stream asks of its sink's request: `te: trailers` (gRPC wants trailers)."""

    headers = ((b"te", b"trailers"),)


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


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class UnaryCall:
    """One unary gRPC call: `start()` fires with the answer's message bytes, or fails with
    GrpcCallError; cancelling the Deferred (a timeout) resets the stream."""

    head = _GrpcHead()

    def __init__(
        self, pool: H2UpstreamPool, path: bytes, message: bytes,
        metadata: tuple[tuple[bytes, bytes], ...] = (), limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.pool = pool
        self.path = path
        self.message = message
        self.metadata = metadata
        self.limit = limit
        self.result: Deferred[bytes] = Deferred(self._cancel)
        self.conn: Any = None
        self.status = 0
        self.grpc_status: bytes | None = None
        self.grpc_message = b""
        self.body = bytearray()
        self.done = False

    def start(self) -> Deferred[bytes]:
        """Ask the pool for a stream."""
        self.pool.acquire(self)
        return self.result

    def _cancel(self, _: Deferred[bytes]) -> None:
        """Timed out: give up the stream (or the wait for one)."""
        self.done = True
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.discard(conn)  # resets the stream; the connection serves on
        else:
            self.pool.cancel(self)

    # -- as the pool's ConnectionWaiter ----------------------------------------------------------

    def upstream_ready(self, conn: Any, reused: bool) -> None:
        """A stream: send the request."""
        if self.done:
            self.pool.release(conn)
            return
        self.conn = conn
        conn.begin(self, False)
        framed = frame(self.message)
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in self.metadata)
        conn.write(
            b"POST " + self.path + b" HTTP/1.1\r\nHost: "
            + self.pool.upstream.authority.encode("latin-1")
            + b"\r\ncontent-type: application/grpc\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(framed) + framed
        )

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

    def response_body(self, data: bytes) -> None:
        """A piece of the framed answer, within the bound."""
        if self.done:
            return
        if len(self.body) + len(data) > self.limit:
            self.response_malformed(f"an answer larger than {self.limit} bytes")
            return
        self.body += data

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

    def response_complete(self) -> None:
        """The answer is whole: its one message with grpc-status 0, else an error."""
        if self.done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.finish()
        if self.status != 200:
            self._end(Failure(GrpcCallError("bad_response", f"HTTP status {self.status}")))
            return
        status = self.grpc_status
        if status is None or not status.isdigit():
            self._end(Failure(GrpcCallError("bad_response", "no grpc-status")))
            return
        if status != b"0":
            text = self.grpc_message.decode("latin-1")
            self._end(Failure(GrpcCallError(
                "status", f"grpc-status {status.decode()} {text}".strip(), int(status))))
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
        if self.done:
            return
        self.done = True
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)


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
