"""Following the chunked framing of a request body as bytes arrive, to bound its lines.

llhttp (through httptools) checks the syntax of chunked framing but reports neither chunk
extensions nor where a chunk-size line starts, so it would consume a 100 KiB extension without
a word. `ChunkFraming` walks the same bytes before they are fed to the parser: it skips chunk
data by size, measures each chunk-size line (size, extensions, CRLF) and the trailer section,
and says where the body ends, so that the front can refuse an over-long line before the request
goes anywhere and feed the parser one message at a time. llhttp stays the judge of the syntax;
this only adds bounds (and refuses the few sizes it cannot read, which llhttp refuses too).
"""

from __future__ import annotations

import re

from flexgw.http.errors import HEADERS_TOO_LARGE, GatewayError, bad_request

#: Longest chunk-size line accepted, CRLF and extensions included (Node.js caps extensions at
#: 16 KiB; flexgw forwards no extension, so a short bound costs nothing legitimate).
MAX_CHUNK_LINE = 4096
CHUNK_LINE_TOO_LONG = bad_request(
    f"A chunk-size line (with its extensions) is longer than {MAX_CHUNK_LINE} bytes"
)
MALFORMED_CHUNK_SIZE = bad_request("Malformed chunk size")

_SIZE = re.compile(rb"([0-9A-Fa-f]{1,64})[;\r]")
# What the start of a chunk-size line may be while its end has not arrived: a size so far, or
# a size and what ends it. Anything else is refused at once, as it would be with the line whole
# (not later by the parser with another message: the answer must not depend on how reads cut).
_OPEN_SIZE = re.compile(rb"[0-9A-Fa-f]{1,64}[;\r]|[0-9A-Fa-f]{0,64}\Z")
_PREFIX = 72  # bytes of a line kept across reads: enough for the size and what follows it

LINE = 0  # in a chunk-size line
DATA = 1  # skipping chunk data and the CRLF after it
TRAILER = 2  # in the trailer section (after the last chunk)


class ChunkFraming:
    """The position in one chunked body; `scan` each piece of input in order."""

    __slots__ = ("left", "line_bytes", "max_trailer_bytes", "prefix", "state", "trailer_bytes")

    def __init__(self, max_trailer_bytes: int) -> None:
        self.state = LINE
        self.left = 0  # DATA: chunk bytes plus CRLF still to come
        self.line_bytes = 0  # bytes of the current line seen in earlier pieces
        self.prefix = b""  # the start of the current line, when it spans pieces
        self.trailer_bytes = 0
        self.max_trailer_bytes = max_trailer_bytes

    def scan(self, data: bytes) -> int | GatewayError:
        """The index just after the body's end in `data`, -1 if the body goes on past `data`,
        or the error to answer (a chunk-size line or the trailer section is too long)."""
        pos = 0
        end = len(data)
        while pos < end:
            if self.state == DATA:
                if self.left > end - pos:
                    self.left -= end - pos
                    return -1
                pos += self.left
                self.left = 0
                self.state = LINE
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line_bytes += end - pos
                if len(self.prefix) < _PREFIX:
                    self.prefix += data[pos : pos + _PREFIX]
                return self._check_open_line()
            length = self.line_bytes + newline + 1 - pos
            if self.state == LINE:
                if length > MAX_CHUNK_LINE:
                    return CHUNK_LINE_TOO_LONG
                start = self.prefix + data[pos : pos + _PREFIX] if self.prefix else data
                match = _SIZE.match(start, 0 if self.prefix else pos)
                if match is None:
                    return MALFORMED_CHUNK_SIZE
                size = int(match.group(1), 16)
                self.state = DATA if size else TRAILER
                self.left = size + 2
            else:
                if length <= 2:  # the empty line that ends the trailer section (and the body)
                    self._reset()
                    return newline + 1
                self.trailer_bytes += length
                if self.trailer_bytes > self.max_trailer_bytes:
                    return HEADERS_TOO_LARGE
            self.line_bytes = 0
            self.prefix = b""
            pos = newline + 1
        return -1

    def _check_open_line(self) -> int | GatewayError:
        """Bound a line that has not ended yet (-1: within bounds, the body goes on)."""
        if self.state == LINE:
            if self.line_bytes > MAX_CHUNK_LINE:
                return CHUNK_LINE_TOO_LONG
            if _OPEN_SIZE.match(self.prefix) is None:
                return MALFORMED_CHUNK_SIZE
        elif self.trailer_bytes + self.line_bytes > self.max_trailer_bytes:
            return HEADERS_TOO_LARGE
        return -1

    def _reset(self) -> None:
        self.state = LINE
        self.line_bytes = 0
        self.prefix = b""
        self.trailer_bytes = 0
