"""HTTP/2 client-side conformance (RFC 9113) of the gateway's `h2c://` upstream connections,
against a raw-frame upstream that misbehaves on purpose (`flexgw.testing.h2raw.ScriptedUpstream`):
no SETTINGS, a first frame other than SETTINGS, invalid SETTINGS, an oversize frame, a header
block that does not decode, a flow-control window overflow, GOAWAY below the streams in flight,
DATA after END_STREAM. The downstream client gets a 502 (503 when the connection never became
usable, as for any connect failure; for gRPC a trailers-only UNAVAILABLE) with an `x-flexgw-error` cause, the access log says why, and the downstream
connection serves its next stream."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import h2raw
from flexgw.testing.h2raw import (
    DATA,
    FrameConnection,
    RawFrame,
    Script,
    ScriptedConnection,
    ScriptedUpstream,
    data,
    goaway,
    settings,
    window_update,
)
from tests.harness import Gateway, free_port
from tests.test_h2_proxy import api

_CONFIGURATION = (
    "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
    "metadata: {name: timeouts}\nspec:\n  http: {connectTimeoutSeconds: 1}\n"
)


class _Misbehaving(Script):
    """Misbehaves on the first connection only (`first`); later connections are answered
    well, so the gateway's next request shows it recovered."""

    def __init__(self) -> None:
        self.connections = 0
        self.bad: ScriptedConnection | None = None

    def connected(self, conn: ScriptedConnection) -> None:
        """The first connection misbehaves from its start when `first_connected` says so."""
        self.connections += 1
        if self.connections == 1:
            self.bad = conn
            self.first_connected(conn)
        else:
            super().connected(conn)

    def frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """Frames of the first connection go to `first_frame`."""
        if conn is self.bad:
            self.first_frame(conn, received)
        else:
            super().frame(conn, received)

    def first_connected(self, conn: ScriptedConnection) -> None:
        """A proper preface by default."""
        conn.send(settings())

    def first_frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """Well-behaved by default, except for `first_request`."""
        if received.fields is not None:
            self.first_request(conn, received.stream_id, received.fields)
        else:
            super().frame(conn, received)

    def first_request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """The misbehaviour."""


class _UpstreamCase(TestCase):
    """A gateway whose Service is an h2c ScriptedUpstream; raw-frame h2c clients."""

    def start(self, script: Script) -> None:
        """Start the scripted upstream and the gateway (connect timeout 1 s)."""
        self.upstream = ScriptedUpstream(script)
        upstream_port = self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.gateway = Gateway(self, {"api.yaml": api(self.port, upstream_port, "h2c", _CONFIGURATION)})
        self.gateway.start()

    async def client(self) -> FrameConnection:
        """A raw-frame h2c client of the gateway."""
        conn = await h2raw.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(lambda: conn.closed or conn.transport.abortConnection())
        return conn

    async def get(self, conn: FrameConnection, stream_id: int, path: bytes = b"/", grpc: bool = False) -> h2raw.Response:
        """A request on the stream; its whole response."""
        extra = [(b"content-type", b"application/grpc"), (b"te", b"trailers")] if grpc else []
        conn.request(stream_id, fields=conn.request_fields(b"POST" if grpc else b"GET", path, extra=extra))
        return await conn.response(stream_id)

    async def bad_gateway(self, cause: str, grpc: bool = False, status: int = 502) -> None:
        """The first request gets a 502 (`status`; UNAVAILABLE for gRPC) naming `cause`, logged
        with it;
        the same downstream connection then serves its next stream from a new upstream
        connection."""
        conn = await self.client()
        response = await self.get(conn, 1, b"/bad", grpc=grpc)
        if grpc:
            self.assertEqual(response.status, 200)
            self.assertEqual(dict(response.headers).get(b"grpc-status"), b"14")
        else:
            self.assertEqual(response.status, status)
        self.assertEqual(response.header(b"x-flexgw-error"), [cause.encode()])
        records = self.gateway.records()
        self.assertEqual((records[-1]["status"], records[-1]["error"]), (status, cause))
        good = await self.get(conn, 3, b"/good")
        self.assertEqual((good.status, good.body), (200, b"ok"))


class _NoSettings(_Misbehaving):
    """Accepts the connection, never sends SETTINGS."""

    def first_connected(self, conn: ScriptedConnection) -> None:
        """Silence."""

    def first_frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """Silence."""


class _PingFirst(_Misbehaving):
    """Its first frame is a PING, not SETTINGS (RFC 9113 §3.4)."""

    def first_connected(self, conn: ScriptedConnection) -> None:
        """PING instead of the server preface."""
        conn.send(h2raw.ping(), settings())


class _InvalidSettings(_Misbehaving):
    """SETTINGS_MAX_FRAME_SIZE below 16,384 (RFC 9113 §6.5.2: PROTOCOL_ERROR)."""

    def first_connected(self, conn: ScriptedConnection) -> None:
        """An invalid SETTINGS value."""
        conn.send(settings((h2raw.MAX_FRAME_SIZE, 100)))


