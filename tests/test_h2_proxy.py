"""HTTP/2 through the gateway over real loopback sockets: h1/h2 both sides, trailers, gRPC-style."""

from __future__ import annotations

from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from flexgw.testing import client, h2
from flexgw.testing.upstream import RecordingUpstream, Responder, echo, fixed
from tests.harness import Gateway, free_port


def api(port: int, upstream_port: int, scheme: str = "http", documents: str = "") -> str:
    """One inline API on 127.0.0.1:port whose Service is `scheme`://127.0.0.1:upstream_port."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        "metadata: {name: test-api}\n"
        f"spec:\n  address: http://127.0.0.1:{port}\n"
        f"  services:\n    b:\n      address: {scheme}://127.0.0.1:{upstream_port}\n"
        + documents
    )


class _Grpc(Responder):
    """A gRPC-style bidirectional streaming echo: each request DATA piece is echoed at once;
    the response ends with `grpc-status` trailers."""

    def on_headers(self, ex) -> None:
        """Response head at once (streaming both ways)."""
        ex.send_head(200, [(b"content-type", b"application/grpc")])

    def on_body(self, ex, data: bytes) -> None:
        """Echo each message as it arrives."""
        ex.write(data)

    def on_complete(self, ex) -> None:
        """End with trailers (HTTP/2), or plain finish for an HTTP/1.1 exchange."""
        if hasattr(ex, "send_trailers"):
            ex.send_trailers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        else:
            ex.finish()


class _Base(TestCase):
    """Starts a recording upstream and a gateway; connects h2 clients."""

    def start(self, responder: Responder, upstream_h2: bool, documents: str = "") -> tuple[Gateway, RecordingUpstream, int]:
        upstream = RecordingUpstream(responder, reactor=reactor, h2c=upstream_h2)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        scheme = "h2c" if upstream_h2 else "http"
        gateway = Gateway(self, {"api.yaml": api(port, upstream.address[1], scheme, documents)})
        gateway.start()
        return gateway, upstream, port

    async def h2_client(self, port: int, **options) -> h2.H2Client:
        conn = await h2.connect(reactor, "127.0.0.1", port, **options)
        self.addCleanup(conn.transport.abortConnection)
        return conn


class ProxyCombinationTests(_Base):
    """h1↔h2 in all four combinations, with a recording upstream."""

    async def test_h2_to_h1(self) -> None:
        """An h2 client's request reaches an HTTP/1.1 upstream as HTTP/1.1 (Host from :authority,
        cookies joined, body chunked without content-length); the response comes back on h2."""
        gateway, upstream, port = self.start(echo(extra_headers=[(b"X-Up", b"1")]), upstream_h2=False)
        conn = await self.h2_client(port)
        response = conn.request(
            b"POST", b"/items?q=1",
            [(b"cookie", b"a=1"), (b"x-case", b"v"), (b"cookie", b"b=2")],
            body=b"hello", authority=b"api.example.test",
        )
        await response.done
        self.assertEqual(response.status, 200)
        self.assertEqual(bytes(response.body), b"hello")
        self.assertEqual(response.header(b"x-up"), [b"1"])
        seen = upstream.received[0]
        self.assertEqual((seen.method, seen.target, seen.version), (b"POST", b"/items?q=1", "1.1"))
        self.assertEqual(seen.header("x-forwarded-host"), [b"api.example.test"])
        self.assertEqual(seen.header("cookie"), [b"a=1; b=2"])
        self.assertEqual(seen.header("transfer-encoding"), [b"chunked"])
        self.assertEqual(seen.body, b"hello")
        records = gateway.records()
        self.assertEqual(records[-1]["version"], "2")
        self.assertEqual(records[-1]["status"], 200)
        self.assertEqual(records[-1]["bytes_in"], 5)

    async def test_h1_to_h2(self) -> None:
        """An HTTP/1.1 request reaches an h2c upstream as HTTP/2 (pseudo-headers, lower-case
        names, no hop-by-hop fields); the h2 response comes back as HTTP/1.1."""
        _gateway, upstream, port = self.start(echo(), upstream_h2=True)
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"POST /x HTTP/1.1\r\nHost: h.test\r\nX-Case: Keep\r\nConnection: keep-alive, X-Drop\r\n"
            b"X-Drop: 1\r\nContent-Length: 3\r\n\r\nabc",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"abc")
        seen = upstream.received[0]
        self.assertEqual(seen.version, "2")
        self.assertEqual(seen.header(":method"), [b"POST"])
        self.assertEqual(seen.header(":path"), [b"/x"])
        self.assertEqual(seen.header(":authority"), [f"127.0.0.1:{upstream.address[1]}".encode()])
        self.assertEqual(seen.header("x-case"), [b"Keep"])
        self.assertIn((b"x-case", b"Keep"), seen.headers)
        self.assertEqual(seen.header("x-drop"), [])
        self.assertEqual(seen.header("connection"), [])
        self.assertEqual(seen.header("content-length"), [b"3"])
        self.assertEqual(seen.body, b"abc")

    async def test_h2_to_h2_multiplexed(self) -> None:
        """Concurrent h2 streams are multiplexed over one pooled upstream HTTP/2 connection."""
        gateway, upstream, port = self.start(fixed(200, body=b"ok"), upstream_h2=True)
        conn = await self.h2_client(port)
        responses = [conn.request(b"GET", b"/n/%d" % i) for i in range(10)]
        await defer.gatherResults([r.done for r in responses])
        self.assertEqual([r.status for r in responses], [200] * 10)
        self.assertEqual([bytes(r.body) for r in responses], [b"ok"] * 10)
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(sorted(r.target for r in upstream.received), sorted(b"/n/%d" % i for i in range(10)))
        again = conn.request(b"GET", b"/again")
        await again.done
        self.assertEqual(len(upstream.connections), 1)
        # Every stream was counted (metrics) with its route.
        metrics = gateway.service.metrics
        self.assertEqual(sum(n for (api, _, status, _), n in metrics.requests.items() if status == 200), 11)
        [pool] = gateway.service.pools.pools.values()
        self.assertEqual((pool.active, len(pool.idle)), (0, 1))

    async def test_h1_to_h1_unchanged(self) -> None:
        """The HTTP/1.1 path still works behind the protocol selector (a request starting 'P')."""
        _gateway, upstream, port = self.start(echo(), upstream_h2=False)
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"PUT /p HTTP/1.1\r\nHost: h.test\r\nContent-Length: 2\r\n\r\nhi",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"hi")
        self.assertEqual(upstream.received[0].version, "1.1")

    async def test_grpc_style_streaming_with_trailers(self) -> None:
        """An h2 client with `te: trailers` streams messages both ways through the gateway to an
        h2 upstream; each message comes back before the call ends; `grpc-status` arrives as a
        trailer."""
        _gateway, upstream, port = self.start(_Grpc(), upstream_h2=True)
        conn = await self.h2_client(port)
        call = conn.request(
            b"POST", b"/pkg.Echo/Chat",
            [(b"content-type", b"application/grpc"), (b"te", b"trailers")], end=False,
        )
        await call.head
        self.assertEqual(call.status, 200)
        for message in (b"\x00\x00\x00\x00\x02m1", b"\x00\x00\x00\x00\x02m2"):
            before = len(call.body)
            conn.send(call.stream_id, message)
            while len(call.body) < before + len(message):
                await _next_read(conn)
            self.assertEqual(bytes(call.body[before:]), message)
        conn.end(call.stream_id)
        await call.done
        self.assertEqual(call.trailers, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        self.assertEqual(upstream.received[0].header("te"), [b"trailers"])
        self.assertEqual(upstream.received[0].header("content-type"), [b"application/grpc"])

    async def test_h2_trailers_to_h1_chunked(self) -> None:
        """Trailers of an h2 upstream response reach an HTTP/1.1 client in the last chunk."""
        _gateway, _upstream, port = self.start(_Grpc(), upstream_h2=True)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"POST /t HTTP/1.1\r\nHost: h.test\r\nTE: trailers\r\nContent-Length: 2\r\n\r\nhi")
        response = await conn.read_final_response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"hi")
        self.assertTrue(
            bytes(conn._raw).endswith(b"0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"),
            bytes(conn._raw),
        )


class MadeYouResetTests(_Base):
    """The 2025 "MadeYouReset" attack over loopback, against a recording HTTP/1.1 upstream."""

    async def test_bounded_attack_gets_goaway(self) -> None:
        """2,000 streams of HEADERS(END_STREAM) then DATA on the half-closed stream: the
        gateway's resets count against the reset budget, the connection gets GOAWAY
        ENHANCE_YOUR_CALM, the upstream sees no more than a handful of connections and request
        heads, and a well-behaved client is served meanwhile."""
        _gateway, upstream, port = self.start(fixed(200, body=b"ok"), upstream_h2=False)
        attacker = h2.RawH2Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), attacker)
        self.addCleanup(attacker.transport.abortConnection)
        attacker.transport.write(h2.made_you_reset(2000, path=b"/a/x"))
        goaway = await attacker.goaway_received.addTimeout(10, reactor)
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        await attacker.lost.addTimeout(10, reactor)
        # At most the reset budget (200 by default) of the gateway's resets was answered.
        self.assertLessEqual(attacker.count(RstStreamFrame), 201)
        conn = await self.h2_client(port)
        response = conn.request(b"GET", b"/fine")
        await response.done
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[-1].target, b"/fine")
        # Only streams whose DATA came in a later read than their HEADERS could start; the
        # connect they began was given up at the reset.
        self.assertLessEqual(len(upstream.received) - 1, 5)
        self.assertLessEqual(len(upstream.connections), 6)


class _ChunkedTrailers(Responder):
    """An HTTP/1.1 upstream answering chunked, with trailer fields after the last chunk."""

    def on_complete(self, ex) -> None:
        """Head, one chunk, the last chunk with trailers."""
        ex.send_head(200, [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"grpc-status")])
        ex.write(b"body")
        ex.write_raw(b"0\r\ngrpc-status: 7\r\nHost: not.a.trailer\r\n\r\n")
        ex.finished = True


def _next_read(conn: h2.H2Client) -> defer.Deferred[None]:
    """Fires after the client's next dataReceived."""
    d: defer.Deferred[None] = defer.Deferred()
    original = conn.dataReceived

    def hooked(data: bytes) -> None:
        conn.dataReceived = original  # type: ignore[method-assign]
        original(data)
        d.callback(None)

    conn.dataReceived = hooked  # type: ignore[method-assign]
    return d


