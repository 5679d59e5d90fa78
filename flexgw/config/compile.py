"""Compile a resolved model into listeners and route tables: regexes compiled once, ports checked."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import attrs

from flexgw.config.plan import (
    Api,
    BoundPolicy,
    Destination,
    Listener,
    Problem,
    Route,
    Rule,
    Upstream,
)
from flexgw.config.regex import RegexError, compile_rule_regex
from flexgw.config.resolve import ApiSpec, PolicySpec, ResolvedModel, RouteSpec, RuleSpec
from flexgw.policies.base import BuildContext, PolicyConfigError
from flexgw.policies.registry import lookup as lookup_policy

FORWARD_PROXY = "forward-proxy"  # flexgw.egress.policy.NAME (not imported: compile stays light)

_ANY = frozenset({".*", "(?s).*", "[\\s\\S]*"})


@attrs.frozen
class Compiled:
    """The listeners of a plan and the problems compiling found."""

    listeners: tuple[Listener, ...]
    problems: tuple[Problem, ...]
    served: frozenset[str]  # keys of the ApiInstances being served


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


def _source_rank(policy: PolicySpec) -> int:
    if policy.kind == "cors-flex":
        return 0  # CORS always runs first, whatever its order
    return 1 if policy.source == "selector" else 2


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
            clock=getattr(runtime, "clock", None),
            reactor=getattr(runtime, "reactor", None),
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
            sub: tuple[str | int, ...] = ("spec", "config")
            if spec.source == "inline":
                sub = ("config",)
            if exc.field:
                sub += tuple(int(p) if p.isdigit() else p for p in exc.field.split("."))
            problems.append(spec.origin.problem("error", exc.message, sub))
            return None
        except Exception as exc:  # noqa: BLE001 (a broken policy kind must not stop a reload)
            problems.append(
                spec.origin.problem("error", f"policy {spec.kind!r} could not be built: {exc!r}")
            )
            return None
        if any(rule.path is None and rule.methods is None and rule.host is None
               and not rule.headers for rule in rules):
            rules = ()
        built.append(
            BoundPolicy(
                name=spec.name,
                kind=spec.kind,
                order=spec.order,
                rules=rules,
                policy=policy,
                needs_body=bool(getattr(policy, "needs_body", False)),
                responds=bool(getattr(policy, "response_phase", True)),
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
    if spec.address.scheme == "https":
        problems.append(
            spec.origin.problem(
                "error",
                "TLS listeners need the tls policy (not yet supported); not served",
                ("spec", "address"),
            )
        )
        return None
    if any(policy.kind == FORWARD_PROXY for policy in spec.policies):
        return _compile_forward_proxy(spec, model, problems, service_policies, runtime)
    routes: list[Route] = []
    for route_spec in spec.routes:
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
    routes.sort(key=lambda r: (r.order, r.name))
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
    routes = [
        attrs.evolve(route, destinations=tuple(_with_chain(d, policies) for d in route.destinations))
        for route in routes
    ]
    return Api(
        key=spec.id.key, base_path=spec.address.path, routes=tuple(routes), policies=policies
    )


def _compile_forward_proxy(
    spec: ApiSpec,
    model: ResolvedModel,
    problems: list[Problem],
    service_policies: Mapping[str, tuple[BoundPolicy, ...]],
    runtime: Any,
) -> Api | None:
    """A forward-proxy ApiInstance: no routes; its policies (basic auth in its proxy form) run
    before the destination checks; every usable Service may be matched by a destination."""
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
    services = tuple(
        _with_chain(Destination(upstream=upstream, policies=service_policies.get(key, ())), api_policies)
        for key, upstream in sorted(model.upstreams.items())
        if key not in model.blocked_upstreams
    )
    return Api(
        key=spec.id.key,
        base_path="",
        routes=(),
        policies=api_policies,
        forward_proxy=forward[0].policy,
        proxy_services=services,
    )


def _with_chain(destination: Destination, api_policies: tuple[BoundPolicy, ...]) -> Destination:
    """The destination with its whole chain precomputed (nothing to concatenate per request)."""
    chain = api_policies + destination.policies
    return attrs.evolve(
        destination, chain=chain, chain_has_rules=any(bound.rules for bound in chain)
    )


def compile_model(
    model: ResolvedModel, prefer: Collection[str] = (), runtime: Any = None
) -> Compiled:
    """Listeners from a resolved model.

    When two ApiInstances conflict (same port with another host, overlapping base paths), the
    one in `prefer` (the APIs served by the previous plan) wins, then the first by key; the
    other is reported and not served.
    """
    problems: list[Problem] = list(model.problems)
    service_policies: dict[str, tuple[BoundPolicy, ...]] = {}
    blocked_upstreams = dict(model.blocked_upstreams)
    for key, specs in sorted(model.service_policies.items()):
        built = build_policies(specs, None, runtime, problems)
        if built is None:
            blocked_upstreams[key] = "an outbound policy that could not be built"
        else:
            service_policies[key] = built
    if blocked_upstreams != model.blocked_upstreams:
        model = attrs.evolve(model, blocked_upstreams=blocked_upstreams)
    ordered = sorted(model.apis, key=lambda a: (a.id.key not in prefer, a.id.key))
    ports: dict[int, tuple[str, str]] = {}  # port -> (host, first api key)
    accepted: dict[int, list[tuple[Api, ApiSpec]]] = {}
    for spec in ordered:
        api = _compile_api(spec, model, problems, service_policies, runtime)
        if api is None:
            continue
        address = spec.address
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
                for other, _ in accepted.get(address.port, [])
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
        accepted.setdefault(address.port, []).append((api, spec))
    listeners = []
    served: set[str] = set()
    for port in sorted(accepted):
        items = accepted[port]
        apis = sorted((api for api, _ in items), key=lambda a: (-len(a.base_path), a.key))
        served.update(api.key for api in apis)
        listeners.append(Listener(scheme="http", host=ports[port][0], port=port, apis=tuple(apis)))
    return Compiled(listeners=tuple(listeners), problems=tuple(problems), served=frozenset(served))
