"""Compile a resolved model into listeners and route tables: regexes compiled once, ports checked."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import attrs

from flexgw.config.regex import RegexError, compile_rule_regex
from flexgw.config.resolve import ApiSpec, PolicySpec, ResolvedModel, RouteSpec, RuleSpec
from flexgw.config.tracing import api_sampler
from flexgw.http import alpn
from flexgw.plan import (
    Api,
    BoundPolicy,
    Destination,
    Listener,
    PolicyConfigError,
    Problem,
    Route,
    Rule,
    Upstream,
)
from flexgw.policies.base import BuildContext, PolicyCapabilities
from flexgw.policies.circuit_breaker import BREAKER_KIND, BREAKER_NAME
from flexgw.policies.registry import lookup as lookup_policy
from flexgw.policies.tracing import NAME as TRACING_NAME
from flexgw.tls.contexts import UPSTREAM_ALPN, build_client_tls, build_server_tls
from flexgw.tls.settings import TLSSettings

FORWARD_PROXY = "forward-proxy"  # flexgw.policies.forward_proxy.NAME (not imported: compile stays light)

_ANY = frozenset({".*", "(?s).*", "[\\s\\S]*"})


@attrs.frozen
class Compiled:
    """The listeners of a plan and the problems compiling found."""

    listeners: tuple[Listener, ...]
    problems: tuple[Problem, ...]
    served: frozenset[str]  # keys of the ApiInstances being served
    tls_files: tuple[str, ...] = ()  # certificate/key/CA files read
    # "kind:binding" -> TLS settings built (or kept): the next reload's last good versions
    tls_good: Mapping[str, TLSSettings] = attrs.field(factory=dict)


def _regex(source: str | None) -> re.Pattern[str] | None:
    if source is None or source in _ANY:
        return None
    return compile_rule_regex(source)


def compile_rule(spec: RuleSpec) -> Rule:
    """A plan Rule; `.*` conditions are dropped (None already means "any")."""
    headers = tuple((name, compile_rule_regex(value)) for name, value in spec.headers)
    return Rule(
        path=_regex(spec.path),
        methods=_regex(spec.methods),
        host=_regex(spec.host),
        headers=headers,
    )


def is_catch_all(route: Route) -> bool:
    """True when the route matches every request."""
    return not route.rules or any(
        rule.path is None and rule.methods is None and rule.host is None and not rule.headers
        for rule in route.rules
    )


def base_paths_overlap(a: str, b: str) -> bool:
    """Segment-wise prefix overlap; an empty base path overlaps everything."""
    sa = [s for s in a.split("/") if s]
    sb = [s for s in b.split("/") if s]
    n = min(len(sa), len(sb))
    return sa[:n] == sb[:n]


def _compile_route(
    spec: RouteSpec,
    upstreams: Mapping[str, Upstream],
    problems: list[Problem],
    service_policies: Mapping[str, tuple[BoundPolicy, ...]] = {},
) -> Route | None:
    destinations = []
    for dest in spec.destinations:
        upstream = upstreams.get(dest.upstream_key)
        if upstream is None:
            problems.append(
                dest.origin.problem("error", f"Service {dest.upstream_key} does not exist")
            )
            continue
        destinations.append(
            Destination(
                upstream=upstream,
                destination_path=dest.destination_path,
                weight=dest.weight,
                policies=service_policies.get(upstream.key, ()),
            )
        )
    if not destinations:
        problems.append(
            spec.origin.problem("error", f"route {spec.name} has no usable destination; dropped")
        )
        return None
    try:
        rules = tuple(compile_rule(rule) for rule in spec.rules)
    except RegexError as exc:  # validated earlier; kept as a guard
        problems.append(spec.origin.problem("error", f"invalid regex: {exc.message}"))
        return None
    route = Route(name=spec.name, order=spec.order, rules=rules, destinations=tuple(destinations))
    if is_catch_all(route) and route.rules:
        route = attrs.evolve(route, rules=())
    return route


def via_forward_proxy(upstream: Upstream, proxy: Any) -> Upstream:
    """`upstream` reached through `proxy` (unless its noProxy matches the host): plain HTTP in
    absolute form with the proxy's credentials on the request line's heels, https by CONNECT."""
    if proxy.bypasses(upstream.host):
        return upstream
    if upstream.scheme != "http" or upstream.tls is not None:
        return attrs.evolve(upstream, proxy=proxy)  # TLS inside a CONNECT tunnel
    line_end = b" HTTP/1.1\r\n"
    if proxy.authorization is not None:
        line_end += b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
    return attrs.evolve(
        upstream,
        proxy=proxy,
        request_prefix=b"http://" + upstream.authority.encode("latin-1"),
        request_line_end=line_end,
    )


def _default_breaker(key: str, thresholds: Mapping[str, Any], runtime: Any) -> BoundPolicy:
    """The gateway-wide circuit breaker for Service `key` (its own state, per Service)."""
    name = f"Configuration.circuitBreaker/{key}"
    context = BuildContext(
        binding=name,
        api=None,
        clock=runtime.clock if runtime is not None else None,
        reactor=runtime.reactor if runtime is not None else None,
        services=runtime,
    )
    policy = BREAKER_KIND.build({"thresholds": dict(thresholds)}, context)
    return BoundPolicy(
        name=name, kind=BREAKER_NAME, order=0, rules=(), policy=policy,
        responds=False, finishes=True,
    )


def _source_rank(policy: PolicySpec) -> int:
    if policy.kind == "cors-flex":
        return 0  # CORS always runs first, whatever its order
    return 1 if policy.source == "selector" else 2


def config_problem(spec: PolicySpec, message: str, field: str | None = None) -> Problem:
    """An error located at `field` (dotted, list indexes as numbers) of a binding's config."""
    sub: tuple[str | int, ...] = ("config",) if spec.source == "inline" else ("spec", "config")
    if field:
        sub += tuple(int(p) if p.isdigit() else p for p in field.split("."))
    return spec.origin.problem("error", message, sub)


