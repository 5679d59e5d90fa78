"""Writes batched per read, and per reactor turn: what HTTP/2 connections queue while reads
are handled goes out in one write per connection once they are.

A client sending ten requests in one read opens ten streams on one upstream connection, and an
upstream answering them in one read completes ten responses on one downstream connection; each
would otherwise be its own `send`. A connection's hot paths call `flush_soon(self)`: inside a
read (between `begin` and `end`, which the HTTP/2 protocols' `dataReceived` call) the
connection is flushed once when the outermost read ends; outside any read, at once. Closing
paths flush at once as before (the codec's output is one queue, so the order of bytes holds).

flexgw's reactor (flexgw.compat.epollreactor.FlexReactor) also calls `begin` and `end` around
each poll's events, so the outermost "read" is the whole turn: ten HTTP/2 streams answered by
ten HTTP/1.1 upstream connections whose responses arrive in one poll go to the client in one
`send`, not ten. Under Twisted's own reactor the batch is one read, as before.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

_log = Logger(namespace="flexgw.writebatch")


class _Batch:
    """The reads in progress (nested: a read's handling may feed another connection) and the
    connections to flush when the outermost ends."""

    __slots__ = ("depth", "pending")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[Any] = []


BATCH = _Batch()


def begin() -> None:
    """A read starts."""
    BATCH.depth += 1


def end() -> None:
    """A read ends; at the outermost, flush every connection that asked to be."""
    batch = BATCH
    batch.depth -= 1
    if batch.depth or not batch.pending:
        return
    flush_pending()


def flush_pending() -> None:
    """Flush every connection that asked to be (the outermost read ended)."""
    batch = BATCH
    pending, batch.pending = batch.pending, []
    for protocol in pending:
        protocol.flush_queued = False
        try:
            protocol.flush()
        except Exception:  # noqa: BLE001 (one connection's failure must not keep the others' bytes)
            _log.failure("Flushing {protocol!r} failed", protocol=protocol)


def flush_soon(protocol: Any) -> None:
    """Flush `protocol` (it has `flush()` and a `flush_queued` flag) at the end of the current
    read, or now when no read is in progress."""
    batch = BATCH
    if not batch.depth:
        protocol.flush()
    elif not protocol.flush_queued:
        protocol.flush_queued = True
        batch.pending.append(protocol)
