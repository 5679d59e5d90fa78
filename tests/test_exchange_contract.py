"""The exchange's written contract: its state enum, the read gate's hold reasons."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.gate import HELD, PIPELINE, Hold, ReadGate
from flexgw.ingress import exchange
from flexgw.ingress.exchange import ExchangeState

PACKAGE = Path(exchange.__file__).parents[1]
STATE_NAMES = {state.name for state in ExchangeState}


def _state_assignments(tree: ast.AST) -> list[int]:
    """Lines assigning an ExchangeState (by alias or by member) to some `.state`."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        value = node.value
        name = value.id if isinstance(value, ast.Name) else getattr(value, "attr", None)
        if name not in STATE_NAMES:
            continue
        if any(isinstance(t, ast.Attribute) and t.attr == "state" for t in node.targets):
            lines.append(node.lineno)
    return lines


class ExchangeStateTests(SynchronousTestCase):
    """One enum, tunnel included, with no order, assigned only by the exchange module."""

    def test_tunnel_is_a_state(self) -> None:
        """The tunnel state is the enum's, not an int of the upgrade module."""
        self.assertIs(exchange.TUNNEL, ExchangeState.TUNNEL)
        self.assertEqual(len(set(ExchangeState)), 8)

    def test_states_have_no_order(self) -> None:
        """Comparing states by order is an error, not a silent int comparison."""
        with self.assertRaises(TypeError):
            _ = ExchangeState.WAITING < ExchangeState.SENDING  # type: ignore[operator]

    def test_only_the_exchange_module_assigns_states(self) -> None:
        """No module but ingress/exchange.py sets an exchange's state (others call its methods)."""
        own = Path(exchange.__file__)
        offenders = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if path == own:
                continue
            for line in _state_assignments(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
        self.assertEqual(offenders, [])
        self.assertTrue(_state_assignments(ast.parse(own.read_text())))


class ReadGateTests(SynchronousTestCase):
    """A ReadGate pauses its transport while any Hold reason is set."""

    def test_resumes_when_the_last_reason_goes(self) -> None:
        """Two reasons: reading resumes only once both are released; Hold names them."""
        transport = StringTransport()
        gate = ReadGate(transport)
        gate.hold(HELD)
        gate.hold(PIPELINE)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(Hold(gate.reasons), Hold.HELD | Hold.PIPELINE)
        gate.release(HELD)
        self.assertEqual(transport.producerState, "paused")
        gate.release(Hold.PIPELINE)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(gate.reasons, 0)
