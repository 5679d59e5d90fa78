"""The HTTP/2 health check connection (flexgw.upstream.health._H2Probe) on flexgw's codec, in
memory: the check's response head decides, a reset stream or a protocol error fails the check
at once, GOAWAY makes the next check reconnect."""

from __future__ import annotations

import hpack
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.testing.h2 import split_frames
from flexgw.upstream.health import _H2Probe

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/health")]


class _Check:
    """What the probe reports to (a flexgw.upstream.health._Check's side)."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.lost_count = 0

    def connected(self, probe: _H2Probe) -> None:
        probe.send(REQUEST)

    def answered(self, probe: _H2Probe, status: int) -> None:
        self.answers.append(status)

    def lost(self, probe: _H2Probe) -> None:
        self.lost_count += 1


class H2ProbeTests(SynchronousTestCase):
    """One stream per check; its final status is the answer."""

    def setUp(self) -> None:
        self.check = _Check()
        self.probe = _H2Probe(self.check)  # type: ignore[arg-type]
        self.transport = StringTransport()
        self.probe.makeConnection(self.transport)
        self.encoder = hpack.Encoder()
        self.probe.dataReceived(SettingsFrame(0).serialize())

    def sent(self) -> list:
        """The frames the probe wrote (after the client preface)."""
        data = self.transport.value()
        self.transport.clear()
        return split_frames(data[24:] if data.startswith(b"PRI ") else data)[0]

    def test_request_then_status(self) -> None:
        """The preface and the check's HEADERS go out; a 103 is not the answer, the 204 is;
        the body (past half the connection window) is acknowledged; the next check opens the
        next stream."""
        headers = [f for f in self.sent() if isinstance(f, HeadersFrame)]
        self.assertEqual([(h.stream_id, "END_STREAM" in h.flags) for h in headers], [(1, True)])
        self.assertEqual(hpack.Decoder().decode(headers[0].data), [(k.decode(), v.decode()) for k, v in REQUEST])
        self.probe.dataReceived(
            HeadersFrame(1, self.encoder.encode([(b":status", b"103")]), flags=["END_HEADERS"]).serialize()
            + HeadersFrame(1, self.encoder.encode([(b":status", b"503")]), flags=["END_HEADERS"]).serialize()
            + DataFrame(1, b"x" * 16384).serialize() * 4
            + DataFrame(1, b"", flags=["END_STREAM"]).serialize()
        )
        self.assertEqual(self.check.answers, [503])
        self.assertTrue(any(isinstance(f, WindowUpdateFrame) for f in self.sent()))
        self.probe.send(REQUEST)
        self.assertEqual([h.stream_id for h in self.sent() if isinstance(h, HeadersFrame)], [3])
        self.assertTrue(self.probe.keep)

    def test_reset_stream_fails_the_check(self) -> None:
        """RST_STREAM on the check's stream: the check failed (status 0), the connection is kept."""
        self.probe.dataReceived(RstStreamFrame(1, error_code=2).serialize())
        self.assertEqual(self.check.answers, [0])
        self.assertTrue(self.probe.keep)

    def test_protocol_error_fails_and_drops(self) -> None:
        """A frame that breaks the protocol: GOAWAY, the check failed, the connection aborted."""
        self.sent()
        self.probe.dataReceived(DataFrame(1, b"x" * 20000).serialize())  # over 16,384
        self.assertEqual(self.check.answers, [0])
        self.assertFalse(self.probe.keep)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(any(isinstance(f, GoAwayFrame) for f in self.sent()))

    def test_goaway_means_reconnect(self) -> None:
        """The upstream's GOAWAY: the answer in flight still counts, the next check reconnects."""
        self.probe.dataReceived(
            GoAwayFrame(0, last_stream_id=1).serialize()
            + HeadersFrame(1, self.encoder.encode([(b":status", b"200")]), flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        self.assertEqual(self.check.answers, [200])
        self.assertFalse(self.probe.keep)