class _Held(Responder):
    """Keeps each exchange until the test answers it (`answer`)."""

    def __init__(self) -> None:
        self.waiting: list = []
        self.arrived: defer.Deferred[None] = defer.Deferred()

    def on_complete(self, ex) -> None:
        """Hold the exchange."""
        self.waiting.append(ex)
        if not self.arrived.called:
            self.arrived.callback(None)

    def answer(self) -> None:
        """Answer every held exchange."""
        for ex in self.waiting:
            ex.respond(200, [(b"Content-Length", b"4")], b"done")
        self.waiting = []


class _Streamer(Responder):
    """Streams `size` pattern bytes with backpressure; records when the upstream got paused."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.paused: defer.Deferred[None] = defer.Deferred()
        self.streamed: defer.Deferred[None] | None = None

    def on_complete(self, ex) -> None:
        """Send the head, stream the body, and watch the upstream's write backpressure."""
        connection = ex.connection
        original = connection.pauseProducing

        def pause() -> None:
            original()
            if not self.paused.called:
                self.paused.callback(None)

        connection.pauseProducing = pause
        ex.send_head(200, [(b"Content-Length", b"%d" % self.size)])
        self.streamed = ex.stream_body(self.size)
        self.streamed.addCallback(lambda _: ex.finish())


