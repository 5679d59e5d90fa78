"""The plain HTTP/1.1 hot path in memory, for instruction counts under callgrind.

N keep-alive GETs go through one IngressProtocol to one pooled upstream connection
(StringTransports, a memory reactor: no sockets, no wrk, no other process), so the count per
request is deterministic enough to compare two trees on a busy machine, where wrk figures are
not. Per-request cost = (Ir at N2 - Ir at N1) / (N2 - N1), e.g.:

    PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/tmp/a \\
        .venv/bin/python bench/hotpath.py 1000
    (same with 5000; compare the "Collected" totals)
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

REQUEST = b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def drive(factory: Any, request: bytes, n: int) -> bytes:
    """Proxy `n` requests through `factory`'s protocol (after one that opens the upstream
    connection); returns what the upstream received for the first. Twisted APIs only, so that
    hotpath_policies.py can count older trees with it."""
    reactor = factory.reactor
    front = factory.buildProtocol(None)
    down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    front.makeConnection(down)
    front.dataReceived(request)
    host, port, client_factory, _, _ = reactor.tcpClients[-1]
    conn = client_factory.buildProtocol(IPv4Address("TCP", host, port))
    up = StringTransport()
    conn.makeConnection(up)
    conn.dataReceived(RESPONSE)
    first = up.value()
    for _ in range(n):
        front.dataReceived(request)
        conn.dataReceived(RESPONSE)
        down.clear()
        up.clear()
    if len(reactor.tcpClients) != 1:
        raise SystemExit("the upstream connection was not reused")
    return first


def main(n: int) -> None:
    """Proxy `n` requests through a one-API listener whose plan is built in code."""
    from flexgw.testing.memory import memory_factory  # (not in older trees: see drive)

    drive(memory_factory(), REQUEST, n)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
