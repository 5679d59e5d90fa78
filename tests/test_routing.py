"""Tests for flexgw.ingress.routing: base paths, rule semantics, path rewriting, weighted choice."""

from __future__ import annotations

import random
import re
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.config.pipeline import load_config
from flexgw.ingress.routing import RouteMatch, join_path, select_route, strip_port
from flexgw.plan import Api, Destination, Listener, Route, Rule, Upstream
from tests.conftools import api, route, service, write_conf

UPSTREAM = Upstream(key="default/svc", scheme="http", host="upstream", port=80)


def make_listener(
    base_path: str, routes: list[Route], extra_apis: tuple[Api, ...] = ()
) -> Listener:
    """A listener with one API at `base_path` holding `routes`."""
    apis = (Api(key="default/api", base_path=base_path, routes=tuple(routes)), *extra_apis)
    apis = tuple(sorted(apis, key=lambda a: -len(a.base_path)))
    return Listener(scheme="http", host="0.0.0.0", port=8080, apis=apis)


def make_route(
    name: str = "default/r",
    rules: tuple[Rule, ...] = (),
    destination_path: str = "",
    upstream: Upstream = UPSTREAM,
) -> Route:
    """A route with one destination."""
    return Route(
        name=name,
        order=50,
        rules=rules,
        destinations=(Destination(upstream=upstream, destination_path=destination_path),),
    )


def path_rule(pattern: str) -> Rule:
    """A rule with only a path regex."""
    return Rule(path=re.compile(pattern))


def select(
    listener: Listener,
    path: str,
    method: str = "GET",
    host: str = "gw.example.com",
    headers: list[tuple[bytes, bytes]] | None = None,
    rng: random.Random | None = None,
) -> RouteMatch | None:
    """select_route with defaults."""
    return select_route(listener, method, path, host, headers or [], rng or random.Random(0))


class RewriteTableTests(SynchronousTestCase):
    """The path transformation table of flex-gateway.md §1.6, row by row."""

    def rewrite(self, base: str, rule: str, destination: str, request: str) -> str | None:
        listener = make_listener(
            base, [make_route(rules=(path_rule(rule),), destination_path=destination)]
        )
        match = select(listener, request)
        return None if match is None else match.upstream_path

    def test_row1_no_base_no_groups(self) -> None:
        """(none) /api/.* (none): /api/foo/bar -> /api/foo/bar."""
        self.assertEqual(self.rewrite("", "/api/.*", "", "/api/foo/bar"), "/api/foo/bar")

    def test_row2_no_base_group(self) -> None:
        """(none) /api(/.*) (none): /api/foo/bar -> /foo/bar."""
        self.assertEqual(self.rewrite("", "/api(/.*)", "", "/api/foo/bar"), "/foo/bar")

    def test_row3_no_base_destination(self) -> None:
        """(none) /api/.* /orders: /api/foo/bar -> /orders/api/foo/bar."""
        self.assertEqual(
            self.rewrite("", "/api/.*", "/orders", "/api/foo/bar"), "/orders/api/foo/bar"
        )

    def test_row4_no_base_group_destination(self) -> None:
        """(none) /api(/.*) /orders: /api/foo/bar -> /orders/foo/bar."""
        self.assertEqual(
            self.rewrite("", "/api(/.*)", "/orders", "/api/foo/bar"), "/orders/foo/bar"
        )

    def test_row5_base(self) -> None:
        """/api /foo/.* (none): /api/foo/bar -> /foo/bar."""
        self.assertEqual(self.rewrite("/api", "/foo/.*", "", "/api/foo/bar"), "/foo/bar")

    def test_row6_base_group(self) -> None:
        """/api /foo(/.*) (none): /api/foo/bar -> /bar."""
        self.assertEqual(self.rewrite("/api", "/foo(/.*)", "", "/api/foo/bar"), "/bar")

    def test_row7_base_destination(self) -> None:
        """/api /foo/.* /orders: /api/foo/bar -> /orders/foo/bar."""
        self.assertEqual(
            self.rewrite("/api", "/foo/.*", "/orders", "/api/foo/bar"), "/orders/foo/bar"
        )

    def test_row8_base_group_destination(self) -> None:
        """/api /foo(/.*) /orders: /api/foo/bar -> /orders/bar."""
        self.assertEqual(
            self.rewrite("/api", "/foo(/.*)", "/orders", "/api/foo/bar"), "/orders/bar"
        )

    def test_row9_base_repeated_in_rule_no_match(self) -> None:
        """/api /api/foo/.* /orders: /api/foo/bar does not match (the base path is stripped first)."""
        self.assertIsNone(self.rewrite("/api", "/api/foo/.*", "/orders", "/api/foo/bar"))

    def test_row10_two_groups_concatenated(self) -> None:
        """/api /foo(/.*)/bar(/.*) (none): /api/foo/abc/bar/def -> /abc/def."""
        self.assertEqual(
            self.rewrite("/api", "/foo(/.*)/bar(/.*)", "", "/api/foo/abc/bar/def"), "/abc/def"
        )

    def test_table_through_config(self) -> None:
        """Row 8 written as YAML (trailing slashes included) routes the same after compilation."""
        root = write_conf(
            self,
            {
                "a.yaml": api("a", "http://0.0.0.0:8080/api/")
                + "---\n"
                + service("svc", "http://upstream:80/")
                + "---\n"
                + route(
                    "r",
                    "a",
                    "svc",
                    rules="  rules:\n    - path: /foo(/.*)\n",
                    config="    destinationPath: /orders/\n",
                ),
            },
        )
        state = load_config([root], {})
        self.assertTrue(state.ok, [str(p) for p in state.problems])
        match = select(state.plan.listeners[0], "/api/foo/bar")
        assert match is not None
        self.assertEqual(match.upstream_path, "/orders/bar")


