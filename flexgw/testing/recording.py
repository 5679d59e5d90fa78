"""What the test upstreams (HTTP/1.1 in flexgw.testing.upstream, HTTP/2 in flexgw.testing.h2)
share: the recorded request, the responder hooks, the response-side exchange, the body pattern."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer

if TYPE_CHECKING:
    from flexgw.testing.upstream import UpstreamConnection

Headers = list[tuple[bytes, bytes]]


#: Reason phrases used when a responder does not give one.
REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    400: b"Bad Request",
    404: b"Not Found",
    413: b"Content Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

_PERIOD = 256
_BLOCK = bytes(range(256)) * (1024 + 1)  # 256 KiB + one period, sliced by offset


def pattern_slice(offset: int, length: int) -> bytes:
    """Return ``length`` bytes of the deterministic test pattern starting at stream ``offset``."""
    out = []
    while length > 0:
        start = offset % _PERIOD
        take = min(length, len(_BLOCK) - start)
        out.append(_BLOCK[start : start + take])
        offset += take
        length -= take
    return b"".join(out) if len(out) != 1 else out[0]


def pattern_sha256(size: int, chunk: int = 1 << 18) -> str:
    """Hex SHA-256 of the first ``size`` bytes of the test pattern (what streamed bodies carry)."""
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        take = min(chunk, size - offset)
        digest.update(pattern_slice(offset, take))
        offset += take
    return digest.hexdigest()


def _has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    """True when header ``name`` lists ``token`` (case-insensitive, comma-separated)."""
    for key, value in headers:
        if key.lower() == name and token in (p.strip().lower() for p in value.split(b",")):
            return True
    return False


def _no_body_status(status: int) -> bool:
    """True for statuses that never carry a body (1xx, 204, 304)."""
    return status < 200 or status in (204, 304)


class HeadersAndDigest:
    """Accessors shared by recorded requests and parsed responses: header lookups by name and
    the body's SHA-256 (kept even when the body itself is not)."""

    __slots__ = ()
    headers: Headers
    _digest: Any

    @property
    def body_sha256(self) -> str:
        """Hex SHA-256 of the body bytes received so far."""
        return str(self._digest.hexdigest())

    def header(self, name: bytes | str) -> list[bytes]:
        """All values of header ``name`` (case-insensitive), in arrival order."""
        key = name.encode("latin-1") if isinstance(name, str) else name
        key = key.lower()
        return [v for k, v in self.headers if k.lower() == key]

    @property
    def header_names(self) -> list[bytes]:
        """Header names as sent, in order, duplicates included."""
        return [k for k, _ in self.headers]


@attrs.define(eq=False)
class RecordedRequest(HeadersAndDigest):
    """One request exactly as it arrived at the recording upstream."""

    connection: int
    index: int
    start: int
    method: bytes = b""
    target: bytes = b""
    version: str = ""
    headers: Headers = attrs.Factory(list)
    raw_head: bytes = b""
    raw: bytes | None = None
    body: bytes | None = None
    body_length: int = 0
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bool = False
    complete: bool = False
    _body_buf: bytearray | None = attrs.field(default=None, repr=False)
    _digest: Any = attrs.field(factory=hashlib.sha256, repr=False)



class Responder:
    """Decides the response for each request; hooks are called as the request arrives.

    Subclass and override any of the hooks; the default waits for the whole request
    and then calls :meth:`respond`.
    """

    def on_headers(self, ex: Exchange) -> None:
        """Called when the request head has been parsed."""

    def on_body(self, ex: Exchange, data: bytes) -> None:
        """Called for each piece of request body."""

    def on_complete(self, ex: Exchange) -> None:
        """Called when the whole request has arrived."""
        self.respond(ex)

    def on_tunnel_data(self, ex: Exchange, data: bytes) -> None:
        """Called with bytes after an upgrade/CONNECT request head."""

    def on_reset(self, ex: Exchange, code: int) -> None:
        """Called when the peer resets an HTTP/2 stream (RST_STREAM with `code`)."""

    def respond(self, ex: Exchange) -> None:
        """Write the response (default: 200 with an empty body)."""
        ex.respond(200, [(b"Content-Length", b"0")], b"")


