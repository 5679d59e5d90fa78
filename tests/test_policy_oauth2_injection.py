"""credential-injection-oauth2-flex against a loopback token endpoint: the token request, caching, shared fetches, expiry, failures, end to end."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs

import jsonschema
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyContext
from flexgw.policies.oauth2_injection import KIND, SCHEMA, OAuth2InjectionPolicy
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import free_port
from tests.keyserver import JsonServer
from tests.outbound import outbound_binding, start_outbound_gateway


def context(*headers: tuple[bytes, bytes]) -> PolicyContext:
    """A GET with the given extra headers."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"api"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def authorization(ctx: PolicyContext) -> list[bytes]:
    """Every Authorization value the upstream would get."""
    headers = ctx.request_headers if ctx.request_headers_changed else ctx.head.headers
    return [v for n, v in headers if n.lower() == b"authorization"]


class TokenEndpointBase(TestCase):
    """A token endpoint handing out tok-1, tok-2, ... with a configurable expires_in; a fake clock."""

    def setUp(self) -> None:
        """Start the endpoint."""
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.expires_in: Any = 100
        self.status = 200
        self.server = JsonServer(self.answer)
        self.server.listen(reactor)
        self.addCleanup(self.server.stop)

    def answer(self, request: Any) -> tuple[int, Any]:
        """The next token (or the configured error status)."""
        if self.status != 200:
            return self.status, {"error": "server_error", "secret-detail": "x"}
        payload: dict[str, Any] = {
            "access_token": f"tok-{len(self.server.requests)}",
            "token_type": "Bearer",
        }
        if self.expires_in is not None:
            payload["expires_in"] = self.expires_in
        return 200, payload

    def build(self, **config: Any) -> OAuth2InjectionPolicy:
        """A policy against the endpoint (schema-checked config)."""
        config.setdefault("oauthService", self.server.url + "/token")
        if config.get("grantType") != "password":
            config.setdefault("clientId", "my id")
            config.setdefault("clientSecret", "s3cr:t")
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        policy = KIND.build(config, BuildContext("default/oauth", None, clock=self.clock))
        assert isinstance(policy, OAuth2InjectionPolicy)
        return policy

    async def call(self, policy: OAuth2InjectionPolicy, ctx: PolicyContext) -> Any:
        """on_request, awaited when it returns a Deferred."""
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        return result


