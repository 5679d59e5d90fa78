"""native-ext-authz-flex: config, a grpcio Authorization server speaking Envoy's messages, an HTTP
authorization server, bad servers (stalled, garbage, oversized, gone), and a real gateway."""

from __future__ import annotations

from typing import Any

import jsonschema
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.ext_authz import KIND, SCHEMA, ExtAuthzPolicy, settings_from
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.extauthz_server import GrpcAuthzServer, HttpAuthzServer, headers_of
from tests.harness import free_port, start_api_gateway
from tests.probes import poll_until

#: Flex's documented Local Mode definition (docs `policies-included-external-authorization`),
#: with values for each key.
FLEX_EXAMPLE = {
    "uri": "h2://authz.example.com:9000",
    "serverType": "grpc",
    "serverVersion": "v3",
    "requestTimeout": 5000,
    "includePeerCertificate": False,
    "allowedHeaders": ["authorization", "x-custom"],
}
FLEX_HTTP_EXAMPLE = {
    "uri": "http://authz.example.com:8080/auth",
    "serverType": "http",
    "serverVersion": "v3",
    "serviceRequestHeadersToAdd": [{"key": "x-source", "value": "flex"}],
    "serviceResponseUpstreamHeaders": ["x-user"],
    "serviceResponseUpstreamHeadersToAppend": ["x-extra"],
    "serviceResponseClientHeaders": ["x-reason"],
    "serviceResponseClientHeadersOnSuccess": ["x-client"],
    "requestTimeout": 5000,
    "includePeerCertificate": False,
    "allowedHeaders": ["x-decision"],
}


def context(headers: list[tuple[bytes, bytes]] = (), target: bytes = b"/x?q=1") -> PolicyContext:
    """A GET request with these headers."""
    head = analyze_head(b"GET", target, "1.1", [(b"Host", b"api.example"), *headers], True)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")  # type: ignore[arg-type]


class ConfigTests(SynchronousTestCase):
    """Flex's keys, defaults and URI forms."""

    def test_flex_examples(self) -> None:
        """The kind is registered; Flex's gRPC and HTTP examples validate and build."""
        self.assertIs(registry.lookup("native-ext-authz-flex"), KIND)
        for example in (FLEX_EXAMPLE, FLEX_HTTP_EXAMPLE):
            jsonschema.Draft202012Validator(SCHEMA).validate(example)
            self.assertIsInstance(KIND.build(dict(example), BuildContext("d/a", "d/api")),
                                  ExtAuthzPolicy)

    def test_defaults_and_errors(self) -> None:
        """Defaults: gRPC, 5 s, raw header values; wrong schemes and v2 are config errors."""
        s = settings_from({"uri": "h2://a:9000"})
        self.assertEqual((s.grpc, s.scheme, s.port, s.timeout, s.raw_values, s.allowed),
                         (True, "h2c", 9000, 5.0, True, None))
        self.assertFalse(settings_from({"uri": "h2c://a"}, {"FLEX_HEADER_RAW_VALUE_ENABLE": "false"})
                         .raw_values)
        self.assertEqual(settings_from({"uri": "h2s://a"}).scheme, "h2")
        for config, field in (({"uri": "http://a"}, "uri"),
                              ({"uri": "h2://a", "serverType": "http"}, "uri"),
                              ({"uri": "h2://a", "serverVersion": "v2"}, "serverVersion")):
            with self.assertRaises(PolicyConfigError) as caught:
                settings_from(config)
            self.assertEqual(caught.exception.field, field)
        self.assertFalse(jsonschema.Draft202012Validator(SCHEMA).is_valid({"uri": "h2://a", "x": 1}))


