"""The `flexgw` command: validate and dump configuration directories, ask a probe, print the
version, and make a demo JWT for the conf/ingress example."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import attrs

import flexgw
from flexgw.config.ingress import ingress_options
from flexgw.config.pipeline import load_config
from flexgw.plan import BoundPolicy, GatewayPlan, Problem, Rule
from flexgw.policies.registry import load_modules


def _problem_json(problem: Problem) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(problem).items() if v is not None} | {
        "text": str(problem)
    }


def _rule_json(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("path", "methods", "host"):
        pattern = getattr(rule, name)
        if pattern is not None:
            out[name] = pattern.pattern
    if rule.headers:
        out["headers"] = {name: pattern.pattern for name, pattern in rule.headers}
    return out


def _forward_proxy_json(api: Any) -> dict[str, Any]:
    """A forward-proxy API's destination rules and the Services a destination may match."""
    config = api.forward_proxy

    def rule(r: Any) -> str:
        host = r.host if isinstance(r.host, str) else (
            f"[{r.host}]" if r.host.version == 6 else str(r.host)
        )
        ports = "*" if r.ports is None else ",".join(str(p) for p in sorted(r.ports))
        return f"{host}:{ports}"

    return {
        "allowedDestinations": [rule(r) for r in config.allow],
        "connectPorts": sorted(config.connect_ports),
        "allowPlainHttp": config.allow_plain_http,
        "blockedAddresses": [str(net) for net in config.guard.blocked],
        "blockedAddressExceptions": [str(net) for net in config.guard.exceptions],
        "services": [d.upstream.key for d in api.proxy_services],
    }


def _policy_json(policy: BoundPolicy) -> dict[str, Any]:
    """A bound policy as dumped: its binding, kind, order and rules (never its config: secrets)."""
    return {
        "name": policy.name,
        "kind": policy.kind,
        "order": policy.order,
        "rules": [_rule_json(rule) for rule in policy.rules],
    }


