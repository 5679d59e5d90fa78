"""flexgw.testing.h2raw's client: a wait for one stream's frames leaves the other streams'
frames queued, in order, for the waits that want them."""

from __future__ import annotations

import hpack
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.testing.h2raw import (
    CANCEL,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    FrameConnection,
    data,
    frame,
    ping,
    rst_stream,
    settings,
)


class PerStreamQueueTests(SynchronousTestCase):
    """Frames of several streams arriving interleaved, read stream by stream."""

    def setUp(self) -> None:
        """A connection on a memory transport; the server's encoder for its header blocks."""
        self.conn = FrameConnection(MemoryReactorClock(), preface=b"")
        self.conn.makeConnection(StringTransport())
        self.encoder = hpack.Encoder()

    def head(self, stream_id: int, status: bytes, end_stream: bool = False) -> bytes:
        """A response HEADERS frame."""
        block = self.encoder.encode([(b":status", status)])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, block)

    def test_a_response_wait_keeps_other_streams_frames(self) -> None:
        """Stream 3's response and stream 5's reset arrive in the middle of stream 1's
        response: reading stream 1 leaves them, and they are read afterwards."""
        self.conn.dataReceived(
            settings()
            + self.head(1, b"200")
            + self.head(3, b"404")
            + data(3, b"three", end_stream=True)
            + rst_stream(5, CANCEL)
            + data(1, b"one", end_stream=True)
        )
        first = self.successResultOf(defer.ensureDeferred(self.conn.response(1)))
        self.assertEqual((first.status, first.body), (200, b"one"))
        third = self.successResultOf(defer.ensureDeferred(self.conn.response(3)))
        self.assertEqual((third.status, third.body), (404, b"three"))
        reset = self.successResultOf(defer.ensureDeferred(self.conn.stream_error(5, CANCEL)))
        self.assertEqual(reset.stream_id, 5)

    def test_any_stream_read_keeps_arrival_order(self) -> None:
        """After a wait for stream 3 took its frames, next() gives the rest in arrival order:
        the connection's frames (stream 0) go to the stream wait too."""
        self.conn.dataReceived(
            self.head(1, b"200") + ping(b"pingpong") + self.head(3, b"204", end_stream=True)
            + data(1, b"x", end_stream=True)
        )
        self.assertEqual(
            self.successResultOf(defer.ensureDeferred(self.conn.response(3))).status, 204
        )
        rest = [self.successResultOf(defer.ensureDeferred(self.conn.next())) for _ in range(2)]
        self.assertEqual([(f.kind, f.stream_id) for f in rest], [(HEADERS, 1), (DATA, 1)])
        self.assertNoResult(defer.ensureDeferred(self.conn.next()))
        self.assertEqual([f.kind for f in self.conn.frames_of(PING)], [PING])

    def test_a_stream_wait_is_woken_by_its_own_frame_only(self) -> None:
        """A wait for stream 3 is not answered by stream 1's frames arriving; it is when
        stream 3's come."""
        waiting = defer.ensureDeferred(self.conn.response(3))
        self.conn.dataReceived(self.head(1, b"200", end_stream=True))
        self.assertNoResult(waiting)
        self.conn.dataReceived(self.head(3, b"202", end_stream=True))
        self.assertEqual(self.successResultOf(waiting).status, 202)
        self.assertEqual(
            self.successResultOf(defer.ensureDeferred(self.conn.response(1))).status, 200
        )
