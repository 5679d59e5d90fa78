"""Read gates: why a connection's reading is paused (one Hold flag set), and the gate itself.

Every reason to stop reading a connection is one bit of `Hold`: the consumer's backpressure,
the proxy waiting for the other side, a pipelined request waiting its turn, an upgrade waiting
for the upstream's answer. A gate pauses its transport while any bit is set and resumes it when
the last one is released. `reasons` is kept as a plain int (IntFlag arithmetic costs
microseconds, and gates are held and released on every request): `Hold(gate.reasons)` reads it.
"""

from __future__ import annotations

import enum

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


class Hold(enum.IntFlag):
    """Why a connection's reading (or an HTTP/2 stream's acknowledgement) is held."""

    BACKPRESSURE = 1  # the consumer's write buffer is full (registered as its producer)
    HELD = 2  # the proxy waits for the other side (a policy's I/O, an upstream connection)
    PIPELINE = 4  # HTTP/1.1: a response is pending; further requests wait unread
    UPGRADING = 8  # HTTP/1.1: an upgrade (or CONNECT) waits for the upstream's answer


# Plain ints for the per-request paths (an IntFlag operation costs microseconds).
BACKPRESSURE = Hold.BACKPRESSURE.value
HELD = Hold.HELD.value
PIPELINE = Hold.PIPELINE.value
UPGRADING = Hold.UPGRADING.value
HELD_OR_BACKPRESSURE = HELD | BACKPRESSURE


@implementer(IPushProducer)
class ReadGate:
    """Pauses a transport's reading while any reason holds; registered as a producer elsewhere.

    Several reasons (the consumer's backpressure, the proxy waiting for the other side) can hold
    reading paused at once; the transport resumes only when none remains.
    """

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: object) -> None:
        self.transport = transport
        self.reasons = 0  # Hold bits, as an int

    def hold(self, reason: int) -> None:
        """Pause reading for `reason` (Hold bits)."""
        if not self.reasons:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.reasons |= reason

    def release(self, reason: int) -> None:
        """Drop `reason`; resume reading when no reason is left."""
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        """The consumer's buffer is full."""
        self.hold(BACKPRESSURE)

    def resumeProducing(self) -> None:
        """The consumer's buffer drained."""
        self.release(BACKPRESSURE)

    def stopProducing(self) -> None:
        """The consumer went away; connectionLost on each side does the cleanup."""
