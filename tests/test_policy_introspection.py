"""oauth2-token-introspection-flex against a loopback introspection server: statuses, bodies, scopes, cache, TTL, bound."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import jsonschema
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.introspection import KIND, SCHEMA, IntrospectionPolicy, settings_from
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port
from tests.keyserver import JsonServer

NOW = 1_700_000_000.0
AUTH = "Basic YWRtaW46YWRtaW4="
REALM = b'Bearer realm="OAuth2 Introspection Client Realm"'
JSON = b"application/json; charset=UTF-8"


def context(
    token: str | None = None, target: bytes = b"/x", headers: list[tuple[bytes, bytes]] = ()
) -> PolicyContext:
    """A request with `Authorization: Bearer token` (when given)."""
    raw = [(b"Host", b"api"), *headers]
    if token is not None:
        raw.append((b"Authorization", b"Bearer " + token.encode()))
    head = analyze_head(b"GET", target, "1.1", raw, True)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")  # type: ignore[arg-type]


class Base(TestCase):
    """An introspection server whose answers depend on the token; a fake clock at NOW."""

    def setUp(self) -> None:
        """Start the server; tokens: `good` (read write), `reader` (read), `dead` (inactive)."""
        self.clock = Clock()
        self.clock.advance(NOW)
        self.answers: dict[str, tuple[int, Any]] = {
            "good": (
                200,
                {
                    "active": True,
                    "scope": "read write",
                    "client_id": "app-1",
                    "username": "alice",
                    "exp": NOW + 3600,
                },
            ),
            "reader": (200, {"active": True, "scope": "read", "client_id": "app-2"}),
            "dead": (200, {"active": False}),
        }
        self.server = JsonServer(self.answer)
        self.server.listen(reactor)
        self.addCleanup(self.server.stop)

    def answer(self, request: Any) -> tuple[int, Any]:
        """The configured answer for the posted token."""
        form = parse_qs(self.server.requests[-1]["body"].decode())
        token = form.get("token", [""])[0]
        return self.answers.get(token, (200, {"active": False}))

    def build(self, **config: Any) -> IntrospectionPolicy:
        """A policy on the server (schema-checked config)."""
        config.setdefault("introspectionURL", self.server.url + "/introspect")
        config.setdefault("authorizationValue", AUTH)
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        policy = KIND.build(config, BuildContext("default/i", "default/api", clock=self.clock))
        assert isinstance(policy, IntrospectionPolicy)
        return policy

    async def call(self, policy: IntrospectionPolicy, ctx: PolicyContext) -> Any:
        """on_request, awaited when it returns a Deferred."""
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        return result

    def assertRefused(self, result: Any, status: int, message: str) -> None:
        """A Flex refusal: status, `{"error": message}`, content type, realm on 401."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual(result.status, status)
        self.assertEqual(
            result.body, json.dumps({"error": message}, separators=(",", ":")).encode()
        )
        headers = dict(result.headers)
        self.assertEqual(headers[b"Content-Type"], JSON)
        self.assertEqual(headers.get(b"WWW-Authenticate"), REALM if status == 401 else None)


