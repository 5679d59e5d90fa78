"""A Service of several addresses over real sockets: three recording upstreams on 127.0.0.2-4
behind one name (an injected resolver), balanced, with per-address /metrics and /status; and
the located config errors of `spec.addresses` / `spec.loadBalancer`."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.config.balancing import balancing_of
from flexgw.config.load import load_text
from flexgw.config.validate import check_document
from flexgw.service.admin import admin_site
from flexgw.testing import client
from flexgw.testing.cluster import UpstreamSet, load
from flexgw.testing.resolver import StaticResolver
from tests.conftools import HEADER, api, route
from tests.harness import Gateway, free_port
from tests.test_admin import samples

NAME = "orders.test"


def service_doc(upstream_port: int, extra: str = "", scheme: str = "http") -> str:
    """The `orders` Service at <scheme>://orders.test:<port>, with extra spec lines."""
    return (
        f"{HEADER}kind: Service\nmetadata:\n  name: orders\n"
        f"spec:\n  address: {scheme}://{NAME}:{upstream_port}\n{extra}"
    )


class ClusterCase(TestCase):
    """Three upstreams behind `orders.test`, and a gateway in front of them."""

    timeout = 30

    def start(
        self,
        extra: str = "",
        responders: Any = (None, None, None),
        config: str = "",
        scheme: str = "http",
        tls: Any = None,
    ) -> tuple[Gateway, UpstreamSet, int]:
        """Start the upstreams (over TLS with `tls`) and the gateway; (gateway, upstreams,
        gateway port)."""
        upstream_port = free_port()
        upstreams = UpstreamSet(
            reactor, upstream_port, list(responders), h2c=scheme == "h2c", tls=tls
        )
        self.addCleanup(upstreams.stop)
        resolver = StaticResolver({NAME: upstreams.hosts})
        port = free_port()
        files = {
            "api.yaml": api("shop", f"http://127.0.0.1:{port}"),
            "service.yaml": service_doc(upstream_port, extra, scheme),
            "route.yaml": route("r", "shop", "orders"),
        }
        if config:
            files["config.yaml"] = config
        gateway = Gateway(self, files)
        gateway.service.pools.name_resolver = resolver
        gateway.start()
        self.resolver = resolver
        return gateway, upstreams, port

    def admin(self, gateway: Gateway) -> int:
        """The admin site of `gateway` on an ephemeral loopback port."""
        listening = reactor.listenTCP(0, admin_site(gateway.service), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return int(listening.getHost().port)


class BalancingTests(ClusterCase):
    """Requests spread over the addresses a name resolves to."""

    async def test_round_robin_metrics_status(self) -> None:
        """30 requests: 10 to each address (round robin, the default); /metrics counts them per
        address, /status shows each address healthy; the name was resolved once."""
        gateway, upstreams, port = self.start()
        statuses = await load(reactor, port, 30, 3)
        self.assertEqual(statuses, {200: 30})
        self.assertEqual(upstreams.counts(), [10, 10, 10])
        self.assertEqual(self.resolver.lookups, [NAME])
        admin = self.admin(gateway)
        page = await client.request(
            reactor, "127.0.0.1", admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        got = samples(page.body)
        for host in upstreams.hosts:
            labels = (
                ("address", f"http://{host}:{upstreams.port}"),
                ("upstream", "default/orders"),
            )
            self.assertEqual(got[("flexgw_upstream_address_requests_total", labels)], 10)
            self.assertEqual(got[("flexgw_upstream_address_healthy", labels)], 1)
        page = await client.request(
            reactor, "127.0.0.1", admin, b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        [cluster] = json.loads(page.body)["upstreamClusters"]
        self.assertEqual(cluster["algorithm"], "roundRobin")
        self.assertEqual(
            [(a["address"], a["state"], a["requests"]) for a in cluster["addresses"]],
            [(f"http://{h}:{upstreams.port}", "healthy", 10) for h in upstreams.hosts],
        )

    async def test_ring_hash_on_header(self) -> None:
        """ringHash on `x-user`: every request of one user reaches the same address, and
        different users spread over all three (30 users: with the ring's positions depending on
        the upstreams' free ports, 12 left one address without a user in about 1 run in 40)."""
        extra = "  loadBalancer:\n    algorithm: ringHash\n    hashOn: \"#[attributes.headers['x-user']]\"\n"
        _, upstreams, port = self.start(extra)
        where: dict[str, set[int]] = {}
        for n in range(90):
            user = f"u{n % 30}"
            head = f"GET /x HTTP/1.1\r\nHost: t\r\nx-user: {user}\r\n\r\n".encode()
            response = await client.request(reactor, "127.0.0.1", port, head)
            self.assertEqual(response.status, 200)
        for index, upstream in enumerate(upstreams.upstreams):
            for request in upstream.received:
                where.setdefault(request.header("x-user")[0].decode(), set()).add(index)
        self.assertEqual(len(where), 30)
        self.assertTrue(all(len(v) == 1 for v in where.values()), where)
        self.assertEqual(len({i for v in where.values() for i in v}), 3)

    async def test_explicit_addresses_with_weights(self) -> None:
        """`spec.addresses` with weights 2:1:1: 40 requests go 20/10/10 (no name lookup)."""
        upstream_port = free_port()
        hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        extra = (
            "  addresses:\n"
            f"    - address: {hosts[0]}:{upstream_port}\n      weight: 2\n"
            f"    - {hosts[1]}:{upstream_port}\n"
            f"    - {hosts[2]}:{upstream_port}\n"
        )
        upstreams = UpstreamSet(reactor, upstream_port, [None, None, None])
        self.addCleanup(upstreams.stop)
        port = free_port()
        gateway = Gateway(
            self,
            {
                "api.yaml": api("shop", f"http://127.0.0.1:{port}"),
                "service.yaml": service_doc(upstream_port, extra),
                "route.yaml": route("r", "shop", "orders"),
            },
        )
        resolver = StaticResolver({})
        gateway.service.pools.name_resolver = resolver
        gateway.start()
        self.assertEqual(await load(reactor, port, 40, 2), {200: 40})
        self.assertEqual(upstreams.counts(), [20, 10, 10])
        self.assertEqual(resolver.lookups, [])
        # The Host header is still the Service address's.
        self.assertEqual(
            upstreams.upstreams[0].received[0].header("host"), [f"{NAME}:{upstream_port}".encode()]
        )


def check(spec: str) -> list[str]:
    """The errors of a Service document with `spec` lines (after its address)."""
    text = f"{HEADER}kind: Service\nmetadata:\n  name: s\nspec:\n  address: http://a.test:80\n"
    loaded = load_text(text + spec, "svc.yaml")
    checked = check_document(loaded.documents[0], {}, False)
    return [str(p) for p in checked.problems if p.severity == "error"]


class ConfigErrorTests(SynchronousTestCase):
    """Bad address lists and balancer keys are located errors."""

    def test_duplicate_and_invalid_addresses(self) -> None:
        """A repeated address (also in the object form), a name, a leading-zero octet and a
        port out of range are errors, each at its line and column."""
        errors = check(
            "  addresses:\n"
            "    - 10.0.0.1:8080\n"
            "    - 10.0.0.01:8080\n"
            "    - backend.test:8080\n"
            "    - address: 10.0.0.1:8080\n"
            "    - '[::1]:99999'\n"
        )
        self.assertEqual(len(errors), 4, errors)
        self.assertTrue(
            errors[0].startswith("svc.yaml:9:7: error: Service default/s: spec.addresses[1]:"),
            errors,
        )
        self.assertIn("'backend.test' is not an IP address", errors[1])
        self.assertTrue(
            errors[2].startswith(
                "svc.yaml:11:16: error: Service default/s: spec.addresses[3].address: "
                "'10.0.0.1:8080' repeats spec.addresses[0]"
            ),
            errors,
        )
        self.assertIn("svc.yaml:12:7:", errors[3])
        self.assertIn("port 99999 out of range", errors[3])

    def test_balancer_keys(self) -> None:
        """An unknown algorithm, a bad hashOn expression, hashOn without a hashing algorithm,
        an out-of-range refresh: each a located error."""
        self.assertIn(
            "spec.loadBalancer.algorithm",
            check("  loadBalancer:\n    algorithm: random\n")[0],
        )
        [error] = check(
            "  loadBalancer:\n    algorithm: ringHash\n    hashOn: '#[attributes.nope]'\n"
        )
        self.assertIn(
            "svc.yaml:9:13: error: Service default/s: spec.loadBalancer.hashOn: invalid expression",
            error,
        )
        [error] = check("  loadBalancer:\n    hashOn: clientAddress\n")
        self.assertIn("hashOn applies to the ringHash and maglev algorithms only", error)
        [error] = check("  loadBalancer:\n    dnsRefreshSeconds: 0\n")
        self.assertIn("spec.loadBalancer.dnsRefreshSeconds", error)
        self.assertEqual(Counter(check("  addresses: [10.0.0.1]\n")), Counter())

    def test_dns_refresh_bounds(self) -> None:
        """dnsMinRefreshSeconds/dnsMaxRefreshSeconds out of range, or the minimum above the
        maximum: located errors; in range they compile into the plan's Balancing."""
        [error] = check("  loadBalancer:\n    dnsMaxRefreshSeconds: 100000\n")
        self.assertIn(
            "svc.yaml:8:27: error: Service default/s: spec.loadBalancer.dnsMaxRefreshSeconds", error
        )
        [error] = check("  loadBalancer:\n    dnsMinRefreshSeconds: 0\n")
        self.assertIn("spec.loadBalancer.dnsMinRefreshSeconds", error)
        [error] = check(
            "  loadBalancer:\n    dnsMinRefreshSeconds: 30\n    dnsMaxRefreshSeconds: 10\n"
        )
        self.assertIn(
            "svc.yaml:8:27: error: Service default/s: spec.loadBalancer.dnsMinRefreshSeconds:"
            " dnsMinRefreshSeconds (30) is above dnsMaxRefreshSeconds (10)",
            error,
        )
        [error] = check("  loadBalancer:\n    dnsMinRefreshSeconds: 400\n")
        self.assertIn("is above dnsMaxRefreshSeconds (300)", error)
        self.assertEqual(
            check("  loadBalancer:\n    dnsMinRefreshSeconds: 1\n    dnsMaxRefreshSeconds: 10\n"),
            [],
        )
        balancing = balancing_of(
            {"loadBalancer": {"dnsMinRefreshSeconds": 1, "dnsMaxRefreshSeconds": 10}}, 80
        )
        self.assertEqual((balancing.dns_min_refresh, balancing.dns_max_refresh), (1.0, 10.0))


class PolicyKeyTests(SynchronousTestCase):
    """Retry, outlier and health-check keys out of range are errors at their file:line:column;
    the Service's APIs are then not served (fail closed), as for any bad outbound binding."""

    def errors(self, kind: str, config: str) -> list[str]:
        """The errors of a conf dir with the `orders` Service and a `kind` binding on it."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf
        from tests.test_upstream_resilience import service_policy

        root = write_conf(
            self,  # type: ignore[arg-type]
            {
                "api.yaml": api("shop", "http://127.0.0.1:8081"),
                "service.yaml": service_doc(8080),
                "route.yaml": route("r", "shop", "orders"),
                "policy.yaml": service_policy(kind, config),
            },
        )
        errors = [str(p) for p in load_config([root], {}).errors]
        assert len(errors) == 2 and "not served (fail closed)" in errors[1], errors
        return errors[:1]

    def test_out_of_range(self) -> None:
        """retries 0, a backoff maximum under its base, a health timeout over its interval,
        consecutiveErrors 0: each located at its value (or its key)."""
        [error] = self.errors("upstream-retry", "    retries: 0\n")
        self.assertRegex(error, r"policy\.yaml:12:14: error: .*config\.retries")
        [error] = self.errors(
            "upstream-retry", "    backoff: {baseMilliseconds: 100, maxMilliseconds: 10}\n"
        )
        self.assertIn("maxMilliseconds must be at least baseMilliseconds", error)
        self.assertIn("policy.yaml:12", error)
        [error] = self.errors(
            "upstream-health-check", "    intervalSeconds: 1\n    timeoutSeconds: 2\n"
        )
        self.assertIn("timeoutSeconds must not exceed intervalSeconds", error)
        [error] = self.errors("upstream-outlier-detection", "    consecutiveErrors: 0\n")
        self.assertRegex(error, r"policy\.yaml:12:\d+: error: .*consecutiveErrors")


class KubernetesEndpointsTests(TestCase):
    """An Ingress backend whose Kubernetes Endpoints list several pods, over real sockets."""

    timeout = 30

    async def test_pods_share_requests_under_the_service_name(self) -> None:
        """Three ready pods (127.0.0.2-4) of Service web: 30 requests, 10 each (the equal
        split one upstream per pod gave), each with Host web.default.svc.cluster.local (not
        one pod's IP), and /status lists the three addresses; a not-ready pod gets nothing."""
        upstream_port = free_port()
        upstreams = UpstreamSet(reactor, upstream_port, [None, None, None, None])
        self.addCleanup(upstreams.stop)
        port = free_port()
        kube = (
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
            "spec:\n  clusterIP: 10.96.0.7\n  ports: [{name: http, port: 80, targetPort: 8080}]\n"
            "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: default}\n"
            "subsets:\n- addresses: [{ip: 127.0.0.2}, {ip: 127.0.0.3}, {ip: 127.0.0.4}]\n"
            "  notReadyAddresses: [{ip: 127.0.0.5}]\n"
            f"  ports: [{{name: http, port: {upstream_port}}}]\n"
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\n"
            "metadata:\n  name: web\n  namespace: default\n  annotations:\n"
            "    flex-gateway.ingress.kubernetes.io/api-instance: edge\n"
            "spec:\n  ingressClassName: flexgw\n  rules:\n  - http:\n      paths:\n"
            "      - {pathType: Prefix, path: /, backend: {service: {name: web, port: {number: 80}}}}\n"
        )
        gateway = Gateway(
            self, {"api.yaml": api("edge", f"http://127.0.0.1:{port}", "default"), "k8s.yaml": kube}
        )
        gateway.start()
        self.assertEqual(await load(reactor, port, 30, 3), {200: 30})
        self.assertEqual(upstreams.counts(), [10, 10, 10, 0])
        hosts = {r.header("host")[0] for u in upstreams.upstreams for r in u.received}
        self.assertEqual(hosts, {b"web.default.svc.cluster.local"})
        admin = ClusterCase.admin(self, gateway)  # type: ignore[arg-type]
        page = await client.request(
            reactor, "127.0.0.1", admin, b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        [cluster] = json.loads(page.body)["upstreamClusters"]
        self.assertEqual(
            [a["address"] for a in cluster["addresses"]],
            [f"http://127.0.0.{i}:{upstream_port}" for i in (2, 3, 4)],
        )
