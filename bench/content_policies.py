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
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _sibling(name: str) -> Any:
    """A module of bench/ by file name (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _sibling("run")


def binding(kind: str, config: str) -> str:
    """A PolicyBinding of `kind` on the bench API, `config` as YAML lines (indented 4)."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: bench-{kind}}}\n"
        "spec:\n  targetRef: {name: bench}\n"
        f"  policyRef: {{name: {kind}}}\n  config:\n{config}"
    )


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


def measure(args: argparse.Namespace, procs: Any, tmp: Path, name: str, conf: str, script: str,
            upstream_port: int, env: dict[str, str], use_taskset: bool) -> dict[str, Any]:
    """Start a gateway with `conf`, warm it up, measure, stop it."""
    port, _ = run.start_gateway(args, procs, tmp, name, name, conf, upstream_port,
                                args.gateway_cpu, env)
    proc = procs.children[-1][1]
    try:
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
            run_wrk(port, script, warm, tmp, use_taskset)
        result = run_wrk(port, script, args, tmp, use_taskset)
    finally:
        procs.stop(proc)
        procs.children.pop()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every scenario; print and optionally save req/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated policy kinds to measure")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--twistd", default=run.default_twistd())
    parser.add_argument("--gateway-cmd", default=run.DEFAULT_GATEWAY_CMD)
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    only = {k for k in args.only.split(",") if k}
    use_taskset = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-bench-content-"))
    procs = run.Processes(tmp, use_taskset)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(run.REPO), env.get("PYTHONPATH", "")) if p)
    rows: list[dict[str, Any]] = []
    try:
        upstream_port = run.free_port()
        if shutil.which("nginx"):
            conf = run.write_nginx(tmp, "upstream-nginx", run.NGINX_UPSTREAM_CONF, port=upstream_port)
            proc = procs.start("upstream", run.nginx_argv(conf), args.load_cpu)
        else:
            proc = procs.start("upstream", [sys.executable, "-m", "flexgw.testing.upstream", "--listen",
                                            f"{run.HOST}:{upstream_port}", "--mode", "hello"],
                               args.load_cpu, env)
        run.wait_port(upstream_port, proc, procs, "upstream")
        plain: dict[str, dict[str, Any]] = {}
        for index, (title, kind, config, script) in enumerate(SCENARIOS):
            if only and kind not in only:
                continue
            if script not in plain:
                plain[script] = measure(args, procs, tmp, f"plain{len(plain)}", "", script,
                                        upstream_port, env, use_taskset)
            with_policy = measure(args, procs, tmp, f"policy{index}", binding(kind, config), script,
                                  upstream_port, env, use_taskset)
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
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'scenario':44} {'plain req/s':>12} {'policy req/s':>13} {'ratio':>7}")
    for row in rows:
        print(f"{row['scenario']:44} {row['plain_rps']:12.0f} {row['policy_rps']:13.0f} {row['ratio']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
