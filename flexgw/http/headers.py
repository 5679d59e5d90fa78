"""Header rules a proxy must apply: hop-by-hop removal and the forwarded-header policy.

Header lists are lists of (name, value) byte pairs in arrival order, with the name's original
case; nothing here lower-cases what it forwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

HeaderList = list[tuple[bytes, bytes]]

#: Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the proxy ones).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

#: Headers a client must not be able to strip from the forwarded request by naming them in
#: `Connection`: the gateway sets these itself, so naming them in Connection is ignored.
PROTECTED_FROM_CONNECTION = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
    }
)


def connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """The lower-cased header names listed in `Connection` header values, minus protected ones."""
    if len(values) == 1:
        common = _COMMON_TOKENS.get(values[0])  # (nearly every response: `keep-alive`)
        if common is not None:
            return common
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in PROTECTED_FROM_CONNECTION:
                tokens.add(token)
    return frozenset(tokens)


#: connection_tokens of the usual single Connection values, computed once.
_COMMON_TOKENS: dict[bytes, frozenset[bytes]] = {}
_COMMON_TOKENS.update(
    (value, connection_tokens([value]))
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
)


def response_headers_for_downstream(
    headers: Sequence[tuple[bytes, bytes]], connection_values: Sequence[bytes]
) -> HeaderList:
    """The upstream response headers to forward: hop-by-hop, Connection-listed and framing removed.

    Content-Length is removed too: the caller re-adds the framing it decides on.
    """
    extra = connection_tokens(connection_values) if connection_values else frozenset()
    kept = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"content-length" or lname in extra:
            continue
        kept.append((name, value))
    return kept


#: Lower-cased names whose underscore spelling is dropped even when underscores are allowed: an
#: upstream that maps `_` and `-` alike (CGI, WSGI, PHP) would read `Transfer_Encoding` as the
#: framing, `Host` or `X-Forwarded-For` the gateway sets itself.
_RISKY_UNDERSCORED = frozenset(
    name.replace(b"-", b"_")
    for name in HOP_BY_HOP | PROTECTED_FROM_CONNECTION | {b"x-real-ip"}
)


def risky_underscored(lname: bytes) -> bool:
    """Whether a lower-cased header name with `_` would read as framing, hop-by-hop, Host or
    forwarding information to an upstream that maps `_` to `-`."""
    name = lname.replace(b"-", b"_")
    return name in _RISKY_UNDERSCORED or name[:12] == b"x_forwarded_"


def without_underscored(headers: HeaderList, drop_all: bool) -> HeaderList:
    """The headers less those whose name has `_`: all of them, or only the risky ones."""
    return [
        (name, value)
        for name, value in headers
        if b"_" not in name or not (drop_all or risky_underscored(name.lower()))
    ]


def serialize_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`Name: value\\r\\n` lines for a header list, in order."""
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])
