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


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lower-cased header names listed in `Connection` header values, minus protected ones."""
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in PROTECTED_FROM_CONNECTION:
                tokens.add(token)
    return frozenset(tokens)


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


def serialize_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`Name: value\\r\\n` lines for a header list, in order."""
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])