class H2BehaviourTests(_Base):
    """Flow control, drain, policies, errors and curl, through a real gateway."""

    async def test_slow_h2_reader_pauses_upstream(self) -> None:
        """A client that acknowledges DATA slowly: at every read, what the gateway has taken from
        the upstream exceeds what the client received by at most the client's window plus one
        upstream read (the upstream is paused, not buffered); the whole body arrives intact."""
        size = 16 * 1024 * 1024
        gateway, _upstream, port = self.start(_Streamer(size), upstream_h2=False)
        conn = await self.h2_client(port, auto_ack=False)
        response = conn.request(b"GET", b"/big")
        await response.head
        [protocol] = [c for f in gateway.service.factories.values() for c in f.connections]
        [stream] = protocol.streams.values()
        exchange = stream.exchange
        paused_seen = False
        while not response.done.called:
            ahead = exchange.bytes_out - len(response.body)
            self.assertLessEqual(ahead, 65535 + 2 * 65536, "the gateway buffers ahead of the client")
            paused_seen = paused_seen or stream.transport.paused
            conn.ack(response.stream_id)
            await _next_read(conn)
        self.assertTrue(paused_seen)
        self.assertEqual(response.status, 200)
        self.assertEqual(len(response.body), size)
        from flexgw.testing.upstream import pattern_slice

        self.assertEqual(bytes(response.body[:1000]), pattern_slice(0, 1000))
        self.assertEqual(bytes(response.body[-1000:]), pattern_slice(size - 1000, 1000))

    async def test_slow_h1_reader_behind_h2_upstream(self) -> None:
        """An HTTP/1.1 client that does not read: once its socket is full the h2 upstream gets no
        more WINDOW_UPDATE (flow control stops it: its body stream cannot finish); when the
        client reads again the whole body arrives."""
        size = 32 * 1024 * 1024
        streamer = _Streamer(size)
        gateway, upstream, port = self.start(streamer, upstream_h2=True)
        conn = await client.connect(reactor, "127.0.0.1", port, retain_body=False)
        self.addCleanup(conn.abort)
        conn.transport.pauseProducing()  # the client reads nothing
        conn.send(b"GET /big HTTP/1.1\r\nHost: h.test\r\n\r\n")
        await upstream.wait_for_requests(1)
        [pool] = gateway.service.pools.pools.values()
        [upconn] = pool.connections
        [stream] = upconn.streams.values()
        if not stream.gate.paused:
            paused: defer.Deferred[None] = defer.Deferred()
            original = stream.gate.pauseProducing

            def pause() -> None:
                original()
                if not paused.called:
                    paused.callback(None)

            stream.gate.pauseProducing = pause  # type: ignore[method-assign]
            await paused
        self.assertLessEqual(stream.unacked, 256 * 1024)  # at most the stream window held
        self.assertFalse(streamer.streamed.called)
        conn.transport.resumeProducing()
        response = await conn.read_final_response()
        self.assertEqual(response.body_length, size)

    async def test_drain_sends_goaway_and_finishes_streams(self) -> None:
        """Stopping the gateway sends GOAWAY naming the last stream; the stream in flight still
        gets its response; a stream opened after GOAWAY is refused; then the connection closes."""
        held = _Held()
        gateway, upstream, port = self.start(held, upstream_h2=False)
        conn = await self.h2_client(port)
        first = conn.request(b"GET", b"/slow")
        await held.arrived
        stopped = gateway.service.stopService()
        goaway = await conn.goaway_received
        self.assertEqual(goaway.last_stream_id, first.stream_id)
        self.assertEqual(goaway.error_code, 0)
        late = conn.request(b"GET", b"/late")
        await late.done
        self.assertEqual(late.reset_code, 7)  # REFUSED_STREAM: the client may retry elsewhere
        self.assertFalse(first.done.called)
        held.answer()
        await first.done
        self.assertEqual((first.status, bytes(first.body)), (200, b"done"))
        await conn.lost
        await stopped
        self.assertEqual(len(upstream.received), 1)

    async def test_basic_auth_applies_to_h2(self) -> None:
        """Policies run for h2 requests: a missing credential gets the policy's 401 on the stream,
        a good one reaches the upstream."""
        binding = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: auth}\nspec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: http-basic-authentication-flex}\n"
            "  config: {username: chris, password: admin}\n"
        )
        gateway, upstream, port = self.start(fixed(200, body=b"in"), upstream_h2=False, documents=binding)
        conn = await self.h2_client(port)
        refused = conn.request(b"GET", b"/secret")
        await refused.done
        self.assertEqual(refused.status, 401, (refused, conn.errors, conn.goaway))
        self.assertEqual(refused.header(b"www-authenticate"), [b'Basic realm="mule-realm"'])
        self.assertEqual(upstream.received, [])
        import base64
        good = conn.request(
            b"GET", b"/secret", [(b"authorization", b"Basic " + base64.b64encode(b"chris:admin"))]
        )
        await good.done
        self.assertEqual((good.status, bytes(good.body)), (200, b"in"))
        self.assertEqual(len(upstream.received), 1)
        records = gateway.records()
        self.assertEqual([(r["status"], r["version"]) for r in records], [(401, "2"), (200, "2")])

    async def test_gateway_errors_on_h2(self) -> None:
        """Gateway-made errors go out on the stream: an upstream stream reset is a 502 (not
        retried: the upstream may have acted on it), and costs neither connection."""

        class Reset(Responder):
            def on_headers(self, ex) -> None:
                ex.reset()

        gateway, upstream, port = self.start(Reset(), upstream_h2=True)
        conn = await self.h2_client(port)
        response = conn.request(b"GET", b"/x")
        await response.done
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header(b"x-flexgw-error"), [b"upstream_reset"])
        self.assertEqual(response.header(b"content-type"), [b"application/json"])
        # The connection serves on after an error.
        again = conn.request(b"GET", b"/y")
        await again.done
        self.assertEqual(again.status, 502)
        [pool] = gateway.service.pools.pools.values()
        self.assertEqual(len(upstream.connections), 1)  # a reset stream does not cost the connection
        self.assertEqual(pool.active, 0)

    async def test_curl_prior_knowledge(self) -> None:
        """curl --http2-prior-knowledge talks HTTP/2 to the gateway (when curl has HTTP/2)."""
        import shutil

        from twisted.internet.utils import getProcessOutputAndValue

        curl = shutil.which("curl")
        if curl is None:
            raise self.skipTest("curl is not installed")
        version, _, _ = await getProcessOutputAndValue(curl, ["-V"])
        if b"HTTP2" not in version:
            raise self.skipTest("curl has no HTTP/2")
        _gateway, upstream, port = self.start(echo(), upstream_h2=False)
        out, err, code = await getProcessOutputAndValue(
            curl,
            ["-sS", "--max-time", "10", "--http2-prior-knowledge", "-d", "payload",
             "-w", "\\n%{http_version}", f"http://127.0.0.1:{port}/c"],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"payload\n2")
        self.assertEqual(upstream.received[0].body, b"payload")


