"""A raw-frame HTTP/2 peer for conformance tests: frames built byte by byte, malformed ones too.

Nothing here uses an HTTP/2 state machine: frames are written as the bytes a test asks for
(`frame`, `settings`, `window_update`...), header blocks are encoded with the `hpack` library
(or hand-made, for HPACK errors), and every frame the other side sends is kept as a `RawFrame`
(header blocks decoded in arrival order). So the checks judge any HTTP/2 implementation alike,
whatever codec it runs:

- `FrameConnection` is a client (prior knowledge h2c, or over TLS with ALPN h2) with the checks
  RFC 9113 asks of a server's reaction: `connection_error` (GOAWAY with one of the codes, then
  the connection closes), `stream_error` (RST_STREAM on the stream with one of the codes),
  `response` (a whole response on the stream), `still_alive` (a PING answered: the frame before
  it was ignored), `settings_ack`, `ping_ack`; the frames not read yet are queued per stream,
  so a wait for one stream (`response`, `stream_error`, `next(stream_id)`) takes that stream's
  frames and the connection's, and leaves the other streams' for their own waits;
- `ScriptedUpstream` is a server whose every reaction a test writes (a misbehaving h2c upstream):
  it reads the client's preface, keeps the frames, and calls the test's script on each.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import hpack
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.python.failure import Failure

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED = range(6)
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = range(6, 12)
# SETTINGS parameters (RFC 9113 §6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

_NAMES = {
    DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE", PING: "PING", GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE", CONTINUATION: "CONTINUATION",
}

Fields = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------- frame builders


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One frame as bytes: `length` overrides the length field (a lying header)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def settings(*pairs: tuple[int, int], ack: bool = False, stream_id: int = 0) -> bytes:
    """A SETTINGS frame with (identifier, value) pairs."""
    payload = b"".join(struct.pack(">HI", ident, value) for ident, value in pairs)
    return frame(SETTINGS, ACK if ack else 0, stream_id, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame."""
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    """A RST_STREAM frame."""
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def ping(data: bytes = b"\0" * 8, ack: bool = False, stream_id: int = 0) -> bytes:
    """A PING frame."""
    return frame(PING, ACK if ack else 0, stream_id, data)


def goaway(last_stream_id: int, code: int = NO_ERROR, stream_id: int = 0, debug: bytes = b"") -> bytes:
    """A GOAWAY frame."""
    return frame(GOAWAY, 0, stream_id, struct.pack(">II", last_stream_id, code) + debug)


def priority(stream_id: int, depends_on: int, weight: int = 16, exclusive: bool = False) -> bytes:
    """A PRIORITY frame."""
    return frame(PRIORITY, 0, stream_id, _priority_fields(depends_on, weight, exclusive))


def data(stream_id: int, payload: bytes, end_stream: bool = False, pad: int | None = None) -> bytes:
    """A DATA frame (`pad`: PADDED with that many padding bytes)."""
    flags = END_STREAM if end_stream else 0
    if pad is not None:
        return frame(DATA, flags | PADDED, stream_id, bytes((pad,)) + payload + b"\0" * pad)
    return frame(DATA, flags, stream_id, payload)


def _priority_fields(depends_on: int, weight: int, exclusive: bool) -> bytes:
    return struct.pack(">IB", depends_on | (0x80000000 if exclusive else 0), weight - 1)


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with `first` holding the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


# --------------------------------------------------------------------------- received frames


@attrs.define(eq=False)
class RawFrame:
    """A frame the peer sent; `fields` is the decoded header block (on the frame ending it)."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes
    fields: Fields | None = None

    @property
    def error_code(self) -> int:
        """RST_STREAM's code, or GOAWAY's."""
        if self.kind == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        return int(struct.unpack(">I", self.payload[:4])[0])

    @property
    def last_stream_id(self) -> int:
        """GOAWAY's last stream id."""
        return int(struct.unpack(">I", self.payload[:4])[0]) & 0x7FFFFFFF

    @property
    def increment(self) -> int:
        """WINDOW_UPDATE's increment."""
        return int(struct.unpack(">I", self.payload[:4])[0]) & 0x7FFFFFFF

    @property
    def settings(self) -> dict[int, int]:
        """SETTINGS' parameters."""
        return {
            ident: value
            for ident, value in (
                struct.unpack(">HI", self.payload[i : i + 6]) for i in range(0, len(self.payload) - 5, 6)
            )
        }

    def has(self, flag: int) -> bool:
        """The flag is set."""
        return bool(self.flags & flag)

    def __repr__(self) -> str:
        name = _NAMES.get(self.kind, f"type 0x{self.kind:x}")
        extra = ""
        if self.kind in (RST_STREAM, GOAWAY) and len(self.payload) >= 4:
            extra = f" code={self.error_code}"
        return f"<{name} stream={self.stream_id} flags=0x{self.flags:x} len={len(self.payload)}{extra}>"


