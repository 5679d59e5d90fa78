"""Probes (`/probes/readiness`, `/probes/liveness`), the admin listener (`/metrics`, `/status`).

Both are small twisted.web sites: they are scraped every few seconds, never on the data path.
The probe listener is configured by `Configuration.spec.probe` and follows reloads; the admin
listener is bound once from the `--admin` endpoint (loopback by default).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from flexgw.plan import ProbeSettings, Problem
from flexgw.service.metrics import make_registry, render, source_statuses
from flexgw.service.sockets import listen_reuse_port

if TYPE_CHECKING:
    from flexgw.service.gateway import GatewayService

_log = Logger(namespace="flexgw.admin")

# Flex's readiness flags (query parameters), and the flexctl-style option names of `flexgw probe`.
ALLOW_FLAGS = ("allowAPIErrors", "allowEnvoyErrors", "allowPolicyErrors")


def _is_policy_problem(problem: Problem) -> bool:
    """A problem in a PolicyBinding, or in the inline policies of an ApiInstance."""
    if problem.resource and problem.resource.startswith("PolicyBinding "):
        return True
    return bool(problem.field) and (problem.field or "").startswith("spec.policies")


def readiness(
    gateway: GatewayService, allow: Mapping[str, bool] | None = None
) -> tuple[bool, list[str]]:
    """(ready, reasons it is not). Ready: running, at least one API served, the last
    configuration applied without errors; each `allow` flag tolerates one class of error:
    `allowAPIErrors` (resource and file errors), `allowPolicyErrors` (policy bindings),
    `allowEnvoyErrors` (the data plane could not apply it: a listener could not be bound)."""
    allow = allow or {}
    reasons = []
    if gateway.stopping:
        reasons.append("the gateway is draining")
    elif not gateway.running:
        reasons.append("the gateway is not running")
    state = gateway.state
    if state is None:
        reasons.append("no configuration applied yet")
        return False, reasons
    served = sum(len(listener.apis) for listener in gateway.plan.listeners)
    if served == 0:
        reasons.append("no API is served")
    policy_errors = api_errors = 0
    for problem in state.errors:
        if _is_policy_problem(problem):
            policy_errors += 1
        else:
            api_errors += 1
    if api_errors and not allow.get("allowAPIErrors"):
        reasons.append(f"{api_errors} configuration error(s)")
    if policy_errors and not allow.get("allowPolicyErrors"):
        reasons.append(f"{policy_errors} policy error(s)")
    unbound = sorted(gateway.unbound)
    if unbound and not allow.get("allowEnvoyErrors"):
        addresses = ", ".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in unbound
        )
        reasons.append(f"{len(unbound)} listener(s) could not be bound: {addresses}")
    return not reasons, reasons


def _flag(request: Request, name: str) -> bool:
    """Flex's form `?allowAPIErrors=` (present, empty) means allowed; `=false` or `=0` does not."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return False
    return values[-1].strip().lower() not in (b"false", b"0", b"no")


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, indent=1).encode("utf-8") + b"\n"


class ReadinessResource(Resource):
    """`GET /probes/readiness[?allowAPIErrors=&allowEnvoyErrors=&allowPolicyErrors=]`: 200 or 503."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request: Request) -> bytes:
        """Answer the readiness check."""
        ready, reasons = readiness(self.gateway, {f: _flag(request, f) for f in ALLOW_FLAGS})
        body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
        if reasons:
            body["reasons"] = reasons
        sources = [status.as_json() for status in source_statuses(self.gateway.source)]
        if sources:  # a lost source leaves readiness as it is: the last configuration serves
            body["sources"] = sources
        return _json(request, 200 if ready else 503, body)

    render_HEAD = render_GET


class LivenessResource(Resource):
    """`GET /probes/liveness`: 200 whenever the reactor is running (it is answering)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """Answer the liveness check."""
        return _json(request, 200, {"status": "alive"})

    render_HEAD = render_GET


