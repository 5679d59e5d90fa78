"""flexgw's HTTP/2 codec (flexgw.http.h2) in memory, section by section of RFC 9113 and 7541:
the frames a peer sends (built with hyperframe, HPACK by hpack) and what the codec answers and
tells its handler."""

from __future__ import annotations

import gc
import struct
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.h2 import fields as h2fields
from flexgw.http.h2 import frames as f
from flexgw.http.h2 import settings as s
from flexgw.http.h2.connection import H2Codec, HeaderListTooLargeError, StreamClosedError
from flexgw.testing.h2 import split_frames
from flexgw.testing.memory import connect_client, connect_upstream, memory_factory, one_api_listener

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/x")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/x")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


class Recorder:
    """A codec handler that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.controls = 0
        self.codec: H2Codec | None = None
        self.control_limit: int | None = None

    def h2_headers(self, stream_id: int, headers: list, end_stream: bool) -> None:
        self.calls.append(("headers", stream_id, [tuple(h) for h in headers], end_stream))

    def h2_trailers(self, stream_id: int, headers: list) -> None:
        self.calls.append(("trailers", stream_id, [tuple(h) for h in headers]))

    def h2_data(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.calls.append(("data", stream_id, data, flow, end_stream))

    def h2_reset(self, stream_id: int, code: int, remote: bool) -> None:
        self.calls.append(("reset", stream_id, code, remote))

    def h2_window(self, stream_id: int) -> None:
        self.calls.append(("window", stream_id))

    def h2_settings(self) -> None:
        self.calls.append(("settings",))

    def h2_goaway(self, last: int, code: int) -> None:
        self.calls.append(("goaway", last, code))

    def h2_control(self) -> None:
        self.controls += 1
        if self.control_limit is not None and self.controls > self.control_limit:
            assert self.codec is not None
            self.codec.close(f.ENHANCE_YOUR_CALM, "flood")

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


class CodecTestCase(SynchronousTestCase):
    """A server codec past the client's preface and SETTINGS, its own SETTINGS acknowledged."""

    client = False

    def setUp(self) -> None:
        self.handler = Recorder()
        self.codec = H2Codec(
            self.handler,
            client=self.client,
            local_settings={s.MAX_CONCURRENT_STREAMS: 5, s.INITIAL_WINDOW_SIZE: 65535},
            max_header_list=4096,
            header_block_limit=2048,
        )
        self.handler.codec = self.codec
        self.encoder = hpack.Encoder()
        self.codec.initiate()
        if self.client:
            self.codec.data_to_send()
            self.codec.receive(SettingsFrame(0).serialize() + f.SETTINGS_ACK)
        else:
            self.codec.receive(f.PREFACE + SettingsFrame(0).serialize() + f.SETTINGS_ACK)
        self.codec.data_to_send()
        self.handler.calls.clear()
        self.handler.controls = 0

    def feed(self, *frames: Any) -> list:
        """Send frames (hyperframe objects or raw bytes); the frames the codec wrote back."""
        self.codec.receive(b"".join(x if isinstance(x, bytes) else x.serialize() for x in frames))
        return split_frames(self.codec.data_to_send())[0]

    def headers(self, stream_id: int, fields: list = GET, flags: tuple = ("END_HEADERS", "END_STREAM")) -> HeadersFrame:
        """A HEADERS frame with `fields` encoded by the test's encoder."""
        return HeadersFrame(stream_id, self.encoder.encode(fields), flags=list(flags))

    def assertGoaway(self, written: list, code: int) -> None:
        """The codec wrote GOAWAY with `code` and reads no more."""
        goaways = [x for x in written if isinstance(x, GoAwayFrame)]
        self.assertEqual([g.error_code for g in goaways], [code], written)
        self.assertTrue(self.codec.closed)

    def assertReset(self, written: list, stream_id: int, code: int) -> None:
        """The codec reset `stream_id` with `code` (a stream error) and reads on."""
        resets = [(x.stream_id, x.error_code) for x in written if isinstance(x, RstStreamFrame)]
        self.assertEqual(resets, [(stream_id, code)], written)
        self.assertFalse(self.codec.closed)
        self.assertIn(("reset", stream_id, code, False), self.handler.calls)


class PrefaceTests(SynchronousTestCase):
    """§3.4: the connection preface, then SETTINGS first."""

    def codec(self) -> H2Codec:
        return H2Codec(Recorder(), client=False, local_settings={}, max_header_list=4096, header_block_limit=2048)

    def test_invalid_preface(self) -> None:
        """Bytes that are not the preface: GOAWAY PROTOCOL_ERROR."""
        codec = self.codec()
        codec.receive(b"GET / HTTP/1.1\r\n\r\n\r\n\r\n\r\n\r\n")
        [goaway] = split_frames(codec.data_to_send())[0]
        self.assertEqual(goaway.error_code, f.PROTOCOL_ERROR)

    def test_preface_in_pieces(self) -> None:
        """The preface and SETTINGS one byte at a time: accepted, SETTINGS acknowledged."""
        codec = self.codec()
        for byte in f.PREFACE + SettingsFrame(0).serialize():
            codec.receive(bytes([byte]))
        self.assertEqual(codec.data_to_send(), f.SETTINGS_ACK)
        self.assertFalse(codec.closed)

    def test_first_frame_not_settings(self) -> None:
        """A PING before SETTINGS: GOAWAY PROTOCOL_ERROR."""
        codec = self.codec()
        codec.receive(f.PREFACE + PingFrame(0, opaque_data=b"12345678").serialize())
        [goaway] = split_frames(codec.data_to_send())[0]
        self.assertEqual(goaway.error_code, f.PROTOCOL_ERROR)