def plan_json(plan: GatewayPlan) -> dict[str, Any]:
    """The compiled model as JSON-ready data."""
    upstreams: dict[str, dict[str, Any]] = {}
    listeners = []
    for listener in plan.listeners:
        apis = []
        for api in listener.apis:
            routes = []
            for route in api.routes:
                destinations = []
                for dest in route.destinations:
                    upstream = dest.upstream
                    upstreams[upstream.key] = {
                        "scheme": upstream.scheme,
                        "host": upstream.host,
                        "port": upstream.port,
                        "pathPrefix": upstream.path_prefix,
                        "authority": upstream.authority,
                        "idleTimeoutSeconds": upstream.idle_timeout,  # idle-timeout-flex
                        # forwardProxy (never its credentials), when it is used for this host
                        "viaProxy": (
                            upstream.proxy.authority.decode("latin-1") if upstream.proxy else None
                        ),
                    }
                    if upstream.tls is not None:
                        upstreams[upstream.key]["tls"] = upstream.tls.describe()
                    destinations.append(
                        {
                            "upstream": upstream.key,
                            "destinationPath": dest.destination_path,
                            "weight": dest.weight,
                            "policies": [_policy_json(p) for p in dest.policies],
                        }
                    )
                routes.append(
                    {
                        "name": route.name,
                        "order": route.order,
                        "rules": [_rule_json(rule) for rule in route.rules],
                        "destinations": destinations,
                    }
                )
            api_entry: dict[str, Any] = {
                "key": api.key,
                "basePath": api.base_path,
                "routes": routes,
                "policies": [_policy_json(p) for p in api.policies],
            }
            if api.forward_proxy is not None:
                api_entry["forwardProxy"] = _forward_proxy_json(api)
            apis.append(api_entry)
        entry = {"scheme": listener.scheme, "host": listener.host, "port": listener.port, "apis": apis}
        if listener.tls is not None:
            entry["tls"] = listener.tls.describe()
        listeners.append(entry)
    timeouts = plan.timeouts
    http = plan.http
    return {
        "generation": plan.generation,
        "listeners": listeners,
        "upstreams": dict(sorted(upstreams.items())),
        "timeouts": {
            "upstreamResponseSeconds": timeouts.upstream_response,
            "streamIdleSeconds": timeouts.stream_idle,
            "upstreamConnectionIdleSeconds": timeouts.upstream_idle,
        },
        "http": {
            "maxHeaderBytes": http.max_header_bytes,
            "headerTimeoutSeconds": http.header_timeout,
            "keepAliveTimeoutSeconds": http.keepalive_timeout,
            "connectTimeoutSeconds": http.connect_timeout,
            "rewriteHostHeader": http.rewrite_host,
            "trustedProxies": [str(net) for net in http.trusted_proxies],
            "maxIdleConnectionsPerUpstream": http.max_idle_per_upstream,
            "bodyBufferLimitBytes": http.body_buffer_limit,
            "headersWithUnderscoresAction": http.headers_with_underscores,
            "normalizePath": http.normalize_path,
            "mergeSlashes": http.merge_slashes,
            "pathWithEscapedSlashesAction": http.escaped_slashes,
        },
        "probe": {"enabled": plan.probe.enabled, "port": plan.probe.port, "host": plan.probe.host},
        "proxyProtocol": plan.proxy_protocol,
        "problems": [_problem_json(p) for p in plan.problems],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgw", description=flexgw.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check configuration directories")
    validate.add_argument("dirs", nargs="+", metavar="DIR")
    dump = commands.add_parser("dump", help="print the compiled model as JSON")
    dump.add_argument("dirs", nargs="+", metavar="DIR")
    for command in (validate, dump):
        command.add_argument("--strict", action="store_true", help="unknown keys are errors")
        command.add_argument(
            "--ingress-class", default="flexgw", help="Kubernetes ingress class served (%(default)s)"
        )
        command.add_argument(
            "--ingress-default-class",
            action="store_true",
            help="serve Ingresses that name no ingress class",
        )
        command.add_argument(
            "--ingress-listener",
            default="http://0.0.0.0:8080",
            help="listener of Ingresses without the api-instance annotation (%(default)s)",
        )
        command.add_argument(
            "--ingress-tls-listener",
            default="https://0.0.0.0:8443",
            help="TLS listener for those Ingresses when they carry spec.tls (%(default)s)",
        )
        command.add_argument(
            "--policy-module",
            action="append",
            default=[],
            metavar="MODULE",
            help="import a third-party policy module first (repeatable)",
        )
    _etcd_commands(commands)
    commands.add_parser("version", help="print the version")
    token = commands.add_parser(
        "demo-token",
        help="print an HS256 JWT for the conf/ingress example's jwt-validation-flex (demos only)",
    )
    token.add_argument(
        "--secret",
        help="the HMAC key, as the example's textKey (default: $FLEXGW_JWT_SECRET)",
    )
    token.add_argument("--audience", default="api.example.com", help="aud (default %(default)s)")
    token.add_argument("--subject", default="demo-user", help="sub (default %(default)s)")
    token.add_argument(
        "--ttl", type=int, default=3600, help="seconds until exp (default %(default)s)"
    )
    probe = commands.add_parser(
        "probe", help="ask a running gateway's probe listener; exit 0 when ready/alive, else 1"
    )
    probe.add_argument("--check", choices=("readiness", "liveness"), required=True)
    probe.add_argument("--host", default="127.0.0.1", help="probe listener host (default %(default)s)")
    probe.add_argument(
        "--port", type=int, default=3000, help="probe listener port (Configuration.spec.probe.port)"
    )
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds (default %(default)s)")
    for flag, name in _PROBE_FLAGS:
        probe.add_argument(flag, dest=name, action="store_true", help=f"readiness: {name}")
    return parser


def _etcd_commands(commands: Any) -> None:
    """apply, diff, get, delete and fleet: the resources and gateways under an etcd prefix."""
    helps = {
        "apply": "check resource files, then write them to etcd in one transaction",
        "diff": "show what `apply` would change in etcd (exit 1 when something would)",
        "get": "print the resources in etcd (all, or those the files name) as YAML",
        "delete": "delete the resources the files name from etcd, in one transaction",
        "fleet": "print the gateways following etcd: version, revision, generation, readiness",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text)
        command.add_argument("--etcd", required=True, metavar="URLS",
                             help="etcd client URLs, comma-separated")
        command.add_argument("--etcd-prefix", default="/flexgw", help="key prefix (%(default)s)")
        command.add_argument("--etcd-cacert", help="CA certificate of etcd's https certificate")
        command.add_argument("--etcd-cert", help="client certificate presented to etcd")
        command.add_argument("--etcd-key", help="private key of --etcd-cert")
        command.add_argument("--etcd-user", help="etcd user")
        command.add_argument("--etcd-password-file", help="file holding the --etcd-user password")
        command.add_argument("--timeout", type=float, default=10.0, help="seconds per call (%(default)s)")
        if name in ("apply", "diff", "delete"):
            command.add_argument("paths", nargs="+", metavar="PATH")
        elif name == "get":
            command.add_argument("paths", nargs="*", metavar="PATH")
        if name in ("apply", "delete"):
            command.add_argument(
                "--wait", type=float, default=0.0, metavar="SECONDS",
                help="then wait until every gateway under the prefix has applied it (exit 1 if not)",
            )
        if name in ("apply", "diff"):
            command.add_argument("--prune", action="store_true",
                                 help="also delete the resources under the prefix the files lack")
            command.add_argument("--strict", action="store_true", help="unknown keys are errors")
            command.add_argument("--policy-module", action="append", default=[], metavar="MODULE",
                                 help="import a third-party policy module first (repeatable)")


