"""Side calls' responses (JWKS, token introspection, OAuth tokens) read with a size limit that
holds whatever the framing: a declared Content-Length over the limit is refused before reading,
and a chunked or close-delimited body is cut off as soon as it passes the limit (the connection
is dropped; nothing more is buffered). Also the bounded POST that introspection and the OAuth
token fetch both make."""

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


def post_bounded(
    reactor: Any,
    agent: Any,
    url: str,
    data: Any,
    headers: Any,
    timeout: float,
    limit: int,
    too_large: Callable[[], Exception],
) -> Deferred[tuple[int, bytes]]:
    """POST `data` with treq (through `agent` when given, on a connection of its own) and fire
    with (status, body): the body read within `limit` bytes, the whole call within `timeout`
    seconds."""
    import treq

    kwargs: dict[str, Any] = {"reactor": reactor, "persistent": False}
    if agent is not None:
        kwargs["agent"] = agent
    d: Deferred[Any] = treq.post(url, data=data, headers=headers, **kwargs)

    def got(response: Any) -> Deferred[tuple[int, bytes]]:
        return read_bounded(response, limit, too_large).addCallback(
            lambda body: (response.code, body)
        )

    d.addCallback(got)
    d.addTimeout(timeout, reactor)
    return d
