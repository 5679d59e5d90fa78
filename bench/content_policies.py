"""Content and caching policies' cost: each policy's req/s as a ratio of the same requests through
flexgw without it, measured in one run (wrk, the same upstream and CPU pinning as bench/run.py).

Usage: python bench/content_policies.py [--duration 5] [--only http-caching-flex,...] [--json out.json]

For every scenario the gateway is started twice, one at a time on the gateway CPU: without
policies, then with the scenario's binding, and wrk sends the scenario's request to both. The
ratio is policy req/s / plain req/s (for `http-caching-flex` hits, > 1 means a hit is cheaper
than proxying; the issue's goal is >= 1.5).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policybench

run = policybench.run
binding = policybench.binding


GET = "wrk.method = 'GET'\n"
JSON_POST = (
    "wrk.method = 'POST'\n"
    "wrk.headers['Content-Type'] = 'application/json'\n"
    "wrk.body = '{\"name\": \"O\\'Brien\", \"comment\": \"Looks good -- see the *notes*\","
    " \"items\": [1, 2, 3], \"tags\": [\"a\", \"b\"]}'\n"
)

GRAPHQL_POST = (
    "wrk.method = 'POST'\n"
    "wrk.headers['Content-Type'] = 'application/json'\n"
    "wrk.body = '{\"query\": \"query Order($id: ID!) { order(id: $id) { id total customer { name"
    " email } items { sku qty product { name price } } } }\", \"variables\": {\"id\": \"42\"}}'\n"
)
SPEC_CONFIG = (
    "    source: inline\n    blockOperation: true\n    spec: |\n"
    "      openapi: 3.0.3\n      info: {title: bench, version: '1'}\n      paths:\n"
    "        /items:\n          post:\n            parameters:\n"
    "              - {name: limit, in: query, schema: {type: integer}}\n"
    "            requestBody:\n              content:\n                application/json:\n"
    "                  schema:\n                    type: object\n                    required: [name]\n"
    "                    properties:\n                      name: {type: string}\n"
    "                      comment: {type: string}\n"
    "                      items: {type: array, items: {type: integer}}\n"
    "                      tags: {type: array, items: {type: string}}\n"
    "            responses: {'200': {description: ok}}\n"
)
JS_CONFIG = (
    "    script: |\n"
    "      let n = 0;\n"
    "      export function requestFilter(request) { n += 1; request.headers['x-n'] = String(n); }\n"
)
INJECTION = (
    "    builtInProtections: [sql, xss]\n    protectPathAndQuery: true\n"
    "    protectHeaders: true\n    protectBody: true\n    rejectRequests: true\n"
)

#: (scenario name, policy kind, binding config, wrk request script)
SCENARIOS: tuple[tuple[str, str, str, str], ...] = (
    ("http-caching-flex (hits)", "http-caching-flex", "    ttl: 600\n", GET),
    ("injection-protection-flex (GET, headers)", "injection-protection-flex", INJECTION, GET),
    ("injection-protection-flex (JSON POST)", "injection-protection-flex", INJECTION, JSON_POST),
    ("spec-validation-flex (JSON POST)", "spec-validation-flex", SPEC_CONFIG, JSON_POST),
    ("javascript-scripting-flex (GET, header set)", "javascript-scripting-flex", JS_CONFIG, GET),
    ("graphql-operation-limits-flex (POST)", "graphql-operation-limits-flex",
     "    maxDepth: 8\n    maxAliases: 10\n    maxRootFields: 10\n    maxDirectives: 10\n", GRAPHQL_POST),
)


def run_wrk(port: int, script: str, args: argparse.Namespace, tmp: Path, use_taskset: bool) -> dict[str, Any]:
    """wrk -t1 -cN with a request script; parsed as bench/run.py does."""
    path = tmp / f"req-{abs(hash(script))}.lua"
    path.write_text(script)
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{max(1, round(args.duration))}s",
            "--latency", "-s", str(path), f"http://{run.HOST}:{port}/items"]
    if use_taskset:
        argv = ["taskset", "-c", str(args.load_cpu), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 60, check=False)
    if out.returncode != 0:
        raise run.BenchError(f"wrk failed ({out.returncode}): {out.stderr}")
    return run.parse_wrk(out.stdout)


def measure(bench: Any, name: str, conf: str, script: str) -> dict[str, Any]:
    """Start a gateway with `conf`, warm it up, measure, stop it."""
    args = bench.args
    port, proc = bench.gateway(name, conf)
    try:
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
            run_wrk(port, script, warm, bench.tmp, bench.use_taskset)
        result = run_wrk(port, script, args, bench.tmp, bench.use_taskset)
    finally:
        bench.stop_gateway(proc)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every scenario; print and optionally save req/s and ratios."""
    args = policybench.arguments(__doc__, argv, "comma-separated policy kinds to measure")
    if not policybench.require_wrk():
        return 2
    bench = policybench.Bench(args, "flexgw-bench-content-")
    rows: list[dict[str, Any]] = []
    try:
        bench.start_upstream()
        plain: dict[str, dict[str, Any]] = {}
        for index, (title, kind, config, script) in enumerate(SCENARIOS):
            if bench.only and kind not in bench.only:
                continue
            if script not in plain:
                plain[script] = measure(bench, f"plain{len(plain)}", "", script)
            with_policy = measure(bench, f"policy{index}", binding(kind, config), script)
            base = plain[script]["rps"]
            rows.append({
                "scenario": title,
                "plain_rps": base,
                "policy_rps": with_policy["rps"],
                "ratio": with_policy["rps"] / base if base else None,
                "policy_non_2xx": with_policy.get("non_2xx", 0),
                "policy_p50_ms": with_policy.get("p50_ms"),
                "plain_p50_ms": plain[script].get("p50_ms"),
            })
    finally:
        bench.close()
    print(f"{'scenario':44} {'plain req/s':>12} {'policy req/s':>13} {'ratio':>7}")
    for row in rows:
        print(f"{row['scenario']:44} {row['plain_rps']:12.0f} {row['policy_rps']:13.0f} {row['ratio']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