def build_policies(
    specs: tuple[PolicySpec, ...], api: str | None, runtime: Any, problems: list[Problem]
) -> tuple[BoundPolicy, ...] | None:
    """Build every policy of a chain in run order; None when one cannot be built (fail closed)."""
    ordered = sorted(specs, key=lambda p: (_source_rank(p), p.order, p.index, p.name))
    built = []
    for spec in ordered:
        kind = lookup_policy(spec.kind)
        context = BuildContext(
            binding=spec.name,
            api=api,
            clock=runtime.clock if runtime is not None else None,
            reactor=runtime.reactor if runtime is not None else None,
            services=runtime,
        )
        config = dict(spec.config)
        if kind.schema.get("additionalProperties") is False:
            # Unknown keys were reported (warnings unless --strict); the kind never sees them.
            known = kind.schema.get("properties", {})
            config = {key: value for key, value in config.items() if key in known}
        try:
            rules = tuple(compile_rule(rule) for rule in spec.rules)
            policy = kind.build(config, context)
        except RegexError as exc:
            problems.append(spec.origin.problem("error", str(exc), ("spec", "rules")))
            return None
        except PolicyConfigError as exc:
            problems.append(config_problem(spec, exc.message, exc.field))
            return None
        except Exception as exc:  # noqa: BLE001 (a broken policy kind must not stop a reload)
            problems.append(
                spec.origin.problem("error", f"policy {spec.kind!r} could not be built: {exc!r}")
            )
            return None
        if any(rule.path is None and rule.methods is None and rule.host is None
               and not rule.headers for rule in rules):
            rules = ()
        capabilities = PolicyCapabilities.of(policy)
        built.append(
            BoundPolicy(
                name=spec.name,
                kind=spec.kind,
                order=spec.order,
                rules=rules,
                policy=policy,
                needs_body=capabilities.needs_body,
                responds=capabilities.response_phase,
                finishes=capabilities.on_done,
                responds_async=capabilities.response_async,
            )
        )
    return tuple(built)