class FrameFormatTests(CodecTestCase):
    """§4.1-4.3: frame format, size, header blocks."""

    def test_unknown_type_ignored_and_counted(self) -> None:
        """An extension frame is ignored (§5.5) and counted as a control frame."""
        written = self.feed(f.frame(0x42, 0xFF, 0, b"abc"), self.headers(1))
        self.assertEqual(written, [])
        self.assertEqual(self.handler.controls, 1)
        self.assertEqual(len(self.handler.of("headers")), 1)

    def test_undefined_flags_and_reserved_bit_ignored(self) -> None:
        """Undefined flags and the reserved bit of the stream id change nothing."""
        block = self.encoder.encode(GET)
        frame = f.HEAD.pack(0, len(block), f.HEADERS, 0xC5 & ~f.PADDED & ~f.PRIORITY_FLAG | 0x5, 0x80000001) + block
        self.feed(frame)
        [(_, stream_id, _, ended)] = self.handler.of("headers")
        self.assertEqual((stream_id, ended), (1, True))

    def test_frame_too_large(self) -> None:
        """A DATA frame over SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.assertGoaway(self.feed(DataFrame(1, b"a" * 16385)), f.FRAME_SIZE_ERROR)

    def test_invalid_header_block(self) -> None:
        """A header block HPACK cannot decode (index 0, an index past the tables): COMPRESSION_ERROR."""
        self.assertGoaway(self.feed(HeadersFrame(1, b"\x80", flags=["END_HEADERS"])), f.COMPRESSION_ERROR)

    def test_index_past_the_tables(self) -> None:
        """An index past the static and dynamic tables: COMPRESSION_ERROR."""
        self.assertGoaway(self.feed(HeadersFrame(1, b"\xff\x10", flags=["END_HEADERS"])), f.COMPRESSION_ERROR)

    def test_table_size_update_over_setting(self) -> None:
        """A dynamic table size update above SETTINGS_HEADER_TABLE_SIZE: COMPRESSION_ERROR."""
        update = b"\x3f\xe1\x3f"  # size 8192 (> 4096)
        block = update + self.encoder.encode(GET)
        self.assertGoaway(self.feed(HeadersFrame(1, block, flags=["END_HEADERS"])), f.COMPRESSION_ERROR)

    def test_header_list_far_too_large(self) -> None:
        """A header list over the decoder's bound: ENHANCE_YOUR_CALM."""
        fields = [*GET, *[(b"x-h%d" % i, b"v" * 400) for i in range(12)]]
        self.assertGoaway(self.feed(self.headers(1, fields)), f.ENHANCE_YOUR_CALM)

    def test_headers_interrupted(self) -> None:
        """HEADERS without END_HEADERS followed by another frame type: PROTOCOL_ERROR."""
        block = self.encoder.encode(GET)
        written = self.feed(HeadersFrame(1, block[:3]), PingFrame(0, opaque_data=b"12345678"))
        self.assertGoaway(written, f.PROTOCOL_ERROR)

    def test_continuation_of_another_stream(self) -> None:
        """CONTINUATION of another stream than the HEADERS: PROTOCOL_ERROR."""
        block = self.encoder.encode(GET)
        written = self.feed(HeadersFrame(1, block[:3]), ContinuationFrame(3, block[3:], flags=["END_HEADERS"]))
        self.assertGoaway(written, f.PROTOCOL_ERROR)

    def test_continuation_without_headers(self) -> None:
        """CONTINUATION after a complete block: PROTOCOL_ERROR."""
        written = self.feed(self.headers(1), ContinuationFrame(1, b"\x82", flags=["END_HEADERS"]))
        self.assertGoaway(written, f.PROTOCOL_ERROR)

    def test_continuations_assembled(self) -> None:
        """A block over HEADERS and two CONTINUATION frames is one head."""
        block = self.encoder.encode(GET)
        self.feed(
            HeadersFrame(1, block[:2], flags=["END_STREAM"]),
            ContinuationFrame(1, block[2:4]),
            ContinuationFrame(1, block[4:], flags=["END_HEADERS"]),
        )
        self.assertEqual(self.handler.of("headers"), [("headers", 1, GET, True)])

    def test_continuation_run_over_limit(self) -> None:
        """An unfinished block past the limit: ENHANCE_YOUR_CALM before it completes."""
        written = self.feed(HeadersFrame(1, b"\x82" * 1500), ContinuationFrame(1, b"\x82" * 1000))
        self.assertGoaway(written, f.ENHANCE_YOUR_CALM)

    def test_padding(self) -> None:
        """Padded HEADERS and DATA: the padding is dropped but counts for flow control."""
        self.feed(
            HeadersFrame(1, self.encoder.encode(POST), flags=["END_HEADERS", "PADDED"], pad_length=10),
            DataFrame(1, b"abc", flags=["END_STREAM", "PADDED"], pad_length=20),
        )
        self.assertEqual(self.handler.of("data"), [("data", 1, b"abc", 24, True)])

    def test_padding_too_long(self) -> None:
        """A pad length not less than the payload: PROTOCOL_ERROR."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.assertGoaway(self.feed(f.frame(f.DATA, f.PADDED, 1, b"\x05abc")), f.PROTOCOL_ERROR)


class StreamStateTests(CodecTestCase):
    """§5.1: stream states and identifiers; §5.1.2 concurrency."""

    def test_data_on_idle_stream(self) -> None:
        """DATA on a stream never opened: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(DataFrame(1, b"a")), f.PROTOCOL_ERROR)

    def test_rst_and_window_update_on_idle_stream(self) -> None:
        """RST_STREAM or WINDOW_UPDATE on an idle stream: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(RstStreamFrame(1)), f.PROTOCOL_ERROR)
        self.setUp()
        self.assertGoaway(self.feed(WindowUpdateFrame(1, window_increment=1)), f.PROTOCOL_ERROR)

    def test_data_on_half_closed_remote(self) -> None:
        """DATA after the client's END_STREAM: RST_STREAM STREAM_CLOSED, reported to the handler."""
        self.feed(self.headers(1))
        self.assertReset(self.feed(DataFrame(1, b"a")), 1, f.STREAM_CLOSED)

    def test_headers_on_half_closed_remote(self) -> None:
        """A second HEADERS after END_STREAM: RST_STREAM STREAM_CLOSED."""
        self.feed(self.headers(1))
        self.assertReset(self.feed(self.headers(1, [(b"x-t", b"1")])), 1, f.STREAM_CLOSED)

    def test_frames_after_our_reset_ignored(self) -> None:
        """After we reset a stream, its late DATA is ignored (its connection window given back)."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.codec.reset_stream(1, f.CANCEL)
        self.codec.data_to_send()
        written = self.feed(*[DataFrame(1, b"a" * 16000) for _ in range(3)])
        self.assertEqual([type(x) for x in written], [WindowUpdateFrame])
        self.assertEqual(written[0].stream_id, 0)
        self.assertEqual(self.handler.of("data"), [])

    def test_data_after_peer_reset(self) -> None:
        """DATA after the client's own RST_STREAM: STREAM_CLOSED."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)), RstStreamFrame(1, error_code=f.CANCEL))
        self.assertEqual(self.handler.of("reset"), [("reset", 1, f.CANCEL, True)])
        self.assertReset(self.feed(DataFrame(1, b"a")), 1, f.STREAM_CLOSED)

    def test_data_on_closed_stream(self) -> None:
        """DATA on a stream closed both ways: RST_STREAM STREAM_CLOSED (the connection serves
        on, as with the h2 library); HEADERS there: connection error STREAM_CLOSED."""
        self.feed(self.headers(1))
        self.codec.send_headers(1, RESPONSE, end_stream=True)
        self.codec.data_to_send()
        written = self.feed(DataFrame(1, b"a"))
        self.assertReset([x for x in written if isinstance(x, RstStreamFrame)], 1, f.STREAM_CLOSED)
        self.feed(self.headers(3))
        self.codec.send_headers(3, RESPONSE, end_stream=True)
        self.codec.data_to_send()
        self.assertGoaway(self.feed(self.headers(3)), f.STREAM_CLOSED)

    def test_lower_stream_id_never_opened(self) -> None:
        """HEADERS on stream 3 after stream 5 was opened: PROTOCOL_ERROR (§5.1.1)."""
        self.feed(self.headers(5))
        self.assertGoaway(self.feed(self.headers(3)), f.PROTOCOL_ERROR)

    def test_even_stream_id(self) -> None:
        """A client opening an even stream: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(self.headers(2)), f.PROTOCOL_ERROR)

    def test_stream_id_lower_than_previous(self) -> None:
        """A new stream numbered below one already opened: a connection error."""
        self.feed(self.headers(5, POST, ("END_HEADERS",)))
        written = self.feed(self.headers(3))
        self.assertTrue(self.codec.closed, written)

    def test_over_max_concurrent_streams(self) -> None:
        """More open streams than SETTINGS_MAX_CONCURRENT_STREAMS: PROTOCOL_ERROR."""
        written = self.feed(*[self.headers(1 + 2 * i, POST, ("END_HEADERS",)) for i in range(6)])
        self.assertGoaway(written, f.PROTOCOL_ERROR)
        self.assertEqual(len(self.handler.of("headers")), 5)

    def test_closed_streams_leave_the_table(self) -> None:
        """A stream ended both ways is gone; its place is free for another."""
        for i in range(8):
            self.feed(self.headers(1 + 2 * i))
            self.codec.send_headers(1 + 2 * i, RESPONSE, end_stream=True)
        self.assertEqual(self.codec.streams, {})
        self.assertFalse(self.codec.closed)

    def test_send_on_closed_stream_raises(self) -> None:
        """Sending on a stream reset by the client raises StreamClosedError."""
        self.feed(self.headers(1), RstStreamFrame(1, error_code=f.CANCEL))
        with self.assertRaises(StreamClosedError):
            self.codec.send_headers(1, RESPONSE)


class FrameDefinitionTests(CodecTestCase):
    """§6: each frame type's rules."""

    def test_data_on_stream_zero(self) -> None:
        """DATA on stream 0: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(f.frame(f.DATA, 0, 0, b"a")), f.PROTOCOL_ERROR)

    def test_headers_on_stream_zero(self) -> None:
        """HEADERS on stream 0: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(f.frame(f.HEADERS, f.END_HEADERS, 0, b"\x82")), f.PROTOCOL_ERROR)

    def test_priority_rules(self) -> None:
        """PRIORITY on stream 0, or of a length other than 5: connection errors; depending on
        itself: a stream error; otherwise ignored (and counted)."""
        self.assertGoaway(self.feed(f.frame(f.PRIORITY, 0, 0, b"\0" * 5)), f.PROTOCOL_ERROR)
        self.setUp()
        self.assertGoaway(self.feed(f.frame(f.PRIORITY, 0, 1, b"\0" * 4)), f.FRAME_SIZE_ERROR)
        self.setUp()
        self.assertEqual(self.feed(PriorityFrame(3, depends_on=1)), [])
        self.assertEqual(self.handler.controls, 1)
        self.assertReset(self.feed(PriorityFrame(5, depends_on=5)), 5, f.PROTOCOL_ERROR)

    def test_headers_depending_on_itself(self) -> None:
        """HEADERS whose priority depends on its own stream: RST_STREAM PROTOCOL_ERROR."""
        frame = HeadersFrame(1, self.encoder.encode(GET), flags=["END_HEADERS", "PRIORITY"], depends_on=1)
        self.assertReset(self.feed(frame), 1, f.PROTOCOL_ERROR)

    def test_rst_stream_rules(self) -> None:
        """RST_STREAM on stream 0 or of a length other than 4: connection errors."""
        self.assertGoaway(self.feed(f.frame(f.RST_STREAM, 0, 0, b"\0" * 4)), f.PROTOCOL_ERROR)
        self.setUp()
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.assertGoaway(self.feed(f.frame(f.RST_STREAM, 0, 1, b"\0" * 3)), f.FRAME_SIZE_ERROR)

    def test_settings_acknowledged(self) -> None:
        """SETTINGS is answered with an empty SETTINGS ACK; unknown settings are ignored."""
        written = self.feed(f.frame(f.SETTINGS, 0, 0, struct.pack(">HL", 0x99, 7)))
        self.assertEqual([(type(x), x.flags) for x in written], [(SettingsFrame, {"ACK"})])
        self.assertEqual(self.handler.of("settings"), [("settings",)])

    def test_settings_errors(self) -> None:
        """ACK with a payload, a stream id, a length not a multiple of 6, ENABLE_PUSH 2,
        INITIAL_WINDOW_SIZE over 2^31-1, MAX_FRAME_SIZE out of range: each its error."""
        cases = [
            (f.frame(f.SETTINGS, f.ACK, 0, b"\0" * 6), f.FRAME_SIZE_ERROR),
            (f.frame(f.SETTINGS, 0, 1, b""), f.PROTOCOL_ERROR),
            (f.frame(f.SETTINGS, 0, 0, b"\0" * 5), f.FRAME_SIZE_ERROR),
            (f.settings({s.ENABLE_PUSH: 2}), f.PROTOCOL_ERROR),
            (f.settings({s.INITIAL_WINDOW_SIZE: 2**31}), f.FLOW_CONTROL_ERROR),
            (f.settings({s.MAX_FRAME_SIZE: 16383}), f.PROTOCOL_ERROR),
            (f.settings({s.MAX_FRAME_SIZE: 2**24}), f.PROTOCOL_ERROR),
        ]
        for frame, code in cases:
            self.setUp()
            self.assertGoaway(self.feed(frame), code)

    def test_ping(self) -> None:
        """PING is answered with the same payload and ACK; a PING ACK is not answered; PING on a
        stream or of a length other than 8 is a connection error."""
        [ack] = self.feed(PingFrame(0, opaque_data=b"abcdefgh"))
        self.assertEqual((ack.flags, ack.opaque_data), ({"ACK"}, b"abcdefgh"))
        self.assertEqual(self.feed(PingFrame(0, opaque_data=b"abcdefgh", flags=["ACK"])), [])
        self.assertGoaway(self.feed(f.frame(f.PING, 0, 1, b"\0" * 8)), f.PROTOCOL_ERROR)
        self.setUp()
        self.assertGoaway(self.feed(f.frame(f.PING, 0, 0, b"\0" * 7)), f.FRAME_SIZE_ERROR)

    def test_goaway(self) -> None:
        """GOAWAY reaches the handler (unknown codes too); on a stream it is PROTOCOL_ERROR."""
        self.feed(GoAwayFrame(0, last_stream_id=0, error_code=0xFF))
        self.assertEqual(self.handler.of("goaway"), [("goaway", 0, 0xFF)])
        self.assertGoaway(self.feed(f.frame(f.GOAWAY, 0, 1, b"\0" * 8)), f.PROTOCOL_ERROR)

    def test_push_promise_from_client(self) -> None:
        """PUSH_PROMISE from a client: PROTOCOL_ERROR."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        frame = PushPromiseFrame(1, promised_stream_id=2, data=self.encoder.encode(GET), flags=["END_HEADERS"])
        self.assertGoaway(self.feed(frame), f.PROTOCOL_ERROR)

    def test_window_update_rules(self) -> None:
        """WINDOW_UPDATE of 0 (connection: connection error; stream: stream error), of a bad
        length, or overflowing a window (connection error / stream error FLOW_CONTROL_ERROR)."""
        self.assertGoaway(self.feed(f.window_update(0, 0)), f.PROTOCOL_ERROR)
        self.setUp()
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.assertReset(self.feed(f.window_update(1, 0)), 1, f.PROTOCOL_ERROR)
        self.setUp()
        self.assertGoaway(self.feed(f.frame(f.WINDOW_UPDATE, 0, 0, b"\0" * 3)), f.FRAME_SIZE_ERROR)
        self.setUp()
        self.assertGoaway(self.feed(WindowUpdateFrame(0, window_increment=2**31 - 1)), f.FLOW_CONTROL_ERROR)
        self.setUp()
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        self.assertReset(self.feed(WindowUpdateFrame(1, window_increment=2**31 - 1)), 1, f.FLOW_CONTROL_ERROR)

    def test_continuation_on_stream_zero(self) -> None:
        """CONTINUATION on stream 0: PROTOCOL_ERROR."""
        self.assertGoaway(self.feed(f.frame(f.CONTINUATION, f.END_HEADERS, 0, b"\x82")), f.PROTOCOL_ERROR)


class OwnSettingsTests(SynchronousTestCase):
    """§6.5.3: our SETTINGS that let the peer send less apply once it acknowledged them; before,
    it may still use the defaults. Those that let it send more apply at once."""

    def codec(self, local: dict[int, int]) -> tuple[H2Codec, Recorder]:
        handler = Recorder()
        codec = H2Codec(handler, client=False, local_settings=local, max_header_list=4096, header_block_limit=2048)
        handler.codec = codec
        codec.initiate()
        codec.receive(f.PREFACE + SettingsFrame(0).serialize())
        codec.data_to_send()
        return codec, handler

    def test_smaller_window_after_ack(self) -> None:
        """INITIAL_WINDOW_SIZE 100: before the ACK a stream takes 65,535 octets; the ACK shrinks
        the open streams' windows by the difference (§6.9.2), and then DATA over it is a stream
        error FLOW_CONTROL_ERROR."""
        codec, handler = self.codec({s.INITIAL_WINDOW_SIZE: 100})
        encoder = hpack.Encoder()
        codec.receive(HeadersFrame(1, encoder.encode(POST), flags=["END_HEADERS"]).serialize())
        codec.receive(DataFrame(1, b"x" * 1000).serialize())
        self.assertEqual(handler.of("reset"), [])
        codec.receive(f.SETTINGS_ACK)
        self.assertEqual(codec.streams[1].recv_window, 100 - 1000)
        codec.receive(HeadersFrame(3, encoder.encode(POST), flags=["END_HEADERS"]).serialize())
        codec.receive(DataFrame(3, b"x" * 101).serialize())
        self.assertEqual(handler.of("reset"), [("reset", 3, f.FLOW_CONTROL_ERROR, False)])

    def test_stream_limit_after_ack(self) -> None:
        """MAX_CONCURRENT_STREAMS 1: a second stream before the ACK is the handler's to refuse
        (no connection error); after it, over the limit is a connection error."""
        codec, handler = self.codec({s.MAX_CONCURRENT_STREAMS: 1})
        encoder = hpack.Encoder()
        codec.receive(b"".join(HeadersFrame(i, encoder.encode(POST), flags=["END_HEADERS"]).serialize() for i in (1, 3)))
        self.assertFalse(codec.closed)
        self.assertEqual(len(handler.of("headers")), 2)
        codec.receive(f.SETTINGS_ACK + HeadersFrame(5, encoder.encode(POST), flags=["END_HEADERS"]).serialize())
        self.assertTrue(codec.closed)
        self.assertEqual(codec.error[0], f.PROTOCOL_ERROR)

    def test_larger_values_at_once(self) -> None:
        """A larger window, frame size and header table apply before the ACK."""
        codec, _ = self.codec({s.INITIAL_WINDOW_SIZE: 1 << 20, s.MAX_FRAME_SIZE: 1 << 15, s.HEADER_TABLE_SIZE: 8192})
        self.assertEqual((codec.local_window, codec.local_max_frame, codec.decoder.max_allowed_table_size), (1 << 20, 1 << 15, 8192))
        codec.receive(f.SETTINGS_ACK)
        self.assertEqual(codec.unacknowledged, [])

    def test_smaller_table_after_ack(self) -> None:
        """HEADER_TABLE_SIZE 0: the decoder allows the default table until the ACK."""
        codec, _ = self.codec({s.HEADER_TABLE_SIZE: 0})
        self.assertEqual(codec.decoder.max_allowed_table_size, 4096)
        codec.receive(f.SETTINGS_ACK)
        self.assertEqual(codec.decoder.max_allowed_table_size, 0)


class FlowControlTests(CodecTestCase):
    """§5.2, §6.9: windows both ways."""

    def test_send_window_follows_updates_and_settings(self) -> None:
        """The stream's send window: 65535, then + WINDOW_UPDATE, then moved by a new
        SETTINGS_INITIAL_WINDOW_SIZE (below zero too); the connection's apart."""
        self.feed(self.headers(1))
        self.assertEqual(self.codec.local_flow_control_window(1), 65535)
        self.codec.send_headers(1, RESPONSE)
        self.codec.send_data(1, b"a" * 16384)
        self.assertEqual(self.codec.local_flow_control_window(1), 65535 - 16384)
        self.feed(WindowUpdateFrame(1, window_increment=16384))
        self.assertEqual(self.handler.of("window"), [("window", 1)])
        self.assertEqual(self.codec.local_flow_control_window(1), 65535 - 16384)  # the connection's
        self.feed(WindowUpdateFrame(0, window_increment=100000))
        self.assertEqual(self.codec.local_flow_control_window(1), 65535)
        self.feed(f.settings({s.INITIAL_WINDOW_SIZE: 0}))
        self.assertEqual(self.codec.local_flow_control_window(1), 0)
        self.assertEqual(self.codec.streams[1].send_window, 0)
        self.codec.send_data(1, b"")
        self.feed(f.settings({s.INITIAL_WINDOW_SIZE: 10}))
        self.assertEqual(self.codec.local_flow_control_window(1), 10)

    def test_settings_window_overflow(self) -> None:
        """A SETTINGS_INITIAL_WINDOW_SIZE pushing an open stream's window past 2^31-1:
        FLOW_CONTROL_ERROR."""
        self.feed(self.headers(1), WindowUpdateFrame(1, window_increment=2**31 - 65536))
        self.assertGoaway(self.feed(f.settings({s.INITIAL_WINDOW_SIZE: 65536})), f.FLOW_CONTROL_ERROR)

    def test_data_over_stream_window(self) -> None:
        """More DATA than the stream window: RST_STREAM FLOW_CONTROL_ERROR."""
        self.codec.increase_window(100000)
        self.feed(self.headers(1, POST, ("END_HEADERS",)))
        written = self.feed(*[DataFrame(1, b"a" * 16384) for _ in range(4)], DataFrame(1, b"a"))
        self.assertReset(written, 1, f.FLOW_CONTROL_ERROR)

    def test_data_over_connection_window(self) -> None:
        """More DATA than the connection window (over several streams): FLOW_CONTROL_ERROR."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)), self.headers(3, POST, ("END_HEADERS",)))
        frames = [DataFrame(1, b"a" * 16383) for _ in range(3)] + [DataFrame(3, b"a" * 16383) for _ in range(2)]
        self.assertGoaway(self.feed(*frames), f.FLOW_CONTROL_ERROR)

    def test_acknowledged_in_batches(self) -> None:
        """Handed-back bytes become WINDOW_UPDATEs once half a window is owed."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)), DataFrame(1, b"a" * 30000))
        self.codec.acknowledge(1, 30000)
        self.assertEqual(self.codec.data_to_send(), b"")
        self.feed(DataFrame(1, b"a" * 3000))
        self.codec.acknowledge(1, 3000)
        updates = split_frames(self.codec.data_to_send())[0]
        self.assertEqual(
            [(u.stream_id, u.window_increment) for u in updates], [(0, 33000), (1, 33000)]
        )

    def test_increase_window(self) -> None:
        """increase_window sends the connection's WINDOW_UPDATE and accepts that much more."""
        self.codec.increase_window(1000000)
        [update] = split_frames(self.codec.data_to_send())[0]
        self.assertEqual((update.stream_id, update.window_increment), (0, 1000000))
        self.feed(*[self.headers(1 + 2 * i, POST, ("END_HEADERS",)) for i in range(5)])
        self.feed(*[DataFrame(1 + 2 * i, b"a" * 16384) for i in range(5)])
        self.assertFalse(self.codec.closed)


