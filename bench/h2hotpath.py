"""The HTTP/2 hot path in memory: CPU per request of h1→h1, h2c→h1 and h2c→h2c through one
listener, measured in one run, with a profile breakdown by package.

All client and upstream bytes are made before the clock starts (raw frames, HPACK encoded in
order), so only the gateway is measured: the client sends `--streams` requests per read (as
h2load -m does), the upstream answers each read's requests in one read. No socket, no other
process: the figures hold on a busy machine, where h2load's do not.

    .venv/bin/python bench/h2hotpath.py 20000            # µs per request and the ratios
    .venv/bin/python bench/h2hotpath.py 20000 --profile  # plus where the time goes (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import hpack
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.testing import StringTransport

from flexgw.testing.memory import connect_client, memory_factory, one_api_listener

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST_FIELDS = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"example.test"),
    (b":path", b"/items"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
    (b"accept", b"*/*"),
]
H1_REQUEST = b"GET /items HTTP/1.1\r\nHost: example.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
H1_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nhello\n"
RESPONSE_FIELDS = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"6")]


def factory_for(scheme: str) -> Any:
    """A one-API listener whose Service is `scheme`://127.0.0.1:9000."""
    return memory_factory(one_api_listener(scheme=scheme))


def client_reads(batches: int, streams: int) -> list[bytes]:
    """The client's bytes: the preface (SETTINGS, ACK, a big connection window) in the first
    read, then `streams` HEADERS (END_STREAM) per read."""
    encoder = hpack.Encoder()
    head = (
        PREFACE
        + SettingsFrame(0).serialize()
        + SettingsFrame(0, flags=["ACK"]).serialize()
        + WindowUpdateFrame(0, window_increment=2**30).serialize()
    )
    reads = []
    stream_id = 1
    for _ in range(batches):
        frames = []
        for _ in range(streams):
            block = encoder.encode(REQUEST_FIELDS)
            frames.append(HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
            stream_id += 2
        reads.append(b"".join(frames))
    reads[0] = head + reads[0]
    return reads


def upstream_reads(batches: int, streams: int) -> list[bytes]:
    """An h2c upstream's bytes: SETTINGS (and the ACK of the gateway's) with the first answers,
    then one read answering each batch of streams (HEADERS, then DATA with END_STREAM)."""
    encoder = hpack.Encoder()
    reads = []
    stream_id = 1
    for _ in range(batches):
        frames = []
        for _ in range(streams):
            frames.append(HeadersFrame(stream_id, encoder.encode(RESPONSE_FIELDS), flags=["END_HEADERS"]).serialize())
            frames.append(DataFrame(stream_id, b"hello\n", flags=["END_STREAM"]).serialize())
            stream_id += 2
        reads.append(b"".join(frames))
    return reads


def run_h1(n: int, profiler: Any = None) -> float:
    """Seconds of CPU for `n` keep-alive HTTP/1.1 requests to an HTTP/1.1 upstream."""
    factory = factory_for("http")
    front, down = connect_client(factory)
    front.dataReceived(H1_REQUEST)
    up_conn = _connect(factory)
    up_conn.dataReceived(H1_RESPONSE)
    if profiler is not None:
        profiler.enable()
    start = time.process_time()
    for _ in range(n):
        front.dataReceived(H1_REQUEST)
        up_conn.dataReceived(H1_RESPONSE)
        down.clear()
        up_conn.transport.clear()
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
    return elapsed


def _connect(factory: Any, index: int = -1) -> Any:
    """Complete upstream connection attempt `index` (the latest by default)."""
    from twisted.internet.address import IPv4Address

    host, port, client_factory, _, _ = factory.reactor.tcpClients[index]
    conn = client_factory.buildProtocol(IPv4Address("TCP", host, port))
    conn.makeConnection(StringTransport())
    return conn


def run_h2(n: int, streams: int, upstream: str, profiler: Any = None) -> float:
    """Seconds of CPU for `n` h2c requests, `streams` per read, to an `upstream` ("h1" or
    "h2c") upstream; `profiler` runs during the measured loop only."""
    batches = n // streams
    reads = client_reads(batches + 1, streams)
    factory = factory_for("h2c" if upstream == "h2c" else "http")
    front, down = connect_client(factory)
    if upstream == "h2c":
        answers = upstream_reads(batches + 1, streams)
        front.dataReceived(reads[0])
        conn = _connect(factory)
        conn.dataReceived(SettingsFrame(0, settings={3: 1000}).serialize() + SettingsFrame(0, flags=["ACK"]).serialize())
        conn.dataReceived(answers[0])
        down.clear()
        conn.transport.clear()
        if profiler is not None:
            profiler.enable()
        start = time.process_time()
        for i in range(1, batches + 1):
            front.dataReceived(reads[i])
            conn.dataReceived(answers[i])
            down.clear()
            conn.transport.clear()
        elapsed = time.process_time() - start
        if profiler is not None:
            profiler.disable()
        if len(factory.reactor.tcpClients) != 1 or len(down.value()):
            raise SystemExit("unexpected upstream connections")
        return elapsed
    # HTTP/1.1 upstream: one pooled connection per concurrent stream
    conns: list[Any] = []

    def answer_all() -> None:
        while len(conns) < len(factory.reactor.tcpClients):
            conns.append(_connect(factory, len(conns)))
        for conn in conns:
            if conn.transport.value():
                conn.transport.clear()
                conn.dataReceived(H1_RESPONSE)

    front.dataReceived(reads[0])
    answer_all()
    down.clear()
    if profiler is not None:
        profiler.enable()
    start = time.process_time()
    for i in range(1, batches + 1):
        front.dataReceived(reads[i])
        answer_all()
        down.clear()
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
    return elapsed




#: How a profiled function's file names its package.
_PACKAGES = (
    ("/flexgw/http/h2/", "flexgw HTTP/2 codec"),
    ("/site-packages/h2/", "h2 (state machine, events)"),
    ("/hpack/", "hpack"),
    ("/hyperframe/", "hyperframe"),
    ("/flexgw/", "flexgw"),
    ("/twisted/", "twisted"),
    ("httptools", "httptools"),
)


def breakdown(stats: pstats.Stats, requests: int) -> list[tuple[str, float]]:
    """Own time per package (µs per request), largest first."""
    groups: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = next((label for part, label in _PACKAGES if part in filename), "other (builtins, enum, stdlib)")
        groups[key] = groups.get(key, 0.0) + tottime
    return sorted(((k, v / requests * 1e6) for k, v in groups.items()), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> None:
    """Measure (and optionally profile) the three paths in one run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=20000)
    parser.add_argument("--streams", type=int, default=10, help="requests per client read (h2load -m)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown per path")
    parser.add_argument("--top", type=int, default=0, help="with --profile: also the N costliest functions")
    args = parser.parse_args(argv)
    n = args.n
    runs = {
        "h1->h1": lambda profiler=None: run_h1(n, profiler),
        "h2c->h1": lambda profiler=None: run_h2(n, args.streams, "h1", profiler),
        "h2c->h2c": lambda profiler=None: run_h2(n, args.streams, "h2c", profiler),
    }
    results = {}
    for name, run in runs.items():
        run()  # warm-up (imports, caches)
        results[name] = min(run() for _ in range(3)) / n * 1e6
    h1 = results["h1->h1"]
    for name, us in results.items():
        print(f"{name:9} {us:7.1f} µs/request  ({h1 / us:.2f} of h1->h1 req/s at equal CPU)")
    if args.profile:
        for name, run in runs.items():
            profiler = cProfile.Profile(time.process_time)
            run(profiler)
            stats = pstats.Stats(profiler)
            print(f"\n{name}: own time per package (cProfile, µs per request; cProfile inflates calls)")
            for key, us in breakdown(stats, n):
                print(f"  {key:32} {us:7.1f}")
            if args.top:
                stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