def _compile_api(
    spec: ApiSpec,
    model: ResolvedModel,
    problems: list[Problem],
    service_policies: Mapping[str, tuple[BoundPolicy, ...]] = {},
    runtime: Any = None,
) -> Api | None:
    if spec.blocked:
        invalid = [reason for reason in spec.blocked if reason.startswith("invalid ")]
        if invalid:
            problems.append(
                spec.origin.problem(
                    "error", "not served (fail closed) because of: " + "; ".join(invalid)
                )
            )
        return None
    if any(policy.kind == FORWARD_PROXY for policy in spec.policies):
        return _compile_forward_proxy(spec, model, problems, service_policies, runtime)
    routes: list[Route] = []
    for route_spec in sorted(spec.routes, key=lambda r: (r.order, r.rank, r.name)):
        route = _compile_route(route_spec, model.upstreams, problems, service_policies)
        if route is not None:
            routes.append(route)
    used = {d.upstream.key for r in routes for d in r.destinations}
    for key in sorted(used & set(model.blocked_upstreams)):
        problems.append(
            spec.origin.problem(
                "error",
                f"routes to Service {key}, which has {model.blocked_upstreams[key]}; not served (fail closed)",
            )
        )
        return None
    for i, route in enumerate(routes[:-1]):
        if is_catch_all(route):
            later = ", ".join(r.name for r in routes[i + 1 :])
            problems.append(
                spec.origin.problem(
                    "warning",
                    f"route {route.name} matches every request, so these routes are never used: {later}",
                )
            )
            break
    if not routes:
        problems.append(
            spec.origin.problem("warning", "no routes: every request to this API gets 404")
        )
    policies = build_policies(spec.policies, spec.id.key, runtime, problems)
    if policies is None:
        problems.append(
            spec.origin.problem("error", "a policy could not be built; not served (fail closed)")
        )
        return None
    tracing = None
    if model.tracing is not None:
        override = next((b.policy for b in policies if b.kind == TRACING_NAME), None)
        tracing = api_sampler(model.tracing[1], override)
    policies = tuple(b for b in policies if b.kind != TRACING_NAME)  # compile-time only
    # upstream-retry bound to the API: its retry policy for every Service it routes to (over a
    # Service's own binding); like any configuring policy it never runs per request.
    retry = next(
        (
            b.policy.upstream_settings["retry"]
            for b in policies
            if "retry" in (getattr(b.policy, "upstream_settings", None) or {})
        ),
        None,
    )
    if retry is not None:
        policies = tuple(b for b in policies if PolicyCapabilities.of(b.policy).chain_member)
        routes = [
            attrs.evolve(
                route,
                destinations=tuple(
                    attrs.evolve(d, upstream=attrs.evolve(d.upstream, retry=retry))
                    for d in route.destinations
                ),
            )
            for route in routes
        ]
    routes = [
        attrs.evolve(route, destinations=tuple(_with_chain(d, policies) for d in route.destinations))
        for route in routes
    ]
    return Api(
        key=spec.id.key, base_path=spec.address.path, routes=tuple(routes), policies=policies,
        tracing=tracing,
    )


