"""Pick the API, route and destination for a request, and compute the upstream path (Flex §1.6)."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

from flexgw.plan import Api, Destination, Listener, Route, Rule

Headers = Sequence[tuple[bytes, bytes]]


class RouteMatch(NamedTuple):
    """The outcome of routing one request (a named tuple: made per request, and a tuple is
    built in one step where a frozen attrs class sets each field through object.__setattr__)."""

    api: Api
    route: Route
    destination: Destination
    upstream_path: str  # no query string


def strip_port(host: str) -> str:
    """The host part of a Host header value: port removed, IPv6 brackets removed, lower-cased."""
    if host.startswith("["):
        end = host.find("]")
        return (host[1:end] if end > 0 else host[1:]).lower()
    colon = host.rfind(":")
    if colon >= 0 and host.find(":") == colon:
        host = host[:colon]
    return host.lower()


def join_path(prefix: str, tail: str) -> str:
    """`prefix` (no trailing slash, maybe "") + `tail`, with exactly one slash at the junction."""
    if not tail:
        return prefix or "/"
    if tail[0] == "/":
        if prefix:
            return prefix + tail
        return tail
    return prefix + "/" + tail


class _Request:
    """Lazily computed request views, built only when a rule asks for them."""

    __slots__ = ("_headers", "_host", "headers", "host")

    def __init__(self, host: str, headers: Headers) -> None:
        self.host = host
        self.headers = headers
        self._host: str | None = None
        self._headers: dict[str, list[str]] | None = None

    def bare_host(self) -> str:
        if self._host is None:
            self._host = strip_port(self.host)
        return self._host

    def header(self, name: str) -> list[str] | None:
        table = self._headers
        if table is None:
            table = {}
            for raw_name, raw_value in self.headers:
                key = raw_name.decode("latin-1").lower()
                table.setdefault(key, []).append(raw_value.decode("latin-1").strip(" \t"))
            self._headers = table
        return table.get(name)


def _rule_matches(rule: Rule, method: str, rest: str, request: _Request) -> bool:
    if rule.methods is not None and rule.methods.fullmatch(method) is None:
        return False
    if rule.host is not None and rule.host.fullmatch(request.bare_host()) is None:
        return False
    for name, pattern in rule.headers:
        values = request.header(name)
        if values is None:
            return False
        if not any(pattern.fullmatch(v) for v in values) and (
            len(values) < 2 or pattern.fullmatch(",".join(values)) is None
        ):
            return False
    return True


def _pick(route: Route, rng: random.Random) -> Destination:
    destinations = route.destinations
    cumulative = list(accumulate(d.weight for d in destinations))
    return destinations[bisect_right(cumulative, rng.randrange(cumulative[-1]))]


def select_route(
    listener: Listener,
    method: str,
    path: str,
    host: str,
    headers: Headers,
    rng: random.Random,
) -> RouteMatch | None:
    """The first matching route of the API whose base path matches `path`, or None (404)."""
    for api in listener.apis:
        base = api.base_path
        if base:
            if not path.startswith(base):
                continue
            if len(path) == len(base):
                rest = "/"
            elif path[len(base)] == "/":
                rest = path[len(base) :]
            else:
                continue
        else:
            rest = path
        request: _Request | None = None
        for route in api.routes:
            tail = rest
            if route.rules:
                for rule in route.rules:
                    if rule.path is not None:
                        match = rule.path.fullmatch(rest)
                        if match is None:
                            continue
                    else:
                        match = None
                    if rule.methods is not None or rule.host is not None or rule.headers:
                        if request is None:
                            request = _Request(host, headers)
                        if not _rule_matches(rule, method, rest, request):
                            continue
                    if match is not None and match.re.groups:
                        tail = "".join([g for g in match.groups() if g])
                    break
                else:
                    continue
            destinations = route.destinations
            destination = destinations[0] if len(destinations) == 1 else _pick(route, rng)
            prefix = destination.upstream.path_prefix + destination.destination_path
            if not prefix and tail[:1] == "/":
                return RouteMatch(api, route, destination, tail)
            return RouteMatch(api, route, destination, join_path(prefix, tail))
        return None
    return None


def remaining_path(api: Api, path: str) -> str:
    """The path after `api`'s base path (the request is known to be under it)."""
    base = api.base_path
    if not base:
        return path
    return path[len(base) :] or "/"


def rules_match(rules: tuple[Rule, ...], method: str, rest: str, host: str, headers: Headers) -> bool:
    """Whether a policy's rules select this request: OR across rules, AND inside one."""
    request: _Request | None = None
    for rule in rules:
        if rule.path is not None and rule.path.fullmatch(rest) is None:
            continue
        if rule.methods is not None or rule.host is not None or rule.headers:
            if request is None:
                request = _Request(host, headers)
            if not _rule_matches(rule, method, rest, request):
                continue
        return True
    return False