async def etcd_command(reactor: Any, args: argparse.Namespace, out: TextIO,
                       environ: dict[str, str]) -> int:
    """Run apply/diff/get/delete/fleet against etcd; the exit status (2: etcd or usage trouble)."""
    from flexgw.config import etcdapply
    from flexgw.config.sources.etcd import gateways_prefix, make_client, resources_prefix
    from flexgw.config.sources.etcd_client import EtcdError
    from flexgw.service.fleet import fleet_table

    password = None
    try:
        if args.etcd_password_file is not None:
            password = _read_secret(args.etcd_password_file)
        client = make_client(
            reactor, args.etcd.split(","), cacert=args.etcd_cacert, cert=args.etcd_cert,
            key=args.etcd_key, user=args.etcd_user, password=password, timeout=args.timeout,
        )
    except (OSError, ValueError) as exc:
        print(f"{args.command}: {exc}", file=out)
        return 2
    prefix = args.etcd_prefix
    resources = resources_prefix(prefix).encode("utf-8")
    try:
        if args.command == "fleet":
            gateways = await client.range_all(gateways_prefix(prefix).encode("utf-8"))
            stored = await client.range_all(resources)
            marker = await client.range(etcdapply.last_change_key(prefix).encode("utf-8"))
            latest = max([kv.mod_revision for kv in (*stored.kvs, *marker.kvs)], default=0)
            out.write(fleet_table(gateways.kvs, latest))
            return 0
        current = {kv.key.decode("utf-8", "replace"): kv for kv in (await client.range_all(resources)).kvs}
        desired = etcdapply.read_files(args.paths, prefix) if args.paths else None
        if args.command == "get":
            keys = sorted(current) if desired is None else sorted(k for k in desired.entries if k in current)
            for n, key in enumerate(keys):
                text = current[key].value.decode("utf-8", "replace")
                out.write(("---\n" if n else "") + f"# {key} (revision {current[key].mod_revision})\n")
                out.write(text if text.endswith("\n") else text + "\n")
            return 0
        assert desired is not None
        if args.command == "delete":
            if desired.errors:
                return _refuse(desired.errors, out)
            gone = [etcdapply.Change(k, current[k], None) for k in sorted(desired.entries) if k in current]
            return await _write(reactor, client, gone, prefix, out, "deleted", args.wait)
        load_modules(args.policy_module)
        problems = etcdapply.check_result(desired, current, prefix, environ,
                                          prune=args.prune, strict=args.strict)
        errors = [p for p in problems if p.severity == "error"]
        found = etcdapply.changes(desired, current, prune=args.prune)
        if args.command == "diff":
            for problem in problems:
                print(problem, file=out)
            out.writelines(change.diff(", ".join(args.paths)) for change in found)
            print(f"{len(found)} change(s); {len(errors)} error(s)", file=out)
            return 2 if errors else (1 if found else 0)
        if errors:
            return _refuse(problems, out)
        for problem in problems:
            print(problem, file=out)
        return await _write(reactor, client, found, prefix, out, "applied", args.wait)
    except (EtcdError, ImportError) as exc:
        print(f"{args.command}: {exc}", file=out)
        return 2


def _read_secret(path: str) -> str:
    """A password file's text, without its final newline."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().rstrip("\r\n")


def _refuse(problems: Any, out: TextIO) -> int:
    """Print the problems; nothing was written."""
    for problem in problems:
        print(problem, file=out)
    errors = sum(1 for p in problems if p.severity == "error")
    print(f"{errors} error(s): nothing written to etcd", file=out)
    return 1


async def _write(
    reactor: Any, client: Any, found: list[Any], prefix: str, out: TextIO, verb: str, wait: float
) -> int:
    """Write `found` in one guarded transaction (1 when etcd changed since it was read); with
    `wait`, then wait for every gateway reporting under the prefix to apply it."""
    from flexgw.config import etcdapply

    if not found:
        print("no changes", file=out)
        return 0
    compares, ops = etcdapply.txn_ops(found, prefix)
    result = await client.txn(compares, ops)
    if not result.succeeded:
        print("etcd changed since it was read (another apply?): nothing written; run it again",
              file=out)
        return 1
    for change in found:
        print(f"{change.action} {change.key}", file=out)
    print(f"{verb} {len(found)} change(s) in one transaction at revision {result.revision}", file=out)
    return await _wait_fleet(reactor, client, prefix, result.revision, wait, out) if wait else 0


async def _wait_fleet(
    reactor: Any, client: Any, prefix: str, revision: int, wait: float, out: TextIO
) -> int:
    """Until every gateway key under the prefix says it applied `revision` (checked every 0.2 s,
    for at most `wait` seconds): 0, else 1 naming those behind."""
    import json

    from twisted.internet.task import deferLater

    from flexgw.config.sources.etcd import gateways_prefix

    started = reactor.seconds()
    while True:
        behind: dict[str, int] = {}
        found = await client.range_all(gateways_prefix(prefix).encode("utf-8"))
        for kv in found.kvs:
            try:
                applied = int(json.loads(kv.value).get("revision", 0))
            except (ValueError, TypeError, AttributeError):
                applied = 0
            if applied < revision:
                behind[kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1]] = applied
        elapsed = reactor.seconds() - started
        if not behind:
            print(f"every gateway ({len(found.kvs)}) applied it in {elapsed:.1f}s", file=out)
            return 0
        if elapsed >= wait:
            names = ", ".join(f"{name} (revision {rev})" for name, rev in sorted(behind.items()))
            print(f"after {wait:g}s, behind: {names}", file=out)
            return 1
        await deferLater(reactor, 0.2)


def _react(run: Any) -> int:
    """Run `run(reactor)` (a coroutine function giving an exit status) on the reactor."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    codes: list[int] = []

    def main(reactor: Any) -> Any:
        return Deferred.fromCoroutine(run(reactor)).addCallback(codes.append)

    try:
        task.react(main)
    except SystemExit:
        pass
    return codes[0] if codes else 2


