"""openidconnect-access-token-enforcement-flex against an OpenID provider on twisted.web that
follows OIDC Discovery and RFC 7662: introspection and JWKS modes, scopes, statuses, caching."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import parse_qs

import jsonschema
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.oidc import KIND, SCHEMA, OidcPolicy, settings_from
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import free_port, start_api_gateway
from tests.keyserver import JsonServer

CLIENT = ("gateway", "gateway-secret")
#: Flex's documented Local Mode keys with their defaults, plus flexgw's `issuer`.
FLEX_EXAMPLE = {
    "authenticationTimeout": 10000,
    "scopes": "",
    "secureTrustStore": False,
    "scopeValidationCriteria": "AND",
    "exposeHeaders": False,
    "skipClientIdValidation": True,
    "maxFederationExpirationTime": -1,
    "maxCacheSize": 1000,
}


class Provider:
    """An OpenID provider: discovery, JWKS (one RSA key) and RFC 7662 introspection requiring
    the gateway's client credentials; tokens it issued are introspected as active."""

    def __init__(self, introspection: bool = True) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.introspection = introspection
        self.server = JsonServer(self.answer)
        self.server.listen(reactor)
        self.issued: dict[str, dict[str, Any]] = {}
        self.document_issuer: str | None = None  # another issuer in the document (a bad one)

    @property
    def issuer(self) -> str:
        """The issuer URL."""
        return self.server.url

    def token(self, **claims: Any) -> str:
        """A signed access token with these claims (iss, exp and kid set)."""
        body = {"iss": self.issuer, "exp": int(time.time()) + 3600, "client_id": "app-1", **claims}
        token = jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "k1"})
        self.issued[token] = body
        return token

    def answer(self, request: Any) -> tuple[int, Any]:
        """Route by path."""
        path = request.path
        if path == b"/.well-known/openid-configuration":
            document: dict[str, Any] = {
                "issuer": self.document_issuer or self.issuer,
                "jwks_uri": self.issuer + "/jwks",
                "authorization_endpoint": self.issuer + "/authorize",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
            if self.introspection:
                document["introspection_endpoint"] = self.issuer + "/introspect"
            return 200, document
        if path == b"/jwks":
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            return 200, {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}
        if path == b"/introspect":
            expected = b"Basic " + base64.b64encode(":".join(CLIENT).encode())
            if request.getHeader(b"authorization") != expected:
                return 401, {"error": "invalid_client"}
            form = parse_qs(self.server.requests[-1]["body"].decode())
            claims = self.issued.get(form.get("token", [""])[0])
            return 200, {"active": False} if claims is None else {"active": True, **claims}
        return 404, {"error": "not found"}

    def stop(self) -> Any:
        """Stop listening."""
        return self.server.stop()

    def paths(self) -> list[bytes]:
        """The paths asked so far."""
        return [r["path"] for r in self.server.requests]


def context(token: str | None = None) -> PolicyContext:
    """A request with `Authorization: Bearer token` (when given)."""
    headers = [(b"Host", b"api")]
    if token is not None:
        headers.append((b"Authorization", b"Bearer " + token.encode()))
    head = analyze_head(b"GET", b"/x", "1.1", headers, True)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")  # type: ignore[arg-type]


class ConfigTests(SynchronousTestCase):
    """Flex's keys and defaults, flexgw's provider keys."""

    def test_flex_keys(self) -> None:
        """Flex's documented keys (with flexgw's issuer) validate and build; defaults apply."""
        self.assertIs(registry.lookup("openidconnect-access-token-enforcement-flex"), KIND)
        config = {**FLEX_EXAMPLE, "issuer": "https://idp.example"}
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        self.assertIsInstance(KIND.build(config, BuildContext("d/o", "d/api")), OidcPolicy)
        s = settings_from({"issuer": "https://idp.example/"})
        self.assertEqual((s.issuer, s.timeout, s.scopes, s.require_all, s.ttl, s.max_entries),
                         ("https://idp.example", 10.0, (), True, 600.0, 1000))
        self.assertEqual(settings_from({"issuer": "https://i", "maxFederationExpirationTime": 30}).ttl,
                         30.0)

    def test_errors(self) -> None:
        """No issuer, a bad one, or introspection without a client: config errors."""
        self.assertFalse(jsonschema.Draft202012Validator(SCHEMA).is_valid(FLEX_EXAMPLE))
        for config, field in (({"issuer": "ftp://x"}, "issuer"),
                              ({"issuer": "https://i", "validation": "introspection"}, "clientId")):
            with self.assertRaises(PolicyConfigError) as caught:
                settings_from(config)
            self.assertEqual(caught.exception.field, field)


class Base(TestCase):
    """A provider and a helper to run one request."""

    introspection = True

    def setUp(self) -> None:
        """Start the provider."""
        self.provider = Provider(self.introspection)
        self.addCleanup(self.provider.stop)

    def build(self, **config: Any) -> OidcPolicy:
        """A policy on the provider (schema-checked)."""
        # 30 s: these tests wait for the provider's answers, never for this timeout (2 s ran
        # out on a loaded machine: discovery, then introspection, from this busy process).
        config = {"issuer": self.provider.issuer, "authenticationTimeout": 30000, **config}
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        policy = KIND.build(config, BuildContext("d/o", "d/api", clock=reactor, reactor=reactor))
        assert isinstance(policy, OidcPolicy)
        return policy

    async def call(self, policy: OidcPolicy, ctx: PolicyContext) -> Any:
        """The outcome (None: let through)."""
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        return result

    def assertRefused(self, result: Any, status: int, message: str) -> None:
        """Flex's status and JSON error."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual((result.status, result.body),
                         (status, json.dumps({"error": message}, separators=(",", ":")).encode()))


class IntrospectionModeTests(Base):
    """The provider lists introspection and the gateway has a client: RFC 7662."""

    def policy(self, **config: Any) -> OidcPolicy:
        """With the gateway's client credentials."""
        return self.build(clientId=CLIENT[0], clientSecret=CLIENT[1], **config)

    async def test_statuses(self) -> None:
        """400 without a token, 401 for an unknown one, 403 for missing scopes, 200 with the
        right ones (AND); the validated token is cached (one introspection)."""
        policy = self.policy(scopes="read write")
        self.assertRefused(await self.call(policy, context()), 400, "Access token was not provided")
        self.assertRefused(await self.call(policy, context("nope")), 401, "Token has been revoked.")
        weak = self.provider.token(scope="read")
        self.assertRefused(await self.call(policy, context(weak)), 403,
                           "The required scopes are not authorized")
        good = self.provider.token(scope="read write admin")
        for _ in range(2):
            self.assertIsNone(await self.call(policy, context(good)))
        paths = self.provider.paths()
        self.assertEqual(paths.count(b"/.well-known/openid-configuration"), 1)
        self.assertEqual(paths.count(b"/introspect"), 3)
        self.assertNotIn(b"/jwks", paths)

    async def test_or_and_expose_headers(self) -> None:
        """OR needs one scope; exposeHeaders sends the properties as x-agw-*."""
        policy = self.policy(scopes="admin read", scopeValidationCriteria="OR", exposeHeaders=True)
        ctx = context(self.provider.token(scope="read", sub="alice"))
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual(ctx.request_header(b"x-agw-sub"), b"alice")
        self.assertEqual(ctx.request_header(b"x-agw-client_id"), b"app-1")

    async def test_wrong_client_credentials(self) -> None:
        """The provider refusing the gateway's credentials (401) is a 401 with its answer."""
        policy = self.build(clientId="gateway", clientSecret="wrong")
        result = await self.call(policy, context(self.provider.token()))
        self.assertEqual(result.status, 401)

    async def test_provider_problems(self) -> None:
        """Discovery unreachable: 401 Unauthorized; a discovery document naming another issuer
        (a bad answer from the provider): 500."""
        unreachable = KIND.build({"issuer": f"http://127.0.0.1:{free_port()}",
                                  "authenticationTimeout": 1000},
                                 BuildContext("d/o", "d/api", clock=reactor, reactor=reactor))
        self.assertRefused(await self.call(unreachable, context("t")), 401, "Unauthorized")
        self.provider.document_issuer = "https://elsewhere.example"
        self.assertRefused(await self.call(self.build(), context("t")), 500,
                           "Unexpected error processing Authentication Server response")


class JwksModeTests(Base):
    """A provider without introspection: the token is checked against its JWKS."""

    introspection = False

    async def test_jwks_validation(self) -> None:
        """A signed token passes (claims give scopes); a forged, expired, HS256 or foreign-issuer
        token is refused; discovery and the key set are fetched once."""
        policy = self.build(scopes="read")
        self.assertIsNone(await self.call(policy, context(self.provider.token(scope="read"))))
        self.assertIsNone(await self.call(policy, context(self.provider.token(scp=["read", "x"]))))
        self.assertRefused(await self.call(policy, context(self.provider.token(scope="other"))),
                           403, "The required scopes are not authorized")
        forged = jwt.encode({"iss": self.provider.issuer, "exp": int(time.time()) + 60,
                             "scope": "read"},
                            rsa.generate_private_key(public_exponent=65537, key_size=2048),
                            algorithm="RS256", headers={"kid": "k1"})
        self.assertRefused(await self.call(policy, context(forged)), 401, "Invalid token")
        expired = self.provider.token(scope="read", exp=int(time.time()) - 3600)
        self.assertRefused(await self.call(policy, context(expired)), 401, "Token has expired.")
        hs = jwt.encode({"iss": self.provider.issuer, "exp": int(time.time()) + 60}, "k" * 32,
                        algorithm="HS256")
        self.assertRefused(await self.call(policy, context(hs)), 401, "Invalid token")
        other = self.provider.token(scope="read", iss="https://evil.example")
        self.assertRefused(await self.call(policy, context(other)), 401, "Invalid token")
        paths = self.provider.paths()
        self.assertEqual(paths.count(b"/.well-known/openid-configuration"), 1)
        self.assertEqual(paths.count(b"/jwks"), 1)


class GatewayTests(TestCase):
    """openidconnect-access-token-enforcement-flex through a real gateway."""

    async def test_end_to_end(self) -> None:
        """400, 401, 403 and 200 with X-AGW-* headers upstream."""
        provider = Provider()
        self.addCleanup(provider.stop)
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        start_api_gateway(self, port, upstream.address[1], (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: oidc}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: openidconnect-access-token-enforcement-flex}\n"
            "  config:\n"
            f"    issuer: {provider.issuer}\n    clientId: {CLIENT[0]}\n"
            f"    clientSecret: {CLIENT[1]}\n    scopes: read\n    exposeHeaders: true\n"
        ))

        async def get(token: str | None) -> client.Response:
            auth = b"" if token is None else b"Authorization: Bearer " + token.encode() + b"\r\n"
            raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
            return await client.request(reactor, "127.0.0.1", port, raw)

        self.assertEqual((await get(None)).status, 400)
        self.assertEqual((await get("unknown")).status, 401)
        self.assertEqual((await get(provider.token(scope="none"))).status, 403)
        self.assertEqual(upstream.received, [])
        ok = await get(provider.token(scope="read", sub="alice"))
        self.assertEqual(ok.status, 200)
        self.assertEqual(upstream.received[0].header("x-agw-sub"), [b"alice"])
