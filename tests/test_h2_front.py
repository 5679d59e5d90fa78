"""The downstream HTTP/2 front in memory: protocol selection, flood guards, limits, flow control,
keep-alive, drain (an h2 client connection drives it over StringTransport)."""

from __future__ import annotations

import hpack
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.ingress.front import IngressFactory, IngressProtocol
from flexgw.ingress.h2front import H2Limits, H2Protocol
from flexgw.plan import HttpSettings, Timeouts
from flexgw.testing.h2 import GoAwayFilter, made_you_reset, split_frames
from flexgw.upstream.manager import PoolManager
from tests.conftools import write_conf
from tests.harness import simple_api

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/x")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"/x")]


class FrontTestCase(TestCase):
    """One downstream connection on a memory reactor, driven by an h2 client connection."""

    limits = H2Limits()
    http = HttpSettings(keepalive_timeout=30.0)

    def setUp(self) -> None:
        """Compile a one-API plan (upstream 127.0.0.1:9000, never connected unless asked)."""
        root = write_conf(self, {"api.yaml": simple_api(8000, 9000)})
        plan = load_config([root], {}).plan
        self.reactor = MemoryReactorClock()
        self.pools = PoolManager(self.reactor, self.reactor)
        self.factory = IngressFactory(
            self.reactor, self.reactor, plan.listeners[0], self.http, Timeouts(), self.pools, None
        )
        self.factory.h2_limits = self.limits
        self.selector = self.factory.buildProtocol(None)
        self.down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        self.selector.makeConnection(self.down)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.events: list = []
        self.goaways = GoAwayFilter()

    def start_h2(self) -> H2Protocol:
        """Send the client preface; the selector hands the connection to an H2Protocol."""
        self.client.initiate_connection()
        self.send()
        protocol = self.selector.chosen
        self.assertIsInstance(protocol, H2Protocol)
        return protocol

    def send(self) -> None:
        """Client bytes to the gateway, then the gateway's answer back to the client."""
        data = self.client.data_to_send()
        if data:
            self.selector.dataReceived(data)
        self.receive()

    def receive(self) -> None:
        """Feed what the gateway wrote to the client (GOAWAY frames recorded aside)."""
        out = self.down.value()
        self.down.clear()
        out, goaways = self.goaways.feed(out)
        for last, code in goaways:
            self.events.append(("goaway", last, code))
        if out:
            self.events.extend(self.client.receive_data(out))
        data = self.client.data_to_send()
        if data and not self.down.disconnecting:
            self.selector.dataReceived(data)
            self.receive()

    def of(self, kind: type) -> list:
        """Events of one type received by the client."""
        return [e for e in self.events if isinstance(e, kind)]

    def goaway_codes(self) -> list[int]:
        """Error codes of the GOAWAY frames received."""
        return [e[2] for e in self.events if isinstance(e, tuple)]


