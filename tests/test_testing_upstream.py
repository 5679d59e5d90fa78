"""Tests for flexgw.testing.upstream: the recording upstream, its responders and the fast upstreams."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from flexgw.testing import upstream as up
from flexgw.testing.client import IncompleteResponse, RawConnection, connect, request


class UpstreamTestCase(unittest.TestCase):
    """Base: start a recording upstream on an ephemeral loopback port, clean up after."""

    def start(self, responder: up.Responder | None = None, **kw: Any) -> up.RecordingUpstream:
        """Listen with ``responder`` and register cleanup."""
        server = up.RecordingUpstream(responder, reactor=reactor, **kw)
        server.listen()
        self.addCleanup(server.stop)
        return server

    @defer.inlineCallbacks
    def connect(self, server: up.RecordingUpstream, **kw: Any) -> Any:
        """A raw client connection to ``server``, aborted at cleanup."""
        host, port = server.address
        conn: RawConnection = yield connect(reactor, host, port, **kw)
        self.addCleanup(conn.abort)
        return conn


class RecordingTests(UpstreamTestCase):
    """What the recording upstream records."""

    @defer.inlineCallbacks
    def test_records_header_case_order_duplicates_and_raw(self) -> Any:
        """Headers keep case, order and duplicates; raw and raw_head are the exact bytes."""
        server = self.start()
        conn = yield self.connect(server)
        data = (
            b"POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nX-Dup: 1\r\nx-dup: 2\r\nCoNtEnT-LeNgTh: 5\r\n\r\nhello"
        )
        conn.send(data)
        reqs = yield server.wait_for_requests(1)
        req = reqs[0]
        self.assertEqual(req.method, b"POST")
        self.assertEqual(req.target, b"/a/b?c=d")
        self.assertEqual(req.version, "1.1")
        self.assertEqual(
            req.headers,
            [(b"Host", b"x"), (b"X-Dup", b"1"), (b"x-dup", b"2"), (b"CoNtEnT-LeNgTh", b"5")],
        )
        self.assertEqual(req.header("x-DUP"), [b"1", b"2"])
        self.assertEqual(req.body, b"hello")
        self.assertEqual(req.body_length, 5)
        self.assertEqual(req.body_sha256, hashlib.sha256(b"hello").hexdigest())
        self.assertEqual(req.raw, data)
        self.assertEqual(req.raw_head, data[:-5])
        self.assertEqual(server.connections[0].raw, data)
        resp = yield conn.read_response()
        self.assertEqual(resp.status, 200)

    @defer.inlineCallbacks
    def test_records_connection_reuse(self) -> Any:
        """Requests on one keep-alive connection share a connection id; a new one gets a new id."""
        server = self.start()
        conn = yield self.connect(server)
        for _ in range(2):
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            yield conn.read_response()
        conn2 = yield self.connect(server)
        conn2.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
        yield conn2.read_response()
        reqs = yield server.wait_for_requests(3)
        self.assertEqual([(r.connection, r.index) for r in reqs], [(0, 0), (0, 1), (1, 0)])
        conns = yield server.wait_for_connections(2)
        self.assertEqual(len(conns), 2)

    @defer.inlineCallbacks
    def test_pipelined_raw_split(self) -> Any:
        """Two requests in one write are split into their own raw bytes."""
        server = self.start()
        conn = yield self.connect(server)
        first = b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        second = b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        conn.send(first + second)
        reqs = yield server.wait_for_requests(2)
        self.assertEqual(reqs[0].raw, first)
        self.assertEqual(reqs[1].raw, second)
        self.assertEqual(reqs[1].raw_head, second)
        self.assertEqual(reqs[1].start, len(first))

    @defer.inlineCallbacks
    def test_chunked_request_body(self) -> Any:
        """A chunked request body is decoded and the request marked chunked."""
        server = self.start()
        conn = yield self.connect(server)
        data = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        conn.send(data)
        reqs = yield server.wait_for_requests(1)
        self.assertEqual(reqs[0].body, b"abcde")
        self.assertTrue(reqs[0].chunked)
        self.assertEqual(reqs[0].raw, data)

    @defer.inlineCallbacks
    def test_body_not_retained(self) -> Any:
        """With retain_bodies=False the body is counted and hashed but not kept."""
        server = self.start(retain_bodies=False)
        conn = yield self.connect(server)
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
        conn.send(head)
        yield conn.send_body(200000)
        reqs = yield server.wait_for_requests(1)
        req = reqs[0]
        self.assertIsNone(req.body)
        self.assertIsNone(req.raw)
        self.assertEqual(req.raw_head, head)
        self.assertEqual(req.body_length, 200000)
        self.assertEqual(req.body_sha256, up.pattern_sha256(200000))
        self.assertEqual(server.connections[0].raw, b"")

    @defer.inlineCallbacks
    def test_wait_for_heads_before_body(self) -> Any:
        """wait_for_heads fires once the head is in, before the body completes."""
        server = self.start()
        conn = yield self.connect(server)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        heads = yield server.wait_for_heads(1)
        self.assertFalse(heads[0].complete)
        self.assertEqual(server.completed, [])

    @defer.inlineCallbacks
    def test_parse_error_answers_400(self) -> Any:
        """Bytes llhttp rejects are recorded as an error and answered with 400 and a close."""
        server = self.start()
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
        resp = yield conn.read_response()
        self.assertEqual(resp.status, 400)
        yield conn.wait_closed()
        self.assertEqual(len(server.errors), 1)

    @defer.inlineCallbacks
    def test_responder_exception_is_logged_not_a_400(self) -> Any:
        """A responder that raises aborts the connection and logs the error (failing the test)."""

        def boom(ex: up.Exchange) -> None:
            raise ZeroDivisionError("responder bug")

        server = self.start(up.function(boom))
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield conn.wait_closed()
        self.assertEqual(conn.received_raw, b"")
        self.assertIsInstance(server.errors[0], ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @defer.inlineCallbacks
    def test_wait_for_disconnections(self) -> Any:
        """wait_for_disconnections fires when the client closes."""
        server = self.start()
        conn = yield self.connect(server)
        yield server.wait_for_connections(1)
        yield conn.close()
        conns = yield server.wait_for_disconnections(1)
        self.assertFalse(conns[0].connected)


class ResponderTests(UpstreamTestCase):
    """Each responder behaves as documented."""

    @defer.inlineCallbacks
    def test_fixed(self) -> Any:
        """fixed() sends the given status, headers in order, body and a Content-Length."""
        server = self.start(up.fixed(201, [(b"X-B", b"1"), (b"x-a", b"2")], b"made", b"Yes"))
        host, port = server.address
        resp = yield request(reactor, host, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual((resp.status, resp.reason), (201, b"Yes"))
        self.assertEqual(resp.headers, [(b"X-B", b"1"), (b"x-a", b"2"), (b"Content-Length", b"4")])
        self.assertEqual(resp.body, b"made")

    @defer.inlineCallbacks
    def test_fixed_chunked(self) -> Any:
        """fixed(chunked=True) frames the body in chunks."""
        server = self.start(up.fixed(body=b"abc", chunked=True))
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = yield conn.read_response()
        self.assertTrue(resp.chunked)
        self.assertEqual(resp.body, b"abc")
        self.assertTrue(conn.received_raw.endswith(b"3\r\nabc\r\n0\r\n\r\n"))

    @defer.inlineCallbacks
    def test_head_has_no_body(self) -> Any:
        """A HEAD request gets the GET's Content-Length and no body; the connection stays usable."""
        server = self.start(up.fixed(body=b"twelve bytes"))
        conn = yield self.connect(server)
        conn.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = yield conn.read_response(head=True)
        self.assertEqual(resp.header(b"content-length"), [b"12"])
        self.assertEqual(resp.body, b"")
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = yield conn.read_response()
        self.assertEqual(resp.body, b"twelve bytes")
        self.assertTrue(conn.received_raw.endswith(b"\r\n\r\ntwelve bytes"))
        self.assertEqual(conn.received_raw.count(b"twelve bytes"), 1)

    @defer.inlineCallbacks
    def test_204_and_304_have_no_body(self) -> Any:
        """204 and 304 responses carry no body and no added Content-Length."""
        for status in (204, 304):
            server = self.start(up.fixed(status, [], b"ignored"))
            conn = yield self.connect(server)
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = yield conn.read_response()
            self.assertEqual(resp.status, status)
            self.assertEqual(resp.headers, [])
            self.assertNotIn(b"ignored", conn.received_raw)

    @defer.inlineCallbacks
    def test_echo_content_length(self) -> Any:
        """echo() returns the request body with the same Content-Length."""
        server = self.start(up.echo())
        conn = yield self.connect(server)
        conn.send(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        resp = yield conn.read_response()
        self.assertEqual(resp.body, b"hello")
        self.assertEqual(resp.header(b"content-length"), [b"5"])

    @defer.inlineCallbacks
    def test_echo_chunked(self) -> Any:
        """echo() of a chunked request body answers chunked, streaming before the request ends."""
        server = self.start(up.echo())
        conn = yield self.connect(server)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        yield server.wait_for_heads(1)
        conn.send(b"2\r\nde\r\n0\r\n\r\n")
        resp = yield conn.read_response()
        self.assertTrue(resp.chunked)
        self.assertEqual(resp.body, b"abcde")

    @defer.inlineCallbacks
    def test_echo_large_streams_with_backpressure(self) -> Any:
        """echo() streams 8 MiB back without keeping it; bytes and hash match what was sent."""
        size = 8 * 1024 * 1024
        server = self.start(up.echo(), retain_bodies=False)
        conn = yield self.connect(server, retain_body=False)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        read = conn.read_response()
        yield conn.send_body(size)
        resp = yield read
        self.assertEqual(resp.body_length, size)
        self.assertEqual(resp.body_sha256, up.pattern_sha256(size))

    @defer.inlineCallbacks
    def test_stream_content_length_and_chunked(self) -> Any:
        """stream(n) sends n pattern bytes with Content-Length, or chunked when asked."""
        size = 3 * 1024 * 1024 + 7
        for chunked in (False, True):
            server = self.start(up.stream(size, chunked=chunked))
            conn = yield self.connect(server, retain_body=False)
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = yield conn.read_response()
            self.assertEqual(resp.chunked, chunked)
            self.assertEqual(resp.body_length, size)
            self.assertEqual(resp.body_sha256, up.pattern_sha256(size))

    @defer.inlineCallbacks
    def test_delayed_uses_injected_clock(self) -> Any:
        """delayed() answers only after the injected clock advances."""
        clock = Clock()
        server = self.start(up.delayed(up.fixed(body=b"late"), 5, clock))
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        read = conn.read_response()
        yield server.wait_for_requests(1)
        clock.advance(4.9)
        self.assertFalse(read.called)
        clock.advance(0.2)
        resp = yield read
        self.assertEqual(resp.body, b"late")

    @defer.inlineCallbacks
    def test_never_responds(self) -> Any:
        """never() reads the request and writes nothing until the connection is dropped."""
        server = self.start(up.never())
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        read = conn.read_response()
        yield server.wait_for_requests(1)
        yield server.close_connections()
        yield conn.wait_closed()
        self.assertEqual(conn.received_raw, b"")
        yield self.assertFailure(read, IncompleteResponse)

    @defer.inlineCallbacks
    def test_close_points(self) -> Any:
        """close_connection() closes before the status line, after it, and mid-body."""
        expected = {
            "before_status": b"",
            "after_status": b"HTTP/1.1 200 OK\r\n",
            "mid_body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
        }
        for when, raw in expected.items():
            for abort in (False, True):
                server = self.start(up.close_connection(when, abort=abort))
                conn = yield self.connect(server)
                conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                yield conn.wait_closed()
                if not abort:
                    self.assertEqual(conn.received_raw, raw, when)
                else:
                    self.assertTrue(raw.startswith(conn.received_raw), when)

    @defer.inlineCallbacks
    def test_malformed(self) -> Any:
        """malformed(kind) writes the named bytes verbatim and closes."""
        server = self.start(up.malformed("cl_and_te"))
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield conn.wait_closed()
        self.assertEqual(conn.received_raw, up.MALFORMED["cl_and_te"])

    @defer.inlineCallbacks
    def test_continue_then_final(self) -> Any:
        """continue_then() answers Expect: 100-continue with a 100 before the body, then the final."""
        server = self.start(up.continue_then(up.echo()))
        conn = yield self.connect(server)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        interim = yield conn.read_response()
        self.assertEqual(interim.status, 100)
        conn.send(b"ok")
        final = yield conn.read_response()
        self.assertEqual((final.status, final.body), (200, b"ok"))

    @defer.inlineCallbacks
    def test_continue_not_sent_without_expect(self) -> Any:
        """continue_then() sends no 100 when the request did not ask for one."""
        server = self.start(up.continue_then(up.fixed()))
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = yield conn.read_final_response()
        self.assertEqual((resp.status, resp.interim), (200, []))

    @defer.inlineCallbacks
    def test_sequence(self) -> Any:
        """sequence() picks the i-th responder for the i-th request, repeating the last."""
        server = self.start(up.sequence(up.fixed(body=b"a"), up.fixed(body=b"b")))
        conn = yield self.connect(server)
        bodies = []
        for _ in range(3):
            conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = yield conn.read_response()
            bodies.append(resp.body)
        self.assertEqual(bodies, [b"a", b"b", b"b"])

    @defer.inlineCallbacks
    def test_connection_close_request(self) -> Any:
        """A request with Connection: close is answered and then the connection is closed."""
        server = self.start()
        conn = yield self.connect(server)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = yield conn.read_response()
        self.assertEqual(resp.status, 200)
        yield conn.wait_closed()


class FastUpstreamTests(unittest.TestCase):
    """The hello and echo upstreams used by make run and the benchmark."""

    def listen(self, mode: str) -> tuple[str, int]:
        """Listen with the fast factory for ``mode``; stop at cleanup."""
        port = reactor.listenTCP(0, up.make_factory(mode), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "127.0.0.1", port.getHost().port

    @defer.inlineCallbacks
    def test_hello_keepalive_pipelined(self) -> Any:
        """hello answers pipelined requests on one connection, each with hello."""
        host, port = self.listen("hello")
        conn = yield connect(reactor, host, port)
        self.addCleanup(conn.abort)
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        for _ in range(3):
            resp = yield conn.read_response()
            self.assertEqual((resp.status, resp.body), (200, b"hello\n"))

    @defer.inlineCallbacks
    def test_echo_describes_request(self) -> Any:
        """echo answers with a JSON description of method, path, headers and body length."""
        host, port = self.listen("echo")
        resp = yield request(
            reactor, host, port, b"POST /p?q=1 HTTP/1.1\r\nHost: h\r\nX-A: b\r\nContent-Length: 3\r\n\r\nabc"
        )
        doc = json.loads(resp.body)
        self.assertEqual(
            doc,
            {
                "method": "POST",
                "path": "/p?q=1",
                "headers": [["Host", "h"], ["X-A", "b"], ["Content-Length", "3"]],
                "body_length": 3,
            },
        )

    def test_parse_listen(self) -> None:
        """--listen values parse into host and port."""
        self.assertEqual(up._parse_listen("127.0.0.1:8082"), ("127.0.0.1", 8082))
        self.assertEqual(up._parse_listen("[::1]:80"), ("::1", 80))

    def test_pattern(self) -> None:
        """pattern_slice is position-consistent and pattern_sha256 hashes it."""
        whole = up.pattern_slice(0, 1000)
        self.assertEqual(up.pattern_slice(300, 200), whole[300:500])
        self.assertEqual(up.pattern_sha256(1000), hashlib.sha256(whole).hexdigest())
        big = up.pattern_slice(5, 600000)
        self.assertEqual(len(big), 600000)
        self.assertEqual(big[-1], (5 + 600000 - 1) % 256)
