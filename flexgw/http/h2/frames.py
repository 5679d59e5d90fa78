"""HTTP/2 frame types, flags, error and settings codes, and the frames flexgw sends, as bytes."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 §6)
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes (RFC 9113 §7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384

#: A frame header: length (24 bits as 16 + 8), type, flags, stream id (reserved bit included).
HEAD = struct.Struct(">HBBBL")
_U32 = struct.Struct(">L")
_U32X2 = struct.Struct(">LL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame."""
    length = len(payload)
    return HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_size: int) -> bytes:
    """A header block as HEADERS (and CONTINUATION frames when it exceeds `max_size`)."""
    flags = END_STREAM if end_stream else 0
    length = len(block)
    if length <= max_size:
        return HEAD.pack(length >> 8, length & 0xFF, HEADERS, flags | END_HEADERS, stream_id) + block
    pieces = [frame(HEADERS, flags, stream_id, block[:max_size])]
    for offset in range(max_size, length, max_size):
        last = offset + max_size >= length
        pieces.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[offset : offset + max_size]))
    return b"".join(pieces)


def data_frame(stream_id: int, data: bytes, end_stream: bool) -> bytes:
    """A DATA frame (no padding)."""
    length = len(data)
    return HEAD.pack(length >> 8, length & 0xFF, DATA, END_STREAM if end_stream else 0, stream_id) + data


def rst_stream(stream_id: int, code: int) -> bytes:
    """RST_STREAM."""
    return HEAD.pack(0, 4, RST_STREAM, 0, stream_id) + _U32.pack(code)


def window_update(stream_id: int, increment: int) -> bytes:
    """WINDOW_UPDATE."""
    return HEAD.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """GOAWAY."""
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code) + debug)


def settings(values: dict[int, int]) -> bytes:
    """SETTINGS with `values` (code: value)."""
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def ping_ack(opaque: bytes) -> bytes:
    """The answer to a PING."""
    return HEAD.pack(0, 8, PING, ACK, 0) + opaque
