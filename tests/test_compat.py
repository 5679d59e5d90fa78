"""The Twisted and h2 private APIs flexgw.compat adapts are still there; each failure names the
attribute, the library version and the adapter module to mend."""

from __future__ import annotations

import inspect
from typing import Any

import h2
from hpack import Decoder, Encoder
from twisted.copyright import version as twisted_version
from twisted.internet import abstract, tcp
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.systemd import ListenFDs
from twisted.trial import unittest

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

    def test_insertion_into_empty_zero_table_is_a_cache_hit(self) -> None:
        """With the table's size 0 (flexgw's upstream SETTINGS ask for it), an encoder's
        literals with incremental indexing change nothing: the repeated block is a plain cache
        hit, with hpack's list."""
        from flexgw.compat.hpackcache import CachingDecoder

        first = b"\x20\x40\x06server\x05nginx\x88"  # size update to 0, an insertion, :status 200
        block = b"\x40\x06server\x05nginx\x88"
        decoder = CachingDecoder()
        expected = Decoder().decode(first, raw=True)
        self.assertEqual(decoder.decode(first, raw=True), expected)
        self.assertEqual(decoder.decode(block, raw=True), expected)
        self.assertIn(block, decoder.cache)
        self.assertNotIn(block, decoder.replays)
        self.assertEqual(decoder.decode(block, raw=True), expected)
        self.assertEqual(list(decoder.header_table.dynamic_entries), [])

    def test_huffman_memo(self) -> None:
        """hpack's decoder calls `hpack.hpack.decode_huffman`, which hpackcache replaced by its
        memo: repeated Huffman strings decode as hpack does, invalid ones still raise."""
        import hpack.hpack
        from hpack.exceptions import HPACKDecodingError
        from hpack.huffman import HuffmanEncoder
        from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

        from flexgw.compat import hpackcache

        self.assertIs(
            hpack.hpack.decode_huffman,
            hpackcache.memo_decode_huffman,
            gone("hpack.hpack.decode_huffman", "hpackcache", "hpack"),
        )
        coded = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(b"nginx/1.22.1")
        for _ in range(2):
            self.assertEqual(hpackcache.memo_decode_huffman(coded), b"nginx/1.22.1")
        self.assertIn(coded, hpackcache._huffman_memo)
        block = b"\x40" + bytes([0x80 | len(coded)]) + coded + bytes([0x80 | len(coded)]) + coded
        self.assertEqual(Decoder().decode(block, raw=True), [(b"nginx/1.22.1", b"nginx/1.22.1")])
        with self.assertRaises(HPACKDecodingError):
            hpackcache.memo_decode_huffman(b"\xff\xff\xff\xff")

    def test_replayed_blocks_as_hpack(self) -> None:
        """Blocks that index their fields anew each time (as nginx's responses), mixed with
        blocks reading the dynamic table and size updates: every list and the dynamic table
        after each block equal plain hpack's."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from flexgw.compat.hpackcache import CachingDecoder

        def literal(name: bytes, value: bytes) -> bytes:  # literal with incremental indexing
            return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value

        blocks = [
            literal(b"server", b"nginx") + literal(b"date", b"d1") + b"\x88",  # + :status 200
            literal(b"server", b"nginx") + literal(b"date", b"d2") + b"\x5f\x0atext/plain",
            literal(b"x-big", b"v" * 100),
            b"\xbe",  # index 62: the newest dynamic entry
            b"\x3f\x21",  # size update to 64, alone
            b"\x3f\xe1\x1f" + literal(b"a", b"b"),  # size update to 4096, then an insertion
            b"\x20" + literal(b"server", b"nginx"),  # size update to 0, then an insertion
        ]

        @settings(max_examples=200, deadline=None)
        @given(st.lists(st.sampled_from(range(len(blocks))), min_size=1, max_size=40))
        def check(order: list[int]) -> None:
            plain, cached = Decoder(), CachingDecoder()
            for index in order * 2:
                try:
                    expected = plain.decode(blocks[index], raw=True)
                except Exception as exc:  # noqa: BLE001 (an index past the table, say)
                    with self.assertRaises(type(exc)):
                        cached.decode(blocks[index], raw=True)
                    return
                self.assertEqual(cached.decode(blocks[index], raw=True), expected)
                self.assertEqual(
                    list(cached.header_table.dynamic_entries), list(plain.header_table.dynamic_entries)
                )

        check()
        decoder = CachingDecoder()
        for _ in range(3):
            decoder.decode(blocks[0], raw=True)
        self.assertIn(blocks[0], decoder.replays)
        self.assertEqual(len(decoder.header_table.dynamic_entries), 6)