def _compile_forward_proxy(
    spec: ApiSpec,
    model: ResolvedModel,
    problems: list[Problem],
    service_policies: Mapping[str, tuple[BoundPolicy, ...]],
    runtime: Any,
) -> Api | None:
    """A forward-proxy ApiInstance: no routes; its policies (basic auth in its proxy form) run
    before the destination checks; only the Services its binding names (`services`) may be
    matched by a destination (never implicitly: that would skip the blocked ranges)."""
    if spec.address.path not in ("", "/"):
        problems.append(
            spec.origin.problem(
                "error", "a forward-proxy ApiInstance has no base path; not served", ("spec", "address")
            )
        )
        return None
    if spec.routes:
        problems.append(
            spec.origin.problem(
                "warning", "a forward-proxy ApiInstance does not route: its services are not used"
            )
        )
    policies = build_policies(spec.policies, spec.id.key, runtime, problems)
    if policies is None:
        problems.append(
            spec.origin.problem("error", "a policy could not be built; not served (fail closed)")
        )
        return None
    forward = [bound for bound in policies if bound.kind == FORWARD_PROXY]
    if len(forward) > 1:
        problems.append(
            spec.origin.problem("error", "several forward-proxy bindings; not served (fail closed)")
        )
        return None
    chain = []
    for bound in policies:
        if bound.kind == FORWARD_PROXY:
            continue
        proxy_form = getattr(bound.policy, "for_proxy", None)
        if proxy_form is not None:
            bound = attrs.evolve(bound, policy=proxy_form())
        chain.append(bound)
    api_policies = tuple(chain)
    config = forward[0].policy
    [binding] = [p for p in spec.policies if p.kind == FORWARD_PROXY]
    services = []
    for i, key in enumerate(config.services):
        upstream = model.upstreams.get(key)
        if upstream is None:
            problems.append(
                config_problem(binding, f"Service {key} does not exist; not mapped", f"services.{i}")
            )
            continue
        if key in model.blocked_upstreams:
            problems.append(
                config_problem(
                    binding,
                    f"Service {key} has {model.blocked_upstreams[key]}; not served (fail closed)",
                    f"services.{i}",
                )
            )
            return None
        services.append(
            _with_chain(Destination(upstream=upstream, policies=service_policies.get(key, ())), api_policies)
        )
    return Api(
        key=spec.id.key,
        base_path="",
        routes=(),
        policies=api_policies,
        forward_proxy=config,
        proxy_services=tuple(services),
    )


def _with_chain(destination: Destination, api_policies: tuple[BoundPolicy, ...]) -> Destination:
    """The destination with its whole chain precomputed (nothing to concatenate per request)."""
    chain = api_policies + destination.policies
    return attrs.evolve(
        destination, chain=chain, chain_has_rules=any(bound.rules for bound in chain)
    )


def build_tls_settings(spec: PolicySpec, problems: list[Problem]) -> TLSSettings | None:
    """Parse a `tls` / `tls-outbound` binding (or defaultTLS block); None, with a located
    problem, when its config is wrong."""
    kind = lookup_policy(spec.kind)
    config = dict(spec.config)
    known = kind.schema.get("properties", {})
    config = {key: value for key, value in config.items() if key in known}
    sub: tuple[str | int, ...] = {"inline": ("config",), "configuration": ()}.get(
        spec.source, ("spec", "config")
    )
    try:
        settings: TLSSettings = kind.build(config, BuildContext(binding=spec.name, api=None))
    except PolicyConfigError as exc:
        if exc.field:
            sub += tuple(int(p) if p.isdigit() else p for p in exc.field.split("."))
        problems.append(spec.origin.problem("error", exc.message, sub))
        return None
    return settings


class _TLSBuilder:
    """Builds TLS bindings; one that fails (say a certificate file replaced by garbage) keeps
    its last good settings, with the error reported, so the running TLS keeps serving."""

    def __init__(self, last_good: Mapping[str, TLSSettings]) -> None:
        self.last_good = last_good
        self.good: dict[str, TLSSettings] = {}

    def __call__(self, spec: PolicySpec, problems: list[Problem]) -> TLSSettings | None:
        key = f"{spec.kind}:{spec.name}"
        settings = build_tls_settings(spec, problems)
        if settings is None and key in self.last_good:
            problems.append(
                spec.origin.problem("warning", "the last good TLS settings of this binding keep serving")
            )
            settings = self.last_good[key]
        if settings is not None:
            self.good[key] = settings
        return settings


