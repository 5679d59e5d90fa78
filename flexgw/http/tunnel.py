"""A byte tunnel: two connections joined as a relay (WebSocket and other upgrades, CONNECT).

Once a connection is upgraded (after a 101) or a CONNECT is established, HTTP is over: bytes
from each side go to the other as they are. The tunnel keeps the two directions flowing with
push-producer backpressure (a slow reader pauses reading on the other side; nothing buffers
without bound), closes the other side when either side closes (a half-close included: the
protocols on both sides see a FIN as the end of the connection), enforces an idle timeout (no
byte in either direction) and counts the bytes each way for the access log.

The tunnel does not own the protocols: each side's protocol hands it what it reads
(`from_downstream` / `from_upstream`) and tells it when its connection is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from flexgw.http.gate import BACKPRESSURE, ReadGate
from flexgw.http.wheel import TimingWheel

#: How a tunnel ended (`Tunnel.ended_by`).
DOWNSTREAM_CLOSED = "downstream_closed"
UPSTREAM_CLOSED = "upstream_closed"
IDLE_TIMEOUT = "stream_idle_timeout"


class Tunnel:
    """Relays bytes between a downstream and an upstream transport until either side closes."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        downstream: Any,
        downstream_gate: ReadGate,
        upstream: Any,
        upstream_gate: ReadGate,
        on_end: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.clock = clock
        self.wheel = TimingWheel.of(clock)  # the idle timeout
        self.idle_timeout = idle_timeout
        self.downstream = downstream
        self.upstream = upstream
        self.downstream_gate = downstream_gate
        self.upstream_gate = upstream_gate
        self.on_end = on_end
        self.bytes_up = 0  # downstream -> upstream
        self.bytes_down = 0  # upstream -> downstream
        self.ended_by: str | None = None
        self.last_activity = clock.seconds()
        self.timer: Any = None
        self.lost: set[str] = set()  # which sides' connections are gone

    def start(self, early_up: bytes = b"", early_down: bytes = b"") -> None:
        """Join the two sides: `early_up` / `early_down` are bytes each side sent before the
        switch (kept aside until the tunnel existed); they go first."""
        downstream, upstream = self.downstream, self.upstream
        # Whatever was registered for HTTP streaming no longer applies.
        _unregister(downstream)
        _unregister(upstream)
        # A full write buffer on one side pauses reading on the other.
        downstream.registerProducer(self.upstream_gate, True)
        upstream.registerProducer(self.downstream_gate, True)
        if early_up:
            self.from_downstream(early_up)
        if early_down:
            self.from_upstream(early_down)
        # Reading resumes on both sides unless a write buffer is already full.
        _release_all_but_backpressure(self.downstream_gate)
        _release_all_but_backpressure(self.upstream_gate)
        if self.ended_by is None:
            self.timer = self.wheel.call_later(self.idle_timeout, self._on_timer)

    @property
    def ended(self) -> bool:
        """True once either side closed (or the idle timeout fired)."""
        return self.ended_by is not None

    def from_downstream(self, data: bytes) -> None:
        """Bytes the client sent: to the upstream."""
        if self.ended_by is not None:
            return
        self.bytes_up += len(data)
        self.last_activity = self.clock.seconds()
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        """Bytes the upstream sent: to the client."""
        if self.ended_by is not None:
            return
        self.bytes_down += len(data)
        self.last_activity = self.clock.seconds()
        self.downstream.write(data)

    def downstream_lost(self) -> None:
        """The client closed (or half-closed, or reset): close the upstream after its writes."""
        self.lost.add("downstream")
        self._end(DOWNSTREAM_CLOSED)
        self._maybe_done()

    def upstream_lost(self) -> None:
        """The upstream closed: close the client after what is still buffered for it."""
        self.lost.add("upstream")
        self._end(UPSTREAM_CLOSED)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if len(self.lost) == 2 and self.timer is not None:
            timer, self.timer = self.timer, None
            if timer.active():
                timer.cancel()

    def _on_timer(self) -> None:
        self.timer = None
        if self.ended_by is not None:
            # Closing after an end: a side still open has not taken its last bytes within the
            # idle timeout (its peer stopped reading). Drop it.
            self._abort_remaining()
            return
        idle = self.clock.seconds() - self.last_activity
        if idle < self.idle_timeout:
            self.timer = self.wheel.call_later(self.idle_timeout - idle, self._on_timer)
            return
        self._end(IDLE_TIMEOUT, abort=True)

    def _abort_remaining(self) -> None:
        if "downstream" not in self.lost:
            self.downstream.abortConnection()
        if "upstream" not in self.lost:
            self.upstream.abortConnection()

    def _end(self, cause: str, abort: bool = False) -> None:
        if self.ended_by is not None:
            return
        self.ended_by = cause
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()
        _unregister(self.downstream)
        _unregister(self.upstream)
        if abort:
            self._abort_remaining()
        else:
            # Pending writes are flushed first; a peer that does not take them within the idle
            # timeout cannot hold its connection open (see _on_timer).
            self.downstream.loseConnection()
            self.upstream.loseConnection()
            if len(self.lost) < 2:
                self.timer = self.wheel.call_later(self.idle_timeout, self._on_timer)
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)


def _release_all_but_backpressure(gate: ReadGate) -> None:
    """Drop every hold reason on `gate` except the consumer's backpressure."""
    others = gate.reasons & ~BACKPRESSURE
    if others:
        gate.release(others)


def _unregister(transport: Any) -> None:
    """Unregister the transport's producer, if it has one (some transports insist)."""
    try:
        transport.unregisterProducer()
    except RuntimeError:
        pass