class _Oversize(_Misbehaving):
    """A DATA frame over the gateway's SETTINGS_MAX_FRAME_SIZE (16,384)."""

    def first_request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """HEADERS, then 20,000 octets in one DATA frame."""
        conn.send(conn.response_headers(stream_id), data(stream_id, b"x" * 20000, end_stream=True))


class _BadHeaderBlock(_Misbehaving):
    """A response header block that does not decode."""

    def first_request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """HEADERS with a truncated literal."""
        conn.send(h2raw.frame(h2raw.HEADERS, h2raw.END_HEADERS, stream_id, b"\x40"))


class _WindowOverflow(_Misbehaving):
    """WINDOW_UPDATEs taking the gateway's connection send window past 2^31-1."""

    def first_request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """Two increments of 2^31-1."""
        conn.send(window_update(0, 2**31 - 1), window_update(0, 2**31 - 1))


class _DataAfterEnd(_Misbehaving):
    """The response ends, then a stray DATA frame follows on the same stream."""

    def __init__(self) -> None:
        super().__init__()
        self.resets: list[RawFrame] = []

    def first_request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """200 "ok" (END_STREAM), then DATA "leak" on the closed stream."""
        conn.send(conn.response_headers(stream_id), data(stream_id, b"ok", end_stream=True))
        conn.send(data(stream_id, b"leak", end_stream=True))

    def first_frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """Keep the gateway's RST_STREAMs."""
        if received.kind == h2raw.RST_STREAM:
            self.resets.append(received)
        super().first_frame(conn, received)


class MisbehavingUpstreamTests(_UpstreamCase):
    """Connection-level misbehaviour of an h2c upstream: 502 with its cause, then recovery."""

    async def test_no_settings(self) -> None:
        """§3.4: no SETTINGS within the connect timeout: the connection never became usable,
        so a connect failure (503 upstream_connect_failure, as for any upstream connect)."""
        self.start(_NoSettings())
        await self.bad_gateway("upstream_connect_failure", status=503)

    async def test_first_frame_not_settings(self) -> None:
        """§3.4: a PING before SETTINGS: not an HTTP/2 server; 503 upstream_connect_failure."""
        self.start(_PingFirst())
        await self.bad_gateway("upstream_connect_failure", status=503)

    async def test_invalid_settings(self) -> None:
        """§6.5.2: SETTINGS_MAX_FRAME_SIZE 100 in the upstream's preface: connection error
        before any stream; 503 upstream_connect_failure."""
        self.start(_InvalidSettings())
        await self.bad_gateway("upstream_connect_failure", status=503)

    async def test_oversize_frame(self) -> None:
        """§4.2: a DATA frame over our SETTINGS_MAX_FRAME_SIZE: connection error; 502."""
        self.start(_Oversize())
        await self.bad_gateway("upstream_bad_response")

    async def test_header_block_not_decodable(self) -> None:
        """§4.3: a response header block that does not decode: connection error; 502."""
        self.start(_BadHeaderBlock())
        await self.bad_gateway("upstream_bad_response")

    async def test_window_overflow(self) -> None:
        """§6.9.1: the upstream's WINDOW_UPDATEs overflow our send window: connection error;
        502."""
        self.start(_WindowOverflow())
        await self.bad_gateway("upstream_bad_response")

    async def test_header_block_not_decodable_grpc(self) -> None:
        """The same for a gRPC request: a trailers-only UNAVAILABLE (grpc-status 14)."""
        self.start(_BadHeaderBlock())
        await self.bad_gateway("upstream_bad_response", grpc=True)

    async def test_data_after_end_stream(self) -> None:
        """§5.1: DATA on a stream the upstream ended: the client's response is the one that
        ended (nothing of the stray DATA is forwarded), the upstream stream is reset
        STREAM_CLOSED, and the downstream connection's next stream is served."""
        script = _DataAfterEnd()
        self.start(script)
        conn = await self.client()
        response = await self.get(conn, 1, b"/bad")
        self.assertEqual((response.status, response.body), (200, b"ok"))
        good = await self.get(conn, 3, b"/good")
        self.assertEqual((good.status, good.body), (200, b"ok"))
        self.assertEqual(b"".join(f.payload for f in conn.frames_of(DATA)), b"okok")
        self.assertEqual({f.error_code for f in script.resets}, {h2raw.STREAM_CLOSED})


