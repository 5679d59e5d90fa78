"""The Twisted and h2 private APIs flexgw.compat adapts are still there; each failure names the
attribute, the library version and the adapter module to mend."""

from __future__ import annotations

import inspect
from typing import Any

import h2
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError
from h2.frame_buffer import FrameBuffer
from hpack import Encoder
from hyperframe.frame import HeadersFrame
from twisted.copyright import version as twisted_version
from twisted.internet import abstract, tcp
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.systemd import ListenFDs
from twisted.trial import unittest

from flexgw.compat.h2buffer import header_backlog
from flexgw.compat.h2frames import FrameHookConnection
from flexgw.compat.logobservers import observers
from flexgw.compat.systemd import twisted_listen_fds


def gone(what: str, module: str, library: str = "Twisted") -> str:
    """The failure message: which private name, in which library version, which adapter."""
    version = twisted_version if library == "Twisted" else h2.__version__
    return f"{what} is gone or changed in {library} {version}: mend flexgw/compat/{module}.py"


class TCPWriteQueueTests(unittest.TestCase):
    """compat.tcpwrite: send_now reads a TCP transport's write queue."""

    def test_write_queues_where_send_now_looks(self) -> None:
        """tcp.Server and tcp.Client queue a write in `dataBuffer` or `_tempDataBuffer`."""
        for cls in (tcp.Server, tcp.Client):
            self.assertTrue(
                issubclass(cls, abstract.FileDescriptor), gone(f"{cls.__name__}'s base", "tcpwrite")
            )
        transport = abstract.FileDescriptor(reactor=MemoryReactor())
        transport.connected = True
        self.assertFalse(
            transport.dataBuffer or transport._tempDataBuffer, gone("dataBuffer", "tcpwrite")
        )
        transport.write(b"queued")
        queued = getattr(transport, "_tempDataBuffer", None)
        self.assertEqual(
            [bytes(transport.dataBuffer), queued],
            [b"", [b"queued"]],
            gone("FileDescriptor._tempDataBuffer", "tcpwrite"),
        )


class TLSFlushTests(unittest.TestCase):
    """compat.tlswrite: SendNowTLSProtocol overrides TLSMemoryBIOProtocol._flushSendBIO."""

    def test_flush_send_bio_is_called(self) -> None:
        """Twisted's TLS protocol still sends its encrypted bytes through `_flushSendBIO`."""
        self.assertIn(
            "_flushSendBIO", vars(TLSMemoryBIOProtocol), gone("_flushSendBIO", "tlswrite")
        )
        source = inspect.getsource(TLSMemoryBIOProtocol)
        self.assertGreaterEqual(
            source.count("self._flushSendBIO()"), 2, gone("calls of _flushSendBIO", "tlswrite")
        )
        self.assertTrue(callable(TLSMemoryBIOProtocol.getHandle), gone("getHandle", "tlswrite"))


class SystemdTests(unittest.TestCase):
    """compat.systemd: the descriptors Twisted's systemd: endpoint parser found."""

    def test_sddaemon(self) -> None:
        """`_SystemdParser._sddaemon` is a ListenFDs whose descriptors and names come back."""
        try:
            from twisted.internet.endpoints import _SystemdParser

            found = _SystemdParser._sddaemon
        except (ImportError, AttributeError):
            self.fail(gone("twisted.internet.endpoints._SystemdParser._sddaemon", "systemd"))
        self.assertIsInstance(found, ListenFDs, gone("_SystemdParser._sddaemon", "systemd"))
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ("web", "admin")))
        self.assertEqual(twisted_listen_fds(), ([3, 4], ["web", "admin"]))
        self.patch(_SystemdParser, "_sddaemon", ListenFDs([3, 4], ()))
        self.assertEqual(twisted_listen_fds(), ([3, 4], []))


