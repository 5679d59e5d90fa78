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

from flexgw.testing.memory import connect_client, connect_upstream, memory_factory

REQUEST = b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def main(n: int) -> None:
    """Proxy `n` requests (after one that opens the upstream connection)."""
    factory = memory_factory()  # one API, one route, a plan built in code
    reactor = factory.reactor
    front, down = connect_client(factory)
    front.dataReceived(REQUEST)
    conn, up = connect_upstream(reactor)
    conn.dataReceived(RESPONSE)
    for _ in range(n):
        front.dataReceived(REQUEST)
        conn.dataReceived(RESPONSE)
        down.clear()
        up.clear()
    if len(reactor.tcpClients) != 1:
        raise SystemExit("the upstream connection was not reused")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
