"""Tests for resolve + compile through load_config: both models, ports, base paths, fail-closed policies."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import TestCase

from flexgw.config.compile import base_paths_overlap
from flexgw.config.pipeline import ConfigState, load_config
from flexgw.plan import HttpSettings, Timeouts
from tests.conftools import HEADER, api, route, service, write_conf


def errors(state: ConfigState) -> list[str]:
    """Error lines of a state."""
    return [str(p) for p in state.problems if p.severity == "error"]


def served(state: ConfigState) -> list[str]:
    """Keys of the ApiInstances served, per listener order."""
    return [a.key for listener in state.plan.listeners for a in listener.apis]


INLINE = api(
    "shop",
    "http://0.0.0.0:8081/shop",
    extra="""\
  services:
    orders:
      address: http://orders.internal:9000/base/
      routes:
        - rules:
            - path: /orders(/.*)
              methods: GET|POST
          config:
            destinationPath: /v1
        - rules:
            - path: /legacy/.*
""",
)

RESOURCES = (
    api("shop", "http://0.0.0.0:8081/shop")
    + "---\n"
    + service("shop-orders", "http://orders.internal:9000/base/")
    + "---\n"
    + route(
        "shop-orders-route-1",
        "shop",
        "shop-orders",
        rules="  rules:\n    - path: /orders(/.*)\n      methods: GET|POST\n",
        config="    destinationPath: /v1\n",
    )
    + "---\n"
    + route(
        "shop-orders-route-2",
        "shop",
        "shop-orders",
        rules="  rules:\n    - path: /legacy/.*\n",
    )
)


class ModelTests(TestCase):
    """The inline and resource-based models."""

    def test_both_models_same_plan(self) -> None:
        """Equivalent inline and resource-based configs compile to the same routing (names aside)."""
        inline = load_config([write_conf(self, {"a.yaml": INLINE})], {})
        resource = load_config([write_conf(self, {"a.yaml": RESOURCES})], {})
        self.assertEqual(errors(inline) + errors(resource), [])

        def shape(state: ConfigState) -> object:
            (listener,) = state.plan.listeners
            return (
                listener.address,
                [
                    (
                        a.key,
                        a.base_path,
                        [
                            (
                                r.order,
                                [(x.path, x.methods, x.host, x.headers) for x in r.rules],
                                [
                                    (
                                        d.upstream.key,
                                        d.upstream.host,
                                        d.upstream.port,
                                        d.upstream.path_prefix,
                                        d.destination_path,
                                        d.weight,
                                    )
                                    for d in r.destinations
                                ],
                            )
                            for r in a.routes
                        ],
                    )
                    for a in listener.apis
                ],
            )

        self.assertEqual(shape(inline), shape(resource))
        names = [r.name for r in inline.plan.listeners[0].apis[0].routes]
        self.assertEqual(names, ["shop-orders-route-1", "shop-orders-route-2"])
        upstream = inline.plan.listeners[0].apis[0].routes[0].destinations[0].upstream
        self.assertEqual(upstream.key, "default/shop-orders")

    def test_inline_service_without_routes_is_catch_all(self) -> None:
        """An inline service with no routes gets one catch-all route."""
        conf = api(
            "a", "http://0.0.0.0:8081", extra="  services:\n    s:\n      address: http://h:80\n"
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        (route_,) = state.plan.listeners[0].apis[0].routes
        self.assertEqual((route_.name, route_.rules), ("a-s-route-1", ()))

    def test_routes_ordered_by_order_then_name(self) -> None:
        """Route bindings run by `order` (default 50), then name."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8081"),
                service("s", "http://h:80"),
                route("zeta", "a", "s", rules="  rules:\n    - path: /z\n"),
                route("alpha", "a", "s", rules="  rules:\n    - path: /a\n"),
                route("last", "a", "s", order=90),
                route("first", "a", "s", rules="  rules:\n    - path: /f\n", order=1),
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        names = [r.name for r in state.plan.listeners[0].apis[0].routes]
        self.assertEqual(names, ["default/first", "default/alpha", "default/zeta", "default/last"])

    def test_weighted_route(self) -> None:
        """route-weighted builds one route with weighted destinations; namespaces default to the binding's."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8081", namespace="team"),
                service("blue", "http://blue:80", namespace="team"),
                service("green", "http://green:80", namespace="other"),
                f"""{HEADER}kind: PolicyBinding
metadata: {{name: w, namespace: team}}
spec:
  targetRef: {{kind: ApiInstance, name: a}}
  policyRef: {{name: route-weighted}}
  config:
    routes:
      - weight: 90
        destinationRef: {{name: blue}}
      - weight: 10
        destinationPath: /canary
        destinationRef: {{name: green, namespace: other}}