# flexctl's option names and the query flags of Flex's readiness endpoint
_PROBE_FLAGS = (
    ("--allow-api-errors", "allowAPIErrors"),
    ("--allow-envoy-errors", "allowEnvoyErrors"),
    ("--allow-policy-errors", "allowPolicyErrors"),
)


def probe(args: argparse.Namespace, out: TextIO) -> int:
    """GET /probes/<check> on the probe listener: 0 on 200, 1 otherwise (like `flexctl probe`)."""
    import http.client
    from urllib.parse import urlencode

    query = {name: "" for _, name in _PROBE_FLAGS if getattr(args, name)}
    path = f"/probes/{args.check}" + (f"?{urlencode(query)}" if query else "")
    connection = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read(64 * 1024).decode("utf-8", "replace").strip()
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        print(f"{args.check}: cannot reach {args.host}:{args.port}: {exc}", file=out)
        return 1
    finally:
        connection.close()
    print(f"{args.check}: {status} {body}", file=out)
    return 0 if status == 200 else 1


def demo_token(secret: str, audience: str, subject: str, ttl: int, now: float) -> str:
    """An HS256 JWT with `sub`, `aud`, `iat` and `exp` (`now` + `ttl`), signed with `secret`:
    what conf/ingress's `jwt-validation-flex` binding accepts when its textKey is `secret`."""
    import jwt

    issued = int(now)
    claims = {"sub": subject, "aud": audience, "iat": issued, "exp": issued + ttl}
    return jwt.encode(claims, secret.encode("utf-8"), algorithm="HS256")


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Run the command line; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    env = dict(os.environ) if environ is None else environ
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "version":
        print(f"flexgw {flexgw.__version__}", file=out)
        return 0
    if args.command == "probe":
        return probe(args, out)
    if args.command == "demo-token":
        secret = args.secret if args.secret is not None else env.get("FLEXGW_JWT_SECRET")
        if not secret or len(secret.encode("utf-8")) < 32:
            print("demo-token: give --secret (or FLEXGW_JWT_SECRET) of 32 bytes or more,"
                  " the gateway's HS256 textKey", file=out)
            return 2
        import time

        print(demo_token(secret, args.audience, args.subject, args.ttl, time.time()), file=out)
        return 0
    if args.command in ("apply", "diff", "get", "delete", "fleet"):
        return _react(lambda reactor: etcd_command(reactor, args, out, env))
    try:
        load_modules(args.policy_module)
    except ImportError as exc:
        print(f"--policy-module: {exc}", file=out)
        return 2
    try:
        ingress = ingress_options(
            args.ingress_class,
            args.ingress_default_class,
            args.ingress_listener,
            args.ingress_tls_listener,
        )
    except ValueError as exc:
        print(str(exc), file=out)
        return 2
    state = load_config(args.dirs, env, strict=args.strict, ingress=ingress)
    if args.command == "validate":
        for problem in state.problems:
            print(problem, file=out)
        errors = len(state.errors)
        warnings = sum(1 for p in state.problems if p.severity == "warning")
        notes = len(state.problems) - errors - warnings
        apis = sum(len(listener.apis) for listener in state.plan.listeners)
        summary = f"{errors} error(s), {warnings} warning(s), {apis} API(s) served"
        if notes:
            summary = f"{errors} error(s), {warnings} warning(s), {notes} note(s), {apis} API(s) served"
        print(summary, file=out)
        return 0 if state.ok else 1
    json.dump(plan_json(state.plan), out, indent=2)
    out.write("\n")
    return 0 if state.ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
