"""Resolve valid resources into APIs, upstreams, routes and settings: namespaces, references, both models."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from flexgw.config.address import Address, normalise_path, parse_api_address, parse_service_address
from flexgw.config.balancing import balancing_of
from flexgw.config.forwardproxy import ForwardProxy, resolve_forward_proxy
from flexgw.config.located import Origin, origin_of
from flexgw.config.logconf import resolve_logging
from flexgw.config.sources import FieldPath
from flexgw.config.storage import SharedStorage, resolve_shared_storage
from flexgw.config.validate import (
    ROUTE_POLICIES,
    Checked,
    Resource,
    ResourceId,
    policy_name,
)
from flexgw.plan import (
    HttpSettings,
    IPNetwork,
    LoggingSettings,
    ProbeSettings,
    Problem,
    Timeouts,
    Upstream,
)
from flexgw.policies.registry import lookup as lookup_policy
from flexgw.tls.settings import CertificateKey

DEFAULT_ORDER = 50
TLS_KINDS = frozenset({"tls", "tls-outbound"})


@attrs.frozen
class RuleSpec:
    """One rule as written: regex sources, None for "any"."""

    path: str | None = None
    methods: str | None = None
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class DestinationSpec:
    """A route destination by upstream key, before the upstream is looked up."""

    upstream_key: str
    destination_path: str
    weight: int
    origin: Origin


@attrs.frozen
class RouteSpec:
    """One route before compilation."""

    name: str
    order: int
    rules: tuple[RuleSpec, ...]
    destinations: tuple[DestinationSpec, ...]
    origin: Origin
    # tie-break inside one `order`, before the name: () for Flex routes (they come first);
    # Ingress routes carry Kubernetes' precedence (host, path length, path type, age)
    rank: tuple[Any, ...] = ()


@attrs.frozen
class PolicySpec:
    """One policy binding (or inline policy) of a registered kind, before it is built."""

    name: str
    kind: str  # policyRef name
    order: int
    rules: tuple[RuleSpec, ...]
    config: Mapping[str, Any]
    origin: Origin
    source: str  # "selector", "api", "inline" or "service"
    index: int = 0  # position in an inline list (tie-break)


@attrs.frozen
class ApiSpec:
    """One ApiInstance with its address and routes, before compilation."""

    id: ResourceId
    address: Address
    routes: tuple[RouteSpec, ...]
    origin: Origin
    blocked: tuple[str, ...] = ()  # reasons the API must not be served (fail closed)
    policies: tuple[PolicySpec, ...] = ()
    tls: tuple[PolicySpec, ...] = ()  # `tls` bindings: API-bound first, then Selector-bound
    # certificates from Kubernetes Ingress `spec.tls[]` Secrets, picked by SNI on a TLS port
    certificates: tuple[CertificateKey, ...] = ()


@attrs.frozen
class ResolvedModel:
    """Everything compile needs, with the problems found while resolving."""

    apis: tuple[ApiSpec, ...]
    upstreams: Mapping[str, Upstream]
    blocked_upstreams: Mapping[str, str]  # upstream key -> reason (an unsupported outbound policy)
    service_policies: Mapping[str, tuple[PolicySpec, ...]]  # upstream key -> outbound policies
    timeouts: Timeouts
    http: HttpSettings
    problems: tuple[Problem, ...]
    shared_storage: SharedStorage | None = None
    probe: ProbeSettings = attrs.field(factory=ProbeSettings)
    proxy_protocol: bool = False  # Configuration.spec.proxyProtocol.enabled
    forward_proxy: ForwardProxy | None = None  # Configuration.spec.forwardProxy
    circuit_breaker: dict[str, Any] | None = None  # Configuration.spec.circuitBreaker.thresholds
    logging: LoggingSettings = attrs.field(factory=LoggingSettings)
    upstream_tls: Mapping[str, tuple[PolicySpec, ...]] = attrs.field(factory=dict)
    default_tls: PolicySpec | None = None  # Configuration.spec.defaultTLS.outboundPolicyCalls


def _rules(raw: Any) -> tuple[RuleSpec, ...]:
    """Rules as written; an empty rule list, or any rule without conditions, matches everything."""
    if not raw:
        return ()
    rules = []
    for item in raw:
        headers = tuple(sorted((str(k).lower(), v) for k, v in (item.get("headers") or {}).items()))
        rule = RuleSpec(
            path=item.get("path"),
            methods=item.get("methods"),
            host=item.get("host"),
            headers=headers,
        )
        if rule == RuleSpec():
            return ()
        rules.append(rule)
    return tuple(rules)


def _upstream(key: str, address: Address) -> Upstream:
    return Upstream(
        key=key,
        scheme=address.scheme,
        host=address.host,
        port=address.port,
        path_prefix=address.path,
    )


def _env_float(environ: Mapping[str, str], name: str, problems: list[Problem]) -> float | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
        if value > 0:
            return value
    except ValueError:
        pass
    problems.append(
        Problem("warning", f"environment variable {name} is not a positive number; ignored")
    )
    return None


def _settings(
    configurations: Sequence[Resource], environ: Mapping[str, str], problems: list[Problem]
) -> tuple[Timeouts, HttpSettings, ProbeSettings, bool, dict[str, Any] | None]:
    """Merge every Configuration (sorted by id; a later value for the same key wins, with a warning)."""
    merged: dict[str, dict[str, tuple[Any, Origin]]] = {
        "timeouts": {}, "http": {}, "probe": {}, "proxyProtocol": {}, "circuitBreaker": {}
    }
    for resource in configurations:
        for section, table in merged.items():
            block = resource.spec.get(section)
            if not isinstance(block, dict):
                continue
            for key, value in block.items():
                origin = origin_of(resource, ("spec", section, key))
                if key in table and table[key][0] != value:
                    problems.append(
                        origin.problem(
                            "warning",
                            f"overrides the value set in {table[key][1].resource}",
                        )
                    )
                table[key] = (value, origin)

    def pick(section: str, key: str) -> Any:
        entry = merged[section].get(key)
        return None if entry is None else entry[0]

    defaults = Timeouts()
    env_response = _env_float(environ, "FLEX_UPSTREAM_RESPONSE_TIMEOUT_SECONDS", problems)
    env_stream = _env_float(environ, "FLEX_STREAM_IDLE_TIMEOUT_SECONDS", problems)
    env_idle = _env_float(environ, "FLEX_UPSTREAM_CONNECTION_IDLE_TIMEOUT_SECONDS", problems)
    if env_idle is None:
        env_idle = _env_float(environ, "FLEX_CONNECTION_IDLE_TIMEOUT_SECONDS", problems)

    def first(*values: Any) -> float:
        for value in values:
            if value is not None:
                return float(value)
        raise AssertionError("unreachable")  # pragma: no cover

    timeouts = Timeouts(
        upstream_response=first(
            pick("timeouts", "upstreamResponseSeconds"), env_response, defaults.upstream_response
        ),
        stream_idle=first(pick("timeouts", "streamIdleSeconds"), env_stream, defaults.stream_idle),
        upstream_idle=first(
            pick("timeouts", "upstreamConnectionIdleSeconds"), env_idle, defaults.upstream_idle
        ),
    )
    base = HttpSettings()
    rewrite = pick("http", "rewriteHostHeader")
    rewrite_host = base.rewrite_host if rewrite is None else bool(rewrite)
    xfcc_mode = environ.get("FLEX_FORWARD_CLIENT_CERT_DETAILS", "").strip().upper() or "SANITIZE_SET"
    if xfcc_mode not in ("SANITIZE", "SANITIZE_SET"):
        problems.append(
            Problem(
                "warning",
                f"FLEX_FORWARD_CLIENT_CERT_DETAILS={xfcc_mode}: a client-sent "
                "x-forwarded-client-cert is never forwarded; treated as SANITIZE_SET",
            )
        )
    if environ.get("FLEX_REWRITE_HOST_HEADER", "").strip().lower() == "false":
        rewrite_host = False
    networks: list[IPNetwork] = []
    for item in pick("http", "trustedProxies") or ():
        networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
    http2 = pick("http", "http2") or {}
    http = HttpSettings(
        h2_max_concurrent_streams=int(
            http2.get("maxConcurrentStreams", base.h2_max_concurrent_streams)
        ),
        h2_max_resets=int(http2.get("maxStreamResetsPer10Seconds", base.h2_max_resets)),
        h2_max_control_frames=int(
            http2.get("maxControlFramesPer10Seconds", base.h2_max_control_frames)
        ),
        max_header_bytes=int(first(pick("http", "maxHeaderBytes"), base.max_header_bytes)),
        header_timeout=first(pick("http", "headerTimeoutSeconds"), base.header_timeout),
        keepalive_timeout=first(pick("http", "keepAliveTimeoutSeconds"), base.keepalive_timeout),
        connect_timeout=first(pick("http", "connectTimeoutSeconds"), base.connect_timeout),
        rewrite_host=rewrite_host,
        forward_client_cert=xfcc_mode != "SANITIZE",
        trusted_proxies=tuple(networks),
        max_idle_per_upstream=int(
            first(pick("http", "maxIdleConnectionsPerUpstream"), base.max_idle_per_upstream)
        ),
        headers_with_underscores=str(
            pick("http", "headersWithUnderscoresAction") or base.headers_with_underscores
        ),
        normalize_path=_flag(pick("http", "normalizePath"), base.normalize_path),
        merge_slashes=_flag(pick("http", "mergeSlashes"), base.merge_slashes),
        escaped_slashes=str(
            pick("http", "pathWithEscapedSlashesAction") or base.escaped_slashes
        ),
        body_buffer_limit=int(
            first(
                pick("http", "bodyBufferLimitBytes"),
                _env_float(environ, "FLEX_DOWNSTREAM_CONNECTION_BUFFER_LIMIT_BYTES", problems),
                base.body_buffer_limit,
            )
        ),
    )
    probe_defaults = ProbeSettings()
    enabled = pick("probe", "enabled")
    probe = ProbeSettings(
        enabled=bool(enabled),  # off unless `enabled: true`, as Flex
        port=int(first(pick("probe", "port"), probe_defaults.port)),
        host=str(pick("probe", "host") or probe_defaults.host),
    )
    # PROXY protocol on every listener (Flex: `proxyProtocol: {enabled: true}`; off by default).
    proxy_protocol = pick("proxyProtocol", "enabled") is True
    # Gateway-wide circuit-breaker thresholds (Flex: `circuitBreaker.thresholds`).
    thresholds = pick("circuitBreaker", "thresholds")
    breaker = dict(thresholds) if isinstance(thresholds, dict) else None
    return timeouts, http, probe, proxy_protocol, breaker


def _flag(value: Any, default: bool) -> bool:
    """A boolean setting: its value when written, else the default."""
    return default if value is None else bool(value)


def _selector_matches(selector: Any, labels: Mapping[str, str]) -> bool:
    wanted = selector.get("labels") if isinstance(selector, dict) else None
    if not wanted:
        return True
    return all(labels.get(str(k)) == str(v) for k, v in wanted.items())


def _target(spec: Mapping[str, Any], namespace: str) -> tuple[str, ResourceId | None, Any]:
    """(target kind, target id for ApiInstance/Service, selector) of a binding spec."""
    ref = spec.get("targetRef")
    if not isinstance(ref, dict):
        return "ApiInstance", None, None
    kind = ref.get("kind") or "ApiInstance"
    if kind == "Selector":
        return kind, None, ref.get("selector")
    name = ref.get("name")
    if not isinstance(name, str):
        return kind, None, None
    target_ns = ref.get("namespace") or namespace
    return kind, ResourceId(str(kind), str(target_ns), name), None


def resolve(
    resources: Iterable[Resource],
    environ: Mapping[str, str],
    failed: Iterable[Checked] = (),
) -> ResolvedModel:
    """Build APIs, upstreams and settings from valid resources.

    `failed` are documents that failed their own checks and have no last good version: a failed
    PolicyBinding naming a policy other than route/route-weighted still blocks its target, so a
    broken authentication binding never exposes the API it was meant to protect.
    """
    problems: list[Problem] = []
    by_kind: dict[str, list[Resource]] = {}
    for resource in sorted(resources, key=lambda r: r.id):
        by_kind.setdefault(resource.id.kind, []).append(resource)
    apis = {r.id: r for r in by_kind.get("ApiInstance", [])}

    upstreams: dict[str, Upstream] = {}
    for resource in by_kind.get("Service", []):
        address = parse_service_address(resource.spec["address"])
        upstreams[resource.id.key] = attrs.evolve(
            _upstream(resource.id.key, address),
            balancing=balancing_of(resource.spec, address.port),
        )

    routes: dict[ResourceId, list[RouteSpec]] = {rid: [] for rid in apis}
    policies: dict[ResourceId, list[PolicySpec]] = {rid: [] for rid in apis}
    service_policies: dict[str, list[PolicySpec]] = {}
    blocked: dict[ResourceId, list[str]] = {rid: [] for rid in apis}
    blocked_upstreams: dict[str, str] = {}
    api_tls: dict[ResourceId, list[PolicySpec]] = {rid: [] for rid in apis}
    upstream_tls: dict[str, list[PolicySpec]] = {}

    # Inline model: services and routes inside the ApiInstance.
    for rid, resource in apis.items():
        spec = resource.spec
        for service_key, service in (spec.get("services") or {}).items():
            name = f"{rid.name}-{service_key}"
            key = f"{rid.namespace}/{name}"
            upstream = _upstream(key, parse_service_address(service["address"]))
            if key in upstreams and upstreams[key] != upstream:
                problems.append(
                    origin_of(resource, ("spec", "services", service_key)).problem(
                        "warning",
                        f"inline service {key} has the same name as a Service resource; the inline one is used by this API",
                    )
                )
            upstreams[key] = upstream
            raw_routes = service.get("routes") or [{}]
            for n, raw in enumerate(raw_routes, start=1):
                path: FieldPath = ("spec", "services", service_key, "routes", n - 1)
                if not service.get("routes"):
                    path = ("spec", "services", service_key)
                origin = origin_of(resource, path)
                config = raw.get("config") or {}
                destination = DestinationSpec(
                    upstream_key=key,
                    destination_path=normalise_path(config.get("destinationPath") or ""),
                    weight=100,
                    origin=origin,
                )
                routes[rid].append(
                    RouteSpec(
                        name=f"{name}-route-{n}",
                        order=DEFAULT_ORDER,
                        rules=_rules(raw.get("rules")),
                        destinations=(destination,),
                        origin=origin,
                    )
                )
        for n, policy in enumerate(spec.get("policies") or []):
            pname = policy["policyRef"]["name"]
            kind = lookup_policy(pname)
            if pname == "tls":
                api_tls[rid].append(
                    PolicySpec(
                        name=f"{rid.namespace}/{rid.name}-{pname}-{n + 1}",
                        kind=pname,
                        order=DEFAULT_ORDER,
                        rules=(),
                        config=policy.get("config") or {},
                        origin=origin_of(resource, ("spec", "policies", n)),
                        source="inline",
                        index=n,
                    )
                )
                continue
            if kind is not None and kind.phase in ("inbound", "both"):
                order = policy.get("order")
                policies[rid].append(
                    PolicySpec(
                        name=f"{rid.namespace}/{rid.name}-{pname}-{n + 1}",
                        kind=pname,
                        order=DEFAULT_ORDER if order is None else int(order),
                        rules=_rules(policy.get("rules")),
                        config=policy.get("config") or {},
                        origin=origin_of(resource, ("spec", "policies", n)),
                        source="inline",
                        index=n,
                    )
                )
                continue
            problems.append(
                origin_of(resource, ("spec", "policies", n, "policyRef", "name")).problem(
                    "error",
                    f"{_unsupported(pname)}; {rid} is not served (fail closed)",
                )
            )
            blocked[rid].append(f"inline policy {pname!r}")

    # Resource model: route / route-weighted bindings, and unsupported policies that block.
    for resource in by_kind.get("PolicyBinding", []):
        spec = resource.spec
        pname = policy_name(spec) or ""
        kind, target, selector = _target(spec, resource.id.namespace)
        origin = origin_of(resource)
        if pname in TLS_KINDS:
            _attach_tls(
                pname, resource, kind, target, selector, origin, apis, api_tls, upstream_tls,
                problems,
            )
            continue
        if pname not in ROUTE_POLICIES:
            registered = lookup_policy(pname)
            if registered is not None and _attach_policy(
                registered, resource, kind, target, selector, origin, apis,
                policies, service_policies, problems,
            ):
                continue
            _block(
                pname, kind, target, selector, origin, apis, blocked, blocked_upstreams, problems
            )
            continue
        if kind != "ApiInstance" or target is None:
            problems.append(
                origin.problem(
                    "error",
                    f"a {pname} binding must target an ApiInstance; ignored",
                    ("spec", "targetRef"),
                )
            )
            continue
        if target not in apis:
            problems.append(
                origin.problem(
                    "error",
                    f"target {target} does not exist; binding ignored",
                    ("spec", "targetRef"),
                )
            )
            continue
        config = spec.get("config") or {}
        items: list[tuple[dict[str, Any], FieldPath, int]]
        if pname == "route":
            items = [(config, ("spec", "config"), 100)]
        else:
            items = [
                (item, ("spec", "config", "routes", i), int(item["weight"]))
                for i, item in enumerate(config["routes"])
            ]
        destinations = []
        for item, path, weight in items:
            ref = item["destinationRef"]
            ns = ref.get("namespace") or resource.id.namespace
            destinations.append(
                DestinationSpec(
                    upstream_key=f"{ns}/{ref['name']}",
                    destination_path=normalise_path(item.get("destinationPath") or ""),
                    weight=weight,
                    origin=origin_of(resource, path + ("destinationRef",)),
                )
            )
        order = spec.get("order")
        routes[target].append(
            RouteSpec(
                name=resource.id.key,
                order=DEFAULT_ORDER if order is None else int(order),
                rules=_rules(spec.get("rules")),
                destinations=tuple(destinations),
                origin=origin,
            )
        )

    for checked in failed:
        value = checked.document.value
        if checked.id is None or checked.id.kind != "PolicyBinding" or not isinstance(value, dict):
            continue
        raw_spec = value.get("spec")
        pname = policy_name(raw_spec)
        if pname is None or pname in ROUTE_POLICIES or not isinstance(raw_spec, dict):
            continue
        kind, target, selector = _target(raw_spec, checked.id.namespace)
        origin = Origin(checked.document, (), str(checked.id))
        _block(
            pname, kind, target, selector, origin, apis, blocked, blocked_upstreams, problems,
            invalid=lookup_policy(pname) is not None,
        )

    timeouts, http, probe, proxy_protocol, breaker = _settings(
        by_kind.get("Configuration", []), environ, problems
    )

    shared_storage = resolve_shared_storage(by_kind.get("Configuration", []), problems)
    forward_proxy = resolve_forward_proxy(by_kind.get("Configuration", []), problems)
    logging = resolve_logging(by_kind.get("Configuration", []), environ, problems)

    api_specs = []
    for rid, resource in apis.items():
        api_specs.append(
            ApiSpec(
                id=rid,
                address=parse_api_address(resource.spec["address"]),
                routes=tuple(routes[rid]),
                origin=origin_of(resource),
                blocked=tuple(blocked[rid]),
                policies=tuple(policies[rid]),
                # API-bound (and inline) bindings win over Selector-bound ones.
                tls=tuple(sorted(api_tls[rid], key=lambda p: p.source == "selector")),
            )
        )
    return ResolvedModel(
        apis=tuple(api_specs),
        upstreams=upstreams,
        blocked_upstreams=blocked_upstreams,
        service_policies={key: tuple(specs) for key, specs in service_policies.items()},
        timeouts=timeouts,
        http=http,
        problems=tuple(problems),
        shared_storage=shared_storage,
        probe=probe,
        logging=logging,
        proxy_protocol=proxy_protocol,
        forward_proxy=forward_proxy,
        circuit_breaker=breaker,
        upstream_tls={key: tuple(specs) for key, specs in upstream_tls.items()},
        default_tls=_default_tls(by_kind.get("Configuration", [])),
    )


def _default_tls(configurations: Sequence[Resource]) -> PolicySpec | None:
    """`defaultTLS.outboundPolicyCalls` of the last Configuration that sets it."""
    found = None
    for resource in configurations:
        block = resource.spec.get("defaultTLS")
        calls = block.get("outboundPolicyCalls") if isinstance(block, dict) else None
        if isinstance(calls, dict):
            found = PolicySpec(
                name=resource.id.key,
                kind="tls-outbound",
                order=0,
                rules=(),
                config=calls,
                origin=origin_of(resource, ("spec", "defaultTLS", "outboundPolicyCalls")),
                source="configuration",
            )
    return found


def _attach_tls(
    pname: str,
    resource: Resource,
    kind: str,
    target: ResourceId | None,
    selector: Any,
    origin: Origin,
    apis: Mapping[ResourceId, Resource],
    api_tls: dict[ResourceId, list[PolicySpec]],
    upstream_tls: dict[str, list[PolicySpec]],
    problems: list[Problem],
) -> None:
    """Take a `tls` / `tls-outbound` binding aside: compile makes contexts of them, not policies."""
    spec = resource.spec
    make = lambda source: PolicySpec(
        name=resource.id.key,
        kind=pname,
        order=DEFAULT_ORDER,  # TLS policies ignore `order`, as Flex
        rules=(),
        config=spec.get("config") or {},
        origin=origin,
        source=source,
    )
    if spec.get("rules"):
        problems.append(
            origin.problem("warning", f"rules do not apply to {pname}; ignored", ("spec", "rules"))
        )
    if pname == "tls-outbound":
        if kind != "Service" or target is None:
            problems.append(
                origin.problem(
                    "error", "tls-outbound must be bound to a Service; ignored", ("spec", "targetRef")
                )
            )
            return
        upstream_tls.setdefault(target.key, []).append(make("service"))
        return
    if kind == "Selector":
        for rid, res in apis.items():
            if _selector_matches(selector, res.labels):
                api_tls[rid].append(make("selector"))
        return
    if kind != "ApiInstance" or target is None:
        problems.append(
            origin.problem(
                "error", "tls must be bound to an ApiInstance or a Selector; ignored",
                ("spec", "targetRef"),
            )
        )
        return
    if target not in apis:
        problems.append(
            origin.problem(
                "error", f"target {target} does not exist; binding ignored", ("spec", "targetRef")
            )
        )
        return
    api_tls[target].append(make("api"))


def _attach_policy(
    registered: Any,
    resource: Resource,
    kind: str,
    target: ResourceId | None,
    selector: Any,
    origin: Origin,
    apis: Mapping[ResourceId, Resource],
    policies: dict[ResourceId, list[PolicySpec]],
    service_policies: dict[str, list[PolicySpec]],
    problems: list[Problem],
) -> bool:
    """Attach a binding of a registered kind to its targets; False when it cannot be (block)."""
    spec = resource.spec
    order = spec.get("order")
    pname = registered.name
    make = lambda source: PolicySpec(
        name=resource.id.key,
        kind=pname,
        order=DEFAULT_ORDER if order is None else int(order),
        rules=_rules(spec.get("rules")),
        config=spec.get("config") or {},
        origin=origin,
        source=source,
    )
    if kind == "Service":
        if registered.phase not in ("outbound", "both") or target is None:
            problems.append(
                origin.problem(
                    "error",
                    f"policy {pname!r} is an inbound policy; bind it to an ApiInstance",
                    ("spec", "targetRef"),
                )
            )
            return False
        service_policies.setdefault(target.key, []).append(make("service"))
        return True
    if registered.phase not in ("inbound", "both"):
        problems.append(
            origin.problem(
                "error",
                f"policy {pname!r} is an outbound policy; bind it to a Service",
                ("spec", "targetRef"),
            )
        )
        return False
    if kind == "Selector":
        for rid, res in apis.items():
            if _selector_matches(selector, res.labels):
                policies[rid].append(make("selector"))
        return True
    if target is None or target not in apis:
        problems.append(
            origin.problem(
                "error", f"target {target} does not exist; binding ignored", ("spec", "targetRef")
            )
        )
        return True
    policies[target].append(make("api"))
    return True


def _block(
    pname: str,
    kind: str,
    target: ResourceId | None,
    selector: Any,
    origin: Origin,
    apis: Mapping[ResourceId, Resource],
    blocked: dict[ResourceId, list[str]],
    blocked_upstreams: dict[str, str],
    problems: list[Problem],
    invalid: bool = False,
) -> None:
    """Record that an unsupported (or invalid) policy keeps its targets from being served."""
    if invalid:
        _block_invalid(pname, kind, target, selector, origin, apis, blocked, blocked_upstreams)
        return
    reason = f"policy {pname!r} ({origin.resource})"
    field: FieldPath = ("spec", "policyRef", "name")
    if kind == "Selector":
        hits = [rid for rid, res in apis.items() if _selector_matches(selector, res.labels)]
        for rid in hits:
            blocked[rid].append(reason)
        names = ", ".join(str(rid) for rid in hits) or "no ApiInstance"
        problems.append(
            origin.problem(
                "error",
                f"{_unsupported(pname)}; not served (fail closed): {names}",
                field,
            )
        )
    elif kind == "Service" and target is not None:
        blocked_upstreams[target.key] = reason
        problems.append(
            origin.problem(
                "error",
                f"{_unsupported(pname)}; APIs routing to Service {target.key} are not served (fail closed)",
                field,
            )
        )
    elif target is not None:
        if target in apis:
            blocked[target].append(reason)
            message = f"{_unsupported(pname)}; {target} is not served (fail closed)"
        else:
            message = f"{_unsupported(pname)}; its target {target} does not exist"
        problems.append(origin.problem("error", message, field))
    else:
        problems.append(origin.problem("error", _unsupported(pname), field))


def _unsupported(pname: str) -> str:
    """The error for a policy name that no built-in or loaded policy kind provides, saying how
    a custom one is loaded."""
    return (
        f"policy {pname!r} is not supported yet (a custom policy kind is loaded with"
        " --policy-module MODULE, for twistd flexgw and flexgw validate alike, or installed"
        " with a flexgw.policies entry point)"
    )


def _block_invalid(
    pname: str,
    kind: str,
    target: ResourceId | None,
    selector: Any,
    origin: Origin,
    apis: Mapping[ResourceId, Resource],
    blocked: dict[ResourceId, list[str]],
    blocked_upstreams: dict[str, str],
) -> None:
    """An invalid binding of a known policy blocks its targets (its own errors are reported)."""
    reason = f"invalid {pname!r} binding ({origin.resource})"
    if kind == "Selector":
        for rid, res in apis.items():
            if _selector_matches(selector, res.labels):
                blocked[rid].append(reason)
    elif kind == "Service" and target is not None:
        blocked_upstreams[target.key] = reason
    elif target is not None and target in apis:
        blocked[target].append(reason)
