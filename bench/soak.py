"""Soak: the gateway under steady load for a long time, RSS sampled from start to end.

Usage: python bench/soak.py [--minutes 10] [--policies] [--json out.json]

Starts the same upstream (nginx when installed, else flexgw.testing.upstream) and gateway as
bench/run.py, warms up, then runs wrk for `--minutes` in one-minute rounds, reading the gateway's
VmRSS after each round. Reports RSS at the start and the end, its growth, and req/s per round
(the first round's req/s is the reference the last is compared with, so a slowdown shows as a
ratio). A leak shows as RSS growing round after round; a plateau after the first rounds is the
allocator and caches settling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # (bench/run.py: processes, upstream and gateway start-up, wrk)
from idle_rss import rss_kib  # (bench/idle_rss.py: VmRSS and VmHWM from /proc)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print a summary; exit 0 (2 when wrk is missing)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load time (default 10)")
    parser.add_argument("--round", type=float, default=60.0, help="seconds per wrk round (default 60)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--policies", action="store_true", help="with bench/run.py's 4-policy chain")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    use_taskset = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-soak-"))
    procs = run.Processes(tmp, use_taskset)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(run.REPO), env.get("PYTHONPATH", "")) if p)
    gateway_args = argparse.Namespace(twistd=run.default_twistd(), gateway_cmd=run.DEFAULT_GATEWAY_CMD)
    try:
        upstream_port = run.free_port()
        if shutil.which("nginx"):
            conf = run.write_nginx(tmp, "upstream-nginx", run.NGINX_UPSTREAM_CONF, port=upstream_port)
            upstream = procs.start("upstream", run.nginx_argv(conf), 1)
        else:
            upstream = procs.start(
                "upstream",
                [sys.executable, "-m", "flexgw.testing.upstream", "--listen",
                 f"{run.HOST}:{upstream_port}", "--mode", "hello"],
                1, env,
            )
        run.wait_port(upstream_port, upstream, procs, "upstream")
        extra = ""
        headers: dict[str, str] | None = None
        if args.policies:
            extra, _, _ = run.policy_bindings(run.available_policy_kinds(env))
            headers = {"Authorization": run.basic_auth_header()}
        port, _ = run.start_gateway(
            gateway_args, procs, tmp, "gateway", "conf", extra, upstream_port, 0, env
        )
        pid = dict(procs.children)["gateway"].pid  # taskset execs the gateway: same PID
        run.sanity_get(port, headers=headers)
        run.run_wrk(port, args.connections, 5.0, 1, use_taskset, headers=headers)  # warm-up
        start_rss = rss_kib(pid)["VmRSS"]
        rounds: list[dict[str, Any]] = []
        total = args.minutes * 60.0
        elapsed = 0.0
        while elapsed < total:
            seconds = min(args.round, total - elapsed)
            result = run.run_wrk(port, args.connections, seconds, 1, use_taskset, headers=headers)
            elapsed += seconds
            rounds.append({
                "at_s": elapsed,
                "rps": result["rps"],
                "requests": result["requests"],
                "rss_kib": rss_kib(pid)["VmRSS"],
                "errors": result["non_2xx"] + result["socket_errors"],
            })
            print(f"{elapsed / 60:5.1f} min: {result['rps']:8.0f} req/s, RSS {rounds[-1]['rss_kib'] / 1024:.1f} MiB",
                  flush=True)
        end_rss = rounds[-1]["rss_kib"]
        summary = {
            "minutes": args.minutes,
            "policies": args.policies,
            "rss_start_kib": start_rss,
            "rss_end_kib": end_rss,
            "rss_growth_ratio": round(end_rss / start_rss, 3),
            "rps_last_over_first": round(rounds[-1]["rps"] / rounds[0]["rps"], 3),
            "requests": sum(r["requests"] for r in rounds),
            "errors": sum(r["errors"] for r in rounds),
            "rounds": rounds,
        }
        print(f"RSS start {start_rss / 1024:.1f} MiB, end {end_rss / 1024:.1f} MiB "
              f"(x{summary['rss_growth_ratio']}); req/s last/first round {summary['rps_last_over_first']}; "
              f"{summary['requests']} requests, {summary['errors']} errors")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
