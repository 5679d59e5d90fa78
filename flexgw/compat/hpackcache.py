"""HPACK caches for repeated header blocks: a header list encoded, or a block decoded, again
while the dynamic table is unchanged gives the same bytes, or the same list, without HPACK's
per-field work (the same client sends the same block for every request of a load; the same
upstream, the same response head).

Private API: `hpack.table.HeaderTable.add` and its `maxsize` setter are the only places the
dynamic table changes; a subclass counts their calls (`generation`). An entry is kept only
when the block changed nothing (no insertion, no size update) and is reused only at the same
generation, so the cached answer is what HPACK would give. The HPACK error checks still run on
every block the cache does not know. Bounded: 64 entries per connection side.

A peer that indexes its fields anew in every block (nginx does, for each response's `server`,
`date`, `content-type`, `content-length`) changes the table every time. Such a block, when it
reads nothing from the dynamic table (private API: `HeaderTable.get_by_index`, counted) and
only inserts, decodes to the same list with the same insertions whatever the table holds: it
is kept aside and replayed (its insertions made again, in order). Its Huffman-coded strings
repeat too. Private API: `hpack.hpack.decode_huffman`,
the function the decoder calls for each Huffman-coded string, is replaced (on import of this
module) by a memo of it: the same bytes give the same string, an invalid string still raises.
Measured: Huffman decoding was a fifth of the gateway's CPU with an nginx h2c upstream
(bench/gateway_instructions.py --h2 h2c). Bounded: 4096 strings of up to 256 bytes.
"""

from __future__ import annotations

from typing import Any

import hpack.hpack
from hpack import Decoder, Encoder
from hpack.table import HeaderTable

_ENTRIES = 64
_STATIC_ENTRIES = HeaderTable.STATIC_TABLE_LENGTH
_HUFFMAN_ENTRIES = 4096
_HUFFMAN_LONGEST = 256

plain_decode_huffman = hpack.hpack.decode_huffman
_huffman_memo: dict[bytes, bytes] = {}


def memo_decode_huffman(data: bytes) -> bytes:
    """hpack's Huffman decoding, remembered for short strings."""
    decoded = _huffman_memo.get(data)
    if decoded is None:
        decoded = plain_decode_huffman(data)
        if len(data) <= _HUFFMAN_LONGEST and type(data) is bytes:
            if len(_huffman_memo) >= _HUFFMAN_ENTRIES:
                _huffman_memo.clear()
            _huffman_memo[data] = decoded
    return decoded


hpack.hpack.decode_huffman = memo_decode_huffman  # type: ignore[attr-defined]


class _CountingTable(HeaderTable):
    """hpack's HeaderTable, counting every change; while `recording`, also noting insertions
    and whether the dynamic table was read (`dynamic_reads`)."""

    generation = 0
    recording: list[tuple[bytes, bytes]] | None = None
    dynamic_reads = 0

    def add(self, name: bytes, value: bytes) -> None:
        """An insertion (evictions come with it); none into an empty table of size 0, which
        changes nothing (an encoder may insert though we set the size to 0: nginx does)."""
        if not self.dynamic_entries and not self.maxsize:
            return
        self.generation += 1
        if self.recording is not None:
            self.recording.append((name, value))
        super().add(name, value)

    def get_by_index(self, index: int) -> Any:
        """An entry (one of the dynamic table's is noted)."""
        if index > _STATIC_ENTRIES:
            self.dynamic_reads += 1
        return super().get_by_index(index)

    def _set_maxsize(self, value: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]

    maxsize = property(HeaderTable.maxsize.fget, _set_maxsize)  # type: ignore[attr-defined]


class CachingEncoder(Encoder):
    """An Encoder that returns the block it made for the same header list, table unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _CountingTable()
        self.cache: dict[Any, tuple[int, bytes]] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """As Encoder.encode."""
        if self.table_size_changes or type(headers) is not list:
            return super().encode(headers, huffman)
        key = (tuple(headers), huffman)
        table = self.header_table
        generation = table.generation
        hit = self.cache.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        block = super().encode(headers, huffman)
        if table.generation == generation:
            if len(self.cache) >= _ENTRIES:
                self.cache.clear()
            self.cache[key] = (generation, block)
        return block


class CachingDecoder(Decoder):
    """A Decoder that returns the list it decoded from the same block, table unchanged; and,
    for a block that only inserts into the dynamic table without reading it (nginx indexes
    each response's fields anew), the same list with the same insertions replayed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_table = _CountingTable()
        self.cache: dict[bytes, tuple[int, list[Any], bool]] = {}
        self.replays: dict[bytes, tuple[list[Any], list[tuple[bytes, bytes]]]] = {}
        # Whether the block last decoded read nothing from the dynamic table: such a block
        # decodes to the same list whatever the table holds (what is known of the list, its
        # checks say, may be kept by the block's bytes).
        self.contained = False

    def decode(self, data: Any, raw: bool = False) -> Any:
        """As Decoder.decode."""
        if not raw or type(data) is not bytes:
            return super().decode(data, raw)
        table = self.header_table
        generation = table.generation
        hit = self.cache.get(data)
        if hit is not None and hit[0] == generation:
            self.contained = hit[2]
            return list(hit[1])
        replay = self.replays.get(data)
        if replay is not None:
            self.contained = True
            add = table.add
            for name, value in replay[1]:
                add(name, value)
            return list(replay[0])
        recording: list[tuple[bytes, bytes]] = []
        table.recording = recording
        table.dynamic_reads = 0
        self.contained = False
        try:
            headers = super().decode(data, raw=True)
        finally:
            table.recording = None
        contained = self.contained = not table.dynamic_reads
        changes = table.generation - generation
        if not changes:
            if len(self.cache) >= _ENTRIES:
                self.cache.clear()
            self.cache[data] = (generation, list(headers), contained)
        elif changes == len(recording) and not table.dynamic_reads:
            # insertions only (no size update), nothing read from the dynamic table: the same
            # block gives the same list and the same insertions whatever the table holds
            if len(self.replays) >= _ENTRIES:
                self.replays.clear()
            self.replays[data] = (list(headers), recording)
        return headers