class BasePathTests(SynchronousTestCase):
    """Choosing the API by base path and stripping it."""

    def test_base_path_equal_becomes_slash(self) -> None:
        """A request for exactly the base path reaches the upstream as `/`."""
        listener = make_listener("/api", [make_route()])
        match = select(listener, "/api")
        assert match is not None
        self.assertEqual(match.upstream_path, "/")

    def test_base_path_needs_segment_boundary(self) -> None:
        """`/apis` does not match base path `/api`."""
        listener = make_listener("/api", [make_route()])
        self.assertIsNone(select(listener, "/apis/x"))

    def test_longest_base_path_wins(self) -> None:
        """Of `/api` and `/api/v2`, the longer base path that matches segment-wise is chosen."""
        other = Api(
            key="default/other",
            base_path="/api/v2",
            routes=(make_route(name="default/other", destination_path="/two"),),
        )
        listener = make_listener("/api", [make_route()], extra_apis=(other,))
        match = select(listener, "/api/v2/x")
        assert match is not None
        self.assertEqual((match.api.key, match.upstream_path), ("default/other", "/two/x"))
        match = select(listener, "/api/v3")
        assert match is not None
        self.assertEqual((match.api.key, match.upstream_path), ("default/api", "/v3"))

    def test_catch_all_keeps_path(self) -> None:
        """A route without rules forwards the remaining path unchanged."""
        listener = make_listener("", [make_route()])
        match = select(listener, "/x/y%20z")
        assert match is not None
        self.assertEqual(match.upstream_path, "/x/y%20z")

    def test_upstream_prefix_before_destination_path(self) -> None:
        """The Service address path comes before destinationPath."""
        upstream = Upstream(key="default/s", scheme="http", host="u", port=80, path_prefix="/base")
        listener = make_listener("", [make_route(destination_path="/v1", upstream=upstream)])
        match = select(listener, "/x")
        assert match is not None
        self.assertEqual(match.upstream_path, "/base/v1/x")

    def test_no_route_matches(self) -> None:
        """No matching rule: None (the caller answers 404)."""
        listener = make_listener("", [make_route(rules=(path_rule("/only"),))])
        self.assertIsNone(select(listener, "/other"))


