"""HPACK conformance (RFC 7541), section by section, over the wire against the gateway's h2c
listener: every case of h2spec's `hpack` group (decoding errors are connection errors of type
COMPRESSION_ERROR, RFC 9113 §4.3) and the positive cases a decoder and encoder must get right
(indexing tables, eviction, table-size updates both ways, Huffman, never-indexed literals)."""

from __future__ import annotations

import hpack

from flexgw.testing import h2raw
from flexgw.testing.h2raw import COMPRESSION_ERROR, FrameConnection, integer
from tests.h2conformance import ConformanceCase

#: Entries of the static table (RFC 7541 Appendix A).
STATIC = 61


def _dynamic_entries(conn: FrameConnection) -> int:
    """Entries the connection's encoder has put in the dynamic table so far."""
    return len(conn.encoder.header_table.dynamic_entries)


class _HpackCase(ConformanceCase):
    """Sends a request whose header block ends (or starts) with hand-made representations."""

    async def _decoding_error(self, before: bytes = b"", after: bytes = b"") -> None:
        conn = await self.connect()
        block = before + conn.block(conn.request_fields()) + after
        conn.request(1, block=block)
        await self.connection_error(conn, COMPRESSION_ERROR)

    async def _served(self, conn: FrameConnection, stream_id: int, block: bytes) -> h2raw.Response:
        conn.request(stream_id, block=block)
        response = await conn.response(stream_id)
        self.assertEqual(response.status, 200)
        return response


class Section2_3IndexingTableTests(_HpackCase):
    """§2.3: the static and dynamic tables, and their index address space (§2.3.3)."""

    async def test_indexed_field_past_the_tables(self) -> None:
        """An indexed field one past the static and dynamic tables: COMPRESSION_ERROR."""
        conn = await self.connect()
        block = conn.block(conn.request_fields())
        index = STATIC + _dynamic_entries(conn) + 1
        conn.request(1, block=block + integer(index, 7, 0x80))
        await self.connection_error(conn, COMPRESSION_ERROR)

    async def test_literal_name_index_past_the_tables(self) -> None:
        """A literal whose name index is past the tables: COMPRESSION_ERROR."""
        conn = await self.connect()
        block = conn.block(conn.request_fields())
        index = STATIC + _dynamic_entries(conn) + 1
        conn.request(1, block=block + integer(index, 6, 0x40) + b"\x00")
        await self.connection_error(conn, COMPRESSION_ERROR)

    async def test_dynamic_table_entries_reused(self) -> None:
        """A second request made of dynamic-table references only decodes to the same fields."""
        conn = await self.connect()
        fields = conn.request_fields(path=b"/indexed", extra=[(b"x-custom", b"value-1")])
        await self._served(conn, 1, conn.block(fields))
        second = conn.block(fields)
        self.assertTrue(all(byte & 0x80 for byte in second), "every field indexed")
        await self._served(conn, 3, second)
        first, again = self.upstream.received
        self.assertEqual((again.target, again.header("x-custom")), (b"/indexed", [b"value-1"]))
        self.assertEqual(first.header("x-custom"), again.header("x-custom"))

    async def test_eviction(self) -> None:
        """Fields cycling through a full dynamic table (entries evicted oldest first) decode
        right on every request."""
        conn = await self.connect()
        for i in range(12):
            extra = [(b"x-big-%d" % (i % 5), b"%d" % i * 300)]
            await self._served(conn, 1 + 2 * i, conn.block(conn.request_fields(path=b"/e%d" % i, extra=extra)))
        for i, request in enumerate(self.upstream.received):
            self.assertEqual(request.header(f"x-big-{i % 5}"), [b"%d" % i * 300])


class Section4_2MaximumTableSizeTests(_HpackCase):
    """§4.2: a table size update may only start a header block."""

    async def test_size_update_at_end_of_block(self) -> None:
        """A dynamic table size update after the fields: COMPRESSION_ERROR."""
        await self._decoding_error(after=b"\x21")

    async def test_size_update_at_start_accepted(self) -> None:
        """Size updates to 0 then back to 4096 at the start of blocks: the fields still decode
        (the decoder emptied its table in between)."""
        conn = await self.connect()
        fields = conn.request_fields(path=b"/sized", extra=[(b"x-keep", b"1")])
        await self._served(conn, 1, conn.block(fields))
        conn.encoder = hpack.Encoder()  # a fresh encoder: the decoder's table is emptied by the update
        conn.encoder.header_table_size = 0
        await self._served(conn, 3, conn.block(fields))
        conn.encoder.header_table_size = 4096
        await self._served(conn, 5, conn.block(fields))
        await self._served(conn, 7, conn.block(fields))
        self.assertEqual([r.header("x-keep") for r in self.upstream.received], [[b"1"]] * 4)


