"""The --policies chain's hot path in memory, for callgrind instruction counts (see hotpath.py).

The same `bench` ApiInstance and four PolicyBindings as `bench/run.py --policies` (basic auth,
rate limiting, header injection, message logging), compiled by the config pipeline from a
temporary directory, then N keep-alive GETs (with the basic auth header) through one
IngressProtocol to one pooled upstream connection on StringTransports and a memory reactor.
It uses only APIs older trees have too, so two trees can be compared run for run:

    PYTHONHASHSEED=0 PYTHONPATH=<tree> valgrind --tool=callgrind --callgrind-out-file=/tmp/p \\
        .venv/bin/python bench/hotpath_policies.py 1000
    (same with 3000; per request = (Ir at 3000 - Ir at 1000) / 2000)
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from flexgw.config.pipeline import load_config
from flexgw.ingress.front import IngressFactory
from flexgw.policies import registry
from flexgw.upstream.manager import PoolManager

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
assert _spec is not None and _spec.loader is not None
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def main(n: int) -> None:
    """Proxy `n` requests through the policy chain (after one that opens the upstream)."""
    bindings, _, missing = run.policy_bindings(set(registry.names()))
    if missing:
        raise SystemExit(f"policy kinds not registered: {missing}")
    with tempfile.TemporaryDirectory() as root:
        api = run.GATEWAY_CONF.format(host="127.0.0.1", port=8000, upstream_port=9000)
        (Path(root) / "bench.yaml").write_text(api + bindings)
        plan = load_config([root], {}).plan
    request = (
        b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n"
        b"Authorization: " + run.basic_auth_header().encode("ascii") + b"\r\n\r\n"
    )
    reactor = MemoryReactorClock()
    pools = PoolManager(reactor, reactor)
    factory = IngressFactory(
        reactor, reactor, plan.listeners[0], plan.http, plan.timeouts, pools, None
    )
    front = factory.buildProtocol(None)
    down = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))
    front.makeConnection(down)
    front.dataReceived(request)
    host, port, client_factory, _, _ = reactor.tcpClients[-1]
    conn = client_factory.buildProtocol(IPv4Address("TCP", host, port))
    up = StringTransport()
    conn.makeConnection(up)
    conn.dataReceived(RESPONSE)
    if b"x-bench: injected" not in up.value().lower():
        raise SystemExit("the policy chain did not run")
    for _ in range(n):
        front.dataReceived(request)
        conn.dataReceived(RESPONSE)
        down.clear()
        up.clear()
    if len(reactor.tcpClients) != 1:
        raise SystemExit("the upstream connection was not reused")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