class SelectionTests(FrontTestCase):
    """The first bytes choose the protocol."""

    def test_preface_starts_h2(self) -> None:
        """The connection preface (even split in pieces) starts HTTP/2; the HTTP/1.1 protocol
        leaves the connection set; SETTINGS advertise the limits."""
        self.client.initiate_connection()
        data = self.client.data_to_send()
        for i in range(0, 30, 5):
            self.selector.dataReceived(data[i : i + 5])
        self.selector.dataReceived(data[30:])
        protocol = self.selector.chosen
        self.assertIsInstance(protocol, H2Protocol)
        self.assertEqual(self.factory.connections, {protocol})
        self.receive()
        settings = self.client.remote_settings
        self.assertEqual(settings.max_concurrent_streams, 100)
        self.assertEqual(settings.max_header_list_size, self.http.max_header_bytes)
        self.assertEqual(settings.enable_push, 0)

    def test_http1_goes_to_ingress_protocol(self) -> None:
        """An HTTP/1.1 request ("P" first, like the preface) is served by IngressProtocol, which
        the selector then calls directly."""
        self.selector.dataReceived(b"P")
        self.assertIsNone(self.selector.chosen)
        self.selector.dataReceived(b"UT /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
        self.assertIsInstance(self.selector.chosen, IngressProtocol)
        self.assertEqual(self.selector.dataReceived.__self__, self.selector.chosen)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # proxied: an upstream connect began

    def test_alpn_h2(self) -> None:
        """On a TLS transport whose ALPN chose h2, the first bytes start HTTP/2."""
        self.down.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.client.initiate_connection()
        self.send()
        self.assertIsInstance(self.selector.chosen, H2Protocol)


class RequestTests(FrontTestCase):
    """Streams become exchanges; request heads are checked."""

    def test_connect_refused(self) -> None:
        """CONNECT gets 405 on its stream (ingress has no tunnels)."""
        self.start_h2()
        self.client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"x.test:443")])
        self.send()
        [response] = self.of(ResponseReceived)
        self.assertEqual(dict(response.headers)[b":status"], b"405")
        self.assertEqual(dict(response.headers)[b"x-flexgw-error"], b"method_not_allowed")
        # The client had not ended its request: the stream is reset with NO_ERROR after it.
        [reset] = self.of(StreamReset)
        self.assertEqual(reset.error_code, ErrorCodes.NO_ERROR)

    def test_header_list_too_large_431(self) -> None:
        """Headers over max_header_bytes get 431 on the stream; the connection serves on."""
        self.start_h2()
        big = b"v" * (self.http.max_header_bytes + 10)
        self.client.send_headers(1, [*GET, (b"x-big", big)], end_stream=True)
        self.send()
        [response] = self.of(ResponseReceived)
        self.assertEqual(dict(response.headers)[b":status"], b"431")
        self.assertEqual(self.goaway_codes(), [])

    def test_host_authority_disagree(self) -> None:
        """A Host header naming another authority than :authority is malformed: the stream is
        reset and nothing is proxied."""
        self.client = H2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        )
        self.start_h2()
        self.client.send_headers(1, [*GET, (b"host", b"b.test")], end_stream=True)
        self.send()
        self.assertEqual(self.of(ResponseReceived), [], self.events)
        self.assertEqual(self.goaway_codes(), [ErrorCodes.PROTOCOL_ERROR])
        self.assertEqual(self.reactor.tcpClients, [])