class MetricsResource(Resource):
    """`GET /metrics`: the Prometheus text format, from a private registry."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()
        self.registry = make_registry(gateway)

    def render_GET(self, request: Request) -> bytes:
        """Collect and render every metric now."""
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return render(self.registry)


class StatusResource(Resource):
    """`GET /status`: the served model with source files, and the current problems (no secrets)."""

    isLeaf = True

    def __init__(self, gateway: GatewayService) -> None:
        super().__init__()
        self.gateway = gateway

    def render_GET(self, request: Request) -> bytes:
        """Describe the gateway now."""
        return _json(request, 200, status_json(self.gateway))


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def problem_json(problem: Problem) -> dict[str, Any]:
    """A problem as /status shows it; quoted values are masked for policy config fields."""
    message = problem.message
    field = problem.field or ""
    if "config" in field.split("."):
        message = _QUOTED.sub("'<redacted>'", message)
    out: dict[str, Any] = {"severity": problem.severity, "message": message}
    for name in ("file", "line", "column", "resource", "field"):
        value = getattr(problem, name)
        if value is not None:
            out[name] = value
    return out


def status_json(gateway: GatewayService) -> dict[str, Any]:
    """Listeners, APIs, routes, policy bindings (name, kind, order, source file; never their
    config), every resource with its file and problems, and readiness."""
    state = gateway.state
    files: dict[tuple[str, str], str] = {}  # (kind, "ns/name") -> file
    resources = []
    problems = list(state.problems) if state is not None else []
    by_resource: dict[str, list[dict[str, Any]]] = {}
    for problem in problems:
        if problem.resource:
            by_resource.setdefault(problem.resource, []).append(problem_json(problem))
    if state is not None:
        for rid, resource in sorted(state.resources.items(), key=lambda item: str(item[0])):
            files[(rid.kind, rid.key)] = resource.origin
            resources.append(
                {
                    "kind": rid.kind,
                    "namespace": rid.namespace,
                    "name": rid.name,
                    "file": resource.origin,
                    "problems": by_resource.get(str(rid), []),
                }
            )

    def source(kind: str, name: str, fallback: str | None) -> str | None:
        if ":" in name:  # from an Ingress: "ns/ingress:spec.rules[0]..." / "ns/service:port..."
            owner = name.partition(":")[0]
            kind = "Ingress" if kind == "PolicyBinding" else "KubernetesService"
            return files.get((kind, owner), files.get(("Service", owner), fallback))
        return files.get((kind, name), fallback)

    def policies(bound: Any, fallback: str | None) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "kind": p.kind,
                "order": p.order,
                "file": source("PolicyBinding", p.name, fallback),
            }
            for p in bound
        ]

    listeners = []
    for listener in gateway.plan.listeners:
        apis = []
        for api in listener.apis:
            api_file = files.get(("ApiInstance", api.key))
            routes = []
            for route in api.routes:
                routes.append(
                    {
                        "name": route.name,
                        "order": route.order,
                        "file": source("PolicyBinding", route.name, api_file),
                        "upstreams": [
                            {
                                "upstream": d.upstream.key,
                                "address": f"{d.upstream.scheme}://{d.upstream.authority}",
                                "weight": d.weight,
                                "file": source("Service", d.upstream.key, api_file),
                                "policies": policies(d.policies, api_file),
                            }
                            for d in route.destinations
                        ],
                    }
                )
            apis.append(
                {
                    "key": api.key,
                    "basePath": api.base_path,
                    "file": api_file,
                    "routes": routes,
                    "policies": policies(api.policies, api_file),
                }
            )
        port = gateway.bound_port(listener.host, listener.port)
        listeners.append(
            {
                "address": f"{listener.scheme}://{listener.host}:{listener.port}",
                "bound": port is not None,
                "apis": apis,
            }
        )
        if listener.tls is not None:
            listeners[-1]["tls"] = listener.tls.describe()
    ready, reasons = readiness(gateway)
    return {
        "ready": ready,
        "notReadyReasons": reasons,
        "generation": gateway.plan.generation,
        "reloads": gateway.reloads,
        "lastReloadOk": gateway.last_reload_ok,
        "listeners": listeners,
        "unbound": [f"{host}:{port}" for host, port in sorted(gateway.unbound)],
        "resources": resources,
        "problems": [problem_json(p) for p in problems],
        # Services of several addresses: each address's state and counts (flexgw.upstream.cluster)
        "upstreamClusters": [
            cluster.status()
            for _, cluster in sorted(gateway.pools.clusters.items(), key=lambda i: i[0].key)
        ],
        "sources": [status.as_json() for status in source_statuses(gateway.source)],
    }


class _QuietSite(Site):
    """A Site that writes no access log line (probes arrive every few seconds)."""

    noisy = False

    def log(self, request: Request) -> None:
        """No access log for probes and scrapes."""


def probes_root(readiness: Resource) -> Resource:
    """A root with /probes/readiness (`readiness`) and /probes/liveness."""
    root = Resource()
    probes = Resource()
    probes.putChild(b"readiness", readiness)
    probes.putChild(b"liveness", LivenessResource())
    root.putChild(b"probes", probes)
    return root


def probe_site(gateway: GatewayService) -> Site:
    """The probe listener's site: /probes/readiness and /probes/liveness."""
    return _QuietSite(probes_root(ReadinessResource(gateway)))


def admin_site(gateway: GatewayService) -> Site:
    """The admin listener's site: /metrics, /status, and the probes."""
    site = probe_site(gateway)
    root = site.resource
    root.putChild(b"metrics", MetricsResource(gateway))
    root.putChild(b"status", StatusResource(gateway))
    return site


class ProbeServer:
    """Binds the probe listener as `Configuration.spec.probe` says, rebinding when it changes."""

    def __init__(self, reactor: Any, gateway: GatewayService) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.settings = ProbeSettings()
        self.port: IListeningPort | None = None

    def configure(self, settings: ProbeSettings) -> None:
        """Apply the probe settings of a new plan."""
        if settings == self.settings and (self.port is not None or not settings.enabled):
            return
        self.settings = settings
        self.stop()
        if not settings.enabled:
            return
        try:
            if getattr(self.gateway, "reuse_port", False):  # --workers: each worker answers
                self.port = listen_reuse_port(
                    self.reactor, settings.port, probe_site(self.gateway), settings.host
                )
            else:
                self.port = self.reactor.listenTCP(
                    settings.port, probe_site(self.gateway), interface=settings.host
                )
        except Exception as exc:  # noqa: BLE001 (CannotListenError and friends: report, go on)
            _log.error(
                "Cannot listen for probes on {host}:{port}: {error}",
                host=settings.host,
                port=settings.port,
                error=exc,
            )
            return
        _log.info("Probes on {host}:{port}", host=settings.host, port=settings.port)

    def stop(self) -> Deferred[Any]:
        """Close the probe listener, if any."""
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)
