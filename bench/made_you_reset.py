"""The HTTP/2 "MadeYouReset" attack (2025) against the gateway, one source tree after another.

Usage: python bench/made_you_reset.py [--pairs 50000] [--source DIR ...] [--json out.json]

For each `--source` (a flexgw source tree; default: this repository), in one run: starts a
recording HTTP/1.1 upstream (flexgw.testing.upstream, in this process) and `twistd flexgw` from
that tree (PYTHONPATH) on bench/run.py's one-API conf, warms it up, then opens one h2c
connection that sends, per odd stream id, HEADERS (END_STREAM|END_HEADERS, `GET /a/x`) and DATA
(no flags, 1 byte) on the now half-closed stream, all in one write (flexgw.testing.h2's
`made_you_reset`). Meanwhile a well-behaved HTTP/1.1 client sends one request every 100 ms.

Reported per source: time from the write to the GOAWAY (none: the gateway never sent one), to
the last frame the attacker received (how long the gateway was busy answering), frames received
(RST_STREAM count), upstream connections opened (and most open at once, sampled every 20 ms),
request heads that reached the upstream, the slowest well-behaved request, and the gateway's
VmRSS before the attack and after it (after a quiet second), with its peak (VmHWM). The attack
ends at the GOAWAY, at a quiet second with no frame for the attacker, or at `--timeout`.

To compare with an earlier version, export its tree and pass both:

    git archive <commit> | (mkdir /tmp/before && tar -x -C /tmp/before)
    .venv/bin/python bench/made_you_reset.py --source /tmp/before --source .
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hyperframe.frame import RstStreamFrame
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this tree's flexgw

from idle_rss import rss_kib  # (bench/idle_rss.py: VmRSS and VmHWM from /proc)
from run import GATEWAY_CONF, HOST, free_port  # (bench/run.py)

from flexgw.testing import client
from flexgw.testing.h2 import RawH2Client, made_you_reset
from flexgw.testing.upstream import RecordingUpstream, fixed

REPO = Path(__file__).resolve().parent.parent
PROBE = b"GET /probe HTTP/1.1\r\nHost: bench\r\n\r\n"


async def wait_listening(reactor: Any, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Until the gateway answers a request (bounded: 20 s)."""
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}")
        try:
            await client.request(reactor, HOST, port, PROBE)
            return
        except ConnectError:
            await task.deferLater(reactor, 0.1)
    raise SystemExit(f"the gateway did not answer on {port} within 20 s")


def start_gateway(source: Path, conf: Path) -> subprocess.Popen[bytes]:
    """`twistd flexgw` on `conf`, from the flexgw of `source`, without access log or admin."""
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "flexgw", "--conf", str(conf), "--access-log", "/dev/null", "--admin", "off"],
        env=dict(os.environ, PYTHONPATH=str(source)),
        cwd=str(source),  # `python -c` puts the working directory first on sys.path
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure(reactor: Any, source: Path, pairs: int, timeout: float, tmp: Path) -> dict[str, Any]:
    """One gateway from `source` under the attack; its figures."""
    upstream = RecordingUpstream(fixed(200, body=b"ok\n"), reactor=reactor, retain_bodies=False)
    upstream.listen(reactor)
    port = free_port()
    conf = tmp / f"conf-{port}"
    conf.mkdir()
    (conf / "bench.yaml").write_text(
        GATEWAY_CONF.format(host=HOST, port=port, upstream_port=upstream.address[1])
    )
    gateway = start_gateway(source, conf)
    attacker = RawH2Client()
    try:
        await wait_listening(reactor, port, gateway)
        for _ in range(20):
            await client.request(reactor, HOST, port, PROBE)
        await task.deferLater(reactor, 1.0)  # settle (a benchmark, not a test)
        rss_before = rss_kib(gateway.pid)
        connections0 = len(upstream.connections)
        most_open = [0]

        def sample() -> None:
            most_open[0] = max(most_open[0], len(upstream.open_connections()))

        sampler = task.LoopingCall(sample)
        sampler.clock = reactor
        sampler.start(0.02)
        attack = made_you_reset(pairs, path=b"/a/x")
        await connectProtocol(TCP4ClientEndpoint(reactor, HOST, port, timeout=5), attacker)
        start = time.monotonic()
        attacker.transport.write(attack)
        goaway_at: list[float] = []
        attacker.goaway_received.addCallback(
            lambda frame: goaway_at.extend((time.monotonic() - start, frame.error_code))
        )
        last_frame = [start]
        frames_seen = [0]
        slowest = [0.0]

        async def probe() -> None:
            began = time.monotonic()
            await client.request(reactor, HOST, port, PROBE)
            slowest[0] = max(slowest[0], time.monotonic() - began)

        while time.monotonic() - start < timeout:
            await probe()
            await task.deferLater(reactor, 0.1)
            if len(attacker.frames) != frames_seen[0]:
                frames_seen[0] = len(attacker.frames)
                last_frame[0] = time.monotonic()
            if attacker.lost.called or time.monotonic() - last_frame[0] > 1.0:
                break
        sampler.stop()
        if not attacker.lost.called:
            attacker.transport.abortConnection()
        await task.deferLater(reactor, 1.0)
        rss_after = rss_kib(gateway.pid)
        return {
            "source": str(source),
            "pairs": pairs,
            "goaway_s": round(goaway_at[0], 3) if goaway_at else None,
            "goaway_code": goaway_at[1] if goaway_at else None,
            "busy_s": round(last_frame[0] - start, 3),
            "frames_received": len(attacker.frames),
            "rst_stream_received": attacker.count(RstStreamFrame),
            "upstream_connections_opened": len(upstream.connections) - connections0,
            "upstream_connections_most_open": most_open[0],
            "upstream_heads": sum(1 for r in upstream.received if r.target == b"/a/x"),
            "slowest_other_request_s": round(slowest[0], 3),
            "rss_before_kib": rss_before["VmRSS"],
            "rss_after_kib": rss_after["VmRSS"],
            "rss_peak_kib": rss_after["VmHWM"],
        }
    finally:
        gateway.terminate()
        try:
            gateway.wait(5)
        except subprocess.TimeoutExpired:
            gateway.kill()
        await upstream.stop()


async def main(reactor: Any, argv: list[str]) -> None:
    """Measure each source in turn; print a table (and the JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50000, help="streams in the attack (default 50000)")
    parser.add_argument("--source", action="append", help="a flexgw source tree (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest attack (s, default 60)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    sources = [Path(s).resolve() for s in (args.source or [str(REPO)])]
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-myr-"))
    results = []
    try:
        for source in sources:
            results.append(await measure(reactor, source, args.pairs, args.timeout, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [k for k in results[0] if k not in ("source", "pairs")]
    print(f"MadeYouReset, {args.pairs} streams in one write")
    print(f"{'':32}" + "".join(f"{Path(r['source']).name[:18]:>20}" for r in results))
    for key in keys:
        print(f"{key:32}" + "".join(f"{r[key]!s:>20}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
