"""Identity and external-decision policies' cost: each policy's req/s as a ratio of the same
requests through flexgw without it, with its remote side on loopback, measured in one run (wrk
and the upstream as in bench/run.py).

Usage: python bench/identity_policies.py [--duration 5] [--only ldap,ext-authz-grpc,...] [--json out.json]

Remote sides: a real slapd (tests/ldapserver.py; every request searches and binds: Flex has no
LDAP cache), the grpcio Authorization server of tests/extauthz_server.py and the grpcio
ExternalProcessor of tests/extproc_server.py (Flex's default modes: request and response headers
sent, both mutated) in this process's threads, an HTTP authorization server and an OpenID provider (discovery + RFC 7662
introspection) on Python's threaded http.server. OIDC's validated tokens are cached (Flex's
`maxCacheSize`), so its figure is the cached path after the first request.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import policybench

run = policybench.run
binding = policybench.binding
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


def scenarios(
    remote_url: str, slapd: Any, grpc_server: Any, proc_server: Any
) -> list[tuple[str, str, dict[str, str]]]:
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
    if proc_server is not None:
        # Flex's default modes: request and response headers go to the processor (mutated)
        out.append(("ext-proc-headers", binding("native-ext-proc-flex",
                                                f"    uri: {proc_server.uri}\n"), {}))
    out.append(("ext-authz-http", binding("native-ext-authz-flex",
                                          f"    uri: {remote_url}/authz\n    serverType: http\n"), {}))
    out.append(("oidc-introspection", binding("openidconnect-access-token-enforcement-flex", (
        f"    issuer: {remote_url}\n    clientId: bench\n    clientSecret: s\n    scopes: read\n")),
        {"Authorization": f"Bearer {TOKEN}"}))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure plain flexgw, then each scenario; print (and save) req/s and ratios."""
    args = policybench.arguments(__doc__, argv, "comma-separated scenario names")
    if not policybench.require_wrk():
        return 2
    bench = policybench.Bench(args, "flexgw-bench-identity-")
    remote = ThreadingHTTPServer((run.HOST, 0), _Remote)
    remote_url = f"http://{run.HOST}:{remote.server_address[1]}"
    _Remote.issuer = remote_url
    threading.Thread(target=remote.serve_forever, daemon=True).start()
    servers: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name, module, factory in (("ldap", "tests.ldapserver", "SlapdServer"),
                                      ("ext-authz-grpc", "tests.extauthz_server", "GrpcAuthzServer"),
                                      ("ext-proc", "tests.extproc_server", "ExtProcServer")):
            try:
                servers[name] = getattr(__import__(module, fromlist=[factory]), factory)().start()
            except Exception as e:  # noqa: BLE001 (no slapd, no grpcio: that scenario is skipped)
                print(f"  {name} skipped: {e}", file=sys.stderr)
        bench.start_upstream()

        def measure(name: str, docs: str, headers: dict[str, str]) -> dict[str, Any]:
            port, gateway = bench.gateway(name, docs)
            try:
                run.sanity_get(port, headers=headers or None)
                if args.warmup:
                    run.run_wrk(port, args.connections, args.warmup, args.load_cpu,
                                bench.use_taskset, headers)
                return run.run_wrk(port, args.connections, args.duration, args.load_cpu,
                                   bench.use_taskset, headers)
            finally:
                bench.stop_gateway(gateway)

        plain = measure("plain", "", {})
        print(f"{'scenario':<22} {'req/s':>9} {'ratio':>7} {'p99 ms':>8}")
        print(f"{'flexgw, no policy':<22} {plain['rps']:>9.0f} {1.0:>7.3f} {plain.get('p99_ms', 0):>8.2f}")
        for name, docs, headers in scenarios(remote_url, servers.get("ldap"),
                                             servers.get("ext-authz-grpc"), servers.get("ext-proc")):
            if bench.only and name not in bench.only:
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
        bench.close()
        remote.shutdown()
        for server in servers.values():
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "scenarios": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
