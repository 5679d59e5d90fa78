"""Unit tests of ChunkFraming: where a chunked body ends, and the bounds on its lines."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.chunked import (
    CHUNK_LINE_TOO_LONG,
    MALFORMED_CHUNK_SIZE,
    MAX_CHUNK_LINE,
    ChunkFraming,
)
from flexgw.http.errors import HEADERS_TOO_LARGE, GatewayError

SLOW = [HealthCheck.too_slow]
_TOKEN = st.text("abcxyz019-", min_size=1, max_size=12).map(str.encode)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """A valid chunked body: chunks with optional extensions, the last chunk, trailers."""
    out = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=300), max_size=6)):
        ext = b"".join(b";" + draw(_TOKEN) for _ in range(draw(st.integers(0, 2))))
        digits = b"%x" % len(data)
        if draw(st.booleans()):
            digits = digits.upper().rjust(6, b"0")
        out.append(digits + ext + b"\r\n" + data + b"\r\n")
    out.append(b"0" + (b";last" if draw(st.booleans()) else b"") + b"\r\n")
    for _ in range(draw(st.integers(0, 2))):
        out.append(b"X-" + draw(_TOKEN) + b": " + draw(_TOKEN) + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (sorted, deduplicated, within bounds)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def scan_all(framing: ChunkFraming, parts: list[bytes]) -> tuple[int, int | GatewayError]:
    """Scan parts in order: (bytes consumed before the result, the first non -1 result)."""
    consumed = 0
    for part in parts:
        result = framing.scan(part)
        if result != -1:
            return consumed, result
        consumed += len(part)
    return consumed, -1


class ChunkFramingTests(SynchronousTestCase):
    """The scanner finds the body's end however the bytes are cut, and bounds its lines."""

    @settings(suppress_health_check=SLOW, max_examples=200)
    @given(chunked_bodies(), st.binary(max_size=40), st.lists(st.integers(0, 4000), max_size=8))
    def test_end_found_however_cut(self, body: bytes, after: bytes, cuts: list[int]) -> None:
        """The end of a valid body is found exactly, whatever follows it and however it is cut."""
        consumed, result = scan_all(ChunkFraming(8192), pieces(body + after, cuts))
        self.assertIsInstance(result, int)
        assert isinstance(result, int)
        self.assertEqual(consumed + result, len(body))

    @settings(suppress_health_check=SLOW, max_examples=100)
    @given(st.integers(MAX_CHUNK_LINE - 2, 3 * MAX_CHUNK_LINE), st.lists(st.integers(), max_size=6))
    def test_long_extension_refused_as_it_arrives(self, size: int, cuts: list[int]) -> None:
        """A chunk line past the bound is refused by the piece that crosses it, never later."""
        line = b"3;" + b"e" * size + b"\r\n"
        stream = b"3\r\nabc\r\n" + line + b"abc\r\n0\r\n\r\n"
        consumed, result = scan_all(ChunkFraming(8192), pieces(stream, cuts))
        if len(line) <= MAX_CHUNK_LINE:
            self.assertEqual(result, len(stream) - consumed)
        else:
            self.assertIs(result, CHUNK_LINE_TOO_LONG)
            # refused no later than the piece holding the first byte past the bound
            self.assertLessEqual(consumed, 8 + MAX_CHUNK_LINE)

    def test_line_of_exactly_the_bound(self) -> None:
        """A chunk-size line of exactly MAX_CHUNK_LINE bytes (CRLF included) is accepted."""
        line = b"1;" + b"x" * (MAX_CHUNK_LINE - 4) + b"\r\n"
        self.assertEqual(len(line), MAX_CHUNK_LINE)
        body = line + b"a\r\n0\r\n\r\n"
        self.assertEqual(ChunkFraming(100).scan(body), len(body))
        self.assertIs(ChunkFraming(100).scan(b"1;x" + line[2:]), CHUNK_LINE_TOO_LONG)

    def test_open_line_bounded(self) -> None:
        """An extension that never ends is refused once it passes the bound, without its LF."""
        framing = ChunkFraming(8192)
        self.assertEqual(framing.scan(b"3;" + b"e" * (MAX_CHUNK_LINE - 10)), -1)
        self.assertIs(framing.scan(b"e" * 100), CHUNK_LINE_TOO_LONG)

    def test_trailers_bounded(self) -> None:
        """The trailer section is bounded like a head (431), ended or not."""
        self.assertIs(ChunkFraming(64).scan(b"0\r\nX-T: " + b"t" * 80), HEADERS_TOO_LARGE)
        self.assertIs(
            ChunkFraming(64).scan(b"0\r\n" + b"X-T: t\r\n" * 10 + b"\r\n"), HEADERS_TOO_LARGE
        )

    def test_malformed_sizes(self) -> None:
        """Sizes llhttp refuses too: not hex, no CR before the LF, absurdly long."""
        for line in (b"0x3\r\n", b"3\n", b"\r\n", b"g\r\n", b"1" * 80 + b"\r\n", b" 3\r\n"):
            self.assertIs(ChunkFraming(100).scan(line), MALFORMED_CHUNK_SIZE, line)

    def test_malformed_start_refused_before_the_line_ends(self) -> None:
        """A line that cannot become a size is refused at its first piece, as it is whole."""
        for start in (b"\x00", b"g", b"\r", b" ", b"1x", b"1" * 65, b"0x"):
            self.assertIs(ChunkFraming(100).scan(start), MALFORMED_CHUNK_SIZE, start)
        for start in (b"", b"a", b"1" * 64, b"3;", b"3\r", b"3;ext=\x00"):
            self.assertEqual(ChunkFraming(100).scan(start), -1, start)

    def test_size_split_across_pieces(self) -> None:
        """A chunk size cut in the middle is read whole."""
        framing = ChunkFraming(100)
        self.assertEqual(framing.scan(b"1"), -1)
        self.assertEqual(framing.scan(b"0;a"), -1)
        self.assertEqual(framing.scan(b"=b\r\n" + b"z" * 16), -1)
        self.assertEqual(framing.scan(b"\r\n0\r\n\r\nGET"), 7)
