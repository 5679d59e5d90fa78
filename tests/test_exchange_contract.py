"""The exchange's written contract: its state enum, the read gate's hold reasons, the front
and observer interfaces and their implementations."""

from __future__ import annotations

import ast
import io
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from flexgw.config.logconf import compile_template
from flexgw.egress import front as egress_front
from flexgw.egress.front import ForwardProxyProtocol, IForwardProxyFront
from flexgw.http.gate import HELD, PIPELINE, Hold, ReadGate
from flexgw.ingress import exchange, upgrade
from flexgw.ingress.contract import IExchangeFront, IExchangeObserver
from flexgw.ingress.exchange import CHAIN_FINISH, ExchangeState
from flexgw.ingress.front import IngressFactory, IngressProtocol
from flexgw.ingress.h2front import H2Protocol, H2Stream
from flexgw.service.accesslog import AccessLog, TeeLog, TemplatedAccessLog
from flexgw.service.metrics import GatewayMetrics
from flexgw.testing.memory import memory_factory, one_api_listener

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
        self.assertEqual(len(set(ExchangeState)), 9)

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


def _front_uses(path: Path) -> dict[str, int]:
    """Attributes read on `front` / `self.front` in a module: name -> first line."""
    used: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if (isinstance(owner, ast.Name) and owner.id == "front") or (
            isinstance(owner, ast.Attribute) and owner.attr == "front"
        ):
            used.setdefault(node.attr, node.lineno)
    return used


class FrontContractTests(SynchronousTestCase):
    """Exchanges use only what IExchangeFront writes down; every front provides it."""

    def test_exchanges_use_only_the_written_contract(self) -> None:
        """The HTTP/1.1, upgrade and forward-proxy exchanges read nothing else from their front
        (the forward proxy's contract extends the base one)."""
        for module, contract in (
            (exchange, IExchangeFront),
            (upgrade, IExchangeFront),
            (egress_front, IForwardProxyFront),
        ):
            allowed = set(contract.names(all=True))
            path = Path(module.__file__)  # type: ignore[arg-type]
            extra = {n: line for n, line in _front_uses(path).items() if n not in allowed}
            self.assertEqual(extra, {}, path.name)

    def test_http1_front_provides_the_contract(self) -> None:
        """A connected IngressProtocol (and the forward proxy's) provides IExchangeFront."""
        for factory, contract in ((_factory(), IExchangeFront), (_factory(True), IForwardProxyFront)):
            front = factory.buildProtocol(None)
            front.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5)))
            front = getattr(front, "h1", front)
            self.assertTrue(verifyObject(contract, front))

    def test_h2_stream_provides_the_contract(self) -> None:
        """An HTTP/2 stream provides IExchangeFront."""
        factory = _factory()
        h1 = IngressProtocol(factory)
        h1.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5)))
        protocol = H2Protocol(factory, h1)
        stream = H2Stream(protocol, 1)
        self.assertTrue(verifyObject(IExchangeFront, stream))

    def test_h2_stream_is_not_its_own_transport(self) -> None:
        """The consumer an HTTP/2 exchange registers its upstream on is a separate IConsumer,
        and a stream routes with the listener factory's route, as the HTTP/1.1 front does."""
        factory = _factory()
        h1 = IngressProtocol(factory)
        h1.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5)))
        stream = H2Stream(H2Protocol(factory, h1), 1)
        self.assertIsNot(stream.transport, stream)
        self.assertTrue(verifyObject(IConsumer, stream.transport))
        self.assertEqual(stream.route, factory.route)
        self.assertEqual(h1.route, factory.route)


class ObserverContractTests(SynchronousTestCase):
    """Every observer of finished exchanges provides IExchangeObserver."""

    def test_observers(self) -> None:
        """The chain's on_done, the access logs and the metrics."""
        log = AccessLog(Clock(), io.BytesIO())
        observers = [
            CHAIN_FINISH,
            log,
            TemplatedAccessLog(Clock(), io.BytesIO(), compile_template("{message}")),
            TeeLog([log]),
            GatewayMetrics(Clock()),
        ]
        for observer in observers:
            self.assertTrue(verifyObject(IExchangeObserver, observer), observer)

    def test_factory_reports_to_observers_in_order(self) -> None:
        """The chain's on_done first, then the access log, the metrics, then other observers;
        swapping the access log keeps the order."""
        extra = _Recorder()
        factory = _factory(observers=[extra])
        self.assertEqual(factory.observers, (CHAIN_FINISH, extra))
        log = AccessLog(Clock(), io.BytesIO())
        metrics = GatewayMetrics(Clock())
        factory.metrics = metrics
        factory.access_log = log
        self.assertEqual(factory.observers, (CHAIN_FINISH, log, metrics, extra))
        factory.access_log = factory.metrics = None
        self.assertEqual(factory.observers, (CHAIN_FINISH, extra))
        factory.tunnel_opened(None)  # type: ignore[arg-type]
        self.assertEqual(extra.calls, ["tunnel_opened"])


@implementer(IExchangeObserver)
class _Recorder:
    """An observer that records which method was called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def exchange_finished(self, exchange: object, listener: object) -> None:
        """Record."""
        self.calls.append("exchange_finished")

    def tunnel_opened(self, exchange: object, listener: object) -> None:
        """Record."""
        self.calls.append("tunnel_opened")

    def tunnel_closed(self, exchange: object, listener: object) -> None:
        """Record."""
        self.calls.append("tunnel_closed")

    def request_refused(self, peer: object, error: object, listener: object) -> None:
        """Record."""
        self.calls.append("request_refused")


def _factory(forward: bool = False, observers: list[Any] | None = None) -> IngressFactory:
    """An in-memory IngressFactory for a listener built in code (a forward proxy's if `forward`)."""
    return memory_factory(
        one_api_listener(forward_proxy=forward or None),
        observers=observers or (),
        forward_proxy=ForwardProxyProtocol,
    )