class RuleSemanticsTests(SynchronousTestCase):
    """Rules: OR across items, AND inside one; methods, host and headers; first route wins."""

    def test_or_across_rules(self) -> None:
        """Either rule matching is enough."""
        listener = make_listener("", [make_route(rules=(path_rule("/a"), path_rule("/b")))])
        self.assertIsNotNone(select(listener, "/a"))
        self.assertIsNotNone(select(listener, "/b"))
        self.assertIsNone(select(listener, "/c"))

    def test_and_inside_rule(self) -> None:
        """Path and methods must both match."""
        rule = Rule(path=re.compile("/a"), methods=re.compile("GET|POST"))
        listener = make_listener("", [make_route(rules=(rule,))])
        self.assertIsNotNone(select(listener, "/a", method="POST"))
        self.assertIsNone(select(listener, "/a", method="DELETE"))
        self.assertIsNone(select(listener, "/b", method="GET"))

    def test_methods_full_match(self) -> None:
        """`GET` does not match `GETX` (full match, not search)."""
        listener = make_listener("", [make_route(rules=(Rule(methods=re.compile("GET")),))])
        self.assertIsNone(select(listener, "/", method="GETX"))

    def test_path_full_match(self) -> None:
        """`/a` does not match `/a/b`."""
        listener = make_listener("", [make_route(rules=(path_rule("/a"),))])
        self.assertIsNone(select(listener, "/a/b"))

    def test_host_port_stripped(self) -> None:
        """The host rule matches the Host without its port, case-insensitively."""
        listener = make_listener(
            "", [make_route(rules=(Rule(host=re.compile(r"api\.example\.com")),))]
        )
        self.assertIsNotNone(select(listener, "/", host="API.example.com:8080"))
        self.assertIsNone(select(listener, "/", host="other.example.com:8080"))

    def test_host_ipv6(self) -> None:
        """A bracketed IPv6 Host with a port is matched as the bare address."""
        listener = make_listener("", [make_route(rules=(Rule(host=re.compile("::1")),))])
        self.assertIsNotNone(select(listener, "/", host="[::1]:8080"))

    def test_headers_case_insensitive_names(self) -> None:
        """Header names match in any case; values by full-match regex; all must match."""
        rule = Rule(headers=(("x-tenant", re.compile("acme|globex")), ("x-v", re.compile("2"))))
        listener = make_listener("", [make_route(rules=(rule,))])
        ok = [(b"X-Tenant", b"globex"), (b"x-V", b"2")]
        self.assertIsNotNone(select(listener, "/", headers=ok))
        self.assertIsNone(select(listener, "/", headers=[(b"X-Tenant", b"globex")]))
        self.assertIsNone(select(listener, "/", headers=[(b"X-Tenant", b"acme2"), (b"x-v", b"2")]))

    def test_first_route_wins(self) -> None:
        """Routes are tried in order; the first match wins even if a later one matches too."""
        first = make_route(name="default/1", rules=(path_rule("/a.*"),), destination_path="/one")
        second = make_route(name="default/2", destination_path="/two")
        listener = make_listener("", [first, second])
        match = select(listener, "/abc")
        assert match is not None
        self.assertEqual((match.route.name, match.upstream_path), ("default/1", "/one/abc"))
        match = select(listener, "/zzz")
        assert match is not None
        self.assertEqual(match.route.name, "default/2")

    def test_headers_only_consulted_when_needed(self) -> None:
        """Without header rules, the header list is never read."""

        class Exploding(list[tuple[bytes, bytes]]):
            def __iter__(self):  # type: ignore[no-untyped-def]
                raise AssertionError("headers read")

        listener = make_listener("", [make_route(rules=(path_rule("/a"),))])
        self.assertIsNotNone(
            select_route(listener, "GET", "/a", "h", Exploding(), random.Random(0))
        )

    def test_optional_group_unmatched(self) -> None:
        """An unmatched optional group contributes nothing; the result is `/`."""
        listener = make_listener("", [make_route(rules=(path_rule("/api(/.*)?"),))])
        match = select(listener, "/api")
        assert match is not None
        self.assertEqual(match.upstream_path, "/")


