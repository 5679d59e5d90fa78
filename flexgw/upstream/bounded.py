"""Reading the body of a side call's response (JWKS, token introspection, OAuth tokens) with a
size limit that holds whatever the framing: a declared Content-Length over the limit is refused
before reading, and a chunked or close-delimited body is cut off as soon as it passes the limit
(the connection is dropped; nothing more is buffered)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail


def read_bounded(
    response: Any, limit: int, too_large: Callable[[], Exception]
) -> Deferred[bytes]:
    """The whole body of a treq/Agent `response`, or a failure with `too_large()` once it would
    exceed `limit` bytes."""
    import treq

    length = response.length
    if isinstance(length, int) and length > limit:
        return fail(too_large())
    parts: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise too_large()  # treq drops the connection and fails the collection with it
        parts.append(data)

    return treq.collect(response, collect).addCallback(lambda _: b"".join(parts))