class FloodTests(FrontTestCase):
    """Rapid reset, control-frame floods, CONTINUATION floods, stream limits."""

    limits = H2Limits(max_resets=10, max_control_frames=20, max_concurrent_streams=5)

    def test_rapid_reset(self) -> None:
        """More than max_resets client resets in the window: GOAWAY ENHANCE_YOUR_CALM, closed,
        and the streams' exchanges abandoned (no upstream connect left pending for them)."""
        self.start_h2()
        for i in range(11):
            stream_id = 1 + 2 * i
            self.client.send_headers(stream_id, GET, end_stream=True)
            self.client.reset_stream(stream_id)
        self.send()
        self.assertEqual(self.goaway_codes(), [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(self.down.disconnecting)

    def test_resets_spread_over_time_are_fine(self) -> None:
        """The same number of resets spread over more than the window is not a flood."""
        self.start_h2()
        for i in range(11):
            stream_id = 1 + 2 * i
            self.client.send_headers(stream_id, GET, end_stream=True)
            self.client.reset_stream(stream_id)
            self.send()
            self.reactor.advance(self.limits.window_seconds / 5)
        self.assertEqual(self.goaway_codes(), [])
        self.assertFalse(self.down.disconnecting)

    def test_ping_flood(self) -> None:
        """More than max_control_frames PINGs in the window: GOAWAY ENHANCE_YOUR_CALM."""
        self.start_h2()
        for i in range(25):
            self.client.ping(b"%08d" % i)
        self.send()
        self.assertEqual(self.goaway_codes(), [ErrorCodes.ENHANCE_YOUR_CALM])
        self.assertTrue(self.down.disconnecting)

    def test_continuation_flood(self) -> None:
        """A header block kept open with CONTINUATION frames past max_header_bytes is cut off
        with GOAWAY before it completes."""
        self.start_h2()
        encoder = hpack.Encoder()
        block = encoder.encode([*GET, *[(b"x-h%d" % i, b"v" * 1000) for i in range(100)]])
        frames = [HeadersFrame(1, block[:1000], flags=["END_STREAM"])]
        for offset in range(1000, len(block), 1000):
            frames.append(ContinuationFrame(1, block[offset : offset + 1000]))  # no END_HEADERS
        self.selector.dataReceived(self.client.data_to_send())
        sent = 0
        for frame in frames:
            if self.down.disconnecting:
                break
            self.selector.dataReceived(frame.serialize())
            sent += 1
        self.receive()
        self.assertTrue(self.down.disconnecting)
        self.assertEqual(self.goaway_codes()[-1], ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLess(sent, len(frames))

    def test_concurrent_streams_limit(self) -> None:
        """Streams beyond SETTINGS_MAX_CONCURRENT_STREAMS from a client that has not
        acknowledged our SETTINGS yet (RFC 9113 §6.5.3: it may not know the limit) are refused
        with REFUSED_STREAM, safe to retry; the connection and the streams within the limit go
        on. (Once acknowledged, over the limit is a connection error: tests/test_h2_codec.py,
        tests/test_h2_conformance_server.py.)"""
        self.client.initiate_connection()
        self.selector.dataReceived(self.client.data_to_send())
        # The client has not seen our SETTINGS yet, so it opens more streams than allowed.
        for i in range(6):
            self.client.send_headers(1 + 2 * i, GET, end_stream=True)
        self.selector.dataReceived(self.client.data_to_send())
        self.receive()
        self.assertEqual(self.goaway_codes(), [])
        self.assertFalse(self.down.disconnecting)
        [refused] = self.of(StreamReset)
        self.assertEqual((refused.stream_id, refused.error_code), (11, ErrorCodes.REFUSED_STREAM))
        self.assertEqual(len(self.reactor.tcpClients), 5)


class ServerResetTests(FrontTestCase):
    """Streams the gateway resets for the client's protocol errors ("MadeYouReset", 2025) count
    like client resets, and never open or keep an upstream connection; PING and SETTINGS floods
    get at most the limit of answers. The client's bytes are raw frames; the gateway's are parsed
    as frames (an h2 client would refuse them, or refuse to send the attack)."""

    limits = H2Limits(max_resets=10, max_control_frames=20, max_concurrent_streams=5)

    def start_raw(self) -> None:
        """Connection preface and SETTINGS; the gateway's first answer is dropped."""
        self.client.initiate_connection()
        self.selector.dataReceived(self.client.data_to_send())
        self.down.clear()

    def written(self) -> list:
        """The frames the gateway wrote since the last call."""
        out = self.down.value()
        self.down.clear()
        return split_frames(out)[0]

    def upstream_pool(self):
        """The pool of the API's upstream (created by the first exchange that connected)."""
        [pool] = self.pools.pools.values()
        return pool

    def test_data_on_half_closed_streams_in_one_read(self) -> None:
        """HEADERS(END_STREAM) then DATA per stream, all in one read: the gateway's resets count
        against the budget; GOAWAY ENHANCE_YOUR_CALM once over it, and no exchange of the read
        ever asked for an upstream connection."""
        self.start_raw()
        self.selector.dataReceived(made_you_reset(50, path=b"/x", authority=b"a.test"))
        frames = self.written()
        resets = [f for f in frames if isinstance(f, RstStreamFrame)]
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.down.disconnecting)
        self.assertLessEqual(len(resets), self.limits.max_resets + 1)
        self.assertEqual(self.reactor.tcpClients, [])
        # The read was cut at the budget: the 11th reset (stream 21) was the last frame read.
        self.assertEqual(goaway.last_stream_id, 21)

    def test_data_on_half_closed_streams_across_reads(self) -> None:
        """The same pattern with each DATA in the read after its HEADERS: each exchange started,
        and its reset gives its upstream connect up (the pool keeps nothing: no pending attempt,
        a connection that completes anyway is closed without a request); GOAWAY within the
        budget."""
        self.start_raw()
        attack, _ = split_frames(made_you_reset(12, path=b"/x", authority=b"a.test"))
        for frame in attack:
            if self.down.disconnecting:
                break
            self.selector.dataReceived(frame.serialize())
        frames = self.written()
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        # The 11th reset is over the budget: the 12th stream never opened.
        self.assertEqual(len(self.reactor.tcpClients), 11)
        self.assertTrue(all(c._disconnected for c in self.reactor.connectors))
        pool = self.upstream_pool()
        self.assertEqual((pool.connecting, pool.active, pool.idle), (0, 0, []))
        # An attempt the reactor completes all the same: closed, nothing sent, nothing kept.
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        up = StringTransport()
        upstream.makeConnection(up)
        self.assertEqual(up.value(), b"")
        self.assertTrue(up.disconnecting)
        self.assertEqual((pool.connecting, pool.active, pool.idle), (0, 0, []))

    def test_window_overflow_counts_as_reset(self) -> None:
        """A WINDOW_UPDATE overflowing a stream's window (h2 resets the stream with
        FLOW_CONTROL_ERROR) counts against the reset budget too."""
        self.start_raw()
        encoder = hpack.Encoder()
        attack = []
        for i in range(11):
            stream_id = 1 + 2 * i
            attack.append(HeadersFrame(stream_id, encoder.encode(POST), flags=["END_HEADERS"]))
            attack.append(WindowUpdateFrame(stream_id, window_increment=2**31 - 1))
        self.selector.dataReceived(b"".join(f.serialize() for f in attack))
        frames = self.written()
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_malformed_requests_count_as_resets(self) -> None:
        """Requests refused for a malformed head (here a :path not starting with "/", which h2
        lets through) are stream errors: past the budget, GOAWAY ENHANCE_YOUR_CALM."""
        self.start_raw()
        encoder = hpack.Encoder()
        bad = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"), (b":path", b"x")]
        for i in range(11):  # one read each: 11 streams at once are over the concurrency limit
            frame = HeadersFrame(1 + 2 * i, encoder.encode(bad), flags=["END_STREAM", "END_HEADERS"])
            self.selector.dataReceived(frame.serialize())
        [goaway] = [f for f in self.written() if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_ping_flood_answered_at_most_limit(self) -> None:
        """25 PINGs in one read, limit 20: no more answers than the limit, then GOAWAY
        ENHANCE_YOUR_CALM (h2 answers each PING as it reads it: the count comes first)."""
        self.start_raw()
        self.selector.dataReceived(
            b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(25))
        )
        frames = self.written()
        acks = [f for f in frames if isinstance(f, PingFrame) and "ACK" in f.flags]
        # The limit counts the client's first SETTINGS (start_raw) too.
        self.assertEqual(len(acks), self.limits.max_control_frames - 1)
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.down.disconnecting)

    def test_settings_flood_answered_at_most_limit(self) -> None:
        """25 SETTINGS in one read, limit 20: no more acknowledgements than the limit, then
        GOAWAY."""
        self.start_raw()
        self.selector.dataReceived(
            b"".join(
                SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096}).serialize()
                for _ in range(25)
            )
        )
        frames = self.written()
        acks = [f for f in frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
        # The limit counts the client's first SETTINGS (start_raw) too.
        self.assertEqual(len(acks), self.limits.max_control_frames - 1)
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_lingering_exchanges_count_against_concurrency(self) -> None:
        """Streams h2 considers closed whose exchanges still run (reset by the gateway, as
        H2Stream.flush does when h2 refuses a response) keep their places: past
        SETTINGS_MAX_CONCURRENT_STREAMS, a new stream is refused."""
        protocol = self.start_h2()
        for i in range(5):
            self.client.send_headers(1 + 2 * i, GET, end_stream=True)
        self.send()
        self.assertEqual(len(protocol.streams), 5)
        for stream in protocol.streams.values():
            stream.closed = True
            protocol.conn.reset_stream(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        protocol.flush()
        self.receive()
        self.client.send_headers(11, GET, end_stream=True)
        self.send()
        [refused] = [e for e in self.of(StreamReset) if e.stream_id == 11]
        self.assertEqual(refused.error_code, ErrorCodes.REFUSED_STREAM)
        self.assertEqual(len(protocol.streams), 5)
        self.assertEqual(len(self.reactor.tcpClients), 5)


class LifecycleTests(FrontTestCase):
    """Keep-alive, drain, request body flow control."""

    def test_idle_connection_closed(self) -> None:
        """No stream for the keep-alive timeout: GOAWAY NO_ERROR and close."""
        self.start_h2()
        self.reactor.advance(self.http.keepalive_timeout - 1)
        self.assertFalse(self.down.disconnecting)
        self.reactor.advance(1)
        self.receive()
        self.assertEqual(self.goaway_codes(), [ErrorCodes.NO_ERROR])
        self.assertTrue(self.down.disconnecting)

    def test_drain_idle_connection(self) -> None:
        """Draining an h2 connection with no stream: GOAWAY, then close."""
        protocol = self.start_h2()
        protocol.drain()
        self.receive()
        self.assertEqual(self.goaway_codes(), [0])
        self.assertTrue(self.down.disconnecting)

    def test_request_body_acknowledged_only_when_forwarded(self) -> None:
        """While the exchange waits for its upstream connection, request DATA is not
        acknowledged (the client is held to one window); once connected and forwarded, the
        window is given back."""
        protocol = self.start_h2()
        self.client.send_headers(1, POST)
        for _ in range(4):
            self.client.send_data(1, b"a" * 15000)
        self.send()
        [stream] = protocol.streams.values()
        self.assertEqual(stream.unacked, 60000)
        self.assertEqual(self.client.local_flow_control_window(1), 65535 - 60000)
        # Complete the upstream connection: the pending body goes out, the window comes back.
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        up = StringTransport()
        upstream.makeConnection(up)
        self.receive()
        self.assertEqual(stream.unacked, 0)
        self.assertTrue(up.value().startswith(b"POST /x HTTP/1.1\r\n"))
        self.assertIn(b"Transfer-Encoding: chunked\r\n", up.value())
        self.assertTrue(up.value().endswith(b"3a98\r\n" + b"a" * 15000 + b"\r\n"))
        self.assertEqual(up.value().count(b"a" * 15000), 4)
        self.assertEqual(self.client.local_flow_control_window(1), 65535)
        # The upstream answers; the client gets the response on its stream.
        self.client.end_stream(1)
        self.send()
        self.assertTrue(up.value().endswith(b"0\r\n\r\n"))
        upstream.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Up: 1\r\n\r\nok")
        self.receive()
        [response] = self.of(ResponseReceived)
        self.assertEqual(response.headers, [(b":status", b"201"), (b"x-up", b"1"), (b"content-length", b"2")])
        self.assertEqual(b"".join(e.data for e in self.of(DataReceived)), b"ok")
        self.assertEqual(len(self.of(StreamEnded)), 1)
        self.assertEqual(protocol.streams, {})


class ConfiguredLimitsTests(TestCase):
    """`Configuration.spec.http.http2` sets the limits the front advertises and enforces."""

    def test_configured_limits(self) -> None:
        """maxConcurrentStreams is advertised in SETTINGS; the reset and control-frame limits
        reach the connection; an out-of-range value is a located config error."""
        config = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
            "metadata: {name: c}\nspec:\n  http:\n    http2:\n"
            "      maxConcurrentStreams: 7\n      maxStreamResetsPer10Seconds: 3\n"
            "      maxControlFramesPer10Seconds: 9\n"
        )
        root = write_conf(self, {"api.yaml": simple_api(8000, 9000) + config})
        state = load_config([root], {})
        http = state.plan.http
        self.assertEqual(
            (http.h2_max_concurrent_streams, http.h2_max_resets, http.h2_max_control_frames),
            (7, 3, 9),
        )
        reactor = MemoryReactorClock()
        factory = IngressFactory(
            reactor, reactor, state.plan.listeners[0], http, Timeouts(),
            PoolManager(reactor, reactor), None,
        )
        selector = factory.buildProtocol(None)
        down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
        selector.makeConnection(down)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        selector.dataReceived(client.data_to_send())
        client.receive_data(down.value())
        self.assertEqual(client.remote_settings.max_concurrent_streams, 7)
        self.assertEqual(
            (selector.chosen.limits.max_resets, selector.chosen.limits.max_control_frames), (3, 9)
        )
        bad = config.replace("maxConcurrentStreams: 7", "maxConcurrentStreams: 0")
        root = write_conf(self, {"api.yaml": simple_api(8000, 9000) + bad})
        problems = [str(p) for p in load_config([root], {}).errors]
        self.assertTrue(any("maxConcurrentStreams" in p and "api.yaml" in p for p in problems), problems)


class GoAwayFilterTests(TestCase):
    """GOAWAY frames are split out of any byte stream, whatever the read boundaries."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=20))
    def test_any_split(self, cuts: list[int]) -> None:
        """Frames pass through unchanged in order and GOAWAYs are reported, for any split."""
        from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame

        frames = [
            DataFrame(1, b"x" * 40).serialize(),
            GoAwayFrame(0, last_stream_id=1, error_code=0).serialize(),
            PingFrame(0, b"12345678").serialize(),
            GoAwayFrame(0, last_stream_id=0, error_code=11, additional_data=b"calm").serialize(),
            DataFrame(3, b"y" * 5).serialize(),
        ]
        stream = b"".join(frames)
        filt = GoAwayFilter()
        passed = []
        found = []
        pos = 0
        for cut in cuts * 10:
            if pos >= len(stream):
                break
            data, goaways = filt.feed(stream[pos : pos + cut])
            passed.append(data)
            found.extend(goaways)
            pos += cut
        if pos < len(stream):
            data, goaways = filt.feed(stream[pos:])
            passed.append(data)
            found.extend(goaways)
        self.assertEqual(b"".join(passed), frames[0] + frames[2] + frames[4])
        self.assertEqual(found, [(1, 0), (0, 11)])
