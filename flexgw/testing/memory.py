"""An ingress listener in memory, for unit tests and benchmarks of the data path.

The plan is built in code (no YAML, no compiler), the reactor is a MemoryReactorClock and both
sides of the proxy are StringTransports: a test drives the HTTP/1.1 state machine byte by byte,
completes upstream connections by hand and moves the clock, with no socket and no file.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from flexgw.ingress.front import IngressFactory
from flexgw.plan import Api, Destination, HttpSettings, Listener, Route, Timeouts, Upstream
from flexgw.upstream.manager import PoolManager


def one_api_listener(
    port: int = 8000, upstream_port: int = 9000, forward_proxy: Any = None, scheme: str = "http"
) -> Listener:
    """http://127.0.0.1:port serving one API whose one route goes to
    `scheme`://127.0.0.1:upstream_port (a forward-proxy API when `forward_proxy` is given: its
    ForwardProxyConfig)."""
    upstream = Upstream(key="default/backend", scheme=scheme, host="127.0.0.1", port=upstream_port)
    route = Route(name="default", order=0, rules=(), destinations=(Destination(upstream=upstream),))
    api = Api(key="default/test-api", base_path="", routes=(route,), forward_proxy=forward_proxy)
    return Listener(scheme="http", host="127.0.0.1", port=port, apis=(api,))


def memory_factory(
    listener: Listener | None = None,
    http: HttpSettings | None = None,
    timeouts: Timeouts | None = None,
    **options: Any,
) -> IngressFactory:
    """An IngressFactory on a fresh MemoryReactorClock (`factory.reactor`, also its clock) with
    its own PoolManager (`factory.pools`); `options` go to IngressFactory."""
    reactor = MemoryReactorClock()
    return IngressFactory(
        reactor,
        reactor,
        listener if listener is not None else one_api_listener(),
        http if http is not None else HttpSettings(),
        timeouts if timeouts is not None else Timeouts(),
        PoolManager(reactor, reactor),
        options.pop("access_log", None),
        **options,
    )


def connect_client(
    factory: IngressFactory, transport: StringTransport | None = None, host: str = "10.0.0.1"
) -> tuple[Any, StringTransport]:
    """Accept one client connection (from `host`): the factory's protocol and its transport."""
    if transport is None:
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 5555))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol, transport


def connect_upstream(
    reactor: MemoryReactorClock, transport: StringTransport | None = None
) -> tuple[Any, StringTransport]:
    """Complete the latest upstream connection attempt: its protocol and its transport."""
    host, port, client_factory, _, _ = reactor.tcpClients[-1]
    connection = client_factory.buildProtocol(IPv4Address("TCP", host, port))
    if transport is None:
        transport = StringTransport()
    connection.makeConnection(transport)
    return connection, transport