class EPollReactorTests(unittest.TestCase):
    """compat.epollreactor: FlexReactor copies EPollReactor.doPoll and _doReadOrWrite's checks."""

    def test_private_attributes(self) -> None:
        """The attributes FlexReactor.doPoll reads are still there, with the same meaning."""
        from twisted.internet import epollreactor, posixbase

        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        for name in ("_poller", "_selectables", "_reads", "_writes"):
            self.assertTrue(hasattr(reactor, name), gone(f"EPollReactor.{name}", "epollreactor"))
        self.assertEqual(
            (reactor._POLL_IN, reactor._POLL_OUT, reactor._POLL_DISCONNECTED),
            (epollreactor.EPOLLIN, epollreactor.EPOLLOUT, epollreactor.EPOLLHUP | epollreactor.EPOLLERR),
            gone("EPollReactor._POLL_*", "epollreactor"),
        )
        self.assertTrue(
            callable(getattr(posixbase.PosixReactorBase, "_disconnectSelectable", None)),
            gone("PosixReactorBase._disconnectSelectable", "epollreactor"),
        )

    def test_dispatch_unchanged(self) -> None:
        """Twisted's doPoll still dispatches each event through callWithLogger to
        _doReadOrWrite, whose checks FlexReactor.doPoll repeats inline; a change there (a new
        check, another order) must be looked at before FlexReactor is trusted again."""
        from twisted.internet import epollreactor, posixbase

        poll = inspect.getsource(epollreactor.EPollReactor.doPoll)
        self.assertIn(
            "log.callWithLogger(selectable, _drdw, selectable, fd, event)",
            poll,
            gone("EPollReactor.doPoll's dispatch", "epollreactor"),
        )
        self.assertIn("doIteration = doPoll", inspect.getsource(epollreactor.EPollReactor))
        dispatch = inspect.getsource(posixbase._PollLikeMixin._doReadOrWrite)
        lines = [line.strip() for line in dispatch.splitlines()]
        code = [line for line in lines if line and not line.startswith(("#", '"""'))]
        expected = [
            "if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):",
            "if fd in self._reads:",
            "why = CONNECTION_DONE",
            "why = CONNECTION_LOST",
            "if selectable.fileno() == -1:",
            "why = _NO_FILEDESC",
            "if event & self._POLL_IN:",
            "why = selectable.doRead()",
            "if not why and event & self._POLL_OUT:",
            "why = selectable.doWrite()",
            "log.err()",
            "self._disconnectSelectable(selectable, why, inRead)",
        ]
        found = [line for line in code if line in expected]
        self.assertEqual(found, expected, gone("_PollLikeMixin._doReadOrWrite", "epollreactor"))
        self.assertEqual(
            len([line for line in code if line.startswith(("if ", "else", "why =", "try", "except"))]),
            18,  # (Twisted 26.10's count: a new branch means a new check to copy)
            gone("_PollLikeMixin._doReadOrWrite's branches", "epollreactor"),
        )


class LogObserversTests(unittest.TestCase):
    """compat.logobservers: a LogPublisher's observers."""

    def test_observers(self) -> None:
        """The observers a publisher was given, in order."""
        first: list[Any] = []
        second: list[Any] = []
        publisher = LogPublisher(first.append, second.append)
        self.assertTrue(
            hasattr(publisher, "_observers"), gone("LogPublisher._observers", "logobservers")
        )
        self.assertEqual(observers(publisher), [first.append, second.append])