def _tls_upstreams(
    model: ResolvedModel, problems: list[Problem], files: list[str], build: _TLSBuilder
) -> tuple[dict[str, Upstream], dict[str, str]]:
    """Upstreams with their client TLS compiled; the keys of those whose TLS failed (blocked)."""
    upstreams = dict(model.upstreams)
    blocked: dict[str, str] = {}
    for key in sorted(set(model.upstream_tls) - set(upstreams)):
        for spec in model.upstream_tls[key]:
            problems.append(
                spec.origin.problem(
                    "warning", f"Service {key} does not exist; binding ignored", ("spec", "targetRef")
                )
            )
    for key, upstream in sorted(upstreams.items()):
        specs = model.upstream_tls.get(key, ())
        if not specs and upstream.scheme not in ("https", "h2"):
            continue
        settings = TLSSettings()  # an https:// Service without a binding: verified defaults
        if specs:
            for extra in specs[1:]:
                problems.append(
                    extra.origin.problem(
                        "warning",
                        f"Service {key} already has tls-outbound {specs[0].name}; this binding is ignored",
                    )
                )
            built = build(specs[0], problems)
            if built is None:
                blocked[key] = f"an invalid tls-outbound binding ({specs[0].origin.resource})"
                continue
            settings = built
            if upstream.scheme not in ("h2", "h2c") and not any(
                name.encode("ascii") in UPSTREAM_ALPN for name in settings.alpn
            ):
                problems.append(
                    specs[0].origin.problem(
                        "warning",
                        "alpn names no protocol the gateway's upstream client speaks yet "
                        f"({', '.join(n.decode() for n in UPSTREAM_ALPN)}); no ALPN is offered",
                        ("spec", "config", "alpn"),
                    )
                )
            if upstream.scheme not in ("https", "h2"):
                problems.append(
                    specs[0].origin.problem(
                        "warning", f"Service {key} has an http:// address; TLS is used (tls-outbound)"
                    )
                )
            if settings.skip_validation:
                problems.append(
                    specs[0].origin.problem(
                        "warning",
                        f"skipValidation: the certificate of Service {key} is not verified",
                        ("spec", "config", "skipValidation"),
                    )
                )
        files.extend(settings.files)
        try:
            tls = build_client_tls(settings, upstream.host, http2=upstream.scheme in ("h2", "h2c"))
        except Exception as exc:  # noqa: BLE001 (OpenSSL refuses the settings: report, fail closed)
            origin = specs[0].origin if specs else None
            message = f"outbound TLS for Service {key} cannot be set up: {exc}"
            problems.append(origin.problem("error", message) if origin else Problem("error", message))
            blocked[key] = "outbound TLS that cannot be set up"
            continue
        upstreams[key] = attrs.evolve(upstream, tls=tls)
    return upstreams, blocked


def _api_tls(
    spec: ApiSpec,
    problems: list[Problem],
    cache: dict[str, TLSSettings | None],
    build: _TLSBuilder,
) -> tuple[bool, TLSSettings | None]:
    """(servable, the API's inbound TLS settings or None for plain HTTP)."""
    if not spec.tls:
        if spec.certificates and spec.address.scheme == "https":
            # Ingress certificates alone: default TLS settings, the oldest Ingress' certificate
            # as the default one, the others picked by SNI (see _port_tls)
            return True, TLSSettings(certificate=spec.certificates[0])
        if spec.address.scheme == "https":
            problems.append(
                spec.origin.problem(
                    "error",
                    "an https:// address needs a tls binding (its certificate); not served",
                    ("spec", "address"),
                )
            )
            return False, None
        return True, None
    first = spec.tls[0]
    for extra in spec.tls[1:]:
        if extra.name != first.name:
            problems.append(
                extra.origin.problem(
                    "warning",
                    f"ApiInstance {spec.id.key} already has tls binding {first.name}; this one does not apply to it",
                )
            )
    if first.name not in cache:
        cache[first.name] = build(first, problems)
    settings = cache[first.name]
    if settings is None:
        problems.append(
            spec.origin.problem(
                "error", f"its tls binding {first.name} is invalid; not served (fail closed)"
            )
        )
        return False, None
    if spec.address.scheme != "https":
        problems.append(
            spec.origin.problem(
                "warning",
                f"the address is http:// but tls binding {first.name} applies: the port serves TLS",
                ("spec", "address"),
            )
        )
    return True, settings


def compile_default_tls(model: ResolvedModel) -> tuple[TLSSettings | None, tuple[Problem, ...]]:
    """`defaultTLS.outboundPolicyCalls` parsed (None when absent or invalid, with its problems)."""
    problems: list[Problem] = []
    if model.default_tls is None:
        return None, ()
    settings = build_tls_settings(model.default_tls, problems)
    if settings is not None and settings.skip_validation:
        problems.append(
            model.default_tls.origin.problem(
                "warning",
                "skipValidation: certificates of the gateway's own side calls (JWKS, introspection) are not verified",
                ("skipValidation",),
            )
        )
    return settings, tuple(problems)


