"""Kubernetes Ingress end to end: a conf dir mixing an ApiInstance, its policy, Ingresses, a v1
Service (clusterIP 127.0.0.1) and TLS Secrets, in front of a real recording upstream on loopback."""

from __future__ import annotations

import base64
import json

from cryptography import x509
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.config.ingress import ingress_options
from flexgw.service.admin import status_json
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, client_options
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, free_port

EDGE = """\
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {{name: ingress-http, namespace: edge}}
spec:
  address: http://127.0.0.1:{port}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {{name: tag, namespace: edge}}
spec:
  targetRef: {{kind: ApiInstance, name: ingress-http}}
  policyRef: {{name: header-injection-flex}}
  config:
    inboundHeaders: [{{key: x-edge, value: "applied"}}]
"""

KUBE = """\
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: shop}}
spec:
  clusterIP: 127.0.0.1
  ports:
  - {{name: http, port: {upstream}, targetPort: 8080, protocol: TCP}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: shop
  creationTimestamp: "2024-03-01T10:00:00Z"
  annotations:
    flex-gateway.ingress.kubernetes.io/api-instance: ingress-http.edge
spec:
  ingressClassName: flexgw
  rules:
  - host: shop.example
    http:
      paths:
      - path: /orders
        pathType: Prefix
        backend:
          service: {{name: shop, port: {{name: http}}}}
      - path: /api(/.*)
        pathType: ImplementationSpecific
        backend:
          service: {{name: shop, port: {{number: {upstream}}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: late
  namespace: shop
  creationTimestamp: "2025-03-01T10:00:00Z"
  annotations:
    flex-gateway.ingress.kubernetes.io/api-instance: ingress-http.edge
spec:
  ingressClassName: flexgw
  rules:
  - host: shop.example
    http:
      paths:
      - path: /orders/
        pathType: Prefix
        backend:
          service: {{name: shop, port: {{name: http}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: plain, namespace: shop}}
spec:
  ingressClassName: flexgw
  rules:
  - http:
      paths:
      - path: /plain
        pathType: Exact
        backend:
          service: {{name: shop, port: {{number: {upstream}}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: theirs, namespace: shop}}
spec:
  ingressClassName: nginx
  defaultBackend:
    service: {{name: shop, port: {{number: {upstream}}}}}
"""


class IngressEndToEndTests(TestCase):
    """Ingress routes served on the annotated ApiInstance's listener, with its policy applied."""

    def setUp(self) -> None:
        """A recording upstream, and a gateway on a conf dir with Flex and Kubernetes documents."""
        self.upstream = RecordingUpstream(fixed(status=200, body=b"ok"), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.default_port = free_port()
        upstream_port = self.upstream.address[1]
        self.gateway = Gateway(
            self,
            {
                "edge.yaml": EDGE.format(port=self.port),
                "k8s/shop.yaml": KUBE.format(upstream=upstream_port),
            },
        )
        self.gateway.service.ingress = ingress_options(
            "flexgw", False, f"http://127.0.0.1:{self.default_port}"
        )
        self.gateway.start()

    async def get(self, path: bytes, host: bytes, port: int | None = None) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        return await client.request(reactor, "127.0.0.1", port or self.port, raw)

    async def test_prefix_route_with_the_api_instance_policy(self) -> None:
        """A Prefix path reaches the Service unchanged, with the ApiInstance's header injected."""
        response = await self.get(b"/orders/7?x=1", b"shop.example")
        self.assertEqual((response.status, response.body), (200, b"ok"))
        [seen] = self.upstream.received
        self.assertEqual(seen.target, b"/orders/7?x=1")
        self.assertEqual(seen.header("x-edge"), [b"applied"])

    async def test_regex_path_rewrites(self) -> None:
        """An ImplementationSpecific path's capture group becomes the upstream path."""
        response = await self.get(b"/api/v2/items", b"shop.example")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].target, b"/v2/items")
        self.assertEqual(self.upstream.received[0].header("x-edge"), [b"applied"])

    async def test_unmatched_host_or_path_is_404(self) -> None:
        """Another host, or a path that is not element-wise under /orders, gets the gateway's 404."""
        for path, host in ((b"/orders/7", b"other.example"), (b"/ordersX", b"shop.example")):
            response = await self.get(path, host)
            self.assertEqual(response.status, 404, (path, host))
            self.assertEqual(response.header("x-flexgw-error"), [b"no_route"])
        self.assertEqual(self.upstream.received, [])

    async def test_default_listener(self) -> None:
        """An Ingress without the annotation is served on --ingress-listener, without the policy."""
        response = await self.get(b"/plain", b"any.example", self.default_port)
        self.assertEqual(response.status, 200)
        [seen] = self.upstream.received
        self.assertEqual((seen.target, seen.header("x-edge")), (b"/plain", []))
        response = await self.get(b"/plain/more", b"any.example", self.default_port)
        self.assertEqual(response.status, 404)

    def test_conflict_and_class_note_in_status(self) -> None:
        """/status shows the losing Ingress as a warning and the other class as an info note."""
        problems = status_json(self.gateway.service)["problems"]
        conflict = [p for p in problems if p.get("resource") == "Ingress shop/late"]
        self.assertEqual(len(conflict), 1)
        self.assertEqual(conflict[0]["severity"], "warning")
        self.assertIn(
            "already served by shop/shop:spec.rules[0].http.paths[0]", conflict[0]["message"]
        )
        self.assertTrue(conflict[0]["file"].endswith("k8s/shop.yaml"))
        self.assertEqual(conflict[0]["line"], KUBE.splitlines().index("      - path: /orders/") + 1)
        [api] = [
            a
            for listener in status_json(self.gateway.service)["listeners"]
            for a in listener["apis"]
            if a["key"] == "edge/ingress-http"
        ]
        route = api["routes"][0]
        self.assertEqual(route["name"], "shop/shop:spec.rules[0].http.paths[1]")  # longer first
        self.assertTrue(route["file"].endswith("k8s/shop.yaml"))
        self.assertTrue(route["upstreams"][0]["file"].endswith("k8s/shop.yaml"))
        self.assertTrue(api["file"].endswith("edge.yaml"))
        note = [p for p in problems if p.get("resource") == "Ingress shop/theirs"]
        self.assertEqual([p["severity"] for p in note], ["info"])
        self.assertTrue(self.gateway.service.last_reload_ok)