class IntrospectionTests(Base):
    """Accept and reject paths."""

    def test_registered(self) -> None:
        """The kind is a built-in."""
        self.assertIs(registry.lookup("oauth2-token-introspection-flex"), KIND)

    async def test_active_token(self) -> None:
        """An active token continues; the call is RFC 7662's; authentication is set."""
        policy = self.build()
        ctx = context("good")
        self.assertIsNone(await self.call(policy, ctx))
        sent = self.server.requests[0]
        self.assertEqual((sent["method"], sent["path"]), (b"POST", b"/introspect"))
        self.assertEqual(sent["headers"][b"authorization"], [AUTH.encode()])
        self.assertEqual(sent["headers"][b"content-type"], [b"application/x-www-form-urlencoded"])
        self.assertEqual(sent["body"], b"token=good")
        assert ctx.authentication is not None
        self.assertEqual(ctx.authentication["clientId"], "app-1")
        self.assertEqual(ctx.authentication["principal"], "app-1")
        self.assertEqual(ctx.authentication["properties"]["username"], "alice")
        self.assertFalse(ctx.request_headers_changed)  # exposeHeaders is off by default

    async def test_consumer_by_username(self) -> None:
        """consumerBy username makes the username the principal."""
        ctx = context("good")
        self.assertIsNone(await self.call(self.build(consumerBy="username"), ctx))
        assert ctx.authentication is not None
        self.assertEqual(ctx.authentication["principal"], "alice")

    async def test_inactive_token(self) -> None:
        """active false: 401 "Token has been revoked." with the realm."""
        self.assertRefused(
            await self.call(self.build(), context("dead")), 401, "Token has been revoked."
        )

    async def test_expired_token(self) -> None:
        """An active answer whose exp has passed: 401 "Token has expired."."""
        self.answers["old"] = (200, {"active": True, "exp": NOW - 1})
        self.assertRefused(await self.call(self.build(), context("old")), 401, "Token has expired.")

    async def test_missing_and_malformed_token(self) -> None:
        """No token: 400; a non-Bearer Authorization: 400; the access_token query parameter works."""
        policy = self.build()
        self.assertRefused(await self.call(policy, context()), 400, "Access token was not provided")
        basic = context(headers=[(b"Authorization", b"Basic dTpw")])
        self.assertRefused(await self.call(policy, basic), 400, "Authorization header is invalid")
        three = context(headers=[(b"Authorization", b"Bearer a b")])
        self.assertRefused(await self.call(policy, three), 400, "Authorization header is invalid")
        self.assertIsNone(await self.call(policy, context(target=b"/x?a=1&access_token=good")))
        self.assertRefused(
            await self.call(policy, context(target=b"/x?access_token=")),
            400,
            "Access token was not provided",
        )
        self.assertEqual(len(self.server.requests), 1)

    async def test_scopes_and(self) -> None:
        """AND (the default): every scope is needed; else 403."""
        policy = self.build(scopes="read write")
        self.assertIsNone(await self.call(policy, context("good")))
        self.assertRefused(
            await self.call(policy, context("reader")),
            403,
            "The required scopes are not authorized",
        )

    async def test_scopes_or(self) -> None:
        """OR: one scope is enough."""
        policy = self.build(scopes="write read", scopeValidationCriteria="OR")
        self.assertIsNone(await self.call(policy, context("reader")))
        only_admin = self.build(scopes="admin", scopeValidationCriteria="or")
        self.assertRefused(
            await self.call(only_admin, context("good")),
            403,
            "The required scopes are not authorized",
        )

    async def test_server_errors(self) -> None:
        """Server 400 -> 500, 403 -> 403, 401/500 -> 401 (bodies echoed); bad JSON -> 500."""
        cases = {
            "t400": ((400, {"error": "invalid_request"}), 500),
            "t403": ((403, {"error": "forbidden"}), 403),
            "t401": ((401, {"error": "bad client"}), 401),
            "t500": ((500, {"error": "boom"}), 401),
        }
        policy = self.build()
        for token, (answer, status) in cases.items():
            self.answers[token] = answer
            result = await self.call(policy, context(token))
            self.assertRefused(result, status, json.dumps(answer[1]))
        self.answers["junk"] = (200, b"<html>")
        self.assertRefused(
            await self.call(policy, context("junk")),
            500,
            "Unexpected error processing Authentication Server response",
        )
        self.answers["noactive"] = (200, {"scope": "read"})
        self.assertRefused(
            await self.call(policy, context("noactive")),
            500,
            "Unexpected error processing Authentication Server response",
        )

    async def test_unreachable_and_timeout(self) -> None:
        """A closed port or a server slower than authenticationTimeout: 401 Unauthorized."""
        closed = self.build(introspectionURL=f"http://127.0.0.1:{free_port()}/i")
        self.assertRefused(await self.call(closed, context("good")), 401, "Unauthorized")
        self.server.held = []
        slow = self.build(authenticationTimeout=50)
        result = await self.call(slow, context("good"))
        self.assertRefused(result, 401, "Unauthorized")
        self.server.release()

    async def test_expose_headers(self) -> None:
        """exposeHeaders sends scalar fields upstream as x-agw-*, replacing the client's."""
        self.answers["rich"] = (
            200,
            {
                "active": True,
                "client_id": "c",
                "exp": 1800000000,
                "admin": False,
                "user name": "bo",
                "aud": ["a"],
                "bad\nname": "x",
                "sub": "line\r\nbreak",
            },
        )
        ctx = context("rich", headers=[(b"X-AGW-client_id", b"forged"), (b"x-agw-extra", b"1")])
        self.assertIsNone(await self.call(self.build(exposeHeaders=True), ctx))
        exposed = {k: v for k, v in ctx.request_headers if k.lower().startswith(b"x-agw-")}
        self.assertEqual(
            exposed,
            {
                b"x-agw-active": b"true",
                b"x-agw-client_id": b"c",
                b"x-agw-exp": b"1800000000",
                b"x-agw-admin": b"false",
                b"x-agw-user-name": b"bo",
            },
        )