def _port_tls(
    items: list[tuple[Api, ApiSpec, TLSSettings | None]], problems: list[Problem]
) -> Any:
    """The port's ServerTLS: the first API's binding sets everything; other bindings on the
    port add their certificates (picked by SNI). None when it cannot be built."""
    first_api, first_spec, settings = items[0]
    assert settings is not None
    others = list(first_spec.certificates)
    for api, spec, other in items[1:]:
        assert other is not None
        if attrs.evolve(other, certificate=settings.certificate, files=settings.files) != settings:
            problems.append(
                _tls_origin(spec).problem(
                    "warning",
                    f"TLS is per port: on port {spec.address.port} every setting but the certificate "
                    f"comes from {_tls_source(first_spec)} (ApiInstance {first_api.key})",
                )
            )
        assert other.certificate is not None
        others.append(other.certificate)
        others.extend(spec.certificates)
    if settings.min_version < (1, 2):
        problems.append(
            first_spec.tls[0].origin.problem(
                "warning",
                f"TLS 1.1 is allowed on port {first_spec.address.port} (OpenSSL security level 0 "
                "there: only the listed ciphers protect it)",
            )
        )
    if not any(name.encode("ascii") in alpn.SERVED_ALPN for name in settings.alpn):
        problems.append(
            _tls_origin(first_spec).problem(
                "warning",
                "alpn names no protocol the gateway serves yet "
                f"({', '.join(n.decode() for n in alpn.SERVED_ALPN)}); no ALPN is advertised",
            )
        )
    try:
        return build_server_tls(settings, others, alpn.SERVED_ALPN)
    except Exception as exc:  # noqa: BLE001 (OpenSSL refuses a key, chain or cipher list)
        problems.append(
            _tls_origin(first_spec).problem(
                "error", f"TLS cannot be set up on port {first_spec.address.port}: {exc}; not served"
            )
        )
        return None


def _tls_origin(spec: ApiSpec) -> Any:
    """Where an API's TLS comes from: its tls binding, else the API (Ingress certificates)."""
    return spec.tls[0].origin if spec.tls else spec.origin


def _tls_source(spec: ApiSpec) -> str:
    return spec.tls[0].name if spec.tls else "the default TLS settings (Ingress certificates)"