TLS_KUBE = """\
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {{name: ingress-https, namespace: edge}}
spec:
  address: https://127.0.0.1:{port}
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: shop}}
spec:
  clusterIP: 127.0.0.1
  ports:
  - {{name: http, port: {upstream}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: shop-tls, namespace: shop}}
type: kubernetes.io/tls
data:
  tls.crt: {shop_crt}
  tls.key: {shop_key}
---
apiVersion: v1
kind: Secret
metadata: {{name: api-tls, namespace: shop}}
type: kubernetes.io/tls
stringData:
  tls.crt: {api_crt}
  tls.key: {api_key}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: shop
  annotations:
    flex-gateway.ingress.kubernetes.io/api-instance: ingress-https.edge
spec:
  ingressClassName: flexgw
  tls:
  - {{hosts: [shop.example], secretName: shop-tls}}
  - {{hosts: [api.example], secretName: api-tls}}
  rules:
  - host: shop.example
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: shop, port: {{number: {upstream}}}}}}}}}
  - host: api.example
    http:
      paths:
      - {{path: /v1, pathType: Prefix, backend: {{service: {{name: shop, port: {{name: http}}}}}}}}
"""


class IngressTlsEndToEndTests(TestCase):
    """Certificates from kubernetes.io/tls Secrets served by SNI on the bound https ApiInstance."""

    def setUp(self) -> None:
        """A CA, two host certificates in Secrets (data and stringData), an upstream, a gateway."""
        self.ca = CertificateAuthority()
        shop = self.ca.issue("shop.example", dns=["shop.example"])
        api = self.ca.issue("api.example", dns=["api.example"])
        self.upstream = RecordingUpstream(fixed(status=200, body=b"ok"), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        quoted = lambda pem: json.dumps(pem.decode())  # a JSON string is a YAML string
        text = TLS_KUBE.format(
            port=self.port,
            upstream=self.upstream.address[1],
            shop_crt=base64.b64encode(shop.cert_pem).decode(),
            shop_key=base64.b64encode(shop.key_pem).decode(),
            api_crt=quoted(api.cert_pem),
            api_key=quoted(api.key_pem),
        )
        self.gateway = Gateway(self, {"k8s.yaml": text})
        self.gateway.start()

    async def get(self, server_name: str, path: bytes) -> tuple[client.Response, str]:
        """A verified TLS GET naming `server_name` (SNI and Host); the response and the peer CN."""
        conn = await client.connect(
            reactor, "127.0.0.1", self.port, tls=client_options(server_name, self.ca)
        )
        self.addCleanup(conn.abort)
        conn.send(b"GET " + path + b" HTTP/1.1\r\nHost: " + server_name.encode() + b"\r\n\r\n")
        response = await conn.read_response()
        certificate = conn.transport.getPeerCertificate().to_cryptography()
        name = certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        return response, str(name)

    async def test_each_host_gets_its_certificate(self) -> None:
        """SNI picks each host's Secret; both verify against the CA and reach the upstream."""
        state = self.gateway.service.state
        assert state is not None
        self.assertTrue(self.gateway.service.last_reload_ok, state.problems)
        response, name = await self.get("shop.example", b"/cart")
        self.assertEqual((response.status, name), (200, "shop.example"))
        response, name = await self.get("api.example", b"/v1/items")
        self.assertEqual((response.status, name), (200, "api.example"))
        self.assertEqual(
            [(r.target, r.header("x-forwarded-proto")) for r in self.upstream.received],
            [(b"/cart", [b"https"]), (b"/v1/items", [b"https"])],
        )


H2C_KUBE = """\
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: shop}}
spec:
  clusterIP: 127.0.0.1
  ports:
  - {{name: h2c-api, port: {upstream}, protocol: TCP}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: grpc, namespace: shop}}
spec:
  ingressClassName: flexgw
  rules:
  - http:
      paths:
      - {{path: /rpc, pathType: Prefix, backend: {{service: {{name: grpc, port: {{name: h2c-api}}}}}}}}
"""


class IngressH2cEndToEndTests(TestCase):
    """A Service port named `h2c[-suffix]` is reached over HTTP/2 with prior knowledge."""

    async def test_h2c_port_name(self) -> None:
        """An HTTP/1.1 request for an h2c Service arrives at the upstream as HTTP/2."""
        upstream = RecordingUpstream(fixed(status=200, body=b"ok"), reactor=reactor, h2c=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = Gateway(self, {"grpc.yaml": H2C_KUBE.format(upstream=upstream.address[1])})
        gateway.service.ingress = ingress_options(
            "flexgw", False, f"http://127.0.0.1:{port}", f"https://127.0.0.1:{free_port()}"
        )
        gateway.start()
        raw = b"GET /rpc/Say HTTP/1.1\r\nHost: g.example\r\n\r\n"
        response = await client.request(reactor, "127.0.0.1", port, raw)
        self.assertEqual((response.status, response.body), (200, b"ok"))
        [seen] = upstream.received
        self.assertEqual((seen.version, seen.header(":path")), ("2", [b"/rpc/Say"]))