class CacheTests(Base):
    """The validated-token cache."""

    async def test_cache_hit_does_not_call(self) -> None:
        """A second request with the same token is answered synchronously from the cache."""
        policy = self.build(scopes="read")
        self.assertIsNone(await self.call(policy, context("good")))
        self.assertIsNone(policy.on_request(context("good")))
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(policy.calls, 1)
        other = self.build(scopes="admin")  # another binding: its own cache, scopes checked
        self.assertRefused(
            await self.call(other, context("good")), 403, "The required scopes are not authorized"
        )
        self.assertRefused(
            other.on_request(context("good")), 403, "The required scopes are not authorized"
        )
        self.assertEqual(len(self.server.requests), 2)

    async def test_inactive_not_cached(self) -> None:
        """A revoked answer is asked again next time."""
        policy = self.build()
        await self.call(policy, context("dead"))
        await self.call(policy, context("dead"))
        self.assertEqual(len(self.server.requests), 2)

    async def test_ttl_expiry(self) -> None:
        """validatedTokenTTL bounds the cache; then the server is asked again."""
        policy = self.build(validatedTokenTTL=30)
        await self.call(policy, context("reader"))
        self.clock.advance(29)
        self.assertIsNone(policy.on_request(context("reader")))
        self.clock.advance(1)
        self.assertIsNone(await self.call(policy, context("reader")))
        self.assertEqual(len(self.server.requests), 2)

    async def test_exp_caps_the_ttl(self) -> None:
        """An entry never outlives the token's exp: after it, the token is re-introspected."""
        self.answers["short"] = (200, {"active": True, "exp": NOW + 5})
        policy = self.build(validatedTokenTTL=600)
        self.assertIsNone(await self.call(policy, context("short")))
        self.clock.advance(5)
        self.answers["short"] = (200, {"active": False})
        self.assertRefused(
            await self.call(policy, context("short")), 401, "Token has been revoked."
        )
        self.assertEqual(len(self.server.requests), 2)

    async def test_cache_bound(self) -> None:
        """maxCacheEntries bounds the cache, the least recently used token leaving first."""
        for name in ("a", "b", "c"):
            self.answers[name] = (200, {"active": True})
        policy = self.build(maxCacheEntries=2)
        for name in ("a", "b"):
            await self.call(policy, context(name))
        self.assertIsNone(policy.on_request(context("a")))  # a is now the most recent
        await self.call(policy, context("c"))  # evicts b
        self.assertEqual(len(policy.cache), 2)
        self.assertIsNone(policy.on_request(context("a")))
        self.assertIsNone(policy.on_request(context("c")))
        evicted = policy.on_request(context("b"))  # b was evicted: asked again
        self.assertIsInstance(evicted, defer.Deferred)
        self.assertIsNone(await evicted)
        self.assertEqual(len(self.server.requests), 4)
        self.assertEqual(len(policy.cache), 2)

    async def test_zero_entries_disables_the_cache(self) -> None:
        """maxCacheEntries 0: every request is introspected."""
        policy = self.build(maxCacheEntries=0)
        await self.call(policy, context("good"))
        await self.call(policy, context("good"))
        self.assertEqual(len(self.server.requests), 2)

    async def test_concurrent_requests_share_a_call(self) -> None:
        """Requests with the same uncached token while a call is in flight share it."""
        policy = self.build()
        self.server.held = []
        first = policy.on_request(context("good"))
        second = policy.on_request(context("good"))
        await self.server.arrival(1)
        self.server.release()
        self.assertEqual([await first, await second], [None, None])
        self.assertEqual(len(self.server.requests), 1)

    def test_cache_keeps_no_raw_tokens(self) -> None:
        """The cache is keyed by a digest, not the token."""
        policy = self.build()
        policy._answered((200, b'{"active": true}'), b"k" * 32)
        self.assertEqual(list(policy.cache), [b"k" * 32])