""",
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(errors(state), [])
        (route_,) = state.plan.listeners[0].apis[0].routes
        self.assertEqual(route_.name, "team/w")
        self.assertEqual(
            [(d.upstream.key, d.weight, d.destination_path) for d in route_.destinations],
            [("team/blue", 90, ""), ("other/green", 10, "/canary")],
        )

    def test_missing_service(self) -> None:
        """A route to a missing Service is an error naming it, located at destinationRef."""
        conf = api("a", "http://0.0.0.0:8081") + "---\n" + route("r", "a", "ghost")
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        first = errors(state)[0]
        self.assertIn(":19:5: error: PolicyBinding default/r: spec.config.destinationRef:", first)
        self.assertIn("Service default/ghost does not exist", first)
        self.assertEqual(state.plan.listeners[0].apis[0].routes, ())


class ListenerTests(TestCase):
    """Ports, hosts and base paths."""

    def test_base_path_overlap_rule(self) -> None:
        """Segment-wise prefix overlap; the empty base path overlaps everything."""
        self.assertTrue(base_paths_overlap("/cats", "/cats/dogs"))
        self.assertTrue(base_paths_overlap("", "/x"))
        self.assertTrue(base_paths_overlap("/a", "/a"))
        self.assertFalse(base_paths_overlap("/cats", "/catsdogs"))
        self.assertFalse(base_paths_overlap("/api/httpbin", "/api/json"))

    def test_shared_port(self) -> None:
        """Instances with disjoint base paths share a listener, longest base path first."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8080/api/httpbin/"),
                api("b", "http://0.0.0.0:8080/api/json/version2"),
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(errors(state), [])
        self.assertEqual(len(state.plan.listeners), 1)
        self.assertEqual(
            [a.base_path for a in state.plan.listeners[0].apis],
            ["/api/json/version2", "/api/httpbin"],
        )

    def test_overlap_is_error(self) -> None:
        """`/cats` and `/cats/dogs` on one port: the second (by key) is not served."""
        conf = "---\n".join(
            [api("a", "http://0.0.0.0:8080/cats"), api("b", "http://0.0.0.0:8080/cats/dogs")]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        (error,) = errors(state)
        self.assertIn("a.yaml:13:12: error: ApiInstance default/b: spec.address:", error)
        self.assertIn("overlaps '/cats' of ApiInstance default/a on port 8080", error)
        self.assertEqual(served(state), ["default/a"])

    def test_empty_base_path_overlaps(self) -> None:
        """An instance without base path cannot share its port."""
        conf = "---\n".join([api("a", "http://0.0.0.0:8080"), api("b", "http://0.0.0.0:8080/x")])
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(len(errors(state)), 1)
        self.assertEqual(served(state), ["default/a"])

    def test_port_with_two_hosts(self) -> None:
        """Two instances on one port with different hosts is an error."""
        conf = "---\n".join(
            [api("a", "http://127.0.0.1:8080/a"), api("b", "http://0.0.0.0:8080/b")]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        (error,) = errors(state)
        self.assertIn("port 8080 is already bound to host 127.0.0.1", error)
        self.assertEqual(served(state), ["default/a"])

    def test_https_not_served(self) -> None:
        """https ApiInstances need a tls binding (the certificate): an error, and not served."""
        state = load_config([write_conf(self, {"a.yaml": api("a", "https://0.0.0.0:8443")})], {})
        (error,) = errors(state)
        self.assertIn("an https:// address needs a tls binding", error)
        self.assertEqual(state.plan.listeners, ())

    def test_ipv6_listener(self) -> None:
        """`http://[::]:8080` listens on `::`."""
        state = load_config([write_conf(self, {"a.yaml": api("a", "http://[::]:8080")})], {})
        self.assertEqual(state.plan.listeners[0].address, ("::", 8080))


class FailClosedTests(TestCase):
    """Policies other than route/route-weighted keep their targets from being served."""

    def test_unsupported_binding_blocks_api(self) -> None:
        """A binding of a policy flexgw does not implement is an error; its API is not served."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8080/a"),
                api("b", "http://0.0.0.0:8080/b"),
                f"""{HEADER}kind: PolicyBinding
metadata: {{name: auth}}
spec:
  targetRef: {{name: a}}
  policyRef: {{name: acme-unknown-auth-flex}}
  config: {{username: u, password: p}}
""",
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        (error,) = errors(state)
        self.assertIn("'acme-unknown-auth-flex' is not supported yet", error)
        self.assertIn("fail closed", error)
        self.assertEqual(served(state), ["default/b"])

    def test_invalid_unsupported_binding_still_blocks(self) -> None:
        """An auth binding that fails its own checks (unset variable) still blocks its target."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8080/a"),
                f"""{HEADER}kind: PolicyBinding
metadata: {{name: auth}}
spec:
  targetRef: {{kind: ApiInstance, name: a}}
  policyRef: {{name: http-basic-authentication-flex}}
  config: {{username: u, password: $PASSWORD}}
""",
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(served(state), [])

    def test_inline_policy_blocks(self) -> None:
        """An inline policy blocks its ApiInstance."""
        conf = api(
            "a",
            "http://0.0.0.0:8080",
            extra="  policies:\n    - policyRef: {name: acme-unknown-quota-flex}\n      config: {}\n",
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(served(state), [])
        self.assertIn("spec.policies[0].policyRef.name", errors(state)[0])

    def test_selector_binding_blocks_matching(self) -> None:
        """An automated (Selector) policy blocks every ApiInstance whose labels match."""
        labelled = f"{HEADER}kind: ApiInstance\nmetadata:\n  name: l\n  labels: {{tier: gold}}\nspec:\n  address: http://0.0.0.0:8080/l\n"
        conf = "---\n".join(
            [
                labelled,
                api("plain", "http://0.0.0.0:8080/p"),
                f"""{HEADER}kind: PolicyBinding
metadata: {{name: sel}}
spec:
  targetRef: {{kind: Selector, selector: {{kind: ApiInstance, labels: {{tier: gold}}}}}}
  policyRef: {{name: acme-unknown-filter-flex}}
  config: {{ips: [10.0.0.1]}}
""",
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(served(state), ["default/plain"])

    def test_outbound_policy_blocks_apis_using_service(self) -> None:
        """A Service-targeted policy blocks the APIs routing to that Service."""
        conf = "---\n".join(
            [
                api("a", "http://0.0.0.0:8080/a"),
                api("b", "http://0.0.0.0:8080/b"),
                service("s", "https://partner:443"),
                service("t", "http://t:80"),
                route("ra", "a", "s"),
                route("rb", "b", "t"),
                f"""{HEADER}kind: PolicyBinding
metadata: {{name: tls}}
spec:
  targetRef: {{kind: Service, name: s}}
  policyRef: {{name: acme-unknown-outbound-flex}}
  config: {{skipValidation: true}}
""",
            ]
        )
        state = load_config([write_conf(self, {"a.yaml": conf})], {})
        self.assertEqual(served(state), ["default/b"])


class SettingsTests(TestCase):
    """Configuration.spec.timeouts and .http."""

    def test_defaults(self) -> None:
        """Without a Configuration the Flex defaults apply."""
        state = load_config([write_conf(self, {"a.yaml": api("a", "http://0.0.0.0:8080")})], {})
        self.assertEqual((state.plan.timeouts, state.plan.http), (Timeouts(), HttpSettings()))

    def test_configuration(self) -> None:
        """Timeouts and http settings are read, across documents; env can turn off host rewriting."""
        conf = f"""{HEADER}kind: Configuration
metadata: {{name: one}}
spec:
  timeouts: {{upstreamResponseSeconds: 5, streamIdleSeconds: 30}}
---
{HEADER}kind: Configuration
metadata: {{name: two}}
spec:
  timeouts: {{upstreamConnectionIdleSeconds: 7.5}}
  http:
    maxHeaderBytes: 8192
    headerTimeoutSeconds: 3
    keepAliveTimeoutSeconds: 4
    connectTimeoutSeconds: 2
    trustedProxies: [10.0.0.0/8, 192.168.1.1]
    maxIdleConnectionsPerUpstream: 4
"""
        state = load_config(
            [write_conf(self, {"c.yaml": conf})], {"FLEX_REWRITE_HOST_HEADER": "false"}
        )
        self.assertEqual(errors(state), [])
        self.assertEqual(state.plan.timeouts, Timeouts(5.0, 30.0, 7.5))
        self.assertEqual(
            state.plan.http,
            HttpSettings(
                max_header_bytes=8192,
                header_timeout=3.0,
                keepalive_timeout=4.0,
                connect_timeout=2.0,
                rewrite_host=False,
                trusted_proxies=(
                    ipaddress.ip_network("10.0.0.0/8"),
                    ipaddress.ip_network("192.168.1.1/32"),
                ),
                max_idle_per_upstream=4,
            ),
        )

    def test_env_timeouts_under_yaml(self) -> None:
        """FLEX_*_TIMEOUT_SECONDS env vars set timeouts that Configuration YAML overrides."""
        conf = f"{HEADER}kind: Configuration\nmetadata: {{name: c}}\nspec:\n  timeouts: {{streamIdleSeconds: 9}}\n"
        environ = {
            "FLEX_UPSTREAM_RESPONSE_TIMEOUT_SECONDS": "20",
            "FLEX_STREAM_IDLE_TIMEOUT_SECONDS": "100",
            "FLEX_UPSTREAM_CONNECTION_IDLE_TIMEOUT_SECONDS": "bogus",
        }
        state = load_config([write_conf(self, {"c.yaml": conf})], environ)
        self.assertEqual(state.plan.timeouts, Timeouts(20.0, 9.0, 60.0))
        self.assertIn(
            "environment variable FLEX_UPSTREAM_CONNECTION_IDLE_TIMEOUT_SECONDS is not a positive number; ignored",
            [p.message for p in state.problems],
        )
