"""Compile a resolved model into listeners and route tables: regexes compiled once, ports checked."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import attrs

from flexgw.config.plan import Api, Destination, Listener, Problem, Route, Rule, Upstream
from flexgw.config.regex import RegexError, compile_rule_regex
from flexgw.config.resolve import ApiSpec, ResolvedModel, RouteSpec, RuleSpec

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
    spec: RouteSpec, upstreams: Mapping[str, Upstream], problems: list[Problem]
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
                upstream=upstream, destination_path=dest.destination_path, weight=dest.weight
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


def _compile_api(spec: ApiSpec, model: ResolvedModel, problems: list[Problem]) -> Api | None:
    if spec.blocked:
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
    routes: list[Route] = []
    for route_spec in spec.routes:
        route = _compile_route(route_spec, model.upstreams, problems)
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
    return Api(key=spec.id.key, base_path=spec.address.path, routes=tuple(routes))


def compile_model(model: ResolvedModel, prefer: Collection[str] = ()) -> Compiled:
    """Listeners from a resolved model.

    When two ApiInstances conflict (same port with another host, overlapping base paths), the
    one in `prefer` (the APIs served by the previous plan) wins, then the first by key; the
    other is reported and not served.
    """
    problems: list[Problem] = list(model.problems)
    ordered = sorted(model.apis, key=lambda a: (a.id.key not in prefer, a.id.key))
    ports: dict[int, tuple[str, str]] = {}  # port -> (host, first api key)
    accepted: dict[int, list[tuple[Api, ApiSpec]]] = {}
    for spec in ordered:
        api = _compile_api(spec, model, problems)
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