class Base(TestCase):
    """Build policies whose clients are closed at the end; run one request."""

    def build(self, clock: Any = reactor, **config: Any) -> ExtAuthzPolicy:
        """A policy (schema-checked config); `clock` runs its timeouts."""
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        policy = KIND.build(config, BuildContext("d/a", "d/api", clock=clock, reactor=reactor))
        self.addCleanup(lambda: policy._client and policy._client.close_with_gateway())
        return policy

    async def call(self, policy: ExtAuthzPolicy, ctx: PolicyContext) -> Any:
        """The outcome (None: allowed)."""
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        return result

    def assertFailed(self, result: Any, cause: str) -> None:
        """Envoy's status_on_error 403 (empty body) with flexgw's cause."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual((result.status, result.body, result.cause), (403, b"", cause))


class GrpcTests(Base):
    """Against a grpcio Authorization server using Envoy's messages."""

    def setUp(self) -> None:
        """Start the server."""
        self.server = GrpcAuthzServer().start()
        self.addCleanup(self.server.stop)

    async def test_allow_applies_ok_response(self) -> None:
        """OK: headers added/overwritten/removed upstream, a header for the client; the
        CheckRequest carries method, path, host, and raw header values with pseudo-headers."""
        policy = self.build(uri=self.server.uri)
        ctx = context([(b"X-Replace", b"old"), (b"x-secret", b"s"), (b"Authorization", b"Bearer t")])
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual(ctx.request_header(b"x-user"), b"alice")
        self.assertEqual(ctx.request_header(b"x-replace"), b"new")
        self.assertIsNone(ctx.request_header(b"x-secret"))
        self.assertEqual(ctx.response_extra, [(b"x-from-authz", b"1")])
        http = self.server.requests[-1].attributes.request.http
        self.assertEqual((http.method, http.path, http.host, http.protocol),
                         ("GET", "/x?q=1", "api.example", "HTTP/1.1"))
        self.assertEqual(len(http.headers), 0)  # FLEX_HEADER_RAW_VALUE_ENABLE: header_map
        sent = headers_of(self.server.requests[-1])
        self.assertEqual(sent[":path"], b"/x?q=1")
        self.assertEqual(sent["authorization"], b"Bearer t")

    async def test_allowed_headers_and_utf8_map(self) -> None:
        """allowedHeaders limits what is sent; without raw values they go in the `headers` map."""
        policy = self.build(uri=self.server.uri, allowedHeaders=["X-Decision"])
        policy.settings = settings_from({"uri": self.server.uri, "allowedHeaders": ["x-decision"]},
                                        {"FLEX_HEADER_RAW_VALUE_ENABLE": "false"})
        ctx = context([(b"x-decision", b"allow"), (b"authorization", b"secret")])
        self.assertIsNone(await self.call(policy, ctx))
        http = self.server.requests[-1].attributes.request.http
        self.assertEqual(sorted(http.headers), [":authority", ":method", ":path", ":scheme",
                                                "x-decision"])

    async def test_denials(self) -> None:
        """A denied_response is answered as given; a bare denial is Envoy's 403, empty body."""
        policy = self.build(uri=self.server.uri)
        denied = await self.call(policy, context([(b"x-decision", b"deny")]))
        self.assertEqual((denied.status, denied.body), (401, b'{"error":"who are you"}'))
        self.assertIn((b"www-authenticate", b"Custom"), denied.headers)
        self.assertIn((b"x-flexgw-error", b"ext_authz_denied"), denied.headers)
        plain = await self.call(policy, context([(b"x-decision", b"deny-plain")]))
        self.assertEqual((plain.status, plain.body), (403, b""))

    async def test_server_errors_fail_closed(self) -> None:
        """A gRPC error status, an oversized answer and an absent server: 403 with the cause."""
        policy = self.build(uri=self.server.uri)
        self.assertFailed(await self.call(policy, context([(b"x-decision", b"error")])),
                          "ext_authz_unavailable")
        self.assertFailed(await self.call(policy, context([(b"x-decision", b"huge")])),
                          "ext_authz_bad_response")
        gone = self.build(uri=f"h2://127.0.0.1:{free_port()}")
        self.assertFailed(await self.call(gone, context()), "ext_authz_unavailable")

    async def test_connection_reused(self) -> None:
        """Twenty checks, ten at a time, share one HTTP/2 connection."""
        policy = self.build(uri=self.server.uri)
        for _ in range(2):
            results = await defer.gatherResults([
                defer.ensureDeferred(self.call(policy, context())) for _ in range(10)])
            self.assertEqual(results, [None] * 10)
        self.assertEqual(len(policy.client.pool.connections), 1)

    async def test_stalled_server(self) -> None:
        """A server holding the call: the check waits (the reactor runs on: the test sees the
        call arrive), ends in 403 ext_authz_timeout when requestTimeout has passed on the
        policy's clock, not before; the connection serves the next check. (A clock the test
        advances: no race between the timeout and a loaded machine.)"""
        clock = Clock()
        policy = self.build(clock, uri=self.server.uri, requestTimeout=400)
        pending = defer.ensureDeferred(self.call(policy, context([(b"x-decision", b"hold")])))
        await poll_until(lambda: self.server.holding == 1)
        clock.advance(0.398)
        self.assertNoResult(pending)
        clock.advance(0.002)
        self.assertFailed(self.successResultOf(pending), "ext_authz_timeout")
        self.server.release()
        self.assertIsNone(await self.call(policy, context()))


