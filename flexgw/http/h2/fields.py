"""Checks on received HTTP/2 header fields (RFC 9113 §8.2, §8.3): a request head, a response
head, trailers. A field list that fails is malformed; the codec makes that a protocol error.
Also which sent request fields HPACK must never index (`request_field`)."""

from __future__ import annotations

import re

from hpack import NeverIndexedHeaderTuple

#: A regular field name: visible ASCII without upper case or colon (§8.2.1).
_NAME = re.compile(rb"[!-9;-@\[-~]+")
#: What a field value must not hold: NUL, CR, LF, or whitespace at either end (§8.2.1).
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
#: Connection-specific fields (§8.2.2).
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = {b":method": 1, b":scheme": 2, b":authority": 4, b":path": 8, b":protocol": 16}
#: Regular names already checked (names repeat on every request; bounded).
_good_names: set[bytes] = set()
#: Fields (name, value) whose value, and name if regular, passed (the same fields come in every
#: request of a client; bounded, emptied when full). Saves a regular expression per field.
_good_fields: set[tuple[bytes, bytes]] = set()
_GOOD_FIELDS = 4096

#: What `request_fields` returns: (content-length or -1, :method, :path, :authority, host, the
#: number of pseudo-header fields (they come first), the size (name + value + 4 per field), and
#: whether a regular field is Host or Cookie).
RequestFields = tuple[int, bytes, bytes | None, bytes | None, bytes | None, int, int, bool]


class MalformedFields(Exception):
    """A header list that is not a well-formed HTTP/2 message head or trailer section."""


def _regular(name: bytes, value: bytes) -> None:
    if name not in _good_names:
        if _NAME.fullmatch(name) is None:
            raise MalformedFields(f"invalid field name {name[:40]!r}")
        if name in CONNECTION_SPECIFIC:
            raise MalformedFields(f"connection-specific field {name!r}")
        if len(_good_names) < 4096 and name != b"te":
            _good_names.add(name)
    if name == b"te" and value.lower() != b"trailers":
        raise MalformedFields("TE other than trailers")


def _check_field(field: tuple[bytes, bytes]) -> None:
    """Check one field's value (and a regular field's name); remember it when good."""
    name, value = field
    if value and _BAD_VALUE.search(value) is not None:
        raise MalformedFields(f"invalid value of {name[:40]!r}")
    if name[:1] != b":":
        _regular(name, value)
    if len(_good_fields) >= _GOOD_FIELDS:
        _good_fields.clear()
    _good_fields.add(field)


def request_fields(headers: list) -> RequestFields:
    """Check a request head; return what the server side reads of it (see RequestFields)."""
    regular = False
    seen = 0
    pseudo = 0
    method = path = authority = host = None
    length = -1
    size = 0
    special = False
    good = _good_fields
    for field in headers:
        name, value = field
        size += len(name) + len(value) + 4
        if field not in good:
            _check_field(field)
        if name[:1] == b":":
            bit = _REQUEST_PSEUDO.get(name)
            if regular or bit is None or seen & bit:
                if regular:
                    raise MalformedFields("pseudo-header field after a regular field")
                raise MalformedFields(f"duplicate or unknown pseudo-header field {name[:40]!r}")
            seen |= bit
            pseudo += 1
            if bit == 1:
                method = value
            elif bit == 8:
                path = value
            elif bit == 4:
                authority = value
            continue
        regular = True
        if name == b"host":
            if host is not None:
                raise MalformedFields("several Host fields")
            host = value
            special = True
        elif name == b"content-length":
            length = _length(value, length)
        elif name == b"cookie":
            special = True
    if method is None:
        raise MalformedFields("no :method")
    if method == b"CONNECT" and not seen & 16:
        if path is not None or seen & 2:
            raise MalformedFields("CONNECT with :scheme or :path")
    else:
        if not path or not seen & 2:
            raise MalformedFields("no :scheme or no (or an empty) :path")
        if seen & 16 and method != b"CONNECT":
            raise MalformedFields(":protocol without CONNECT")
    if authority is None and host is None:
        raise MalformedFields("no :authority and no Host")
    if authority is not None and host is not None and authority != host:
        raise MalformedFields("Host and :authority disagree")
    return length, method, path, authority, host, pseudo, size, special


def response_status(headers: list) -> tuple[int, int]:
    """Check a response head; return its status and content-length (-1 without one)."""
    status = 0
    regular = False
    length = -1
    bad_value = _BAD_VALUE.search
    for name, value in headers:
        if value and bad_value(value) is not None:
            raise MalformedFields(f"invalid value of {name[:40]!r}")
        if name[:1] == b":":
            if regular or name != b":status" or status:
                raise MalformedFields(f"misplaced, duplicate or unknown pseudo-header {name[:40]!r}")
            if len(value) != 3 or not value.isdigit():
                raise MalformedFields("invalid :status")
            status = int(value)
            continue
        regular = True
        _regular(name, value)
        if name == b"content-length":
            length = _length(value, length)
    if not status:
        raise MalformedFields("no :status")
    return status, length


def check_trailers(headers: list) -> None:
    """Check a trailer section (no pseudo-header field)."""
    bad_value = _BAD_VALUE.search
    for name, value in headers:
        if name[:1] == b":":
            raise MalformedFields("pseudo-header field in trailers")
        if value and bad_value(value) is not None:
            raise MalformedFields(f"invalid value of {name[:40]!r}")
        _regular(name, value)


def _length(value: bytes, previous: int) -> int:
    if not value.isdigit() or len(value) > 18:
        raise MalformedFields("invalid content-length")
    length = int(value)
    if previous not in (-1, length):
        raise MalformedFields("conflicting content-length")
    return length


#: Request fields never indexed by HPACK: credentials (h2's own list), as a shared upstream
#: connection carries many clients' requests (RFC 7541 §7.1.3).
NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})


def request_field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """The field to send for lower-case `name`: a never-indexed one for a credential (and a
    short cookie, guessable from its table entry's presence), else the plain pair."""
    if name in NEVER_INDEXED or (name == b"cookie" and len(value) < 20):
        return NeverIndexedHeaderTuple(name, value)  # type: ignore[no-any-return]
    return (name, value)