class LargeBodyTests(_Base):
    """Bodies larger than every flow-control window, both ways, through HTTP/2 on either side."""

    size = 3 * 1024 * 1024 + 7

    async def test_h1_upload_to_h2_echo(self) -> None:
        """An HTTP/1.1 chunked upload to an h2c echo upstream comes back whole."""
        from flexgw.testing.upstream import pattern_sha256

        _gateway, upstream, port = self.start(echo(), upstream_h2=True)
        conn = await client.connect(reactor, "127.0.0.1", port, retain_body=False)
        self.addCleanup(conn.abort)
        conn.send(b"POST /up HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = await conn.send_body(self.size, chunked=True)
        response = await conn.read_final_response()
        self.assertEqual(sent, self.size)
        self.assertEqual(response.body_length, self.size)
        self.assertEqual(response.body_sha256, pattern_sha256(self.size))
        self.assertEqual(upstream.completed[0].body_sha256, pattern_sha256(self.size))

    async def test_h2_upload_to_h2_echo(self) -> None:
        """An h2 client's upload to an h2c echo upstream, echoed back while it is sent."""
        from flexgw.testing.upstream import pattern_sha256, pattern_slice

        _gateway, upstream, port = self.start(echo(), upstream_h2=True)
        conn = await self.h2_client(port)
        response = conn.request(
            b"PUT", b"/up", [(b"content-length", b"%d" % self.size)],
            body=pattern_slice(0, self.size),
        )
        await response.done
        self.assertEqual(response.status, 200)
        self.assertEqual(len(response.body), self.size)
        import hashlib

        self.assertEqual(hashlib.sha256(bytes(response.body)).hexdigest(), pattern_sha256(self.size))
        self.assertEqual(upstream.completed[0].header("content-length"), [b"%d" % self.size])


class TrailerTests(_Base):
    """Trailers of an HTTP/1.1 upstream's chunked response, and of an h2 client's request."""

    async def test_request_trailers_h2_to_h2(self) -> None:
        """An h2 client's request trailers reach an h2 upstream as trailing HEADERS (framing
        fields left out), after the whole body."""
        _gateway, upstream, port = self.start(echo(), upstream_h2=True)
        conn = await self.h2_client(port)
        call = conn.request(b"POST", b"/t", [(b"te", b"trailers")], body=b"data", end=False)
        conn.send_trailers(call.stream_id, [(b"x-checksum", b"abc"), (b"content-length", b"9")])
        await call.done
        self.assertEqual((call.status, bytes(call.body)), (200, b"data"))
        self.assertEqual(upstream.received[0].body, b"data")
        self.assertEqual(upstream.connections[0].trailers_received, [[(b"x-checksum", b"abc")]])
        # Trailers that come once the request is already streaming upstream.
        late = conn.request(b"POST", b"/late", body=b"more", end=False)
        await upstream.wait_for_heads(2)
        conn.send_trailers(late.stream_id, [(b"x-late", b"1")])
        await late.done
        self.assertEqual((late.status, bytes(late.body)), (200, b"more"))
        self.assertEqual(upstream.connections[0].trailers_received[-1], [(b"x-late", b"1")])

    async def test_request_trailers_h2_to_h1(self) -> None:
        """They reach an HTTP/1.1 upstream in the last chunk of the chunked request."""
        _gateway, upstream, port = self.start(echo(), upstream_h2=False)
        conn = await self.h2_client(port)
        call = conn.request(b"POST", b"/t", body=b"data", end=False)
        conn.send_trailers(call.stream_id, [(b"x-checksum", b"abc")])
        await call.done
        self.assertEqual((call.status, bytes(call.body)), (200, b"data"))
        seen = upstream.received[0]
        self.assertTrue(seen.raw.endswith(b"0\r\nx-checksum: abc\r\n\r\n"), seen.raw)

    async def test_h1_trailers_to_h2(self) -> None:
        """They reach an h2 client as trailing HEADERS (framing fields left out)."""
        _gateway, _upstream, port = self.start(_ChunkedTrailers(), upstream_h2=False)
        conn = await self.h2_client(port)
        response = conn.request(b"GET", b"/t", [(b"te", b"trailers")])
        await response.done
        self.assertEqual((response.status, bytes(response.body)), (200, b"body"))
        self.assertEqual(response.trailers, [(b"grpc-status", b"7")])
        self.assertEqual(response.header(b"trailer"), [])  # hop-by-hop

    async def test_h1_trailers_to_h1(self) -> None:
        """They reach an HTTP/1.1 client in the last chunk."""
        _gateway, _upstream, port = self.start(_ChunkedTrailers(), upstream_h2=False)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /t HTTP/1.1\r\nHost: h.test\r\n\r\n")
        response = await conn.read_final_response()
        self.assertEqual(response.body, b"body")
        self.assertTrue(bytes(conn._raw).endswith(b"0\r\ngrpc-status: 7\r\n\r\n"), bytes(conn._raw))
        # The connection is still good for another request.
        conn.send(b"GET /t HTTP/1.1\r\nHost: h.test\r\n\r\n")
        again = await conn.read_final_response()
        self.assertEqual(again.body, b"body")


class AddressTests(TestCase):
    """`h2c://` and `h2://` are Service schemes (HTTP/2 upstreams), not listener ones."""

    def test_service_h2c(self) -> None:
        """An h2c Service address parses, port 80 by default; an API address cannot be h2c."""
        from flexgw.config.address import AddressError, parse_api_address, parse_service_address

        address = parse_service_address("h2c://grpc.internal:50051/base")
        self.assertEqual((address.scheme, address.host, address.port), ("h2c", "grpc.internal", 50051))
        self.assertEqual(parse_service_address("h2c://grpc.internal").port, 80)
        with self.assertRaises(AddressError) as caught:
            parse_api_address("h2c://0.0.0.0:8081")
        self.assertIn("expected http or https", str(caught.exception))
        self.assertEqual(parse_service_address("h2://x").port, 443)
        with self.assertRaises(AddressError) as caught:
            parse_service_address("grpc://x")
        self.assertIn("expected http, https, h2c or h2", str(caught.exception))


def _self_signed() -> tuple[bytes, bytes]:
    """A key and a self-signed certificate for `localhost` (PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class TlsAlpnTests(TestCase):
    """On a TLS listener (built here: TLS listeners come with the tls binding), ALPN picks the
    protocol: `h2` starts HTTP/2, `http/1.1` stays HTTP/1.1."""

    async def start(self) -> tuple[RecordingUpstream, int, bytes]:
        """A recording upstream and an ingress factory behind TLS offering SERVED_ALPN."""
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from flexgw.config.pipeline import load_config
        from flexgw.http.alpn import SERVED_ALPN
        from flexgw.ingress.front import IngressFactory
        from flexgw.plan import HttpSettings, Timeouts
        from flexgw.upstream.manager import PoolManager
        from tests.conftools import write_conf
        from tests.harness import simple_api

        upstream = RecordingUpstream(echo(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        root = write_conf(self, {"api.yaml": simple_api(8443, upstream.address[1])})
        plan = load_config([root], {}).plan
        pools = PoolManager(reactor, reactor)
        self.addCleanup(pools.stop)
        factory = IngressFactory(
            reactor, reactor, plan.listeners[0], HttpSettings(), Timeouts(), pools, None
        )
        self.addCleanup(lambda: [c.transport.abortConnection() for c in list(factory.connections)])
        key_pem, cert_pem = _self_signed()
        certificate = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem)
        options = ssl.CertificateOptions(
            privateKey=certificate.privateKey.original,
            certificate=certificate.original,
            acceptableProtocols=list(SERVED_ALPN),
        )
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return upstream, port.getHost().port, cert_pem

    async def connect(self, port: int, cert_pem: bytes, alpn: list[bytes], proto: object) -> object:
        """A TLS client connection offering `alpn`."""
        from twisted.internet import ssl
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        options = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(cert_pem),
            acceptableProtocols=alpn,
        )
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
        await connectProtocol(endpoint, proto)
        self.addCleanup(proto.transport.abortConnection)  # type: ignore[attr-defined]
        return proto

    async def test_alpn_h2(self) -> None:
        """A client offering only h2 gets HTTP/2 over TLS (the listener offers h2 first)."""
        upstream, port, cert_pem = await self.start()
        conn = h2.H2Client()
        await self.connect(port, cert_pem, [b"h2"], conn)
        response = conn.request(b"POST", b"/tls", body=b"over tls", authority=b"localhost")
        await response.done
        self.assertEqual(conn.transport.negotiatedProtocol, b"h2")
        self.assertEqual((response.status, bytes(response.body)), (200, b"over tls"))
        self.assertEqual(upstream.received[0].header("x-forwarded-host"), [b"localhost"])

    async def test_alpn_http11(self) -> None:
        """A client offering http/1.1 stays on HTTP/1.1."""
        upstream, port, cert_pem = await self.start()
        conn = client.RawConnection()
        await self.connect(port, cert_pem, [b"http/1.1"], conn)
        conn.send(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = await conn.read_final_response()
        self.assertEqual(conn.transport.negotiatedProtocol, b"http/1.1")
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].target, b"/one")


class H2OverTlsUpstreamTests(TestCase):
    """`h2://` Services: HTTP/2 over TLS, ALPN h2, the certificate verified."""

    def setUp(self) -> None:
        """A CA and an upstream certificate for 127.0.0.1."""
        import os

        from flexgw.testing.certs import CertificateAuthority

        self.dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority("upstream CA")
        self.ca_path = self.ca.write(self.dir, "ca")
        self.port = free_port()

    def start(self, responder: Responder, alpn: list[bytes]) -> tuple[Gateway, RecordingUpstream]:
        """A TLS h2 recording upstream offering `alpn`, and a gateway whose Service is h2://."""
        from flexgw.testing.certs import server_options
        from tests.test_tls_upstream import documents

        upstream = RecordingUpstream(responder, reactor=reactor, h2c=True)
        issued = self.ca.issue("upstream", ips=["127.0.0.1"])
        upstream.listen(reactor, tls=server_options(issued, acceptableProtocols=alpn))
        self.addCleanup(upstream.stop)
        url = f"h2://127.0.0.1:{upstream.address[1]}"
        gateway = Gateway(self, {"api.yaml": documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n')})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        return gateway, upstream

    async def test_h1_and_h2_clients_to_h2_over_tls(self) -> None:
        """HTTP/1.1 and h2 clients reach the upstream over one TLS HTTP/2 connection
        (`:scheme` https); trailers come back."""
        _gateway, upstream = self.start(_Grpc(), [b"h2"])
        response = await client.request(
            reactor, "127.0.0.1", self.port,
            b"POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\nhi",
        )
        self.assertEqual((response.status, response.body), (200, b"hi"))
        conn = await h2.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.transport.abortConnection)
        call = conn.request(b"POST", b"/b", [(b"te", b"trailers")], body=b"yo")
        await call.done
        self.assertEqual((call.status, bytes(call.body)), (200, b"yo"))
        self.assertEqual(call.trailers, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual([r.header(":scheme") for r in upstream.received], [[b"https"], [b"https"]])

    async def test_alpn_without_h2_is_502_upstream_tls(self) -> None:
        """An upstream whose TLS does not agree to h2 is a 502 upstream_tls; nothing is sent."""
        _gateway, upstream = self.start(echo(), [b"http/1.1"])
        response = await client.request(
            reactor, "127.0.0.1", self.port, b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n"
        )
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_tls"])
        self.assertEqual(upstream.received, [])


class GatewayTlsH2Tests(TestCase):
    """Through the gateway's own TLS listener (a `tls` binding): ALPN h2, mTLS details forwarded."""

    async def test_h2_over_gateway_tls_with_client_certificate(self) -> None:
        """A client negotiating h2 with a client certificate: served over HTTP/2, its
        certificate reaches the upstream as XFCC (a client-sent one never), X-Forwarded-Proto is
        https."""
        import hashlib
        import os

        from cryptography.hazmat.primitives.serialization import Encoding
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        from flexgw.testing.certs import CertificateAuthority, client_options
        from tests.test_tls_ingress import api as tls_api
        from tests.test_tls_ingress import tls_binding

        ca, client_ca = CertificateAuthority("server CA"), CertificateAuthority("client CA")
        directory = os.path.abspath(self.mktemp())
        crt, key = ca.issue("api.test", dns=["api.test"]).write(directory, "server")
        client_ca_path = client_ca.write(directory, "client-ca")
        upstream = RecordingUpstream(echo(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        extra = f'requireClientCertificate: true\ntrustedCA: "file://{client_ca_path}"\n'
        gateway = Gateway(self, {"api.yaml": tls_api("secure", port, upstream.address[1], "")
                                 + "---\n" + tls_binding("t", "secure", crt, key, extra)})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        alice = client_ca.issue("alice", client=True)
        conn = h2.H2Client()
        endpoint = wrapClientTLS(
            client_options("api.test", ca, alice, alpn=[b"h2"]),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5),
        )
        await connectProtocol(endpoint, conn)
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(
            b"GET", b"/x", [(b"x-forwarded-client-cert", b"Hash=forged")], authority=b"api.test"
        )
        await response.done
        self.assertEqual(conn.transport.negotiatedProtocol, b"h2")
        self.assertEqual(response.status, 200)
        seen = upstream.received[0]
        digest = hashlib.sha256(alice.certificate.public_bytes(Encoding.DER)).hexdigest()
        self.assertEqual(seen.header("x-forwarded-client-cert"), [f'Hash={digest};Subject="CN=alice"'.encode()])
        self.assertEqual(seen.header("x-forwarded-proto"), [b"https"])
        self.assertEqual(gateway.records()[-1]["version"], "2")


class _GoAwayThenAnswer(Responder):
    """On its first request, the h2 upstream announces GOAWAY (that stream included), then
    answers it; later requests (on later connections) are answered at once."""

    def on_complete(self, ex) -> None:
        """GOAWAY first on the first connection, then the response."""
        from hyperframe.frame import GoAwayFrame

        connection = ex.connection
        if connection.id == 0 and ex.request.index == 0:
            connection.transport.write(
                GoAwayFrame(0, last_stream_id=ex.stream_id, error_code=0).serialize()
            )
        ex.respond(200, [(b"content-length", b"2")], b"ok")


class UpstreamGoAwayTests(_Base):
    """An HTTP/2 upstream going away gracefully."""

    async def test_graceful_goaway(self) -> None:
        """The stream in flight still gets its response; the next request opens a new upstream
        connection (the old one is not used again, and is closed once idle)."""
        _gateway, upstream, port = self.start(_GoAwayThenAnswer(), upstream_h2=True)
        conn = await self.h2_client(port)
        first = conn.request(b"GET", b"/1")
        await first.done
        self.assertEqual((first.status, bytes(first.body)), (200, b"ok"))
        second = conn.request(b"GET", b"/2")
        await second.done
        self.assertEqual((second.status, bytes(second.body)), (200, b"ok"))
        self.assertEqual(len(upstream.connections), 2)
        await upstream.wait_for_disconnections(1)
        self.assertFalse(upstream.connections[0].connected)


class ProxyProtocolH2Tests(TestCase):
    """HTTP/2 behind a load balancer speaking PROXY protocol."""

    async def test_proxy_header_then_h2(self) -> None:
        """A PROXY v1 header followed by the h2 preface: the request is served over HTTP/2 and
        the address from the header is the client's (allowlist, X-Forwarded-For, access log)."""
        from tests.harness import api_document
        from tests.test_proxy_protocol import ALLOWLIST, PROXY_ON, v1

        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = Gateway(
            self, {"api.yaml": api_document(port, upstream.address[1]) + ALLOWLIST + PROXY_ON}
        )
        gateway.start()
        conn = await h2.connect(reactor, "127.0.0.1", port, prefix=v1("203.0.113.9"))
        self.addCleanup(conn.transport.abortConnection)
        response = conn.request(b"GET", b"/x")
        await response.done
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].header("x-forwarded-for"), [b"203.0.113.9"])
        record = gateway.records()[-1]
        self.assertEqual((record["client"], record["version"]), ("203.0.113.9", "2"))
        refused = await h2.connect(reactor, "127.0.0.1", port, prefix=v1("198.51.100.1"))
        self.addCleanup(refused.transport.abortConnection)
        denied = refused.request(b"GET", b"/x")
        await denied.done
        self.assertEqual(denied.status, 403)


class UpstreamHpackTests(_Base):
    """What HPACK does with the requests the gateway sends an HTTP/2 upstream."""

    async def test_credentials_are_never_indexed(self) -> None:
        """Authorization (and a short cookie) reach an h2c upstream as never-indexed fields
        (a shared upstream connection keeps clients' credentials out of its HPACK table)."""
        from hpack import NeverIndexedHeaderTuple

        _gateway, upstream, port = self.start(echo(), upstream_h2=True)
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"GET /a HTTP/1.1\r\nHost: api\r\nAuthorization: Basic dTpw\r\nCookie: s=1\r\nX-A: 1\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        fields = {name: type(field) for field in upstream.received[0].headers for name in (field[0],)}
        self.assertEqual(
            (fields[b"authorization"], fields[b"cookie"], fields[b"x-a"] is NeverIndexedHeaderTuple),
            (NeverIndexedHeaderTuple, NeverIndexedHeaderTuple, False),
        )