class Section5_2StringLiteralTests(_HpackCase):
    """§5.2: Huffman-coded string literals (h2spec's byte strings)."""

    async def test_huffman_padding_longer_than_seven_bits(self) -> None:
        """Huffman padding over 7 bits: COMPRESSION_ERROR."""
        await self._decoding_error(after=b"\x00\x85\xf2\xb2\x4a\x84\xff\x84\x49\x50\x9f\xff")

    async def test_huffman_padded_by_zero(self) -> None:
        """Huffman padding of zeros (not the EOS prefix): COMPRESSION_ERROR."""
        await self._decoding_error(after=b"\x00\x85\xf2\xb2\x4a\x84\xff\x83\x49\x50\x90")

    async def test_huffman_containing_eos(self) -> None:
        """The EOS symbol inside a Huffman string: COMPRESSION_ERROR."""
        await self._decoding_error(after=b"\x00\x85\xf2\xb2\x4a\x84\xff\x87\x49\x51\xff\xff\xff\xfa\x7f")

    async def test_huffman_and_raw_literals_accepted(self) -> None:
        """The same field as a Huffman literal and as a raw one: both reach the upstream."""
        conn = await self.connect()
        encoder = hpack.Encoder()
        huffman = encoder.encode(conn.request_fields(extra=[(b"x-word", b"huffman-coded")]), huffman=True)
        await self._served(conn, 1, bytes(huffman))
        conn.encoder = hpack.Encoder()
        conn.encoder.header_table_size = 0  # the gateway's table is emptied: start afresh
        plain = conn.encoder.encode(conn.request_fields(extra=[(b"x-word", b"raw-literal")]), huffman=False)
        await self._served(conn, 3, bytes(plain))
        self.assertEqual([r.header("x-word") for r in self.upstream.received], [[b"huffman-coded"], [b"raw-literal"]])


class Section6_1IndexedFieldTests(_HpackCase):
    """§6.1: index 0 is not used."""

    async def test_index_zero(self) -> None:
        """An indexed field with index 0: COMPRESSION_ERROR."""
        await self._decoding_error(after=b"\x80")


class Section6_2LiteralFieldTests(_HpackCase):
    """§6.2: literal representations (without indexing, never indexed)."""

    async def test_literals_without_indexing_and_never_indexed(self) -> None:
        """A literal without indexing (0x0) and a never-indexed one (0x1) decode, and add
        nothing to the table (a later index reference past the static table fails)."""
        conn = await self.connect()
        block = conn.block(conn.request_fields(path=b"/literal"))
        plain = b"\x00" + integer(6, 7) + b"x-none" + integer(1, 7) + b"a"
        never = b"\x10" + integer(7, 7) + b"x-never" + integer(1, 7) + b"b"
        await self._served(conn, 1, block + plain + never)
        seen = self.upstream.received[0]
        self.assertEqual((seen.header("x-none"), seen.header("x-never")), ([b"a"], [b"b"]))
        index = STATIC + _dynamic_entries(conn) + 1
        conn.request(3, block=conn.block(conn.request_fields()) + integer(index, 7, 0x80))
        await self.connection_error(conn, COMPRESSION_ERROR)


class Section6_3TableSizeUpdateTests(_HpackCase):
    """§6.3: a size update may not exceed SETTINGS_HEADER_TABLE_SIZE; the encoder signals ours."""

    async def test_size_update_over_settings_limit(self) -> None:
        """A size update to the server's SETTINGS_HEADER_TABLE_SIZE + 1: COMPRESSION_ERROR."""
        conn = await self.connect(handshake=False)
        server = await conn.handshake()
        limit = server.settings.get(h2raw.HEADER_TABLE_SIZE, 4096)
        conn.request(1, block=integer(limit + 1, 5, 0x20) + conn.block(conn.request_fields()))
        await self.connection_error(conn, COMPRESSION_ERROR)

    async def test_server_encoder_honours_table_size_zero(self) -> None:
        """The client's SETTINGS_HEADER_TABLE_SIZE 0: the server's header blocks start with a
        size update to 0 and never use the dynamic table (a decoder without one reads them)."""
        conn = await self.connect()
        conn.send(h2raw.settings((h2raw.HEADER_TABLE_SIZE, 0)))
        await conn.settings_ack()
        conn.reader.decoder.header_table_size = 0
        conn.reader.decoder.max_allowed_table_size = 0
        for stream_id in (1, 3, 5):
            response = await self._served(conn, stream_id, conn.block(conn.request_fields()))
            self.assertEqual(response.status, 200)
        blocks = [f.payload for f in conn.frames_of(h2raw.HEADERS)]
        self.assertEqual(blocks[0][:1], b"\x20")