class OAuth2InjectionTests(TokenEndpointBase):
    """The policy object against the real endpoint."""

    def test_registered(self) -> None:
        """A built-in outbound kind."""
        self.assertIs(registry.lookup("credential-injection-oauth2-flex"), KIND)
        self.assertEqual(KIND.phase, "outbound")

    async def test_token_request_and_injection(self) -> None:
        """Client credentials in Basic (url-encoded), form body with scope; Bearer token injected
        in place of the client's Authorization."""
        policy = self.build(scope=["read", "write"])
        ctx = context((b"Authorization", b"Bearer client-own"))
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual(authorization(ctx), [b"Bearer tok-1"])
        sent = self.server.requests[0]
        self.assertEqual((sent["method"], sent["path"]), (b"POST", b"/token"))
        expected = b"Basic " + base64.b64encode(b"my%20id:s3cr%3At")
        self.assertEqual(sent["headers"][b"authorization"], [expected])
        self.assertEqual(
            parse_qs(sent["body"].decode()),
            {"grant_type": ["client_credentials"], "scope": ["read write"]},
        )

    async def test_cached_then_refetched_after_expiry(self) -> None:
        """One fetch serves requests until expires_in (less the 5 s skew); then a new token."""
        policy = self.build()
        await self.call(policy, context())
        self.clock.advance(94)
        ctx = context()
        result = policy.on_request(ctx)  # synchronous: the cached token
        self.assertIsNone(result)
        self.assertEqual(authorization(ctx), [b"Bearer tok-1"])
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(2)
        ctx = context()
        await self.call(policy, ctx)
        self.assertEqual(authorization(ctx), [b"Bearer tok-2"])
        self.assertEqual(len(self.server.requests), 2)

    async def test_caching_ttl_caps_lifetime(self) -> None:
        """cachingTtl 10 with expires_in 100: min(10, 50) = 10 s (less a tenth)."""
        policy = self.build(cachingTtl=10)
        await self.call(policy, context())
        self.clock.advance(8.9)
        self.assertIsNone(policy.on_request(context()))
        self.clock.advance(0.2)
        await self.call(policy, context())
        self.assertEqual(len(self.server.requests), 2)

    async def test_concurrent_requests_share_one_fetch(self) -> None:
        """Requests arriving while a token is being fetched wait for that one fetch."""
        self.server.held = []
        policy = self.build()
        contexts = [context() for _ in range(3)]
        waiting = [policy.on_request(ctx) for ctx in contexts]
        self.assertTrue(all(isinstance(d, defer.Deferred) for d in waiting))
        await self.server.arrival(1)
        self.server.release()
        results = await defer.gatherResults(waiting)
        self.assertEqual(results, [None, None, None])
        self.assertEqual([authorization(ctx) for ctx in contexts], [[b"Bearer tok-1"]] * 3)
        self.assertEqual((len(self.server.requests), policy.fetches), (1, 1))

    async def test_failure_is_502_and_held(self) -> None:
        """A 500 from the endpoint: 502 oauth_token_failure (not its body); for 1 s no refetch."""
        self.status = 500
        policy = self.build()
        result = await self.call(policy, context())
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual(result.status, 502)
        self.assertEqual(result.cause, "oauth_token_failure")
        self.assertIn((b"x-flexgw-error", b"oauth_token_failure"), result.headers)
        self.assertNotIn(b"secret-detail", result.body)
        self.assertEqual(policy.on_request(context()).status, 502)  # held: no new fetch
        self.assertEqual(len(self.server.requests), 1)
        self.status = 200
        self.clock.advance(1.5)
        ctx = context()
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual(authorization(ctx), [b"Bearer tok-2"])

    async def test_answer_without_token_fails(self) -> None:
        """A 200 without access_token is a failure too."""
        self.server.handler = lambda request: (200, {"token_type": "Bearer"})
        result = await self.call(self.build(), context())
        self.assertEqual(result.status, 502)

    async def test_allow_without_credential_strips_clients(self) -> None:
        """allowRequestWithoutCredential: the request goes on, but without the client's value."""
        self.status = 503
        policy = self.build(allowRequestWithoutCredential=True)
        ctx = context((b"Authorization", b"Bearer client-own"))
        self.assertIsNone(await self.call(policy, ctx))
        self.assertEqual(authorization(ctx), [])

    async def test_overwrite_false_keeps_client_without_fetch(self) -> None:
        """overwrite false and a client Authorization: kept, and no token is fetched."""
        policy = self.build(overwrite=False)
        ctx = context((b"Authorization", b"Bearer client-own"))
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(authorization(ctx), [b"Bearer client-own"])
        self.assertEqual(self.server.requests, [])

    async def test_password_grant_body_json_custom_header(self) -> None:
        """Password grant, JSON body, custom request headers, custom upstream header and prefix."""
        policy = self.build(
            grantType="password", username="u", password="p", clientId="c", clientSecret="s",
            credentialLocation="body", tokenRequestBodyFormat="json",
            customRequestHeaders=[{"name": "X-Tenant", "value": "acme"}],
            upstreamTokenHeaderName="X-Token", upstreamTokenPrefixName="",
        )
        ctx = context()
        await self.call(policy, ctx)
        headers = ctx.request_headers
        self.assertIn((b"X-Token", b"tok-1"), headers)
        sent = self.server.requests[0]
        self.assertEqual(
            json.loads(sent["body"]),
            {"grant_type": "password", "username": "u", "password": "p",
             "client_id": "c", "client_secret": "s"},
        )
        self.assertEqual(sent["headers"][b"x-tenant"], [b"acme"])
        self.assertNotIn(b"authorization", sent["headers"])

    def test_schema(self) -> None:
        """oauthService is required and must be http(s); clientCredentials needs id and secret."""
        for config in (
            {"clientId": "a", "clientSecret": "b"},
            {"oauthService": "ftp://x/token", "clientId": "a", "clientSecret": "b"},
            {"oauthService": "http://x/token", "clientId": "a"},
            {"oauthService": "http://x/token", "grantType": "password", "username": "u"},
        ):
            with self.assertRaises(jsonschema.ValidationError, msg=config):
                jsonschema.Draft202012Validator(SCHEMA).validate(config)

    def test_repr_hides_credentials(self) -> None:
        """The repr names the endpoint host only."""
        policy = self.build()
        self.assertNotIn("s3cr", repr(policy))


class OAuth2EndToEndTests(TokenEndpointBase):
    """Bound to a Service, through a real gateway and a recording upstream."""

    def setUp(self) -> None:
        """The token endpoint, a recording upstream and a gateway port."""
        super().setUp()
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    async def get(self, *headers: bytes) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    def start(self, url: str) -> None:
        """A gateway whose Service has the oauth2 binding on `url`."""
        bindings = outbound_binding(
            "oauth", "credential-injection-oauth2-flex",
            f"oauthService: {url}\nclientId: id\nclientSecret: $SECRET\n",
        )
        self.gateway = start_outbound_gateway(
            self, self.port, self.upstream.address[1], bindings, {"SECRET": "sec"}
        )

    async def test_token_reaches_upstream_cached(self) -> None:
        """The upstream gets the Bearer token, never the client's credential; one fetch for two."""
        self.start(self.server.url + "/token")
        first = await self.get(b"Authorization: Basic Y2xpZW50OnNlY3JldA==")
        second = await self.get()
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(
            [r.header("authorization") for r in self.upstream.received],
            [[b"Bearer tok-1"], [b"Bearer tok-1"]],
        )
        self.assertNotIn(b"Y2xpZW50OnNlY3JldA==", self.upstream.received[0].raw)
        self.assertEqual(len(self.server.requests), 1)

    async def test_token_kept_across_reload(self) -> None:
        """A reload with the same token request keeps the cached token (no new fetch)."""
        self.start(self.server.url + "/token")
        self.assertEqual((await self.get()).status, 200)
        self.assertTrue(self.gateway.service.reload())
        self.assertEqual((await self.get()).status, 200)
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(self.upstream.received[1].header("authorization"), [b"Bearer tok-1"])

    async def test_unreachable_endpoint_is_502(self) -> None:
        """A token endpoint nobody listens on: 502 oauth_token_failure; the upstream sees nothing."""
        self.start(f"http://127.0.0.1:{free_port()}/token")
        response = await self.get()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"oauth_token_failure"])
        self.assertEqual(self.upstream.received, [])