class WeightedTests(SynchronousTestCase):
    """Weighted destinations are picked at random, by weight."""

    def test_distribution_follows_weights(self) -> None:
        """Over 10000 seeded draws, 80/20 weights give roughly 80%/20%."""
        a = Upstream(key="default/a", scheme="http", host="a", port=80)
        b = Upstream(key="default/b", scheme="http", host="b", port=80)
        weighted = Route(
            name="default/w",
            order=50,
            rules=(),
            destinations=(Destination(a, weight=80), Destination(b, weight=20)),
        )
        listener = make_listener("", [weighted])
        rng = random.Random(1234)
        counts: Counter[str] = Counter()
        for _ in range(10000):
            match = select(listener, "/", rng=rng)
            assert match is not None
            counts[match.destination.upstream.key] += 1
        self.assertTrue(7700 < counts["default/a"] < 8300, counts)
        self.assertTrue(1700 < counts["default/b"] < 2300, counts)


class HelperTests(SynchronousTestCase):
    """strip_port and join_path."""

    def test_strip_port(self) -> None:
        """Ports and IPv6 brackets are removed; hosts lower-cased."""
        self.assertEqual(strip_port("Example.COM:80"), "example.com")
        self.assertEqual(strip_port("[2001:db8::1]:443"), "2001:db8::1")
        self.assertEqual(strip_port("[::1]"), "::1")
        self.assertEqual(strip_port("host"), "host")

    def test_join_path(self) -> None:
        """One slash at the junction, `/` for nothing at all."""
        self.assertEqual(join_path("", ""), "/")
        self.assertEqual(join_path("/v1", ""), "/v1")
        self.assertEqual(join_path("/v1", "/x"), "/v1/x")
        self.assertEqual(join_path("/v1", "x"), "/v1/x")
        self.assertEqual(join_path("", "x"), "/x")


_segment = st.text(alphabet="abcxyz019-_.~%", min_size=1, max_size=8)
_path = st.lists(_segment, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))
_prefix = st.lists(_segment, min_size=0, max_size=3).map(
    lambda parts: "".join("/" + p for p in parts)
)


class RewritePropertyTests(SynchronousTestCase):
    """Hypothesis properties of the path rewrite."""

    @given(first=_path, second=_path)
    def test_groups_concatenate(self, first: str, second: str) -> None:
        """With `/x(/.*)/y(/.*)`, the upstream path is the two captured parts joined."""
        listener = make_listener("", [make_route(rules=(path_rule("/x(/.*)/y(/.*)"),))])
        match = select(listener, f"/x{first}/y{second}")
        assert match is not None
        # the regex is greedy: the first group takes as much as it can
        found = re.fullmatch("/x(/.*)/y(/.*)", f"/x{first}/y{second}")
        assert found is not None
        self.assertEqual(match.upstream_path, found.group(1) + found.group(2))

    @given(prefix=_prefix, destination=_prefix, tail=_path)
    def test_no_double_slash_from_joining(self, prefix: str, destination: str, tail: str) -> None:
        """Joining Service path, destinationPath and the remaining path never adds `//`."""
        upstream = Upstream(key="default/s", scheme="http", host="u", port=80, path_prefix=prefix)
        listener = make_listener("", [make_route(destination_path=destination, upstream=upstream)])
        match = select(listener, tail)
        assert match is not None
        self.assertNotIn("//", match.upstream_path)
        self.assertTrue(match.upstream_path.startswith("/"))
        self.assertEqual(
            match.upstream_path.rstrip("/"), (prefix + destination + tail).rstrip("/") or ""
        )

    @given(base=_prefix.filter(bool), tail=_path)
    def test_base_path_stripped(self, base: str, tail: str) -> None:
        """The catch-all route receives the request path minus the base path."""
        listener = make_listener(base, [make_route()])
        match = select(listener, base + tail)
        assert match is not None
        self.assertEqual(match.upstream_path, tail)
