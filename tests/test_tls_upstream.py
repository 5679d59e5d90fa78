"""Outbound TLS on real loopback sockets: https Services, tls-outbound, 502 upstream_tls, pooling,
upstream mTLS, skipValidation, and defaultTLS for the gateway's own JWKS calls."""

from __future__ import annotations

import os
import textwrap
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, server_options
from flexgw.testing.upstream import RecordingUpstream, echo
from tests.harness import Gateway, free_port
from tests.keyserver import JsonServer
from tests.outbound import outbound_binding, service_api

GET = b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n"


def documents(port: int, service: str, binding: str = "", extra: str = "") -> str:
    """An http ApiInstance routed to the Service at `service` (`https://host:port`), plus a
    tls-outbound binding on it with `binding` as its config."""
    scheme, _, authority = service.partition("://")
    host, _, upstream_port = authority.rpartition(":")
    text = service_api(port, int(upstream_port), host, scheme)
    if binding:
        text += outbound_binding("partner-tls", "tls-outbound", binding)
    return text + extra


class OutboundTLSTests(TestCase):
    """A gateway in front of a TLS upstream whose certificate is for 127.0.0.1 (IP SAN)."""

    def setUp(self) -> None:
        """A CA, an upstream certificate for 127.0.0.1, and the TLS upstream."""
        self.dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority("upstream CA")
        self.ca_path = self.ca.write(self.dir, "ca")
        self.port = free_port()

    def start_upstream(self, issued: object = None, **options: object) -> RecordingUpstream:
        """A recording TLS upstream (closed at cleanup)."""
        issued = issued or self.ca.issue("upstream", ips=["127.0.0.1"])
        upstream = RecordingUpstream(echo(), reactor=reactor)
        upstream.listen(reactor, tls=server_options(issued, **options))  # type: ignore[arg-type]
        self.addCleanup(upstream.stop)
        return upstream

    def start(self, text: str) -> Gateway:
        """A started gateway on `text`."""
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        return gateway

    async def get(self) -> client.Response:
        """One GET through the gateway."""
        return await client.request(reactor, "127.0.0.1", self.port, GET)

    async def test_trusted_ca_success_and_pool_reuse(self) -> None:
        """trustedCA verifies the upstream; two requests share one pooled TLS connection."""
        upstream = self.start_upstream()
        url = f"https://127.0.0.1:{upstream.address[1]}"
        gateway = self.start(documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n'))
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        first, second = await self.get(), await self.get()
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(len(upstream.received), 2)
        self.assertEqual(len(upstream.connections), 1)
        self.assertEqual(upstream.received[0].header("host"), [f"127.0.0.1:{upstream.address[1]}".encode()])

    async def test_reload_keeps_pool_when_unchanged(self) -> None:
        """A reload with the same TLS settings keeps the pooled upstream connection."""
        upstream = self.start_upstream()
        url = f"https://127.0.0.1:{upstream.address[1]}"
        gateway = self.start(documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n'))
        self.assertEqual((await self.get()).status, 200)
        self.assertTrue(gateway.service.reload())
        self.assertEqual((await self.get()).status, 200)
        self.assertEqual(len(upstream.connections), 1)

    async def test_untrusted_ca_is_502_upstream_tls(self) -> None:
        """An https Service without a binding is verified against the system store: a private
        CA fails with 502 upstream_tls, and no request reaches the upstream."""
        upstream = self.start_upstream()
        self.start(documents(self.port, f"https://127.0.0.1:{upstream.address[1]}"))
        response = await self.get()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_tls"])
        self.assertEqual(upstream.received, [])

    async def test_wrong_host_is_502_upstream_tls(self) -> None:
        """A trusted certificate for another host name fails the host name check: 502 upstream_tls."""
        upstream = self.start_upstream(self.ca.issue("elsewhere", dns=["elsewhere.test"]))
        url = f"https://127.0.0.1:{upstream.address[1]}"
        gateway = self.start(documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n'))
        response = await self.get()
        self.assertEqual((response.status, response.header("x-flexgw-error")), (502, [b"upstream_tls"]))
        self.assertEqual(upstream.received, [])
        self.assertEqual(gateway.records()[0]["error"], "upstream_tls")

    async def test_connect_failure_is_distinct(self) -> None:
        """Nothing listening: 503 upstream_connect_failure, not upstream_tls."""
        closed = free_port()
        self.start(documents(self.port, f"https://127.0.0.1:{closed}", f'trustedCA: "file://{self.ca_path}"\n'))
        response = await self.get()
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_connect_failure"])

    async def test_skip_validation(self) -> None:
        """skipValidation: true accepts an unverifiable certificate, with a warning at apply time."""
        upstream = self.start_upstream(CertificateAuthority("stranger").issue("x", dns=["x.test"]))
        url = f"https://127.0.0.1:{upstream.address[1]}"
        gateway = self.start(documents(self.port, url, "skipValidation: true\n"))
        warnings = [str(p) for p in gateway.service.state.problems if p.severity == "warning"]
        self.assertTrue(any("skipValidation" in w for w in warnings), warnings)
        self.assertEqual((await self.get()).status, 200)

    async def test_upstream_mtls(self) -> None:
        """The upstream requires a client certificate: the binding's certificate is presented;
        without one the request fails (502)."""
        client_ca = CertificateAuthority("client CA")
        gateway_cert = client_ca.issue("gateway", client=True)
        crt, key = gateway_cert.write(self.dir, "gateway")
        upstream = self.start_upstream(
            verify=True,
            caCerts=[ssl.Certificate.loadPEM(client_ca.pem).original],
            requireCertificate=True,
        )
        url = f"https://127.0.0.1:{upstream.address[1]}"
        binding = (
            f'trustedCA: "file://{self.ca_path}"\n'
            f'certificate: {{crt: "file://{crt}", key: "file://{key}"}}\n'
        )
        gateway = self.start(documents(self.port, url, binding))
        self.assertEqual((await self.get()).status, 200)
        peer = upstream.connections[0].transport.getPeerCertificate()
        self.assertEqual(peer.get_subject().CN, "gateway")
        gateway.write({"api.yaml": documents(self.port, url, f'trustedCA: "file://{self.ca_path}"\n')})
        gateway.service.reload()
        self.assertEqual((await self.get()).status, 502)
        self.assertEqual(len(upstream.received), 1)

    async def test_jwks_over_https_with_default_tls(self) -> None:
        """A JWKS on an https key server with a private CA: fetched when
        `defaultTLS.outboundPolicyCalls.trustedCA` names that CA, refused otherwise."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = dict(__import__("json").loads(RSAAlgorithm.to_jwk(key.public_key())), kid="k1")
        keys = JsonServer(lambda request: (200, {"keys": [jwk]}))
        keys.listen(reactor, tls=server_options(self.ca.issue("keys", ips=["127.0.0.1"])))
        self.addCleanup(keys.stop)
        upstream = RecordingUpstream(echo(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)

        def config(default_tls: str) -> str:
            return textwrap.dedent(
                f"""\
                apiVersion: gateway.mulesoft.com/v1alpha1
                kind: ApiInstance
                metadata: {{name: api}}
                spec:
                  address: http://127.0.0.1:{self.port}
                  services: {{b: {{address: "http://127.0.0.1:{upstream.address[1]}"}}}}
                ---
                apiVersion: gateway.mulesoft.com/v1alpha1
                kind: PolicyBinding
                metadata: {{name: jwt}}
                spec:
                  targetRef: {{kind: ApiInstance, name: api}}
                  policyRef: {{name: jwt-validation-flex}}
                  config: {{jwtKeyOrigin: jwks, jwksUrl: "{keys.url}/jwks"}}
                """
            ) + default_tls

        token = jwt.encode({"sub": "a", "exp": time.time() + 600}, key, "RS256", headers={"kid": "k1"})
        request = b"GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        gateway = self.start(config(""))
        refused = await client.request(reactor, "127.0.0.1", self.port, request)
        self.assertNotEqual(refused.status, 200)
        self.assertEqual(keys.requests, [])  # the handshake failed: no HTTP request was made
        gateway.write(
            {
                "api.yaml": config(
                    "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                    "metadata: {name: tls}\nspec:\n  defaultTLS:\n    outboundPolicyCalls:\n"
                    f'      trustedCA: "file://{self.ca_path}"\n'
                )
            }
        )
        self.assertTrue(gateway.service.reload(), [str(p) for p in gateway.service.state.problems])
        allowed = await client.request(reactor, "127.0.0.1", self.port, request)
        self.assertEqual(allowed.status, 200)
        self.assertEqual(len(keys.requests), 1)
        self.assertEqual(len(upstream.received), 1)


class _Silent(Protocol):
    """Accepts the connection and never answers (a TLS handshake that never completes)."""


class HandshakeTimeoutTests(TestCase):
    """The upstream TLS handshake is bounded by `http.connectTimeoutSeconds`."""

    async def test_stalled_handshake_is_502_upstream_tls(self) -> None:
        """A peer that takes the TCP connection and says nothing: 502 upstream_tls after the
        (short, configured) connect timeout, and the connection is closed."""
        factory = Factory.forProtocol(_Silent)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = free_port()
        text = documents(
            port, f"https://127.0.0.1:{listening.getHost().port}",
            extra="---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
            "metadata: {name: c}\nspec:\n  http: {connectTimeoutSeconds: 0.3}\n",
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual((response.status, response.header("x-flexgw-error")), (502, [b"upstream_tls"]))
        pool = next(iter(gateway.service.pools.pools.values()))
        self.assertEqual((pool.connecting, pool.active, pool.idle), (0, 0, []))


class IntrospectionTLSTests(TestCase):
    """Token introspection over https, with `defaultTLS` trustedCA and a client certificate."""

    async def test_introspection_mtls(self) -> None:
        """The IdP requires a client certificate from a private CA: the gateway presents the
        `defaultTLS.outboundPolicyCalls.certificate` and trusts its `trustedCA`."""
        directory = os.path.abspath(self.mktemp())
        server_ca, client_ca = CertificateAuthority("idp CA"), CertificateAuthority("gw CA")
        ca_path = server_ca.write(directory, "idp-ca")
        crt, key = client_ca.issue("gateway", client=True).write(directory, "gw")
        idp = JsonServer(lambda request: (200, {"active": True, "scope": "read"}))
        idp.listen(
            reactor,
            tls=server_options(
                server_ca.issue("idp", ips=["127.0.0.1"]),
                verify=True,
                caCerts=[ssl.Certificate.loadPEM(client_ca.pem).original],
                requireCertificate=True,
            ),
        )
        self.addCleanup(idp.stop)
        upstream = RecordingUpstream(echo(), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        text = textwrap.dedent(
            f"""\
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: ApiInstance
            metadata: {{name: api}}
            spec:
              address: http://127.0.0.1:{port}
              services: {{b: {{address: "http://127.0.0.1:{upstream.address[1]}"}}}}
            ---
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {{name: introspect}}
            spec:
              targetRef: {{kind: ApiInstance, name: api}}
              policyRef: {{name: oauth2-token-introspection-flex}}
              config:
                introspectionURL: {idp.url}/introspect
                authorizationValue: "Basic Zm9vOmJhcg=="
            ---
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: Configuration
            metadata: {{name: tls}}
            spec:
              defaultTLS:
                outboundPolicyCalls:
                  trustedCA: "file://{ca_path}"
                  certificate: {{crt: "file://{crt}", key: "file://{key}"}}
            """
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok\r\n\r\n"
        response = await client.request(reactor, "127.0.0.1", port, raw)
        self.assertEqual(response.status, 200)
        self.assertEqual(len(idp.requests), 1)
        self.assertEqual(len(upstream.received), 1)


class StreamingTLSTests(TestCase):
    """Bodies stream intact through TLS on both sides (encrypted bytes are sent at once when the
    TCP buffer is empty, queued behind what is not: the order must hold)."""

    async def test_echo_both_ways_over_tls(self) -> None:
        """8 MiB up and back through an https listener and an https Service: every byte arrives
        in order (sha256) in both directions."""
        from flexgw.testing.certs import client_options
        from flexgw.testing.upstream import pattern_sha256

        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority("stream CA")
        ca_path = ca.write(directory)
        crt, key = ca.issue("gw.test", dns=["gw.test"]).write(directory, "gw")
        upstream = RecordingUpstream(echo(), reactor=reactor, retain_bodies=False)
        upstream.listen(reactor, tls=server_options(ca.issue("up", ips=["127.0.0.1"])))
        self.addCleanup(upstream.stop)
        port = free_port()
        text = documents(
            port, f"https://127.0.0.1:{upstream.address[1]}", f'trustedCA: "file://{ca_path}"\n'
        ).replace(f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port}") + textwrap.dedent(
            f"""\
            ---
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {{name: api-tls}}
            spec:
              targetRef: {{name: api}}
              policyRef: {{name: tls}}
              config: {{certificate: {{crt: "file://{crt}", key: "file://{key}"}}}}
            """
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        size = 8 * 1024 * 1024
        result = await client.stream_exchange(
            reactor, "127.0.0.1", port,
            b"PUT /echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            size, chunked=True, tls=client_options("gw.test", ca),
        )
        self.assertEqual((result.sent, result.response.status), (size, 200))
        self.assertEqual(result.response.body_length, size)
        self.assertEqual(result.response.body_sha256, pattern_sha256(size))
        [received] = upstream.completed
        self.assertEqual(received.body_sha256, pattern_sha256(size))