class HAProxyTests(unittest.TestCase):
    """compat.haproxy: Twisted's PROXY protocol parsers and wrapper."""

    def test_private_modules(self) -> None:
        """The parsers, the wrapper and ProxyInfo import, and a v1 header parses."""
        try:
            from flexgw.compat import haproxy
        except ImportError as exc:
            self.fail(gone(f"twisted.protocols.haproxy private modules ({exc})", "haproxy"))
        info, rest = haproxy.V1Parser().feed(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 443\r\nGET")
        self.assertIsInstance(info, haproxy.ProxyInfo, gone("V1Parser.feed", "haproxy"))
        self.assertEqual((info.source.host, info.source.port, rest), ("10.1.2.3", 5555, b"GET"))
        self.assertEqual(len(haproxy.V2Parser.PREFIX), 12, gone("V2Parser.PREFIX", "haproxy"))


class H2HeaderBufferTests(unittest.TestCase):
    """compat.h2buffer: h2's buffered HEADERS/CONTINUATION frames."""

    def test_headers_buffer(self) -> None:
        """A HEADERS frame without END_HEADERS waits in `FrameBuffer._headers_buffer`."""
        self.assertIn(
            "_headers_buffer",
            vars(FrameBuffer()),
            gone("h2.frame_buffer.FrameBuffer._headers_buffer", "h2buffer", "h2"),
        )
        conn = H2Connection(H2Configuration(client_side=False))
        conn.initiate_connection()
        block = Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http")])
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        conn.receive_data(preface + HeadersFrame(1, block).serialize())
        self.assertEqual(
            header_backlog(conn), len(block), gone("FrameBuffer._headers_buffer", "h2buffer", "h2")
        )


class H2FrameHookTests(unittest.TestCase):
    """compat.h2frames: h2 hands every received frame to `_receive_frame`."""

    def test_every_frame_reaches_the_hook_before_h2_answers(self) -> None:
        """SETTINGS and two PINGs: the hook sees each, and stopping at the second PING leaves
        it unanswered (the hook runs before h2 acts, not after the read)."""
        self.assertTrue(
            callable(getattr(H2Connection, "_receive_frame", None)),
            gone("h2.connection.H2Connection._receive_frame", "h2frames", "h2"),
        )
        seen: list[str] = []

        class Stopping(FrameHookConnection):
            def frame_hook(self, frame: Any) -> Any:
                seen.append(frame.__class__.__name__)
                if seen.count("PingFrame") == 2:
                    raise ProtocolError("stop before the second PING is answered")
                return self.receive_one_frame(frame)

        conn = Stopping(H2Configuration(client_side=False))
        conn.initiate_connection()
        conn.clear_outbound_data_buffer()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
        with self.assertRaises(ProtocolError):
            conn.receive_data(preface + ping + ping)
        hook_gone = gone("H2Connection.receive_data calling _receive_frame", "h2frames", "h2")
        self.assertEqual(seen, ["SettingsFrame", "PingFrame", "PingFrame"], hook_gone)
        ping_acks = conn.data_to_send().count(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00")
        self.assertEqual(ping_acks, 1, hook_gone)


class H2TerminateTests(unittest.TestCase):
    """compat.h2frames: the GOAWAY code of a refused SETTINGS ACK with a payload."""

    def test_settings_ack_with_payload_is_frame_size_error(self) -> None:
        """h2 queues its GOAWAY in `_terminate_connection`, with the refused frame still at the
        start of `FrameBuffer._data`: the code becomes FRAME_SIZE_ERROR (RFC 9113 §6.5)."""
        self.assertTrue(
            callable(getattr(H2Connection, "_terminate_connection", None)),
            gone("h2.connection.H2Connection._terminate_connection", "h2frames", "h2"),
        )
        self.assertIn("_data", vars(FrameBuffer()), gone("h2.frame_buffer.FrameBuffer._data", "h2frames", "h2"))

        class Hooked(FrameHookConnection):
            pass

        conn = Hooked(H2Configuration(client_side=False))
        conn.initiate_connection()
        conn.clear_outbound_data_buffer()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        with self.assertRaises(ProtocolError):
            conn.receive_data(preface + b"\x00\x00\x01\x04\x01\x00\x00\x00\x00\x00")
        sent = conn.data_to_send()
        goaway = sent[sent.index(b"\x07\x00\x00\x00\x00\x00") - 3 :]
        self.assertEqual(
            goaway[-4:], b"\x00\x00\x00\x06", gone("H2Connection._terminate_connection", "h2frames", "h2")
        )


class HpackCacheTests(unittest.TestCase):
    """compat.hpackcache: hpack's HeaderTable changes only through `add` and `maxsize`, so the
    cached blocks and lists are exactly what hpack itself gives."""

    def test_private_names_exist(self) -> None:
        """HeaderTable.add and the maxsize property are where the counting subclass hooks in."""
        from hpack.table import HeaderTable

        self.assertTrue(callable(getattr(HeaderTable, "add", None)), gone("HeaderTable.add", "hpackcache", "hpack"))
        self.assertIsInstance(
            HeaderTable.__dict__.get("maxsize"), property, gone("HeaderTable.maxsize", "hpackcache", "hpack")
        )

    def test_same_bytes_and_lists_as_hpack(self) -> None:
        """Header lists repeated, new, evicting (small table) and with table size updates in
        between: every block and every decoded list equals plain hpack's."""
        from hpack import Decoder
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from flexgw.compat.hpackcache import CachingDecoder, CachingEncoder

        pool = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-a", b"1"),
                (b"x-b", b"2" * 40), (b"x-c", b"3" * 90), (b"content-length", b"6")]
        step = st.one_of(
            st.lists(st.sampled_from(pool), min_size=1, max_size=5),
            st.sampled_from([64, 128, 256, 4096]),  # a table size change
        )

        @settings(max_examples=200, deadline=None)
        @given(st.lists(step, min_size=1, max_size=30))
        def check(steps: list[Any]) -> None:
            plain, cached = Encoder(), CachingEncoder()
            plain_in, cached_in = Decoder(), CachingDecoder()
            for item in steps * 2:
                if isinstance(item, int):
                    plain.header_table_size = cached.header_table_size = item
                    continue
                block = plain.encode(list(item))
                self.assertEqual(cached.encode(list(item)), block)
                try:
                    expected = plain_in.decode(block, raw=True)
                except Exception as exc:  # noqa: BLE001 (hpack's own edge: the cache must agree)
                    self.assertRaises(type(exc), cached_in.decode, block, raw=True)
                    return
                self.assertEqual(cached_in.decode(block, raw=True), expected)

        check()

    def test_repeated_block_is_a_cache_hit(self) -> None:
        """A block that inserts nothing is decoded once; the next identical one is not."""
        from flexgw.compat.hpackcache import CachingDecoder

        encoder = Encoder()
        fields = [(b":method", b"GET"), (b"x-a", b"1")]
        encoder.encode(fields)  # inserts x-a
        block = encoder.encode(fields)  # indexed only
        decoder = CachingDecoder()
        decoder.decode(encoder_first := Encoder().encode(fields), raw=True)
        self.assertEqual(encoder_first != block, True)
        first = decoder.decode(block, raw=True)
        self.assertIn(block, decoder.cache)
        self.assertEqual(decoder.decode(block, raw=True), first)
