"""The cost of balancing, in instructions: N keep-alive GETs in memory (as bench/hotpath.py)
through a Service of one address, or of three (`spec.addresses`, round robin, one pooled
connection each), with the same driver loop for both, for callgrind:

    for mode in one three; do for n in 1000 3000; do
      PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/tmp/$mode-$n \\
          .venv/bin/python bench/hotpath_balancing.py $mode $n
    done; done
    (per request: (Ir at 3000 - Ir at 1000) / 2000 for each mode; compare the two)
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from bench.hotpath import REQUEST, RESPONSE
from flexgw.plan import Api, Balancing, Destination, Endpoint, Listener, Route, Upstream
from flexgw.testing.memory import memory_factory


def listener(addresses: int) -> Listener:
    """One API routed to a Service of `addresses` addresses (127.0.0.1.. on port 9000)."""
    balancing = None
    if addresses > 1:
        balancing = Balancing(
            endpoints=tuple(Endpoint(f"127.0.0.{i + 1}", 9000) for i in range(addresses))
        )
    upstream = Upstream(
        key="default/backend", scheme="http", host="127.0.0.1", port=9000, balancing=balancing
    )
    route = Route(name="default", order=0, rules=(), destinations=(Destination(upstream=upstream),))
    api = Api(key="default/test-api", base_path="", routes=(route,))
    return Listener(scheme="http", host="127.0.0.1", port=8000, apis=(api,))


def main(mode: str, n: int) -> None:
    """Proxy `n` requests (after one per address, which connects it)."""
    addresses = {"one": 1, "three": 3}[mode]
    factory = memory_factory(listener(addresses))
    reactor: Any = factory.reactor
    front = factory.buildProtocol(None)
    down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    front.makeConnection(down)
    ups: list[tuple[Any, StringTransport]] = []
    for i in range(addresses):
        front.dataReceived(REQUEST)
        host, port, client_factory, _, _ = reactor.tcpClients[i]
        conn = client_factory.buildProtocol(IPv4Address("TCP", host, port))
        up = StringTransport()
        conn.makeConnection(up)
        conn.dataReceived(RESPONSE)
        up.clear()
        ups.append((conn, up))
    for _ in range(n):
        front.dataReceived(REQUEST)
        for conn, up in ups:
            if up.value():
                conn.dataReceived(RESPONSE)
                up.clear()
        down.clear()
    if len(reactor.tcpClients) != addresses:
        raise SystemExit("the upstream connections were not reused")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
