"""gRPC on the wire, as far as a gateway that never parses messages needs it: telling a gRPC
request by its content-type, the HTTP status → `grpc-status` mapping of the gateway's own
answers, `grpc-message` percent-encoding, and `grpc-timeout` parsing.

Statuses follow Envoy's local replies to gRPC requests (and grpc's http-grpc-status-mapping),
with the issue's choices where they differ: 429 → RESOURCE_EXHAUSTED, 504 → DEADLINE_EXCEEDED.
"""

from __future__ import annotations

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

_GRPC = b"application/grpc"
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
            return value if value.startswith(_GRPC) else None
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