class _FrameReader:
    """Splits bytes into frames and decodes header blocks (one HPACK decoder per direction)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.block: bytearray | None = None

    def feed(self, data: bytes) -> list[RawFrame]:
        """The whole frames that `data` completes."""
        self.buffer += data
        out = []
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 9:
            size = int.from_bytes(buf[pos : pos + 3], "big")
            if len(buf) - pos - 9 < size:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            received = RawFrame(kind, flags, stream_id, buf[pos + 9 : pos + 9 + size])
            self._decode(received)
            out.append(received)
            pos += 9 + size
        self.buffer = buf[pos:]
        return out

    def _decode(self, received: RawFrame) -> None:
        kind, payload = received.kind, received.payload
        if kind in (HEADERS, PUSH_PROMISE):
            start, end = 0, len(payload)
            if received.flags & PADDED:
                start, end = 1, end - payload[0]
            if kind == HEADERS and received.flags & PRIORITY_FLAG:
                start += 5
            if kind == PUSH_PROMISE:
                start += 4
            self.block = bytearray(payload[start:end])
        elif kind == CONTINUATION and self.block is not None:
            self.block += payload
        else:
            return
        if received.flags & END_HEADERS and self.block is not None:
            received.fields = list(self.decoder.decode(bytes(self.block), raw=True))
            self.block = None


@attrs.define(eq=False)
class Response:
    """A whole response read off one stream."""

    status: int
    headers: Fields
    body: bytes
    trailers: Fields | None = None

    def header(self, name: bytes) -> list[bytes]:
        """All values of a response header."""
        return [v for n, v in self.headers if n == name]


class ConformanceFailure(AssertionError):
    """The peer did not react as the RFC requires."""


# --------------------------------------------------------------------------- client


class FrameConnection(protocol.Protocol):
    """A raw-frame HTTP/2 client connection (see the module docstring)."""

    transport: Any

    def __init__(self, reactor: Any, preface: bytes | None = None, timeout: float = 5.0) -> None:
        """`preface` replaces the connection preface and first SETTINGS frame written at connect
        (b"" writes nothing); `timeout` bounds every wait for a frame."""
        self.reactor = reactor
        self.timeout = timeout
        self.preface = PREFACE + settings() if preface is None else preface
        self.encoder = hpack.Encoder()
        self.reader = _FrameReader()
        self.received: list[RawFrame] = []
        # Frames not read yet, one queue per stream (0: the connection's), each frame with its
        # arrival number: a read for one stream leaves the other streams' frames queued.
        self.unread: dict[int, deque[tuple[int, RawFrame]]] = {}
        self._arrived = 0
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiter: defer.Deferred[None] | None = None
        self._pings = 0
        self.next_stream_id = 1  # the lowest client stream id no HEADERS built here used yet

    # -- protocol --------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Write the preface (and our SETTINGS)."""
        if self.preface:
            self.transport.write(self.preface)

    def dataReceived(self, data: bytes) -> None:
        """Keep the frames; wake the waiting check."""
        frames = self.reader.feed(data)
        self.received.extend(frames)
        for received in frames:
            self.unread.setdefault(received.stream_id, deque()).append((self._arrived, received))
            self._arrived += 1
        self._wake()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """The server closed (or the test aborted) the connection."""
        self.closed = True
        self._wake()
        self.lost.callback(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    # -- sending ---------------------------------------------------------------------------------

    def send(self, *chunks: bytes) -> None:
        """Bytes (built frames) to the server, in one write."""
        self.transport.write(b"".join(chunks))

    def block(self, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A header block from this connection's HPACK encoder."""
        return bytes(self.encoder.encode(list(fields)))

    @staticmethod
    def request_fields(
        method: bytes = b"GET",
        path: bytes = b"/",
        authority: bytes = b"example.test",
        extra: Iterable[tuple[bytes, bytes]] = (),
        scheme: bytes = b"http",
    ) -> Fields:
        """A request's fields, pseudo-headers first."""
        return [(b":method", method), (b":scheme", scheme), (b":path", path), (b":authority", authority), *extra]

    def headers(
        self,
        stream_id: int,
        fields: Sequence[tuple[bytes, bytes]] | None = None,
        end_stream: bool = True,
        end_headers: bool = True,
        block: bytes | None = None,
        flags: int = 0,
        prefix: bytes = b"",
    ) -> bytes:
        """A HEADERS frame (the request of `request_fields()` by default); `block` is a
        hand-made header block, `prefix` goes before it (pad length, priority fields) with
        `flags` saying so. Returned, not sent."""
        if block is None:
            block = self.block(self.request_fields() if fields is None else fields)
        flags |= (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        if stream_id % 2:
            self.next_stream_id = max(self.next_stream_id, stream_id + 2)
        return frame(HEADERS, flags, stream_id, prefix + block)

    def request(self, stream_id: int, **options: Any) -> None:
        """Send a GET request (HEADERS with END_STREAM), or what `options` make of it."""
        self.send(self.headers(stream_id, **options))

    # -- reading ---------------------------------------------------------------------------------

    def _take(self, stream_id: int | None) -> RawFrame | None:
        """The first unread frame (of `stream_id` or the connection, if given), taken off its
        queue; None when there is none yet."""
        if stream_id is None:
            queues = [q for q in self.unread.values() if q]
        else:
            queues = [q for q in (self.unread.get(stream_id), self.unread.get(0)) if q]
        if not queues:
            return None
        return min(queues, key=lambda q: q[0][0]).popleft()[1]

    async def next(self, stream_id: int | None = None) -> RawFrame | None:
        """The next frame the server sent (None: the connection closed first). With
        `stream_id`, the next one on that stream or on the connection (stream 0): the other
        streams' frames stay unread, in order, for the reads that want them."""
        while (got := self._take(stream_id)) is None:
            if self.closed:
                return None
            waiter = self._waiter = defer.Deferred()
            try:
                await waiter.addTimeout(self.timeout, self.reactor)
            except defer.TimeoutError:
                self._waiter = None
                raise ConformanceFailure(
                    f"no frame within {self.timeout}s; received so far: {self.received}"
                ) from None
        return got

    async def handshake(self) -> RawFrame:
        """Read the server's SETTINGS (its preface, the first frame), acknowledge it and wait
        for the acknowledgement of ours; returns the server's SETTINGS."""
        first = await self.next()
        if first is None or first.kind != SETTINGS or first.has(ACK):
            raise ConformanceFailure(f"the server preface must be a SETTINGS frame, got {first!r}")
        self.send(settings(ack=True))
        await self.settings_ack()
        return first

    async def settings_ack(self) -> RawFrame:
        """Read until a SETTINGS frame with ACK (an empty one)."""
        while True:
            got = await self._expect("SETTINGS with ACK")
            if got.kind == SETTINGS and got.has(ACK):
                if got.payload:
                    raise ConformanceFailure(f"SETTINGS ACK with a payload: {got!r}")
                return got

    async def ping_ack(self, payload: bytes) -> RawFrame:
        """Read until the PING ACK echoing `payload`."""
        while True:
            got = await self._expect(f"PING ACK {payload!r}")
            if got.kind == PING and got.has(ACK) and got.payload == payload:
                return got
            if got.kind == PING and got.has(ACK):
                raise ConformanceFailure(f"PING ACK with another payload: {got.payload!r}")

    async def still_alive(self) -> None:
        """Send a PING and read up to its ACK: the connection survived what came before."""
        self._pings += 1
        payload = b"alive%03d" % (self._pings % 1000)
        self.send(ping(payload))
        await self.ping_ack(payload)

    async def _expect(self, what: str, stream_id: int = 0) -> RawFrame:
        """The next frame (of `stream_id` or the connection, if given); a GOAWAY fails the wait
        unless it is graceful (NO_ERROR) and lets `stream_id` finish."""
        got = await self.next(stream_id or None)
        if got is None:
            raise ConformanceFailure(f"connection closed while waiting for {what}; received {self.received}")
        if got.kind == GOAWAY and not (
            stream_id and got.error_code == NO_ERROR and got.last_stream_id >= stream_id
        ):
            raise ConformanceFailure(f"GOAWAY (code {got.error_code}) while waiting for {what}")
        return got

    async def connection_error(self, *codes: int) -> RawFrame:
        """Read until GOAWAY: its code must be one of `codes`; then the connection must close."""
        while True:
            got = await self.next()
            if got is None:
                raise ConformanceFailure(
                    f"connection closed without GOAWAY({codes}); received {self.received}"
                )
            if got.kind == GOAWAY:
                break
            if got.kind == RST_STREAM:
                raise ConformanceFailure(f"stream error {got!r} where a connection error {codes} is due")
        if got.error_code not in codes:
            raise ConformanceFailure(f"GOAWAY with code {got.error_code}, expected one of {codes}")
        await self.closes()
        return got

    async def closes(self) -> None:
        """Wait until the server closes the connection (frames up to then are skipped)."""
        while await self.next() is not None:
            pass

    async def stream_error(self, stream_id: int, *codes: int) -> RawFrame:
        """Read until RST_STREAM on `stream_id`: its code must be one of `codes`.

        A stream error may be escalated to a connection error (RFC 9113 §5.4.2: "an endpoint
        MAY choose to treat a stream error as a connection error"): GOAWAY with one of the
        codes, then the connection closing, passes too (returned)."""
        while True:
            got = await self.next(stream_id)
            if got is None:
                raise ConformanceFailure(f"connection closed without RST_STREAM({codes}) on {stream_id}")
            if got.kind == GOAWAY:
                if got.error_code not in codes:
                    raise ConformanceFailure(f"GOAWAY with code {got.error_code}, expected RST_STREAM {codes}")
                await self.closes()
                return got
            if got.kind == RST_STREAM and got.stream_id == stream_id:
                if got.error_code not in codes:
                    raise ConformanceFailure(f"RST_STREAM with code {got.error_code}, expected one of {codes}")
                return got

    async def response(self, stream_id: int) -> Response:
        """Read a whole response on `stream_id` (interim 1xx heads skipped)."""
        head: Fields | None = None
        trailers: Fields | None = None
        body = bytearray()
        while True:
            got = await self._expect(f"a response on stream {stream_id}", stream_id)
            if got.stream_id != stream_id:
                continue  # the connection's (SETTINGS, PING, WINDOW_UPDATE, a graceful GOAWAY)
            if got.kind == RST_STREAM:
                raise ConformanceFailure(f"stream {stream_id} reset (code {got.error_code}) instead of a response")
            if got.kind == DATA:
                if head is None:
                    raise ConformanceFailure("DATA before the response HEADERS")
                payload = got.payload
                if got.has(PADDED):
                    payload = payload[1 : len(payload) - payload[0]]
                body += payload
                if payload:
                    self.send(window_update(0, len(got.payload)), window_update(stream_id, len(got.payload)))
            elif got.fields is not None:
                if head is None:
                    status = dict(got.fields).get(b":status", b"")
                    if status.startswith(b"1") and not got.has(END_STREAM):
                        continue
                    head = got.fields
                else:
                    trailers = got.fields
            if got.has(END_STREAM) and got.kind in (DATA, HEADERS):
                if head is None:
                    raise ConformanceFailure("stream ended before the response HEADERS")
                break
        status = int(dict(head)[b":status"])
        return Response(status, [(n, v) for n, v in head if n[:1] != b":"], bytes(body), trailers)

    def frames_of(self, kind: int, stream_id: int | None = None) -> list[RawFrame]:
        """Frames of a type received so far (on one stream, if given)."""
        return [f for f in self.received if f.kind == kind and (stream_id is None or f.stream_id == stream_id)]


async def connect(
    reactor: Any, host: str, port: int, tls: Any = None, handshake: bool = True, **options: Any
) -> FrameConnection:
    """A FrameConnection to host:port (over TLS with `tls`, client connection options offering
    ALPN h2), with the SETTINGS exchange done unless `handshake` is False."""
    conn = FrameConnection(reactor, **options)
    endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    await connectProtocol(endpoint, conn)
    if handshake:
        await conn.handshake()
    return conn


# --------------------------------------------------------------------------- upstream


class ScriptedConnection(protocol.Protocol):
    """One connection of a ScriptedUpstream: the client's preface checked, its frames kept and
    handed to the script, which answers with `send` (raw frames) and `block` (HPACK)."""

    transport: Any

    def __init__(self, factory: ScriptedUpstream) -> None:
        self.factory = factory
        self.encoder = hpack.Encoder()
        self.reader = _FrameReader()
        self.received: list[RawFrame] = []
        self.preface_seen = False
        self._pending = b""

    def connectionMade(self) -> None:
        """Registered with the factory; the script's `connected` runs."""
        self.factory.connections.append(self)
        self.factory.script.connected(self)

    def dataReceived(self, data: bytes) -> None:
        """The preface, then frames, each given to the script."""
        if not self.preface_seen:
            self._pending += data
            if len(self._pending) < len(PREFACE):
                return
            if not self._pending.startswith(PREFACE):
                self.transport.abortConnection()
                return
            self.preface_seen = True
            data, self._pending = self._pending[len(PREFACE) :], b""
        for received in self.reader.feed(data):
            self.received.append(received)
            self.factory.script.frame(self, received)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Forget the connection."""
        if self in self.factory.connections:
            self.factory.connections.remove(self)
        self.factory.closed += 1

    def send(self, *chunks: bytes) -> None:
        """Raw frames to the client."""
        self.transport.write(b"".join(chunks))

    def block(self, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
        """A header block from this connection's HPACK encoder."""
        return bytes(self.encoder.encode(list(fields)))

    def response_headers(
        self, stream_id: int, status: int = 200, extra: Iterable[tuple[bytes, bytes]] = (), end_stream: bool = False
    ) -> bytes:
        """A response HEADERS frame (returned, not sent)."""
        fields = [(b":status", b"%d" % status), *extra]
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, self.block(fields))


class Script:
    """What a ScriptedUpstream does; the default is a well-behaved server answering every
    request 200 "ok"."""

    def connected(self, conn: ScriptedConnection) -> None:
        """The server preface (an empty SETTINGS frame)."""
        conn.send(settings())

    def frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """SETTINGS acknowledged, PING answered, requests handed to `request`."""
        if received.kind == SETTINGS and not received.has(ACK):
            conn.send(settings(ack=True))
        elif received.kind == PING and not received.has(ACK):
            conn.send(ping(received.payload, ack=True))
        elif received.fields is not None and received.kind in (HEADERS, CONTINUATION):
            self.request(conn, received.stream_id, received.fields)

    def request(self, conn: ScriptedConnection, stream_id: int, fields: Fields) -> None:
        """Answer a request (its header block decoded)."""
        conn.send(conn.response_headers(stream_id), data(stream_id, b"ok", end_stream=True))


class ScriptedUpstream(protocol.Factory):
    """A misbehaving-on-purpose h2c upstream: `script` decides every frame it sends."""

    def __init__(self, script: Script | Callable[[], Script] | None = None) -> None:
        self.script = script if isinstance(script, Script) else (script or Script)()
        self.connections: list[ScriptedConnection] = []
        self.closed = 0
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> ScriptedConnection:
        """One ScriptedConnection per accepted connection."""
        return ScriptedConnection(self)

    def listen(self, reactor: Any, interface: str = "127.0.0.1") -> int:
        """Listen on an ephemeral loopback port; return it."""
        self.port = reactor.listenTCP(0, self, interface=interface)
        return int(self.port.getHost().port)

    def stop(self) -> Any:
        """Stop listening and abort every connection."""
        for conn in list(self.connections):
            conn.transport.abortConnection()
        return self.port.stopListening() if self.port is not None else None