def compile_model(
    model: ResolvedModel,
    prefer: Collection[str] = (),
    runtime: Any = None,
    last_good_tls: Mapping[str, TLSSettings] = {},
) -> Compiled:
    """Listeners from a resolved model.

    When two ApiInstances conflict (same port with another host, overlapping base paths), the
    one in `prefer` (the APIs served by the previous plan) wins, then the first by key; the
    other is reported and not served.
    """
    problems: list[Problem] = list(model.problems)
    service_policies: dict[str, tuple[BoundPolicy, ...]] = {}
    blocked_upstreams = dict(model.blocked_upstreams)
    tls_files: list[str] = []
    build_tls = _TLSBuilder(last_good_tls)
    upstreams, tls_blocked = _tls_upstreams(model, problems, tls_files, build_tls)
    blocked_upstreams.update(tls_blocked)
    upstreams = dict(upstreams)
    if model.forward_proxy is not None:
        for key, upstream in upstreams.items():
            upstreams[key] = via_forward_proxy(upstream, model.forward_proxy)
    model = attrs.evolve(model, upstreams=upstreams)
    upstreams_changed = False  # (idle_timeout is not part of an Upstream's equality)
    for key, specs in sorted(model.service_policies.items()):
        built = build_policies(specs, None, runtime, problems)
        if built is None:
            blocked_upstreams[key] = "an outbound policy that could not be built"
            continue
        for bound in built:
            idle = getattr(bound.policy, "upstream_idle_timeout", None)
            if idle is not None and key in upstreams:  # idle-timeout-flex: the pool's setting
                upstreams[key] = attrs.evolve(upstreams[key], idle_timeout=idle)
                upstreams_changed = True
            # upstream-retry, -outlier-detection, -health-check: the Service's cluster settings
            settings = getattr(bound.policy, "upstream_settings", None)
            if settings and key in upstreams:
                upstreams[key] = attrs.evolve(upstreams[key], **settings)
                upstreams_changed = True
        # Policies that only configure something (chain_member = False) never run per request.
        service_policies[key] = tuple(
            bound for bound in built if PolicyCapabilities.of(bound.policy).chain_member
        )
    if model.circuit_breaker is not None:
        # Configuration.spec.circuitBreaker: the same thresholds for every Service that has no
        # circuit-breaker-flex binding of its own (a binding overrides them, as in Flex).
        for key in sorted(upstreams):
            if key in blocked_upstreams:
                continue
            bound = service_policies.get(key, ())
            if any(b.kind == BREAKER_NAME for b in bound):
                continue
            service_policies[key] = (*bound, _default_breaker(key, model.circuit_breaker, runtime))
    if blocked_upstreams != model.blocked_upstreams or upstreams_changed:
        model = attrs.evolve(model, blocked_upstreams=blocked_upstreams, upstreams=upstreams)
    ordered = sorted(model.apis, key=lambda a: (a.id.key not in prefer, a.id.key))
    ports: dict[int, tuple[str, str]] = {}  # port -> (host, first api key)
    accepted: dict[int, list[tuple[Api, ApiSpec, TLSSettings | None]]] = {}
    tls_cache: dict[str, TLSSettings | None] = {}
    for spec in ordered:
        servable, tls = _api_tls(spec, problems, tls_cache, build_tls)
        if not servable:
            continue
        api = _compile_api(spec, model, problems, service_policies, runtime)
        if api is None:
            continue
        address = spec.address
        if address.port in accepted and (accepted[address.port][0][2] is None) != (tls is None):
            other = accepted[address.port][0][0].key
            problems.append(
                spec.origin.problem(
                    "error",
                    f"port {address.port} serves {'plain HTTP' if tls else 'TLS'} for ApiInstance "
                    f"{other}; one port cannot mix TLS and plain HTTP; not served",
                    ("spec", "address"),
                )
            )
            continue
        if address.port in ports and ports[address.port][0] != address.host:
            host, other = ports[address.port]
            problems.append(
                spec.origin.problem(
                    "error",
                    f"port {address.port} is already bound to host {host} by ApiInstance {other}; not served",
                    ("spec", "address"),
                )
            )
            continue
        clash = next(
            (
                other
                for other, _, _ in accepted.get(address.port, [])
                if base_paths_overlap(other.base_path, api.base_path)
            ),
            None,
        )
        if clash is not None:
            problems.append(
                spec.origin.problem(
                    "error",
                    f"base path {api.base_path or '/'!r} overlaps {clash.base_path or '/'!r} of ApiInstance "
                    f"{clash.key} on port {address.port}; not served",
                    ("spec", "address"),
                )
            )
            continue
        ports.setdefault(address.port, (address.host, spec.id.key))
        accepted.setdefault(address.port, []).append((api, spec, tls))
    listeners = []
    served: set[str] = set()
    for port in sorted(accepted):
        items = accepted[port]
        server_tls = None
        if items[0][2] is not None:
            server_tls = _port_tls(items, problems)
            if server_tls is None:
                continue
            for _, _, settings in items:
                tls_files.extend(settings.files)  # type: ignore[union-attr]
        apis = sorted((api for api, _, _ in items), key=lambda a: (-len(a.base_path), a.key))
        served.update(api.key for api in apis)
        listeners.append(
            Listener(
                scheme="https" if server_tls is not None else "http",
                host=ports[port][0],
                port=port,
                apis=tuple(apis),
                tls=server_tls,
            )
        )
    return Compiled(
        listeners=tuple(listeners),
        problems=tuple(problems),
        served=frozenset(served),
        tls_files=tuple(sorted(set(tls_files))),
        tls_good=build_tls.good,
    )
