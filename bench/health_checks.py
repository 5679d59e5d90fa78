"""What active health checks cost: one Service of N addresses (default 1,000), each checked
every second over HTTP/1.1 (kept-alive check connections), against nginx listening on N
loopback ports; reports the checking process's CPU share (target: under 5 % of one core for
1,000 addresses every second) and the checks done per second.

Usage: python bench/health_checks.py [--addresses 1000] [--interval 1] [--duration 10]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import NGINX_UPSTREAM_CONF, nginx_argv, write_nginx


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; print (and with --json write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--first-port", type=int, default=15000, help="below the ephemeral range")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not shutil.which("nginx"):
        print("nginx is not installed", file=sys.stderr)
        return 2

    from twisted.internet import reactor

    from flexgw.plan import Balancing, Endpoint, Upstream
    from flexgw.upstream.health import HealthPolicy
    from flexgw.upstream.manager import PoolManager

    tmp = Path(tempfile.mkdtemp(prefix="flexgw-health-bench-"))
    ports = range(args.first_port, args.first_port + args.addresses)
    # run.py's upstream nginx, listening on every port
    listen = "        listen {host}:{port} backlog=4096;\n"
    template = NGINX_UPSTREAM_CONF.replace(
        listen, "".join(f"        listen {{host}}:{p};\n" for p in ports)
    )
    conf = write_nginx(tmp, "upstream-nginx", template)
    nginx = subprocess.Popen(nginx_argv(conf))
    try:
        time.sleep(1.0)  # nginx binds its listeners (a benchmark, not a test)
        if nginx.poll() is not None:
            print("nginx failed to start", file=sys.stderr)
            return 1
        upstream = Upstream(
            key="bench/many",
            scheme="http",
            host="127.0.0.1",
            port=args.first_port,
            balancing=Balancing(endpoints=tuple(Endpoint("127.0.0.1", p) for p in ports)),
            health=HealthPolicy(path="/health", interval=args.interval, timeout=min(1.0, args.interval)),
        )
        manager = PoolManager(reactor, reactor)  # type: ignore[arg-type]
        manager.configure(manager.http, manager.timeouts, {upstream})
        cluster = manager.clusters[upstream]
        checker = cluster.health
        result: dict[str, float] = {}

        def start_measuring() -> None:
            result["cpu0"], result["wall0"] = time.process_time(), time.monotonic()
            result["checks0"] = checker.checks_run
            reactor.callLater(args.duration, stop_measuring)

        def stop_measuring() -> None:
            cpu = time.process_time() - result["cpu0"]
            wall = time.monotonic() - result["wall0"]
            result["cpu_share"] = cpu / wall
            result["checks_per_s"] = (checker.checks_run - result["checks0"]) / wall
            result["healthy"] = sum(1 for m in cluster.members.values() if m.healthy)
            reactor.stop()

        reactor.callLater(args.warmup, start_measuring)
        reactor.run()
    finally:
        nginx.terminate()
        nginx.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        "addresses": args.addresses,
        "interval_s": args.interval,
        "checks_per_s": round(result["checks_per_s"], 1),
        "cpu_share_of_one_core": round(result["cpu_share"], 4),
        "healthy_addresses": result["healthy"],
        "cpu_us_per_check": round(result["cpu_share"] / result["checks_per_s"] * 1e6, 1),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(figures, indent=2))
    print(
        f"{args.addresses} addresses every {args.interval:g}s: {figures['checks_per_s']} checks/s,"
        f" {100 * figures['cpu_share_of_one_core']:.2f} % of one core (target < 5 %)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