class MessageTests(CodecTestCase):
    """§8.1-8.3: malformed messages, trailers, content-length."""

    def test_malformed_request_heads(self) -> None:
        """Upper case, connection-specific fields, TE other than trailers, a pseudo-header after
        a regular field, unknown or response pseudo-headers, missing or empty :path, duplicate
        :method, a bad value, Host disagreeing with :authority: PROTOCOL_ERROR."""
        cases = [
            [*GET, (b"X-Upper", b"1")],
            [*GET, (b"connection", b"close")],
            [*GET, (b"te", b"gzip")],
            [(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")],
            [*GET, (b":foo", b"1")],
            [(b":status", b"200"), *GET],
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test")],
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"")],
            [*GET, (b":method", b"POST")],
            [*GET, (b"x-a", b" padded")],
            [*GET, (b"x-a", b"a\nb")],
            [*GET, (b"host", b"b.test")],
        ]
        for fields in cases:
            self.setUp()
            self.assertGoaway(self.feed(self.headers(1, fields)), f.PROTOCOL_ERROR)
            self.assertEqual(self.handler.of("headers"), [])

    def test_well_formed_request_passes_as_sent(self) -> None:
        """A request with cookies split in fields, te: trailers, and an empty value reaches the
        handler as decoded."""
        fields = [*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers"), (b"x-e", b"")]
        self.feed(self.headers(1, fields))
        self.assertEqual(self.handler.of("headers"), [("headers", 1, fields, True)])

    def test_request_fields_read_once(self) -> None:
        """What the checks read of a request head is handed on (`request`): content-length,
        :method, :path, :authority, Host, the number of pseudo-header fields, the size, whether
        a Host or Cookie field needs the front's attention."""
        self.feed(self.headers(1, [*POST, (b"content-length", b"3"), (b"x-a", b"1")], ("END_HEADERS",)))
        size = sum(len(n) + len(v) + 4 for n, v in [*POST, (b"content-length", b"3"), (b"x-a", b"1")])
        self.assertEqual(self.codec.request, (3, b"POST", b"/x", b"a.test", None, 4, size, False))
        self.feed(self.headers(3, [*GET, (b"cookie", b"a=1")]))
        self.assertEqual(self.codec.request[4:], (None, 4, 73, True))  # 14 + 15 + 20 + 11 + 13

    def test_checked_fields_remembered_not_trusted_blindly(self) -> None:
        """Fields that passed are remembered (bounded), but the same name with a bad value, on
        any connection, is still malformed."""
        from flexgw.http.h2 import fields

        for i in range(fields._GOOD_FIELDS + 10):
            fields.request_fields([*GET, (b"x-n", b"%d" % i)])
        self.assertLessEqual(len(fields._good_fields), fields._GOOD_FIELDS)
        self.feed(self.headers(1, [*GET, (b"x-a", b"ok")]))
        self.assertIn((b"x-a", b"ok"), fields._good_fields)
        self.setUp()
        self.assertGoaway(self.feed(self.headers(1, [*GET, (b"x-a", b"ok\r")])), f.PROTOCOL_ERROR)

    def test_trailers(self) -> None:
        """Trailers end the stream; without END_STREAM, or with a pseudo-header, they are
        malformed."""
        self.feed(self.headers(1, POST, ("END_HEADERS",)), DataFrame(1, b"ab"), self.headers(1, [(b"x-t", b"1")]))
        self.assertEqual(self.handler.of("trailers"), [("trailers", 1, [(b"x-t", b"1")])])
        self.feed(self.headers(3, POST, ("END_HEADERS",)))
        self.assertReset(self.feed(self.headers(3, [(b"x-t", b"1")], ("END_HEADERS",))), 3, f.PROTOCOL_ERROR)
        self.feed(self.headers(5, POST, ("END_HEADERS",)))
        self.assertGoaway(self.feed(self.headers(5, [(b":path", b"/")])), f.PROTOCOL_ERROR)

    def test_content_length_mismatch(self) -> None:
        """DATA adding up to more, or less, than content-length: RST_STREAM PROTOCOL_ERROR."""
        self.feed(self.headers(1, [*POST, (b"content-length", b"3")], ("END_HEADERS",)))
        self.assertReset(self.feed(DataFrame(1, b"abcd")), 1, f.PROTOCOL_ERROR)
        self.handler.calls.clear()
        self.feed(self.headers(3, [*POST, (b"content-length", b"3")], ("END_HEADERS",)))
        self.assertReset(self.feed(DataFrame(3, b"ab", flags=["END_STREAM"])), 3, f.PROTOCOL_ERROR)
        self.handler.calls.clear()
        self.feed(self.headers(5, [*POST, (b"content-length", b"3")], ("END_HEADERS",)))
        self.feed(DataFrame(5, b"ab"), DataFrame(5, b"c", flags=["END_STREAM"]))
        self.assertEqual([c[2] for c in self.handler.of("data")], [b"ab", b"c"])


class SendingTests(CodecTestCase):
    """What the codec writes: header blocks split to the peer's frame size, HPACK state kept."""

    def test_large_header_block_split(self) -> None:
        """A head over SETTINGS_MAX_FRAME_SIZE goes out as HEADERS + CONTINUATION frames that
        decode to the head."""
        self.feed(self.headers(1))
        head = [*RESPONSE, *[(b"x-h%d" % i, b"%d" % i * 3000) for i in range(8)]]
        self.codec.send_headers(1, head, end_stream=True)
        written = split_frames(self.codec.data_to_send())[0]
        self.assertEqual([type(x) for x in written], [HeadersFrame, ContinuationFrame])
        self.assertEqual(written[0].flags, {"END_STREAM"})
        self.assertEqual(written[1].flags, {"END_HEADERS"})
        block = b"".join(x.data for x in written)
        self.assertEqual(hpack.Decoder().decode(block, raw=True), head)

    def test_send_response_in_one_piece(self) -> None:
        """A whole response (head and a body that fits the windows and one frame) is queued as
        HEADERS + DATA(END_STREAM), or HEADERS(END_STREAM) without a body, and ends the stream;
        a body over the stream's window is refused with nothing queued."""
        self.feed(self.headers(1), self.headers(3))
        self.assertTrue(self.codec.send_response(1, RESPONSE, b"hello"))
        self.assertEqual(len(self.codec.out), 1)
        headers, data = split_frames(self.codec.data_to_send())[0]
        self.assertEqual((type(headers), headers.flags, data.data, data.flags), (HeadersFrame, {"END_HEADERS"}, b"hello", {"END_STREAM"}))
        self.assertNotIn(1, self.codec.streams)
        self.assertEqual(self.codec.send_window, 65535 - 5)
        self.assertTrue(self.codec.send_response(3, RESPONSE, b""))
        [headers] = split_frames(self.codec.data_to_send())[0]
        self.assertEqual(headers.flags, {"END_HEADERS", "END_STREAM"})
        self.assertRaises(StreamClosedError, self.codec.send_response, 3, RESPONSE, b"")
        self.feed(f.settings({s.INITIAL_WINDOW_SIZE: 4}), self.headers(5))
        self.codec.data_to_send()
        self.assertFalse(self.codec.send_response(5, RESPONSE, b"hello"))
        self.assertEqual(self.codec.data_to_send(), b"")
        self.assertEqual(self.codec.streams[5].send_window, 4)

    def test_peer_max_header_list_size(self) -> None:
        """§6.5.2: a header block over the client's SETTINGS_MAX_HEADER_LIST_SIZE (names, values
        and 32 octets per field) is not sent (HeaderListTooLargeError, a StreamClosedError);
        one at the limit is."""
        self.feed(f.settings({s.MAX_HEADER_LIST_SIZE: 100}), self.headers(1), self.headers(3))
        self.codec.data_to_send()
        fits = [(b":status", b"200"), (b"x-a", b"a" * 23)]  # 7 + 3 + 32 + 3 + 23 + 32 = 100
        over = [(b":status", b"200"), (b"x-a", b"a" * 24)]
        for send in (self.codec.send_headers, lambda i, h: self.codec.send_response(i, h, b"ok")):
            with self.assertRaises(HeaderListTooLargeError):
                send(1, over)
            self.assertEqual(self.codec.data_to_send(), b"")
        self.assertIn(1, self.codec.streams)
        self.assertTrue(self.codec.send_response(3, fits, b"ok"))
        self.assertEqual(len(split_frames(self.codec.data_to_send())[0]), 2)

    def test_peer_header_table_size(self) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE reaches the encoder (a size update leads its
        next block)."""
        self.feed(f.settings({s.HEADER_TABLE_SIZE: 0}), self.headers(1))
        self.codec.send_headers(1, RESPONSE, end_stream=True)
        [headers] = split_frames(self.codec.data_to_send())[0]
        self.assertEqual(headers.data[0] & 0xE0, 0x20)

    def test_control_flood_stops_before_answering(self) -> None:
        """A handler closing the connection at its control-frame limit: no more PINGs answered."""
        self.handler.control_limit = 3
        written = self.feed(*[PingFrame(0, opaque_data=b"%08d" % i) for i in range(10)])
        self.assertEqual(len([x for x in written if isinstance(x, PingFrame)]), 3)
        self.assertGoaway(written, f.ENHANCE_YOUR_CALM)


class ClientSideTests(CodecTestCase):
    """The client role: streams we open, responses (informational ones too), push refused."""

    client = True

    def test_request_and_response(self) -> None:
        """A request out; 103, then the response head, DATA and trailers back."""
        stream_id = self.codec.get_next_available_stream_id()
        self.codec.send_headers(stream_id, GET, end_stream=True)
        self.codec.data_to_send()
        self.feed(
            self.headers(stream_id, [(b":status", b"103"), (b"link", b"</a>")], ("END_HEADERS",)),
            self.headers(stream_id, [*RESPONSE, (b"content-length", b"2")], ("END_HEADERS",)),
            DataFrame(stream_id, b"ok"),
            self.headers(stream_id, [(b"x-t", b"1")]),
        )
        kinds = [c[0] for c in self.handler.calls]
        self.assertEqual(kinds, ["headers", "headers", "data", "trailers"])
        self.assertEqual(self.codec.streams, {})
        self.assertEqual(self.codec.get_next_available_stream_id(), 3)

    def test_malformed_response(self) -> None:
        """A response head without :status, or with a request pseudo-header: a stream error
        PROTOCOL_ERROR (§8.1.1), the reason told to the handler; the connection serves on."""
        self.codec.send_headers(1, GET, end_stream=True)
        written = self.feed(self.headers(1, [(b"x-a", b"1")]))
        self.assertReset([x for x in written if isinstance(x, RstStreamFrame)], 1, f.PROTOCOL_ERROR)
        self.assertIn(":status", self.codec.reason)
        self.codec.send_headers(3, GET, end_stream=True)
        written = self.feed(self.headers(3, [(b":path", b"/"), *RESPONSE]))
        self.assertEqual(self.handler.of("reset")[-1], ("reset", 3, f.PROTOCOL_ERROR, False))

    def _responses(self, encoder: hpack.Encoder, head: list, count: int) -> list[int]:
        """`count` requests answered with the same `head` by `encoder`; the :status each time
        the codec told its handler (`status`)."""
        statuses = []
        original = self.handler.h2_headers

        def seen(stream_id: int, headers: list, end_stream: bool) -> None:
            statuses.append((self.codec.status, self.codec.length))
            original(stream_id, headers, end_stream)

        self.handler.h2_headers = seen  # type: ignore[method-assign]
        for _ in range(count):
            stream_id = self.codec.get_next_available_stream_id()
            self.codec.send_headers(stream_id, GET, end_stream=True)
            self.feed(HeadersFrame(stream_id, encoder.encode(head), flags=["END_HEADERS", "END_STREAM"]))
        return statuses

    def _counting_checks(self) -> list[int]:
        checks: list[int] = []
        original = h2fields.response_status

        def counted(headers: list) -> tuple[int, int]:
            checks.append(1)
            return original(headers)

        self.patch(h2fields, "response_status", counted)
        return checks

    def test_repeated_response_head_checked_once(self) -> None:
        """A response head that reads nothing from the HPACK table (flexgw's upstreams keep
        none) is checked once: its repeats give the same :status and content-length."""
        checks = self._counting_checks()
        encoder = hpack.Encoder()
        encoder.header_table_size = 0
        head = [(b":status", b"204"), (b"server", b"nginx"), (b"content-length", b"0")]
        self.assertEqual(self._responses(encoder, head, 3), [(204, 0)] * 3)
        self.assertEqual(len(checks), 2)  # the first block (a table size update) and its repeat
        self.assertEqual(self.handler.of("headers")[-1][2], [tuple(h) for h in head])

    def test_head_reading_the_table_checked_each_time(self) -> None:
        """A head indexing the HPACK table's entries decodes by what the table holds: checked
        every time; a malformed head is never remembered."""
        checks = self._counting_checks()
        head = [(b":status", b"200"), (b"server", b"nginx")]
        self.assertEqual(self._responses(hpack.Encoder(), head, 3), [(200, -1)] * 3)
        self.assertEqual(len(checks), 3)
        encoder = hpack.Encoder()
        encoder.header_table_size = 0
        for stream_id in (7, 9):
            self.codec.send_headers(stream_id, GET, end_stream=True)
            written = self.feed(HeadersFrame(stream_id, encoder.encode([(b"x-a", b"1")]), flags=["END_HEADERS"]))
            self.assertReset([x for x in written if isinstance(x, RstStreamFrame)], stream_id, f.PROTOCOL_ERROR)

    def test_push_promise_refused(self) -> None:
        """PUSH_PROMISE (push disabled): PROTOCOL_ERROR."""
        self.codec.send_headers(1, GET, end_stream=True)
        frame = PushPromiseFrame(1, promised_stream_id=2, data=self.encoder.encode(GET), flags=["END_HEADERS"])
        self.assertGoaway(self.feed(frame), f.PROTOCOL_ERROR)

    def test_frames_after_goaway_still_read(self) -> None:
        """After the server's GOAWAY the streams at or below its last id still get their DATA."""
        self.codec.send_headers(1, GET, end_stream=True)
        self.feed(
            GoAwayFrame(0, last_stream_id=1, error_code=0),
            self.headers(1, RESPONSE, ("END_HEADERS",)),
            DataFrame(1, b"ok", flags=["END_STREAM"]),
        )
        self.assertEqual([c[0] for c in self.handler.calls], ["goaway", "headers", "data"])


class SplitTests(SynchronousTestCase):
    """Any split of the bytes gives the same handler calls."""

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=400), max_size=12))
    def test_any_split(self, cuts: list[int]) -> None:
        """A preface, SETTINGS, two requests with bodies and trailers, cut anywhere."""
        encoder = hpack.Encoder()
        data = (
            f.PREFACE
            + SettingsFrame(0).serialize()
            + HeadersFrame(1, encoder.encode(POST), flags=["END_HEADERS"]).serialize()
            + DataFrame(1, b"x" * 300).serialize()
            + HeadersFrame(3, encoder.encode(GET), flags=["END_HEADERS", "END_STREAM"]).serialize()
            + HeadersFrame(1, encoder.encode([(b"x-t", b"1")]), flags=["END_HEADERS", "END_STREAM"]).serialize()
        )

        def run(pieces: list[bytes]) -> list:
            handler = Recorder()
            codec = H2Codec(handler, client=False, local_settings={}, max_header_list=4096, header_block_limit=2048)
            for piece in pieces:
                codec.receive(piece)
            return handler.calls

        whole = run([data])
        positions = sorted({min(c, len(data)) for c in cuts})
        pieces, last = [], 0
        for position in positions:
            pieces.append(data[last:position])
            last = position
        pieces.append(data[last:])
        self.assertEqual(run(pieces), whole)
        self.assertEqual([c[0] for c in whole], ["settings", "headers", "data", "headers", "trailers"])


