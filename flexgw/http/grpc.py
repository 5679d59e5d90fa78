"""gRPC on the wire, as far as a gateway that never parses messages needs it: telling a gRPC
request by its content-type, the HTTP status → `grpc-status` mapping of the gateway's own
answers, `grpc-message` percent-encoding, and `grpc-timeout` parsing.

Statuses follow Envoy's local replies to gRPC requests (and grpc's http-grpc-status-mapping),
with the issue's choices where they differ: 429 → RESOURCE_EXHAUSTED, 504 → DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable

# grpc.StatusCode values (the numbers are the wire format).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

#: The grpc-status of a gateway-made answer, by the HTTP status it would have had.
STATUS_FOR_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    405: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    500: INTERNAL,
    501: UNIMPLEMENTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

GRPC_PREFIX = b"application/grpc"
_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def grpc_content_type(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The request's content-type when it is a gRPC one (`application/grpc`, `+proto`,
    `application/grpc-web`, `-web-text`, ...), lower-cased; None otherwise."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            value = value.strip().lower()
            return value if value.startswith(GRPC_PREFIX) else None
    return None


def status_for_http(status: int) -> int:
    """The grpc-status for a gateway answer that HTTP would have given `status`."""
    if status < 300:
        return OK
    return STATUS_FOR_HTTP.get(status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """`grpc-message`: UTF-8, percent-encoded outside printable ASCII (and `%` itself)."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value (1 to 8 digits and a unit: H M S m u n); None when
    malformed (the request then has no deadline of its own, as in grpc)."""
    value = value.strip()
    if not 2 <= len(value) <= 9:
        return None
    digits = value[:-1]
    unit = _UNITS.get(value[-1])
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


# -- gRPC-Web (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md) ----------------------

GRPC_WEB = b"application/grpc-web"
GRPC_WEB_TEXT = b"application/grpc-web-text"
#: What a browser script may read of a gRPC-Web response (CORS): the status and its details.
EXPOSE_GRPC = (
    b"access-control-expose-headers",
    b"grpc-status, grpc-message, grpc-status-details-bin",
)


def web_content_type(request_type: bytes) -> bytes:
    """The content-type of the gateway's own answer to a request of `request_type`: a gRPC-Web
    request's own type, else `application/grpc`."""
    return request_type if request_type.startswith(GRPC_WEB) else b"application/grpc"


def grpc_type_for_web(web_type: bytes) -> bytes:
    """`application/grpc-web[-text][+proto]` → `application/grpc[+proto]` (to the upstream)."""
    rest = web_type[len(GRPC_WEB_TEXT):] if web_type.startswith(GRPC_WEB_TEXT) else web_type[len(GRPC_WEB):]
    return GRPC_PREFIX + rest


def web_type_for_grpc(grpc_type: bytes, text: bool) -> bytes:
    """`application/grpc[+proto]` from the upstream → the gRPC-Web type the client speaks."""
    value = grpc_type.strip().lower()
    rest = value[len(GRPC_PREFIX):] if value.startswith(GRPC_PREFIX) else b""
    if rest[:1] not in (b"", b"+", b";"):
        rest = b""
    return (GRPC_WEB_TEXT if text else GRPC_WEB) + rest


def trailer_frame(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """gRPC-Web's trailer frame: flag 0x80, a 4-byte length, then `name:value\\r\\n` lines."""
    block = b"".join(name.lower() + b":" + value + b"\r\n" for name, value in trailers)
    return b"\x80" + len(block).to_bytes(4, "big") + block


class Base64Decoder:
    """A `grpc-web-text` request body, decoded as it streams: whole 4-character groups are
    decoded, the rest waits for the next piece (padded segments may follow one another)."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes `data` (with what was left over) decodes to; raises binascii.Error on input
        that is not base64."""
        data = self.rest + data.replace(b"\r", b"").replace(b"\n", b"")
        cut = len(data) - len(data) % 4
        self.rest = data[cut:]
        whole = data[:cut]
        if b"=" not in whole:
            return binascii.a2b_base64(whole, strict_mode=True)
        out = []
        start = 0
        while start < len(whole):
            pad = whole.find(b"=", start)
            end = len(whole) if pad < 0 else (pad // 4 + 1) * 4  # the end of the padded group
            out.append(binascii.a2b_base64(whole[start:end], strict_mode=True))
            start = end
        return b"".join(out)


class Base64Encoder:
    """A `grpc-web-text` response body, encoded as it streams: whole 3-byte groups now, the
    rest (padded) at the end, so the client sees one unbroken base64 text."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """The base64 of `data` (with what was left over), whole groups only."""
        data = self.rest + data
        cut = len(data) - len(data) % 3
        self.rest = data[cut:]
        return binascii.b2a_base64(data[:cut], newline=False) if cut else b""

    def end(self) -> bytes:
        """The base64 of what is left, padded."""
        rest, self.rest = self.rest, b""
        return binascii.b2a_base64(rest, newline=False) if rest else b""
