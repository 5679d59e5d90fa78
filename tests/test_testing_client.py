"""Tests for flexgw.testing.client: response parsing (CL, chunked, close-delimited, HEAD, 1xx) and streaming."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from flexgw.testing import upstream as up
from flexgw.testing.client import (
    BodyNotSent,
    IncompleteResponse,
    RawConnection,
    ResponseParseError,
    connect,
    request,
    stream_exchange,
)

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class ClientTestCase(unittest.TestCase):
    """Base: an upstream on an ephemeral loopback port whose response bytes the test chooses."""

    def serve(self, responder: up.Responder, **kw: Any) -> tuple[str, int]:
        """Listen with ``responder``; stop at cleanup; return (host, port)."""
        server = up.RecordingUpstream(responder, reactor=reactor, **kw)
        server.listen()
        self.addCleanup(server.stop)
        self.server = server
        return server.address

    @defer.inlineCallbacks
    def open(self, host: str, port: int, **kw: Any) -> Any:
        """A connection aborted at cleanup."""
        conn: RawConnection = yield connect(reactor, host, port, **kw)
        self.addCleanup(conn.abort)
        return conn

    @defer.inlineCallbacks
    def exchange(self, raw_response: bytes, close: bool = False, head: bool = False) -> Any:
        """Serve ``raw_response`` verbatim to one GET (or HEAD) and parse it."""
        host, port = self.serve(up.raw(raw_response, close=close))
        conn = yield self.open(host, port)
        conn.send(GET if not head else b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = yield conn.read_response(head=head)
        return conn, resp


class ParsingTests(ClientTestCase):
    """read_response parses each framing."""

    @defer.inlineCallbacks
    def test_content_length(self) -> Any:
        """A Content-Length body is read exactly; headers keep case, order and duplicates."""
        raw = b"HTTP/1.1 200 Fine\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 5\r\n\r\nhello"
        conn, resp = yield self.exchange(raw)
        self.assertEqual((resp.status, resp.reason, resp.version), (200, b"Fine", "1.1"))
        self.assertEqual(resp.headers, [(b"X-A", b"1"), (b"x-a", b"2"), (b"Content-Length", b"5")])
        self.assertEqual(resp.header("X-A"), [b"1", b"2"])
        self.assertEqual(resp.body, b"hello")
        self.assertFalse(resp.chunked)
        self.assertFalse(resp.close_delimited)
        self.assertEqual(conn.received_raw, raw)

    @defer.inlineCallbacks
    def test_chunked(self) -> Any:
        """A chunked body is decoded, with chunk extensions and trailers skipped."""
        raw = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nTrailer-A: x\r\n\r\n"
        )
        _, resp = yield self.exchange(raw)
        self.assertEqual(resp.body, b"abcdefg")
        self.assertTrue(resp.chunked)

    @defer.inlineCallbacks
    def test_close_delimited(self) -> Any:
        """Without framing headers the body runs until the server closes."""
        raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
        _, resp = yield self.exchange(raw, close=True)
        self.assertEqual(resp.body, b"until the end")
        self.assertTrue(resp.close_delimited)

    @defer.inlineCallbacks
    def test_head(self) -> Any:
        """A HEAD response with a Content-Length has no body and the next response parses."""
        host, port = self.serve(up.fixed(body=b"0123456789"))
        conn = yield self.open(host, port)
        conn.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        head = yield conn.read_response(head=True)
        get = yield conn.read_response()
        self.assertEqual((head.header(b"content-length"), head.body), ([b"10"], b""))
        self.assertEqual(get.body, b"0123456789")

    @defer.inlineCallbacks
    def test_pipelined_get_then_head(self) -> Any:
        """A HEAD response arriving right behind a GET response is parsed as bodiless."""
        data = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n"
        )
        host, port = self.serve(up.raw(data, close=False))
        conn = yield self.open(host, port)
        first = conn.read_response()
        second = conn.read_response(head=True)
        third = conn.read_response()
        conn.send(GET)
        responses = yield defer.gatherResults([first, second, third])
        self.assertEqual([r.status for r in responses], [200, 200, 204])
        self.assertEqual([r.body for r in responses], [b"ok", b"", b""])

    @defer.inlineCallbacks
    def test_interim_then_final(self) -> Any:
        """read_response returns a 100 on its own; read_final_response collects it in interim."""
        raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
        host, port = self.serve(up.raw(raw + raw, close=False))
        conn = yield self.open(host, port)
        conn.send(GET)
        first = yield conn.read_response()
        self.assertEqual(first.status, 100)
        second = yield conn.read_response()
        self.assertEqual(second.body, b"x")
        final = yield conn.read_final_response()
        self.assertEqual((final.status, [r.status for r in final.interim]), (200, [100]))

    @defer.inlineCallbacks
    def test_204_304_bodiless(self) -> Any:
        """204 and 304 complete at the end of their heads even with a Content-Length."""
        raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        host, port = self.serve(up.raw(raw, close=False))
        conn = yield self.open(host, port)
        conn.send(GET)
        first = yield conn.read_response()
        second = yield conn.read_response()
        self.assertEqual([(first.status, first.body), (second.status, second.body)], [(304, b""), (204, b"")])

    @defer.inlineCallbacks
    def test_truncated_body_fails(self) -> Any:
        """A close before Content-Length bytes arrive fails with IncompleteResponse holding the partial."""
        host, port = self.serve(up.close_connection("mid_body"))
        conn = yield self.open(host, port)
        conn.send(GET)
        failure = yield self.assertFailure(conn.read_response(), IncompleteResponse)
        self.assertEqual(failure.partial.status, 200)
        self.assertEqual(failure.partial.body, b"x" * 10)

    @defer.inlineCallbacks
    def test_close_before_response_fails(self) -> Any:
        """A close with nothing received fails with IncompleteResponse and no partial."""
        host, port = self.serve(up.close_connection("before_status"))
        conn = yield self.open(host, port)
        conn.send(GET)
        failure = yield self.assertFailure(conn.read_response(), IncompleteResponse)
        self.assertIsNone(failure.partial)
        yield conn.wait_closed()
        self.assertTrue(conn.closed)

    @defer.inlineCallbacks
    def test_malformed_fails(self) -> Any:
        """Bytes llhttp rejects fail the read with ResponseParseError."""
        host, port = self.serve(up.malformed("garbage"))
        conn = yield self.open(host, port)
        conn.send(GET)
        yield self.assertFailure(conn.read_response(), ResponseParseError)

    @defer.inlineCallbacks
    def test_read_after_arrival(self) -> Any:
        """A read issued after the bytes arrived (and the peer closed) still parses them."""
        host, port = self.serve(up.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", close=True))
        conn = yield self.open(host, port)
        conn.send(GET)
        yield conn.wait_closed()
        resp = yield conn.read_response()
        self.assertEqual(resp.body, b"hi")

    @defer.inlineCallbacks
    def test_upgrade_switches_to_tunnel(self) -> Any:
        """A 101 response completes and the bytes after it go to tunnel_data."""
        raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframe"
        host, port = self.serve(up.raw(raw, close=False))
        conn = yield self.open(host, port)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        resp = yield conn.read_response()
        self.assertEqual(resp.status, 101)
        self.assertTrue(conn.upgraded)
        self.assertEqual(bytes(conn.tunnel_data), b"frame")


class HelperTests(ClientTestCase):
    """request() and stream_exchange()."""

    @defer.inlineCallbacks
    def test_request_closes_connection(self) -> Any:
        """request() returns the response and closes its connection."""
        host, port = self.serve(up.fixed(body=b"yo"))
        resp = yield request(reactor, host, port, GET)
        self.assertEqual(resp.body, b"yo")
        conns = yield self.server.wait_for_disconnections(1)
        self.assertEqual(len(conns), 1)

    @defer.inlineCallbacks
    def test_stream_exchange_upload_and_download(self) -> Any:
        """stream_exchange sends N bytes with backpressure and counts/hashes the echoed N bytes."""
        size = 16 * 1024 * 1024
        host, port = self.serve(up.echo(), retain_bodies=False)
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        result = yield stream_exchange(reactor, host, port, head, size)
        self.assertEqual(result.sent, size)
        self.assertEqual(result.response.body_length, size)
        self.assertEqual(result.response.body, b"")
        self.assertEqual(result.response.body_sha256, up.pattern_sha256(size))
        self.assertEqual(self.server.completed[0].body_sha256, up.pattern_sha256(size))

    @defer.inlineCallbacks
    def test_stream_exchange_chunked(self) -> Any:
        """stream_exchange can chunk-encode the upload."""
        size = 1024 * 1024 + 3
        host, port = self.serve(up.echo(), retain_bodies=False)
        head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        result = yield stream_exchange(reactor, host, port, head, size, chunked=True, chunk_size=10000)
        self.assertTrue(self.server.completed[0].chunked)
        self.assertEqual(result.response.body_sha256, up.pattern_sha256(size))

    @defer.inlineCallbacks
    def test_stream_exchange_early_response_stops_upload(self) -> Any:
        """An early final response (413 before the body is read) stops the upload without a hang."""

        class EarlyReject(up.Responder):
            """Answer 413 at the head and stop reading."""

            def on_headers(self, ex: up.Exchange) -> None:
                ex.respond(413, [(b"Content-Length", b"0")])
                ex.transport.pauseProducing()

        host, port = self.serve(EarlyReject())
        size = 64 * 1024 * 1024
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        result = yield stream_exchange(reactor, host, port, head, size)
        self.assertEqual(result.response.status, 413)
        self.assertLess(result.sent, size)

    @defer.inlineCallbacks
    def test_send_body_fails_when_peer_closes(self) -> Any:
        """send_body fails with BodyNotSent (holding the count) when the peer closes mid-body."""
        host, port = self.serve(up.close_connection("before_status", at="headers"))
        conn = yield self.open(host, port)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        yield self.server.wait_for_disconnections(1)
        failure = yield self.assertFailure(conn.send_body(100000000), BodyNotSent)
        self.assertLess(failure.sent, 100000000)
