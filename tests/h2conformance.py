"""Shared base of the HTTP/2 and HPACK conformance suites: a gateway per test with its h2c
listener on loopback in front of a recording echo upstream, raw-frame client connections, and
the checks every case ends with (the reaction the RFC requires, then a fresh connection served)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import h2raw
from flexgw.testing.h2raw import FrameConnection
from flexgw.testing.upstream import RecordingUpstream, echo
from tests.harness import Gateway, free_port, simple_api


class ConformanceCase(TestCase):
    """One gateway (h2c by prior knowledge on its plaintext port) per test, and the checks."""

    def setUp(self) -> None:
        """A recording echo upstream and a gateway in front of it."""
        self.upstream = RecordingUpstream(echo(), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.gateway = Gateway(self, {"api.yaml": simple_api(self.port, self.upstream.address[1])})
        self.gateway.start()

    async def connect(self, handshake: bool = True, **options: Any) -> FrameConnection:
        """A raw-frame client connection (SETTINGS exchanged unless `handshake` is False)."""
        conn = await h2raw.connect(reactor, "127.0.0.1", self.port, handshake=handshake, **options)
        self.addCleanup(lambda: conn.closed or conn.transport.abortConnection())
        return conn

    async def serves_next(self) -> None:
        """A new connection is served: the gateway survived whatever came before."""
        conn = await self.connect()
        conn.request(1, fields=conn.request_fields(b"POST", b"/next"), end_stream=False)
        conn.send(h2raw.data(1, b"next", end_stream=True))
        response = await conn.response(1)
        self.assertEqual((response.status, response.body), (200, b"next"))
        self.assertEqual(self.upstream.received[-1].target, b"/next")
        conn.transport.loseConnection()

    async def connection_error(self, conn: FrameConnection, *codes: int) -> None:
        """GOAWAY with one of `codes` and the connection closed; the next connection served."""
        await conn.connection_error(*codes)
        await self.serves_next()

    async def stream_error(self, conn: FrameConnection, stream_id: int, *codes: int) -> None:
        """RST_STREAM with one of `codes` on the stream (or the error escalated to a connection
        error with one of them); when only the stream was reset, the connection still answers;
        the next connection served."""
        got = await conn.stream_error(stream_id, *codes)
        if got.kind == h2raw.RST_STREAM:
            await conn.still_alive()
        await self.serves_next()

    async def ignored(self, conn: FrameConnection) -> None:
        """What came before was ignored: the connection answers a PING and serves a request."""
        await conn.still_alive()
        stream_id = conn.next_stream_id
        conn.request(stream_id, fields=conn.request_fields(path=b"/after"))
        response = await conn.response(stream_id)
        self.assertEqual(response.status, 200)

    async def malformed(self, conn: FrameConnection, stream_id: int) -> None:
        """RFC 9113 §8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR (a 4xx
        response may come first, ending the stream), and an intermediary MUST NOT forward it:
        nothing reached the upstream; the next connection is served."""
        while True:
            got = await conn.next()
            if got is None:
                self.fail(f"connection closed without a reaction to the malformed request: {conn.received}")
            if got.kind == h2raw.GOAWAY:
                self.assertEqual(got.error_code, h2raw.PROTOCOL_ERROR, got)
                await conn.closes()
                break
            if got.stream_id != stream_id:
                continue
            if got.kind == h2raw.RST_STREAM:
                self.assertEqual(got.error_code, h2raw.PROTOCOL_ERROR, got)
                break
            if got.kind == h2raw.HEADERS and got.fields is not None:
                status = int(dict(got.fields)[b":status"])
                self.assertTrue(400 <= status < 500, f"malformed request answered {status}")
                if got.has(h2raw.END_STREAM):
                    break
            elif got.kind == h2raw.DATA and got.has(h2raw.END_STREAM):
                break
        self.assertEqual([r.target for r in self.upstream.received], [])
        await self.serves_next()