class Exchange:
    """The response side of one request: write a head, body pieces, finish, close or abort."""

    def __init__(self, connection: UpstreamConnection, request: RecordedRequest) -> None:
        """Bind the exchange to its connection and request."""
        self.connection = connection
        self.request = request
        self.head_sent = False
        self.finished = False
        self.status: int | None = None
        self.body_allowed = True
        self._chunked = False
        self._close_after = False
        self.state: dict[str, Any] = {}

    @property
    def blocked(self) -> bool:
        """Whether body writes should wait (HTTP/2: the stream's flow-control window is shut)."""
        return False

    @property
    def reactor(self) -> Any:
        """The reactor/clock given to the factory."""
        return self.connection.factory.reactor

    @property
    def transport(self) -> Any:
        """The connection's transport."""
        return self.connection.transport

    def write_raw(self, data: bytes) -> None:
        """Write bytes as they are, bypassing framing (for malformed responses)."""
        if self.connection.connected:
            self.connection.transport.write(data)

    def send_interim(self, status: int = 100, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Write a 1xx interim response."""
        self.write_raw(_head_bytes(status, headers, None))

    def send_head(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
        reason: bytes | None = None,
    ) -> None:
        """Write the status line and exactly the given headers; framing follows them."""
        self.status = status
        self.head_sent = True
        self._chunked = _has_token(headers, b"transfer-encoding", b"chunked")
        self._close_after = _has_token(headers, b"connection", b"close")
        self.body_allowed = not (self.request.method == b"HEAD" or _no_body_status(status))
        self.write_raw(_head_bytes(status, headers, reason))

    def write(self, data: bytes) -> None:
        """Write a piece of body (chunk-encoded when the head said chunked)."""
        if not data or not self.body_allowed:
            return
        if self._chunked:
            self.write_raw(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.write_raw(data)

    def finish(self) -> None:
        """End the response (terminal chunk), then close if either side asked to."""
        if self.finished:
            return
        self.finished = True
        if self._chunked and self.body_allowed:
            self.write_raw(b"0\r\n\r\n")
        if self._close_after or not self.request.keep_alive:
            self.close()

    def respond(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        reason: bytes | None = None,
    ) -> None:
        """Write a whole response: head, body, finish."""
        self.send_head(status, headers, reason)
        self.write(body)
        self.finish()

    def close(self) -> None:
        """Close the connection cleanly after pending writes."""
        self.connection.close()

    def abort(self) -> None:
        """Abort the connection (RST), dropping pending writes."""
        self.connection.abort()

    def stream_body(self, size: int, chunk_size: int = 65536) -> defer.Deferred[None]:
        """Write ``size`` pattern bytes honouring write backpressure; fires when all are written."""
        streamer = _BodyStreamer(self, size, chunk_size)
        self.connection._streamers.append(streamer)
        streamer.pump()
        return streamer.done


class _BodyStreamer:
    """Writes pattern bytes while the transport accepts them, pausing on backpressure."""

    def __init__(self, ex: Exchange, size: int, chunk_size: int) -> None:
        """Remember how much to write."""
        self.ex = ex
        self.remaining = size
        self.offset = 0
        self.chunk_size = chunk_size
        self.done: defer.Deferred[None] = defer.Deferred()
        self._pumping = False

    def pump(self) -> None:
        """Write until paused, finished or disconnected."""
        if self._pumping:
            return
        self._pumping = True
        conn = self.ex.connection
        try:
            ex = self.ex
            while self.remaining > 0 and not conn.write_paused and not ex.blocked and conn.connected:
                take = min(self.chunk_size, self.remaining)
                self.ex.write(pattern_slice(self.offset, take))
                self.offset += take
                self.remaining -= take
        finally:
            self._pumping = False
        if self.remaining == 0 or not conn.connected:
            if self in conn._streamers:
                conn._streamers.remove(self)
            if not self.done.called:
                self.done.callback(None)


def _head_bytes(status: int, headers: Iterable[tuple[bytes, bytes]], reason: bytes | None) -> bytes:
    """Serialise a status line and headers."""
    if reason is None:
        reason = REASONS.get(status, b"Unknown")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
    lines.append(b"\r\n")
    return b"".join(lines)
