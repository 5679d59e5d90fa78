"""100 MiB bodies streamed through the gateway both ways, with backpressure and bounded memory."""

from __future__ import annotations

import functools
import tracemalloc
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.upstream import Exchange, Responder, echo, pattern_sha256, stream
from tests.harness import gateway_with_upstream
from tests.probes import buffered, only_front, poll_until, reading

MiB = 1 << 20
SIZE = 100 * MiB
STOP_AT = 16 * MiB  # the receiver stops reading here until the whole chain has stalled
MAX_GATEWAY_BUFFER = 1 * MiB  # user-space bytes a gateway transport may hold while stalled
MAX_PEAK = 8 * MiB  # tracemalloc peak over a whole 100 MiB transfer (gateway + peers + test)


@functools.cache
def size_sha256() -> str:
    """SHA-256 of the SIZE-byte test pattern."""
    return pattern_sha256(SIZE)


class PausingSink(Responder):
    """An upstream that stops reading the request body at `stop_at` bytes until resumed, then 200."""

    def __init__(self, stop_at: int) -> None:
        """Stop reading once `stop_at` body bytes have arrived."""
        self.stop_at = stop_at
        self.received = 0
        self.stopped: defer.Deferred[None] = defer.Deferred()
        self.exchange: Exchange | None = None

    def on_body(self, ex: Exchange, data: bytes) -> None:
        """Count, and pause the transport's reading at the threshold."""
        self.received += len(data)
        if self.received >= self.stop_at and self.exchange is None:
            self.exchange = ex
            ex.transport.pauseProducing()
            reactor.callLater(0, self.stopped.callback, None)  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Read again."""
        assert self.exchange is not None
        self.exchange.transport.resumeProducing()

    def respond(self, ex: Exchange) -> None:
        """An empty 200."""
        ex.respond(200, [(b"Content-Length", b"0")])


def pause_reading_at(conn: client.RawConnection, stop_at: int) -> defer.Deferred[None]:
    """Make the client stop reading once `stop_at` bytes arrived; fires when it has stopped."""
    stopped: defer.Deferred[None] = defer.Deferred()
    original = conn.dataReceived
    paused = []

    def data_received(data: bytes) -> None:
        original(data)
        if conn.bytes_received >= stop_at and not paused:
            paused.append(True)
            conn.transport.pauseProducing()
            reactor.callLater(0, stopped.callback, None)  # type: ignore[attr-defined]

    conn.dataReceived = data_received  # type: ignore[method-assign]
    return stopped


def stalled(progress: Any, sending_side_reading: Any) -> Any:
    """A predicate: the gateway stopped reading the sender and its byte count stopped moving."""
    last = [-1]

    def check() -> bool:
        now = progress()
        still = now == last[0]
        last[0] = now
        return (still and not sending_side_reading()) or now >= SIZE

    return check


class StreamingTestCase(TestCase):
    """Measures the Python heap peak over each test (tracemalloc)."""

    timeout = 60

    def setUp(self) -> None:
        """Start tracing allocations."""
        size_sha256()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)

    def start_measuring(self) -> None:
        """Measure from here (loading the configuration has its own transient peak)."""
        tracemalloc.reset_peak()

    def peak(self) -> int:
        """The traced heap peak since `start_measuring`."""
        return tracemalloc.get_traced_memory()[1]


class RequestBodyTests(StreamingTestCase):
    """A 100 MiB request body reaches the upstream intact, and a slow upstream pauses the client."""

    async def _upload(self, chunked: bool) -> None:
        sink = PausingSink(STOP_AT)
        gateway, upstream, port = await gateway_with_upstream(self, sink, retain_bodies=False)
        self.start_measuring()
        conn = await client.connect(reactor, "127.0.0.1", port, retain_body=False)
        self.addCleanup(conn.abort)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % SIZE
        conn.send(b"POST /upload HTTP/1.1\r\nHost: example.test\r\n" + framing + b"\r\n\r\n")
        read = conn.read_final_response()
        sent = conn.send_body(SIZE, chunked=chunked)
        await sink.stopped
        front = only_front(gateway)
        exchange = front.active
        assert exchange is not None
        await poll_until(stalled(lambda: exchange.bytes_in, lambda: reading(front.transport)))
        # The gateway stopped reading the client instead of buffering what the upstream won't take.
        self.assertFalse(reading(front.transport))
        self.assertLess(exchange.bytes_in, SIZE - STOP_AT)
        self.assertFalse(sent.called)
        self.assertLessEqual(buffered(exchange.conn.transport), MAX_GATEWAY_BUFFER)
        sink.resume()
        self.assertEqual(await sent, SIZE)
        response = await read
        self.assertEqual(response.status, 200)
        [received] = await upstream.wait_for_requests(1)
        self.assertEqual(received.body_length, SIZE)
        self.assertEqual(received.body_sha256, size_sha256())
        self.assertEqual(received.chunked, chunked)
        self.assertLess(self.peak(), MAX_PEAK)
        self.assertEqual(gateway.records()[-1]["bytes_in"], SIZE)

    async def test_content_length_upload(self) -> None:
        """100 MiB with Content-Length: upstream gets every byte (sha256), gateway memory bounded."""
        await self._upload(chunked=False)

    async def test_chunked_upload(self) -> None:
        """100 MiB chunked: re-chunked to the upstream intact (sha256), gateway memory bounded."""
        await self._upload(chunked=True)


class ResponseBodyTests(StreamingTestCase):
    """A 100 MiB response body reaches the client intact, and a slow client pauses the upstream."""

    async def _download(self, chunked: bool) -> None:
        gateway, upstream, port = await gateway_with_upstream(
            self, stream(SIZE, chunked=chunked), retain_bodies=False
        )
        self.start_measuring()
        conn = await client.connect(reactor, "127.0.0.1", port, retain_body=False)
        self.addCleanup(conn.abort)
        stopped = pause_reading_at(conn, STOP_AT)
        conn.send(b"GET /download HTTP/1.1\r\nHost: example.test\r\n\r\n")
        read = conn.read_final_response()
        await stopped
        front = only_front(gateway)
        exchange = front.active
        assert exchange is not None and exchange.conn is not None
        up_transport = exchange.conn.transport
        await poll_until(stalled(lambda: exchange.bytes_out, lambda: reading(up_transport)))
        # The gateway paused its upstream connection instead of buffering for the slow client.
        self.assertFalse(reading(up_transport))
        self.assertLess(exchange.bytes_out, SIZE - STOP_AT)
        [up_conn] = upstream.connections
        self.assertTrue(up_conn.write_paused)
        self.assertLessEqual(buffered(front.transport), MAX_GATEWAY_BUFFER)
        conn.transport.resumeProducing()
        response = await read
        self.assertEqual(response.status, 200)
        self.assertEqual(response.chunked, chunked)
        self.assertEqual(response.body_length, SIZE)
        self.assertEqual(response.body_sha256, size_sha256())
        self.assertLess(self.peak(), MAX_PEAK)
        self.assertEqual(gateway.records()[-1]["bytes_out"], SIZE)

    async def test_content_length_download(self) -> None:
        """100 MiB with Content-Length: the client gets every byte (sha256), memory bounded."""
        await self._download(chunked=False)

    async def test_chunked_download(self) -> None:
        """100 MiB chunked: the client gets every byte chunked (sha256), memory bounded."""
        await self._download(chunked=True)


class FullDuplexTests(StreamingTestCase):
    """An upstream answering while it still reads (an echo) gets the whole body and returns it."""

    async def test_echo_streams_both_ways_at_once(self) -> None:
        """32 MiB through an echo upstream: the response streams back while the request streams up."""
        size = 32 * MiB
        gateway, upstream, port = await gateway_with_upstream(self, echo(), retain_bodies=False)
        self.start_measuring()
        result = await client.stream_exchange(
            reactor, "127.0.0.1", port,
            b"PUT /echo HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            size, chunked=True,
        )
        self.assertEqual(result.sent, size)
        self.assertEqual(result.response.status, 200)
        self.assertEqual(result.response.body_length, size)
        self.assertEqual(result.response.body_sha256, pattern_sha256(size))
        [received] = upstream.completed
        self.assertEqual(received.body_length, size)
        self.assertLess(self.peak(), MAX_PEAK)
        self.assertEqual(gateway.records()[-1]["bytes_in"], size)
