"""Identity and external-decision policies' cost: each policy's req/s as a ratio of the same
requests through flexgw without it, with its remote side on loopback, measured in one run (wrk
and the upstream as in bench/run.py).

Usage: python bench/identity_policies.py [--duration 5] [--only ldap,ext-authz-grpc,...] [--json out.json]

Remote sides: a real slapd (tests/ldapserver.py; every request searches and binds: Flex has no
LDAP cache), the grpcio Authorization server of tests/extauthz_server.py (in this process's
threads), an HTTP authorization server and an OpenID provider (discovery + RFC 7662
introspection) on Python's threaded http.server. OIDC's validated tokens are cached (Flex's
`maxCacheSize`), so its figure is the cached path after the first request.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _sibling(name: str) -> Any:
    """A module of bench/ by file name (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _sibling("run")
TOKEN = "bench-token"


class _Remote(BaseHTTPRequestHandler):
    """The HTTP authorization server (200 to everything) and the OpenID provider."""

    issuer = ""
    protocol_version = "HTTP/1.1"  # keep-alive, as a real authorization server

    def log_message(self, *args: Any) -> None:
        """Quiet."""

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """Discovery, or an authorization check."""
        if self.path == "/.well-known/openid-configuration":
            self._json(200, {"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks",
                             "introspection_endpoint": self.issuer + "/introspect"})
        else:
            self._json(200, {})

    def do_POST(self) -> None:
        """Introspection: the bench token is active."""
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._json(200, {"active": True, "scope": "read", "client_id": "bench"})


def binding(kind: str, config: str) -> str:
    """A PolicyBinding of `kind` on the bench API."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: bench-policy}}\n"
        "spec:\n  targetRef: {name: bench}\n"
        f"  policyRef: {{name: {kind}}}\n  config:\n{config}"
    )


def scenarios(remote_url: str, slapd: Any, grpc_server: Any) -> list[tuple[str, str, dict[str, str]]]:
    """(name, bindings, request headers) of each measured gateway."""
    from tests.ldapserver import BASE, SERVICE_DN, SERVICE_PASSWORD

    out = []
    if slapd is not None:
        basic = base64.b64encode(b"alice:alice-pw").decode()
        out.append(("ldap", binding("ldap-authentication-flex", (
            f"    ldapServerURL: {slapd.url}\n    ldapServerUserDn: '{SERVICE_DN}'\n"
            f"    ldapServerUserPassword: {SERVICE_PASSWORD}\n"
            f"    ldapSearchBase: 'ou=people,{BASE}'\n")), {"Authorization": f"Basic {basic}"}))
    if grpc_server is not None:
        out.append(("ext-authz-grpc", binding("native-ext-authz-flex",
                                              f"    uri: {grpc_server.uri}\n"), {}))
    out.append(("ext-authz-http", binding("native-ext-authz-flex",
                                          f"    uri: {remote_url}/authz\n    serverType: http\n"), {}))
    out.append(("oidc-introspection", binding("openidconnect-access-token-enforcement-flex", (
        f"    issuer: {remote_url}\n    clientId: bench\n    clientSecret: s\n    scopes: read\n")),
        {"Authorization": f"Bearer {TOKEN}"}))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure plain flexgw, then each scenario; print (and save) req/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
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
    tmp = Path(tempfile.mkdtemp(prefix="flexgw-bench-identity-"))
    procs = run.Processes(tmp, use_taskset)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(run.REPO), env.get("PYTHONPATH", "")) if p)

    remote = ThreadingHTTPServer((run.HOST, 0), _Remote)
    remote_url = f"http://{run.HOST}:{remote.server_address[1]}"
    _Remote.issuer = remote_url
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    slapd = grpc_server = None
    rows: list[dict[str, Any]] = []
    try:
        try:
            from tests.ldapserver import SlapdServer

            slapd = SlapdServer().start()
        except Exception as e:  # noqa: BLE001 (no slapd: that scenario is skipped)
            print(f"  ldap skipped: {e}", file=sys.stderr)
        try:
            from tests.extauthz_server import GrpcAuthzServer

            grpc_server = GrpcAuthzServer().start()
        except Exception as e:  # noqa: BLE001
            print(f"  ext-authz-grpc skipped: {e}", file=sys.stderr)
        upstream_port = run.free_port()
        conf = run.write_nginx(tmp, "upstream-nginx", run.NGINX_UPSTREAM_CONF, port=upstream_port)
        proc = procs.start("upstream", run.nginx_argv(conf), args.load_cpu)
        run.wait_port(upstream_port, proc, procs, "upstream")

        def measure(name: str, docs: str, headers: dict[str, str]) -> dict[str, Any]:
            port, _ = run.start_gateway(args, procs, tmp, name, f"conf-{name}", docs,
                                        upstream_port, args.gateway_cpu, env)
            gateway = procs.children[-1][1]
            try:
                run.sanity_get(port, headers=headers or None)
                if args.warmup:
                    run.run_wrk(port, args.connections, args.warmup, args.load_cpu, use_taskset, headers)
                return run.run_wrk(port, args.connections, args.duration, args.load_cpu,
                                   use_taskset, headers)
            finally:
                procs.stop(gateway)
                procs.children.pop()

        plain = measure("plain", "", {})
        print(f"{'scenario':<22} {'req/s':>9} {'ratio':>7} {'p99 ms':>8}")
        print(f"{'flexgw, no policy':<22} {plain['rps']:>9.0f} {1.0:>7.3f} {plain.get('p99_ms', 0):>8.2f}")
        for name, docs, headers in scenarios(remote_url, slapd, grpc_server):
            if only and name not in only:
                continue
            result = measure(name, docs, headers)
            ratio = result["rps"] / plain["rps"] if plain["rps"] else 0.0
            rows.append({"scenario": name, **result, "ratio": ratio})
            print(f"{name:<22} {result['rps']:>9.0f} {ratio:>7.3f} {result.get('p99_ms', 0):>8.2f}"
                  f" non-2xx {result['non_2xx']}")
    except run.BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        remote.shutdown()
        if slapd is not None:
            slapd.stop()
        if grpc_server is not None:
            grpc_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "scenarios": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
