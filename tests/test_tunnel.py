"""Unit tests of the byte tunnel: relay, backpressure both ways, close propagation, idle timeout."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http import tunnel as tunnel_module
from flexgw.http.gate import BACKPRESSURE, HELD, ReadGate
from flexgw.http.tunnel import Tunnel


class _Transport(StringTransport):
    """A StringTransport that records loseConnection and abortConnection separately."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        """Record the abort."""
        self.aborted = True
        self.disconnecting = True


class TunnelTests(SynchronousTestCase):
    """A Tunnel between two in-memory transports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.down = _Transport()
        self.up = _Transport()
        self.down_gate = ReadGate(self.down)
        self.up_gate = ReadGate(self.up)
        self.ended: list[Tunnel] = []
        self.tunnel = Tunnel(
            self.clock, 10.0, self.down, self.down_gate, self.up, self.up_gate, self.ended.append
        )

    def test_relays_both_ways_and_counts(self) -> None:
        """Bytes go to the other side as they are, early bytes first, counted per direction."""
        self.tunnel.start(early_up=b"early-up", early_down=b"early-down")
        self.tunnel.from_downstream(b"ping")
        self.tunnel.from_upstream(b"pong!")
        self.assertEqual(self.up.value(), b"early-upping")
        self.assertEqual(self.down.value(), b"early-downpong!")
        self.assertEqual((self.tunnel.bytes_up, self.tunnel.bytes_down), (12, 15))

    def test_start_releases_holds_but_not_backpressure(self) -> None:
        """Reasons the HTTP phase held reading for are dropped; a full buffer still pauses."""
        self.down_gate.hold(HELD)
        self.up_gate.hold(HELD | BACKPRESSURE)
        self.tunnel.start()
        self.assertEqual(self.down.producerState, "producing")
        self.assertEqual(self.up_gate.reasons, BACKPRESSURE)
        self.assertEqual(self.up.producerState, "paused")

    def test_backpressure_each_way(self) -> None:
        """A side whose write buffer is full pauses reading on the other side, and resumes it."""
        self.tunnel.start()
        self.assertIs(self.down.producer, self.up_gate)
        self.assertIs(self.up.producer, self.down_gate)
        self.down.producer.pauseProducing()  # the client's buffer is full
        self.assertEqual(self.up.producerState, "paused")
        self.assertEqual(self.down.producerState, "producing")
        self.down.producer.resumeProducing()
        self.assertEqual(self.up.producerState, "producing")
        self.up.producer.pauseProducing()  # the upstream's buffer is full
        self.assertEqual(self.down.producerState, "paused")

    def test_downstream_close_closes_upstream(self) -> None:
        """The client closing closes the upstream (after its writes) and ends the tunnel once."""
        self.tunnel.start()
        self.tunnel.downstream_lost()
        self.assertTrue(self.up.disconnecting)
        self.assertFalse(self.up.aborted)
        self.assertEqual(self.tunnel.ended_by, tunnel_module.DOWNSTREAM_CLOSED)
        self.assertEqual(self.ended, [self.tunnel])
        self.tunnel.upstream_lost()
        self.assertEqual(self.ended, [self.tunnel])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.tunnel.from_downstream(b"late")
        self.assertEqual(self.up.value(), b"")

    def test_upstream_close_closes_downstream(self) -> None:
        """The upstream closing closes the client connection."""
        self.tunnel.start()
        self.tunnel.upstream_lost()
        self.assertTrue(self.down.disconnecting)
        self.assertEqual(self.tunnel.ended_by, tunnel_module.UPSTREAM_CLOSED)

    def test_side_not_taking_last_bytes_is_aborted(self) -> None:
        """After one side closed, the other one gets the idle timeout to go, then is aborted."""
        self.tunnel.start()
        self.tunnel.upstream_lost()
        self.clock.advance(9.9)
        self.assertFalse(self.down.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.down.aborted)
        self.assertFalse(self.up.aborted)

    def test_idle_timeout(self) -> None:
        """No byte either way for the idle timeout aborts both sides; activity postpones it."""
        self.tunnel.start()
        self.clock.advance(6)
        self.tunnel.from_upstream(b"x")
        self.clock.advance(6)
        self.assertIsNone(self.tunnel.ended_by)
        self.clock.advance(4.1)
        self.assertEqual(self.tunnel.ended_by, tunnel_module.IDLE_TIMEOUT)
        self.assertTrue(self.down.aborted and self.up.aborted)
        self.assertEqual(self.ended, [self.tunnel])