class _Garbage(protocol.Protocol):
    """Answers an HTTP/2 preface with bytes that are not HTTP/2."""

    def dataReceived(self, data: bytes) -> None:
        """Garbage back."""
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\xff" * 64)


class BadServerTests(Base):
    """A server that answers garbage: 403, never allowed."""

    async def test_garbage(self) -> None:
        """Not HTTP/2: the connection is dropped and the check fails closed."""
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Garbage), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        policy = self.build(uri=f"h2://127.0.0.1:{port.getHost().port}", requestTimeout=2000)
        result = await self.call(policy, context())
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual(result.status, 403)
        self.assertIn(result.cause, ("ext_authz_unavailable", "ext_authz_bad_response"))


class _Silent(Resource):
    """Never answers (the request is held until the connection goes)."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        """Hold."""
        return NOT_DONE_YET


class HttpTests(Base):
    """Against an HTTP authorization server."""

    def setUp(self) -> None:
        """Start the server."""
        self.server = HttpAuthzServer()
        self.server.listen(reactor)
        self.addCleanup(self.server.stop)

    def http(self, **config: Any) -> ExtAuthzPolicy:
        """A policy on the HTTP server with Flex's HTTP example keys."""
        return self.build(**{**FLEX_HTTP_EXAMPLE, "uri": self.server.uri, **config})

    async def test_allow_copies_configured_headers(self) -> None:
        """200: x-user replaces, x-extra appends, x-client goes to the client; the server got
        the method, prefixed path and query, Host, Authorization, allowed and added headers."""
        policy = self.http()
        ctx = context([(b"x-user", b"mallory"), (b"x-extra", b"first"), (b"x-decision", b"allow"),
                       (b"Authorization", b"Bearer t"), (b"x-private", b"p")])
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual([v for n, v in ctx.request_headers if n.lower() == b"x-user"], [b"alice"])
        self.assertEqual([v for n, v in ctx.request_headers if n.lower() == b"x-extra"],
                         [b"first", b"appended"])
        self.assertEqual(ctx.response_extra, [(b"x-client", b"seen")])
        method, path, headers = self.server.requests[-1]
        self.assertEqual((method, path), (b"GET", b"/authz/x?q=1"))
        self.assertEqual(headers[b"authorization"], [b"Bearer t"])
        self.assertEqual(headers[b"x-source"], [b"flex"])
        self.assertEqual(headers[b"host"], [b"api.example"])
        self.assertNotIn(b"x-private", headers)

    async def test_deny_answers_as_the_server(self) -> None:
        """Not 200: the server's status and body, its WWW-Authenticate and the listed headers."""
        policy = self.http()
        result = await self.call(policy, context([(b"x-decision", b"deny")]))
        self.assertEqual((result.status, result.body), (401, b'{"error":"denied by authz"}'))
        names = [n for n, _ in result.headers]
        self.assertIn(b"www-authenticate", names)
        self.assertIn(b"x-reason", names)
        self.assertNotIn(b"x-other", names)

    async def test_silent_and_absent_servers(self) -> None:
        """No answer within requestTimeout, or nobody listening: 403 with the cause."""
        silent = reactor.listenTCP(0, Site(_Silent()), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        policy = self.http(uri=f"http://127.0.0.1:{silent.getHost().port}", requestTimeout=300)
        self.assertFailed(await self.call(policy, context()), "ext_authz_timeout")
        gone = self.http(uri=f"http://127.0.0.1:{free_port()}")
        self.assertFailed(await self.call(gone, context()), "ext_authz_unavailable")


class GatewayTests(TestCase):
    """native-ext-authz-flex through a real gateway, gRPC and HTTP servers."""

    async def test_end_to_end(self) -> None:
        """gRPC: allowed requests reach the upstream with x-user and the client sees the
        server's response header; denied ones get the server's 401. HTTP: the same on
        another API."""
        grpc_server = GrpcAuthzServer().start()
        self.addCleanup(grpc_server.stop)
        http_server = HttpAuthzServer()
        http_server.listen(reactor)
        self.addCleanup(http_server.stop)
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()

        def binding(name: str, config: str) -> str:
            return (
                "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
                f"metadata: {{name: {name}}}\n"
                "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
                "  policyRef: {name: native-ext-authz-flex}\n"
                f"  config:\n{config}"
            )

        start_api_gateway(self, port, upstream.address[1], binding(
            "authz", f"    uri: {grpc_server.uri}\n    serverType: grpc\n    requestTimeout: 2000\n"))

        async def get(decision: bytes) -> client.Response:
            raw = b"GET /x HTTP/1.1\r\nHost: t\r\nx-decision: " + decision + b"\r\n\r\n"
            return await client.request(reactor, "127.0.0.1", port, raw)

        ok = await get(b"allow")
        self.assertEqual(ok.status, 200)
        self.assertEqual(ok.header("x-from-authz"), [b"1"])
        self.assertEqual(upstream.received[-1].header("x-user"), [b"alice"])
        denied = await get(b"deny")
        self.assertEqual((denied.status, denied.body), (401, b'{"error":"who are you"}'))
        self.assertEqual(len(upstream.received), 1)

        port2 = free_port()
        start_api_gateway(self, port2, upstream.address[1], binding(
            "authz-http", f"    uri: {http_server.uri}\n    serverType: http\n"
            "    allowedHeaders: [x-decision]\n    serviceResponseUpstreamHeaders: [x-user]\n"),
            name="test-api")
        raw = b"GET /y HTTP/1.1\r\nHost: t\r\nx-decision: %s\r\n\r\n"
        allowed = await client.request(reactor, "127.0.0.1", port2, raw % b"allow")
        self.assertEqual(allowed.status, 200)
        self.assertEqual(upstream.received[-1].header("x-user"), [b"alice"])
        refused = await client.request(reactor, "127.0.0.1", port2, raw % b"deny")
        self.assertEqual(refused.status, 401)
        self.assertEqual(len(upstream.received), 2)


class PeerCertificateTests(TestCase):
    """includePeerCertificate over a real mTLS gateway: the client certificate goes to the
    gRPC server as URL-encoded PEM in attributes.source.certificate."""

    async def test_client_certificate_sent(self) -> None:
        """With the key, alice's certificate arrives as Envoy encodes it; without the key, or
        without a client certificate, the field stays empty. An HTTP server gets no
        certificate even with the key, as from Envoy's HTTP client (the module docstring)."""
        import os
        from urllib.parse import unquote

        from cryptography.hazmat.primitives.serialization import Encoding

        from flexgw.testing.certs import CertificateAuthority, client_options
        from tests.harness import Gateway
        from tests.test_tls_ingress import api, tls_binding

        server = GrpcAuthzServer().start()
        self.addCleanup(server.stop)
        http_server = HttpAuthzServer()
        http_server.listen(reactor)
        self.addCleanup(http_server.stop)
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        ca, client_ca = CertificateAuthority("server CA"), CertificateAuthority("client CA")
        folder = os.path.abspath(self.mktemp())
        crt, key = ca.issue("api.test", dns=["api.test"]).write(folder, "server")
        client_ca_path = client_ca.write(folder, "client-ca")
        alice = client_ca.issue("alice", client=True)
        documents = []
        ports = [free_port(), free_port(), free_port()]
        for name, port, include, mtls in (("with", ports[0], "true", True),
                                          ("without", ports[1], "false", True),
                                          ("http", ports[2], "true", True)):
            documents.append(api(name, port, upstream.address[1]) + "---\n" + tls_binding(
                f"{name}-tls", name, crt, key,
                f'requireClientCertificate: true\ntrustedCA: "file://{client_ca_path}"\n'
                if mtls else ""))
            documents.append(
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
                f"metadata: {{name: {name}-authz}}\n"
                f"spec:\n  targetRef: {{kind: ApiInstance, name: {name}}}\n"
                "  policyRef: {name: native-ext-authz-flex}\n"
                + (f"  config: {{uri: '{http_server.uri}', serverType: http, "
                   f"includePeerCertificate: {include}}}\n" if name == "http" else
                   f"  config: {{uri: '{server.uri}', includePeerCertificate: {include}}}\n"))
        gateway = Gateway(self, {"api.yaml": "---\n".join(documents)})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        for port in ports:
            conn = await client.connect(reactor, "127.0.0.1", port,
                                        tls=client_options("api.test", ca, alice))
            self.addCleanup(conn.abort)
            conn.send(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
            self.assertEqual((await conn.read_response()).status, 200)
        sent = [r.attributes.source.certificate for r in server.requests]
        pem = alice.certificate.public_bytes(Encoding.PEM).decode()
        self.assertEqual(unquote(sent[0]), pem)
        self.assertNotIn("\n", sent[0])
        self.assertIn("%0A", sent[0])
        self.assertNotIn("/", sent[0])
        self.assertEqual(sent[1], "")
        [(_, _, headers)] = http_server.requests
        encoded = [sent[0].encode(), pem.encode()]
        self.assertEqual([n for n, values in headers.items()
                          if any(e in v for e in encoded for v in values)], [])
