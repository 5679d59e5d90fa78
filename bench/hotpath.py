"""The plain HTTP/1.1 hot path in memory, for instruction counts under callgrind.

N keep-alive GETs go through one IngressProtocol to one pooled upstream connection
(StringTransports, a memory reactor: no sockets, no wrk, no other process), so the count per
request is deterministic enough to compare two trees on a busy machine, where wrk figures are
not. Per-request cost = (Ir at N2 - Ir at N1) / (N2 - N1), e.g.:

    PYTHONHASHSEED=0 PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/tmp/a \\
        .venv/bin/python bench/hotpath.py 1000
    (same with 5000; compare the "Collected" totals)

The requests after the first run through `measured` (operator.call), so callgrind can count
them alone (`--collect-atstart=no --toggle-collect=_operator_call`): `instructions()` does that
in a child process, one run per figure (bench/hotpath_policies.py --callgrind uses it).

`--tracing 100` (or `0`) samples the API's requests at that percentage, with the gateway's
Tracer observing the exchanges and every trace encoded as OTLP in batches of 512 (the export
itself answered at once): the tracing cost of the data path and the encoder, without the
collector's network round trips (bench/gateway_instructions.py --tracing counts those too).
`--profile` prints cProfile's top functions instead (where the time goes, not how much).
"""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
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

    def loop() -> None:
        for _ in range(n):
            front.dataReceived(request)
            conn.dataReceived(RESPONSE)
            down.clear()
            up.clear()

    measured(loop)
    if len(reactor.tcpClients) != 1:
        raise SystemExit("the upstream connection was not reused")
    return first


def measured(loop: Callable[[], None]) -> None:
    """Run the measured requests through `operator.call`, which nothing else in flexgw or
    Twisted calls: under `valgrind --tool=callgrind --collect-atstart=no
    --toggle-collect=_operator_call` only they are counted (see `instructions`)."""
    if os.environ.get("FLEXGW_CALLGRIND_INSTRUMENT"):
        # started with --instr-atstart=no: instrument from here (set-up ran at full speed)
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
    operator.call(loop)


def instructions(script: Path, n: int, args: Sequence[str] = (), tree: str | None = None) -> int:
    """Instructions per request of `script n *args` (a bench script whose requests run through
    `measured`), counted by callgrind in a child process with `tree` (default: this one) first
    on the import path. Start-up and set-up are not counted, so one run of n requests is enough."""
    tree = tree or str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="flexgw-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                "--toggle-collect=_operator_call", f"--callgrind-out-file={out}",
                sys.executable, str(script), str(n), *args,
            ],
            env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": tree, "FLEXGW_CALLGRIND_INSTRUMENT": "1"},
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"callgrind run failed:\n{done.stderr[-3000:]}")
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1]) // n
    raise SystemExit("callgrind wrote no totals")


def traced_factory(percent: float) -> Any:
    """A one-API factory whose API samples `percent` of requests, observed by a Tracer whose
    exporter encodes every batch of 512 spans (and sends it nowhere)."""
    import attrs
    from twisted.internet.defer import succeed

    from flexgw.http.tracecontext import Sampler
    from flexgw.plan import TracingSettings
    from flexgw.service.tracing import SpanExporter, Tracer
    from flexgw.testing.memory import memory_factory, one_api_listener

    listener = one_api_listener()
    api = attrs.evolve(listener.apis[0], tracing=Sampler(overall=percent))
    factory = memory_factory(attrs.evolve(listener, apis=(api,)))
    settings = TracingSettings("h2c://127.0.0.1:4317", "grpc", max_queue=1 << 20, max_batch=512)
    exporter = SpanExporter(factory.reactor, settings, lambda body: succeed(None))
    factory.set_observers([Tracer(factory.reactor, exporter)])

    def flush_full_batches(*trace: Any, offer: Any = exporter.offer) -> None:
        offer(*trace)
        if exporter.queued >= settings.max_batch:
            exporter.flush()

    exporter.offer = flush_full_batches  # type: ignore[method-assign]
    return factory


def main(n: int, tracing: str | None = None, profile: bool = False) -> None:
    """Proxy `n` requests through a one-API listener whose plan is built in code."""
    from flexgw.testing.memory import memory_factory  # (not in older trees: see drive)

    factory = memory_factory() if tracing is None else traced_factory(float(tracing))
    if not profile:
        drive(factory, REQUEST, n)
        return
    import cProfile
    import pstats

    cProfile.runctx("drive(factory, REQUEST, n)", globals(), {"factory": factory, "n": n}, "/tmp/hotpath.prof")
    pstats.Stats("/tmp/hotpath.prof").sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--tracing", choices=("0", "100"), help="sampling percentage of a traced API")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()
    main(args.n, args.tracing, args.profile)