class CountingTransport(StringTransport):
    """A StringTransport counting its writes."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class BatchedWriteTests(SynchronousTestCase):
    """flexgw.http.h2.batch through a gateway in memory: ten requests in one client read go to
    an h2c upstream in one write, and ten answers in one upstream read reach the client in one
    write."""

    def test_one_write_per_read_each_way(self) -> None:
        """Ten streams each way, one write each way (besides the answers to SETTINGS)."""
        factory = memory_factory(one_api_listener(scheme="h2c"))
        down = CountingTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        front, _ = connect_client(factory, down)
        encoder = hpack.Encoder()
        front.dataReceived(f.PREFACE + SettingsFrame(0).serialize())
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.test"), (b":path", b"/items")]
        front.dataReceived(HeadersFrame(1, encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize())
        up_conn, up = connect_upstream(factory.reactor, CountingTransport())
        up_conn.dataReceived(SettingsFrame(0, settings={3: 100}).serialize())
        answers = hpack.Encoder()

        def answer(stream_ids: list[int]) -> bytes:
            return b"".join(
                HeadersFrame(i, answers.encode(RESPONSE), flags=["END_HEADERS"]).serialize()
                + DataFrame(i, b"ok", flags=["END_STREAM"]).serialize()
                for i in stream_ids
            )

        up_conn.dataReceived(answer([1]))
        down.writes = up.writes = 0
        requests = b"".join(
            HeadersFrame(3 + 2 * i, encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize()
            for i in range(10)
        )
        up.clear()
        front.dataReceived(requests)
        self.assertEqual(up.writes, 1)
        self.assertEqual(len([x for x in split_frames(up.value())[0] if isinstance(x, HeadersFrame)]), 10)
        down.clear()
        up_conn.dataReceived(answer([3 + 2 * i for i in range(10)]))
        self.assertEqual(down.writes, 1)
        frames = split_frames(down.value())[0]
        self.assertEqual(len([x for x in frames if isinstance(x, DataFrame) and x.data == b"ok"]), 10)


class NoCycleTests(SynchronousTestCase):
    """A finished HTTP/2 stream, its exchange and request head are freed by reference counting:
    nothing of them waits for the cycle collector (which ran every ~80 requests for ~8 objects
    of garbage per request when the stream and its exchange referred to each other)."""

    def test_finished_streams_leave_no_cyclic_garbage(self) -> None:
        """200 h2c->HTTP/1.1 requests through a gateway in memory: no cyclic garbage."""
        factory = memory_factory(one_api_listener(scheme="http"))
        front, _ = connect_client(factory)
        encoder = hpack.Encoder()
        front.dataReceived(f.PREFACE + SettingsFrame(0).serialize())
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example.test"), (b":path", b"/items")]
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        def request(stream_id: int) -> None:
            front.dataReceived(HeadersFrame(stream_id, encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize())

        request(1)
        up_conn, _ = connect_upstream(factory.reactor)
        up_conn.dataReceived(answer)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for i in range(200):
            request(3 + 2 * i)
            up_conn.dataReceived(answer)
        self.assertEqual(len(front.chosen.streams), 0)
        self.assertLess(gc.collect(), 20)