class ConfigTests(TestCase):
    """Config keys, spellings and errors."""

    def test_defaults_and_spellings(self) -> None:
        """Flex's defaults; the 1.4 docs' snake_case keys are accepted."""
        s = settings_from({"introspectionURL": "https://idp/i", "authorizationValue": "Bearer x"})
        self.assertEqual(
            (
                s.ttl,
                s.timeout,
                s.skip_client_id,
                s.consumer_by,
                s.expose_headers,
                s.scopes,
                s.require_all,
                s.max_entries,
            ),
            (600.0, 10.0, True, "client_id", False, (), True, 1000),
        )
        snake = settings_from(
            {
                "introspection_url": "http://idp/i",
                "authorization_value": "x",
                "max_cache_entries": 5,
                "scope_validation_criteria": "OR",
                "scopes": "a b",
            }
        )
        self.assertEqual(
            (snake.url, snake.max_entries, snake.require_all), ("http://idp/i", 5, False)
        )
        validator = jsonschema.Draft202012Validator(SCHEMA)
        self.assertTrue(validator.is_valid({"introspection_url": "x", "expose_headers": True}))
        self.assertFalse(validator.is_valid({"introspectionUrl": "x"}))
        self.assertFalse(validator.is_valid({"scopeValidationCriteria": "XOR"}))
        self.assertFalse(validator.is_valid({"consumerBy": "email"}))

    def test_errors_name_the_field(self) -> None:
        """Missing or bad values are config errors on their field."""
        cases = [
            ({"authorizationValue": "x"}, "introspectionURL"),
            ({"introspectionURL": "ftp://idp/i", "authorizationValue": "x"}, "introspectionURL"),
            ({"introspectionURL": "http://idp/i"}, "authorizationValue"),
            (
                {"introspectionURL": "http://idp/i", "authorizationValue": "a\r\nb"},
                "authorizationValue",
            ),
            (
                {
                    "introspectionURL": "http://i/",
                    "introspection_url": "http://j/",
                    "authorizationValue": "x",
                },
                "introspection_url",
            ),
        ]
        for config, field in cases:
            error = self.assertRaises(PolicyConfigError, settings_from, config)
            self.assertEqual(error.field, field, config)

    def test_builds_without_a_reactor(self) -> None:
        """`flexgw validate` builds without a reactor: nothing runs until a request."""
        policy = KIND.build(
            {"introspectionURL": "http://127.0.0.1:9/i", "authorizationValue": "x"},
            BuildContext("b", "a"),
        )
        self.assertEqual(policy.calls, 0)


class GatewayTests(TestCase):
    """oauth2-token-introspection-flex through a real gateway."""

    async def test_end_to_end(self) -> None:
        """400, 401, 403 and an accepted request with x-agw-* headers; the cache spares the IdP."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        answers = {
            b"token=good": {"active": True, "scope": "read", "client_id": "app-1"},
            b"token=weak": {"active": True, "scope": "none"},
        }
        idp = JsonServer(
            lambda request: (200, answers.get(idp.requests[-1]["body"], {"active": False}))
        )
        idp.listen(reactor)
        self.addCleanup(idp.stop)
        port = free_port()
        text = api_document(port, upstream.address[1], name="oauth-api") + (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: introspect}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: oauth-api}\n"
            "  policyRef: {name: oauth2-token-introspection-flex}\n"
            "  config:\n"
            f"    introspectionURL: {idp.url}/introspect\n"
            f"    authorizationValue: '{AUTH}'\n"
            "    scopes: read\n    exposeHeaders: true\n"
        )
        Gateway(self, {"api.yaml": text}).start()

        async def get(auth: bytes) -> client.Response:
            raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
            return await client.request(reactor, "127.0.0.1", port, raw)

        missing = await get(b"")
        self.assertEqual(
            (missing.status, missing.body), (400, b'{"error":"Access token was not provided"}')
        )
        dead = await get(b"Authorization: Bearer dead\r\n")
        self.assertEqual((dead.status, dead.body), (401, b'{"error":"Token has been revoked."}'))
        self.assertEqual(dead.header("www-authenticate"), [REALM])
        weak = await get(b"Authorization: Bearer weak\r\n")
        self.assertEqual(weak.status, 403)
        self.assertEqual(upstream.received, [])
        for _ in range(2):
            ok = await get(b"Authorization: Bearer good\r\n")
            self.assertEqual(ok.status, 200)
        self.assertEqual(len(upstream.received), 2)
        self.assertEqual(upstream.received[0].header("x-agw-client_id"), [b"app-1"])
        self.assertEqual(upstream.received[0].header("x-agw-scope"), [b"read"])
        self.assertEqual(len(idp.requests), 3)  # dead, weak, good once: the second good was cached
