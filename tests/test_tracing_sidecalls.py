"""Side calls of a traced request: JWKS, OAuth token, ext_authz (gRPC and HTTP), ext_proc streams
and LDAP each get a child span of the server span, and (but LDAP) send the server a `traceparent`
naming that span; a real side server records what it got, a real grpcio OTLP receiver what the
gateway exported."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet import reactor

from flexgw.http.tracecontext import parse_traceparent
from flexgw.testing import client
from flexgw.testing.otlp import OtlpGrpcReceiver, attributes
from tests.extauthz_server import GrpcAuthzServer, HttpAuthzServer
from tests.extproc_server import ExtProcServer
from tests.harness import Gateway, free_port
from tests.keyserver import JsonServer
from tests.ldapserver import BASE, SERVICE_DN, SERVICE_PASSWORD
from tests.outbound import outbound_binding, service_api
from tests.test_policy_jwt import RSA_KEY, jwk
from tests.test_policy_ldap import shared_slapd
from tests.test_tracing import _TracingCase, get, tracing_config


def policy(name: str, config: dict[str, Any]) -> str:
    """An inline ApiInstance `policies` entry."""
    return f"  policies:\n    - policyRef: {{name: {name}}}\n      config: {json.dumps(config)}\n"


class SideCallSpanTests(_TracingCase):
    """One gateway per side call kind, exporting to one grpcio receiver."""

    def setUp(self) -> None:
        super().setUp()
        self.receiver = OtlpGrpcReceiver(reactor)
        self.address = f"h2://127.0.0.1:{self.receiver.start()}"
        self.addCleanup(self.receiver.stop)

    async def traced(self, policies: str, *headers: bytes, spans: int = 4, outbound: str = "") -> list[Span]:
        """A request through a gateway with `policies` inline (or an `outbound` binding on the
        API's Service), answered 200; the spans exported."""
        if outbound:
            port = free_port()
            Gateway(self, {"api.yaml": service_api(port, self.upstream.address[1]) + outbound
                           + "---\n" + tracing_config(self.address)}).start()
        else:
            _, port = self.gateway(self.address, self.upstream_address, policies=policies)
        response = await client.request(reactor, "127.0.0.1", port, get("/side", *headers))
        self.assertEqual(response.status, 200)
        return await self.receiver.wait_for_spans(spans)

    def child(self, spans: list[Span], name: str, sent: bytes | None = None) -> Span:
        """The span `name`: a child of the server span, with no error; when the side server got
        a traceparent (`sent`), it names this span in the server span's trace, sampled."""
        [server] = [s for s in spans if s.kind == Span.SpanKind.SPAN_KIND_SERVER]
        [span] = [s for s in spans if s.name == name]
        self.assertEqual((span.trace_id, span.parent_span_id), (server.trace_id, server.span_id))
        self.assertEqual(span.kind, Span.SpanKind.SPAN_KIND_CLIENT)
        self.assertEqual(span.status.code, 0)
        self.assertLessEqual(server.start_time_unix_nano, span.start_time_unix_nano)
        self.assertLessEqual(span.start_time_unix_nano, span.end_time_unix_nano)
        if sent is not None:
            self.assertEqual(parse_traceparent(sent), (int.from_bytes(span.trace_id, "big"),
                                                       int.from_bytes(span.span_id, "big"), True))
        return span

    async def test_jwks_fetch(self) -> None:
        """jwt-validation-flex's first JWKS fetch: the key server gets the jwks span's id."""
        keys = JsonServer(lambda request: (200, {"keys": [jwk(RSA_KEY, "k1")]}))
        keys.listen(reactor)
        self.addCleanup(keys.stop)
        token = jwt.encode({"sub": "a"}, RSA_KEY, algorithm="RS256", headers={"kid": "k1"})
        spans = await self.traced(
            policy("jwt-validation-flex", {"jwtKeyOrigin": "jwks", "jwksUrl": f"{keys.url}/jwks.json"}),
            b"Authorization: Bearer " + token.encode(),
        )
        [sent] = keys.requests[0]["headers"][b"traceparent"]
        span = self.child(spans, "jwks", sent)
        self.assertEqual(attributes(span)["url.full"], f"{keys.url}/jwks.json")

    async def test_oauth_token(self) -> None:
        """credential-injection-oauth2-flex's token request carries the token span's id."""
        idp = JsonServer(lambda request: (200, {"access_token": "t0k", "expires_in": 600}))
        idp.listen(reactor)
        self.addCleanup(idp.stop)
        spans = await self.traced("", outbound=outbound_binding(
            "oauth", "credential-injection-oauth2-flex",
            f"oauthService: {idp.url}/token\nclientId: app\nclientSecret: s\n"))
        [sent] = idp.requests[0]["headers"][b"traceparent"]
        self.child(spans, "oauth token", sent)
        self.assertEqual(self.upstream.completed[0].header(b"authorization"), [b"Bearer t0k"])

    async def test_ext_authz_grpc(self) -> None:
        """native-ext-authz-flex over gRPC: the traceparent goes as call metadata."""
        server = GrpcAuthzServer().start()
        self.addCleanup(server.stop)
        spans = await self.traced(policy("native-ext-authz-flex", {"uri": server.uri}))
        sent = server.metadata[0]["traceparent"]
        self.child(spans, "ext_authz", sent.encode())

    async def test_ext_authz_http(self) -> None:
        """native-ext-authz-flex over HTTP: the traceparent goes as a header (the client's own
        traceparent, a header the policy does not forward, is not what it gets)."""
        server = HttpAuthzServer()
        server.listen(reactor)
        self.addCleanup(server.stop)
        spans = await self.traced(policy("native-ext-authz-flex", {"uri": server.uri, "serverType": "http"}))
        [sent] = server.requests[0][2][b"traceparent"]
        self.child(spans, "ext_authz", sent)

    async def test_ext_proc_stream(self) -> None:
        """native-ext-proc-flex: its stream to the processor is the ext_proc span, from the
        request headers to the end of the response phase, and the processor gets that span's
        traceparent as call metadata; the request waits for the policy in each phase (a span
        each, the response phase's included)."""
        server = ExtProcServer().start()
        self.addCleanup(server.stop)
        spans = await self.traced(policy("native-ext-proc-flex", {"uri": server.uri}), spans=5)
        self.assertEqual(server.kinds(), ["request_headers", "response_headers"])
        span = self.child(spans, "ext_proc", server.metadata[0]["traceparent"].encode())
        self.assertEqual(attributes(span)["url.full"], server.uri)
        first, second = sorted((s for s in spans if s.name == "policy native-ext-proc-flex"),
                               key=lambda s: s.start_time_unix_nano)
        self.assertLessEqual(span.start_time_unix_nano, first.end_time_unix_nano)
        self.assertLessEqual(second.start_time_unix_nano, span.end_time_unix_nano)
        self.assertLessEqual(first.end_time_unix_nano, second.start_time_unix_nano)

    async def test_ldap_search_and_bind(self) -> None:
        """ldap-authentication-flex: a span for the search, then one for the bind (LDAP carries no
        trace context)."""
        directory = shared_slapd("plain")
        credentials = b"Authorization: Basic " + base64.b64encode(b"alice:alice-pw")
        spans = await self.traced(policy("ldap-authentication-flex", {
            "ldapServerURL": directory.url, "ldapServerUserDn": SERVICE_DN,
            "ldapServerUserPassword": SERVICE_PASSWORD, "ldapSearchBase": f"ou=people,{BASE}",
        }), credentials, spans=5)
        search = self.child(spans, "ldap search")
        bind = self.child(spans, "ldap bind")
        self.assertLessEqual(search.end_time_unix_nano, bind.start_time_unix_nano)
        self.assertEqual(attributes(bind)["server.address"], "127.0.0.1")
