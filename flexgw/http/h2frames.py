"""GOAWAY frames taken out of an HTTP/2 byte stream before the `h2` library sees them.

`h2` treats a received GOAWAY as the end of the connection: every later frame, including the
DATA of streams the peer promised to finish (those at or below its last stream id), is a
protocol error. A graceful shutdown (RFC 9113 §6.8) needs those frames, so the client side reads
GOAWAY itself: this filter passes every other frame through untouched and reports each GOAWAY as
(last_stream_id, error_code).
"""

from __future__ import annotations

_GOAWAY = 0x7
_MAX_GOAWAY = 16384  # a longer GOAWAY is passed to h2, which refuses it by the frame size rules


class GoAwayFilter:
    """Splits GOAWAY frames out of the frames received on one connection."""

    __slots__ = ("held", "remaining")

    def __init__(self) -> None:
        self.held = b""  # an incomplete frame header, or an incomplete GOAWAY frame
        self.remaining = 0  # bytes of the current (passed-through) frame still to come

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """The bytes for h2, and the GOAWAY frames found in `data`."""
        if self.held:
            data = self.held + data
            self.held = b""
        size = len(data)
        remaining = self.remaining
        if remaining >= size:
            self.remaining = remaining - size
            return data, []
        pos = remaining
        pieces: list[bytes] | None = None
        start = 0
        goaways: list[tuple[int, int]] = []
        while pos < size:
            if size - pos < 9:
                self.held = data[pos:]
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] == _GOAWAY and 8 <= length <= _MAX_GOAWAY:
                end = pos + 9 + length
                if end > size:
                    self.held = data[pos:]
                    break
                payload = data[pos + 9 : end]
                goaways.append(
                    (
                        int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                        int.from_bytes(payload[4:8], "big"),
                    )
                )
                if pieces is None:
                    pieces = []
                pieces.append(data[start:pos])
                start = pos = end
                continue
            pos += 9 + length
        if pos > size:
            self.remaining = pos - size
            cut = size
        else:
            self.remaining = 0
            cut = pos if not self.held else size - len(self.held)
        if pieces is None:
            return (data if cut == size else data[:cut]), goaways
        pieces.append(data[start:cut])
        return b"".join(pieces), goaways