class _GoAwayBelow(Script):
    """The first connection waits for two requests (streams 1 and 3), then sends
    GOAWAY(last_stream_id=1): stream 3 was never processed. With `answer`, stream 1 is answered
    and the connection closed once idle; without, the connection is closed at once (stream 1
    was processed, its response is lost)."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.pending: list[int] = []
        self.connections: list[ScriptedConnection] = []
        self.seen: list[tuple[int, bytes]] = []  # (connection number, path)
        self.first_seen: defer.Deferred[None] = defer.Deferred()

    def connected(self, conn: ScriptedConnection) -> None:
        """Count the connection; a proper preface."""
        self.connections.append(conn)
        super().connected(conn)

    def request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """First connection: hold requests until two came; later ones: answer."""
        number = self.connections.index(conn)
        path = dict(fields)[b":path"]
        self.seen.append((number, path))
        if not self.first_seen.called:
            self.first_seen.callback(None)
        if number:
            conn.send(conn.response_headers(stream_id), data(stream_id, path, end_stream=True))
            return
        self.pending.append(stream_id)
        if len(self.pending) < 2:
            return
        first = self.pending[0]
        conn.send(goaway(first, h2raw.NO_ERROR))
        if self.answer:
            conn.send(conn.response_headers(first), data(first, b"answered", end_stream=True))
        else:
            conn.transport.loseConnection()


class UpstreamGoAwayTests(_UpstreamCase):
    """§6.8: GOAWAY with a last stream id below the streams in flight."""

    async def _two(self, script: _GoAwayBelow) -> tuple[h2raw.Response, h2raw.Response]:
        self.start(script)
        conn = await self.client()
        conn.request(1, fields=conn.request_fields(path=b"/one"))
        await script.first_seen  # the second request on the same upstream connection, later
        conn.request(3, fields=conn.request_fields(path=b"/two"))
        return await conn.response(1), await conn.response(3)

    async def test_unprocessed_stream_retried(self) -> None:
        """The stream above last_stream_id was not processed: it is retried on a new upstream
        connection and answered; the stream below is answered on the old one."""
        script = _GoAwayBelow(answer=True)
        one, two = await self._two(script)
        self.assertEqual((one.status, one.body), (200, b"answered"))
        self.assertEqual((two.status, two.body), (200, b"/two"))
        self.assertEqual(script.seen, [(0, b"/one"), (0, b"/two"), (1, b"/two")])

    async def test_processed_stream_fails_cleanly(self) -> None:
        """The upstream closes after GOAWAY without answering the processed stream: that one
        gets a 502 upstream_reset (never retried: it may have acted on it); the unprocessed one
        is retried and answered."""
        script = _GoAwayBelow(answer=False)
        one, two = await self._two(script)
        self.assertEqual((one.status, one.header(b"x-flexgw-error")), (502, [b"upstream_reset"]))
        self.assertEqual((two.status, two.body), (200, b"/two"))
        self.assertEqual(script.seen, [(0, b"/one"), (0, b"/two"), (1, b"/two")])
        errors = sorted(str(r["error"]) for r in self.gateway.records())
        self.assertEqual(errors, ["None", "upstream_reset"])


class _TableSize(Script):
    """Answers every request 200 with a field HPACK inserts into its dynamic table
    (`x-served-by`), the next answers indexing it; keeps the gateway's SETTINGS. With
    `shrink`, its encoder obeys the gateway's SETTINGS_HEADER_TABLE_SIZE (as nginx, grpcio and
    Go do); without, it keeps its 4096-byte table (RFC 7541 §4.2 says it must not)."""

    def __init__(self, shrink: bool) -> None:
        self.shrink = shrink
        self.table_sizes: list[int] = []

    def frame(self, conn: ScriptedConnection, received: RawFrame) -> None:
        """The gateway's SETTINGS values of SETTINGS_HEADER_TABLE_SIZE noted (and obeyed)."""
        if received.kind == h2raw.SETTINGS and not received.has(h2raw.ACK):
            payload = received.payload
            for at in range(0, len(payload), 6):
                if int.from_bytes(payload[at : at + 2], "big") == h2raw.HEADER_TABLE_SIZE:
                    size = int.from_bytes(payload[at + 2 : at + 6], "big")
                    self.table_sizes.append(size)
                    if self.shrink:
                        conn.encoder.header_table_size = size
        super().frame(conn, received)

    def request(self, conn: ScriptedConnection, stream_id: int, fields: h2raw.Fields) -> None:
        """200 "ok" with x-served-by."""
        head = conn.response_headers(stream_id, extra=[(b"x-served-by", b"scripted")])
        conn.send(head, data(stream_id, b"ok", end_stream=True))


class HeaderTableSizeTests(_UpstreamCase):
    """The gateway asks its upstreams for no HPACK dynamic table (their repeated response heads
    are then decoded from its cache); an upstream that keeps one anyway is still understood."""

    async def _three(self, shrink: bool) -> None:
        script = _TableSize(shrink)
        self.start(script)
        conn = await self.client()
        for stream_id in (1, 3, 5):
            response = await self.get(conn, stream_id)
            self.assertEqual((response.status, response.body), (200, b"ok"))
            self.assertEqual(response.header(b"x-served-by"), [b"scripted"])
        self.assertEqual(script.table_sizes, [0])
        [upstream] = self.upstream.connections
        self.assertEqual(len(upstream.encoder.header_table.dynamic_entries), 0 if shrink else 1)

    async def test_upstream_obeys(self) -> None:
        """SETTINGS_HEADER_TABLE_SIZE 0: an upstream that obeys inserts nothing."""
        await self._three(shrink=True)

    async def test_upstream_keeps_its_table(self) -> None:
        """An upstream that keeps its table (no size update, its fields indexed) is decoded."""
        await self._three(shrink=False)
