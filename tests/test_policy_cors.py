"""cors-flex: preflights answered locally, CORS headers on allowed responses, config errors, end to end."""

from __future__ import annotations

from typing import Any

import attrs
import jsonschema
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.cors import CorsKind, CorsPolicy
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, free_port, start_api_gateway

APP = b"https://app.example.com"

GROUPS: dict[str, Any] = {
    "publicResource": False,
    "originGroups": [
        {
            "name": "wild",
            "origins": ["https://*.example.com"],
            "allowedMethods": [{"methodName": "GET", "isAllowed": True}],
            "exposedHeaders": ["X-Wild"],
        },
        {
            "name": "app",
            "origins": ["https://app.example.com", "http://localhost:8080"],
            "accessControlMaxAge": 60,
            "allowedMethods": [
                {"methodName": "PUT", "isAllowed": True},
                {"methodName": "DELETE", "isAllowed": False},
                {"methodName": "PATCH", "allowed": True},
            ],
            "headers": ["X-Custom", "Content-Type"],
            "exposedHeaders": ["X-Request-Id", "X-Trace"],
        },
    ],
}


def build(config: dict[str, Any]) -> CorsPolicy:
    """Build a cors-flex policy from config."""
    return CorsKind().build(config, BuildContext(binding="default/cors", api="default/api"))


def context(method: bytes = b"GET", headers: tuple[tuple[bytes, bytes], ...] = ()) -> PolicyContext:
    """A policy context for a request with the given method and headers."""
    head = analyze_head(method, b"/x", "1.1", [(b"Host", b"t"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def preflight(
    origin: bytes = APP, method: bytes | None = b"PUT", request_headers: bytes | None = None
) -> PolicyContext:
    """A context for an OPTIONS preflight."""
    headers = [(b"Origin", origin)]
    if method is not None:
        headers.append((b"Access-Control-Request-Method", method))
    if request_headers is not None:
        headers.append((b"Access-Control-Request-Headers", request_headers))
    return context(b"OPTIONS", tuple(headers))


def extra(ctx: PolicyContext) -> dict[bytes, bytes]:
    """The headers a policy asked to add to the response, by lower-cased name."""
    return {k.lower(): v for k, v in ctx.response_extra or []}


class KindTests(SynchronousTestCase):
    """The kind's interface, schema and build-time checks."""

    def test_interfaces(self) -> None:
        """The kind and its policy provide the framework interfaces; the kind is registered."""
        kind = CorsKind()
        self.assertTrue(verifyObject(IPolicyKind, kind))
        self.assertTrue(verifyObject(IPolicy, build({})))
        self.assertIs(type(registry.lookup("cors-flex")), CorsKind)

    def test_defaults(self) -> None:
        """publicResource defaults to true, supportCredentials to false, no groups."""
        policy = build({})
        self.assertEqual((policy.public, policy.credentials, policy.groups), (True, False, ()))

    def test_group_defaults(self) -> None:
        """A group without allowedMethods allows Flex's eight; max age defaults to 30."""
        policy = build({"publicResource": False, "originGroups": [{"origins": ["https://a"]}]})
        group = policy.groups[0]
        self.assertEqual(
            group.methods,
            {b"CONNECT", b"DELETE", b"GET", b"OPTIONS", b"PATCH", b"POST", b"PUT", b"TRACE"},
        )
        self.assertEqual(group.max_age, b"30")
        self.assertEqual(group.name, "Default group")

    def test_schema_accepts_flex_examples(self) -> None:
        """The documented example config validates; unknown keys and bad types do not."""
        validator = jsonschema.Draft202012Validator(CorsKind.schema)
        doc_example = {
            "originGroups": [
                {
                    "origins": ["http://www.mulesoft.com"],
                    "accessControlMaxAge": 20,
                    "allowedMethods": [
                        {"methodName": "CONNECT", "isAllowed": True},
                        {"methodName": "DELETE", "isAllowed": False},
                    ],
                    "headers": ["X-My-Header"],
                    "exposedHeaders": ["X-Expose-Header"],
                }
            ],
            "publicResource": True,
            "supportCredentials": False,
        }
        self.assertEqual(list(validator.iter_errors(doc_example)), [])
        self.assertEqual(list(validator.iter_errors({"publicResource": "false"})), [])
        bad = list(validator.iter_errors({"publicResource": "yes", "colour": 1}))
        self.assertEqual(len(bad), 2)
        negative = list(validator.iter_errors({"originGroups": [{"accessControlMaxAge": -1}]}))
        self.assertEqual(len(negative), 1)

    def test_string_booleans(self) -> None:
        """ "false"/"true" strings (from $ENV substitution) are booleans."""
        policy = build({"publicResource": "false", "supportCredentials": "true"})
        self.assertEqual((policy.public, policy.credentials), (False, True))

    def test_bad_origin_is_a_config_error(self) -> None:
        """An origin with a space is refused with its field path."""
        with self.assertRaises(PolicyConfigError) as caught:
            build({"originGroups": [{"origins": ["https://ok", "https://bad host"]}]})
        self.assertEqual(caught.exception.field, "originGroups.0.origins.1")

    def test_bad_method_is_a_config_error(self) -> None:
        """A method name that is not a token is refused with its field path."""
        with self.assertRaises(PolicyConfigError) as caught:
            build({"originGroups": [{"allowedMethods": [{"methodName": "GE T"}]}]})
        self.assertEqual(caught.exception.field, "originGroups.0.allowedMethods.0.methodName")

    def test_bad_header_is_a_config_error(self) -> None:
        """A header name that is not a token is refused with its field path."""
        with self.assertRaises(PolicyConfigError) as caught:
            build({"originGroups": [{"exposedHeaders": ["X-Ok", "X:Bad"]}]})
        self.assertEqual(caught.exception.field, "originGroups.0.exposedHeaders.1")


class PublicResourceTests(SynchronousTestCase):
    """publicResource: true (the default)."""

    def test_no_origin_untouched(self) -> None:
        """A request without Origin gets nothing, and an OPTIONS without Origin goes on."""
        policy = build({})
        for method in (b"GET", b"OPTIONS"):
            ctx = context(method)
            self.assertIsNone(policy.on_request(ctx))
            self.assertIsNone(ctx.response_extra)
            self.assertFalse(ctx.request_headers_changed)

    def test_actual_request_gets_star(self) -> None:
        """Any origin gets `Access-Control-Allow-Origin: *`, no credentials header, no Vary."""
        policy = build({})
        ctx = context(headers=((b"Origin", b"https://anywhere.test"),))
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(ctx.response_extra, [(b"Access-Control-Allow-Origin", b"*")])

    def test_credentials_echo_origin(self) -> None:
        """With supportCredentials the origin is echoed, with the credentials header and Vary."""
        policy = build({"supportCredentials": True})
        ctx = context(headers=((b"Origin", b"https://anywhere.test"),))
        policy.on_request(ctx)
        self.assertEqual(
            ctx.response_extra,
            [
                (b"Access-Control-Allow-Origin", b"https://anywhere.test"),
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Vary", b"Origin"),
            ],
        )

    def test_preflight_mirrors(self) -> None:
        """A public preflight is answered 200 mirroring the requested method and headers."""
        policy = build({})
        answer = policy.on_request(preflight(b"https://x.test", b"PUT", b"X-A, x-b"))
        assert isinstance(answer, LocalResponse)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.body, b"")
        self.assertEqual(
            answer.headers,
            (
                (b"Access-Control-Allow-Origin", b"*"),
                (b"Access-Control-Allow-Methods", b"PUT"),
                (b"Access-Control-Allow-Headers", b"x-a, x-b"),
            ),
        )

    def test_preflight_without_method_is_bare(self) -> None:
        """An OPTIONS with Origin but no Access-Control-Request-Method: a bare 200, not forwarded."""
        answer = build({}).on_request(preflight(method=None))
        self.assertEqual(answer, LocalResponse(200))

    def test_groups_ignored(self) -> None:
        """A public resource does not consult origin groups."""
        policy = build({**GROUPS, "publicResource": True})
        ctx = context(b"DELETE", ((b"Origin", b"https://evil.test"),))
        policy.on_request(ctx)
        self.assertEqual(extra(ctx), {b"access-control-allow-origin": b"*"})


class ProtectedResourceTests(SynchronousTestCase):
    """publicResource: false with origin groups."""

    def setUp(self) -> None:
        """Build the two-group policy."""
        self.policy = build(GROUPS)

    def test_allowed_actual_request(self) -> None:
        """An exact-match origin gets its origin back, Vary and the group's exposed headers."""
        ctx = context(headers=((b"Origin", APP),))
        self.assertIsNone(self.policy.on_request(ctx))
        self.assertEqual(
            ctx.response_extra,
            [
                (b"Access-Control-Allow-Origin", APP),
                (b"Vary", b"Origin"),
                (b"Access-Control-Expose-Headers", b"X-Request-Id, X-Trace"),
            ],
        )

    def test_exact_group_wins_over_wildcard(self) -> None:
        """app.example.com matches both groups; the exact one (listed second) wins."""
        ctx = context(headers=((b"Origin", APP),))
        self.policy.on_request(ctx)
        self.assertEqual(extra(ctx)[b"access-control-expose-headers"], b"X-Request-Id, X-Trace")

    def test_wildcard_group(self) -> None:
        """Another subdomain matches the wildcard group."""
        ctx = context(headers=((b"Origin", b"https://api.example.com"),))
        self.policy.on_request(ctx)
        self.assertEqual(extra(ctx)[b"access-control-allow-origin"], b"https://api.example.com")
        self.assertEqual(extra(ctx)[b"access-control-expose-headers"], b"X-Wild")

    def test_wildcard_is_anchored(self) -> None:
        """The wildcard does not match another scheme, another domain or a suffix trick."""
        for origin in (
            b"http://api.example.com",
            b"https://example.com.evil.test",
            b"https://api.example.community",
        ):
            ctx = context(headers=((b"Origin", origin),))
            self.policy.on_request(ctx)
            self.assertIsNone(ctx.response_extra, origin)

    def test_origin_case_insensitive(self) -> None:
        """Origins compare case-insensitively; the request's spelling is echoed."""
        ctx = context(headers=((b"Origin", b"HTTPS://App.Example.com"),))
        self.policy.on_request(ctx)
        self.assertEqual(extra(ctx)[b"access-control-allow-origin"], b"HTTPS://App.Example.com")

    def test_disallowed_origin_gets_nothing(self) -> None:
        """An origin no group lists continues with no CORS headers."""
        ctx = context(headers=((b"Origin", b"https://evil.test"),))
        self.assertIsNone(self.policy.on_request(ctx))
        self.assertIsNone(ctx.response_extra)

    def test_unsafe_origin_ignored(self) -> None:
        """An Origin value with spaces or controls is never echoed (treated as absent)."""
        ctx = context(headers=((b"Origin", b"https://app.example.com x"),))
        self.assertIsNone(self.policy.on_request(ctx))
        self.assertIsNone(ctx.response_extra)

    def test_method_rules_for_actual_requests(self) -> None:
        """Safelisted methods always pass; others must be allowed (isAllowed/allowed honoured)."""
        cases = {
            b"GET": True,
            b"HEAD": True,
            b"POST": True,
            b"PUT": True,
            b"PATCH": True,
            b"DELETE": False,
            b"TRACE": False,
        }
        for method, allowed in cases.items():
            ctx = context(method, ((b"Origin", APP),))
            self.policy.on_request(ctx)
            self.assertEqual(ctx.response_extra is not None, allowed, method)

    def test_allowed_preflight(self) -> None:
        """An allowed preflight: origin, requested method and headers, max age, Vary."""
        answer = self.policy.on_request(preflight(APP, b"PUT", b"x-custom,Content-Type"))
        assert isinstance(answer, LocalResponse)
        self.assertEqual(answer.status, 200)
        self.assertEqual(
            answer.headers,
            (
                (b"Access-Control-Allow-Origin", APP),
                (b"Vary", b"Origin"),
                (b"Access-Control-Allow-Methods", b"PUT"),
                (b"Access-Control-Allow-Headers", b"x-custom, content-type"),
                (b"Access-Control-Max-Age", b"60"),
            ),
        )

    def test_credentials_on_preflight(self) -> None:
        """supportCredentials adds `Access-Control-Allow-Credentials: true` to the preflight."""
        policy = build({**GROUPS, "supportCredentials": True})
        answer = policy.on_request(preflight(APP, b"PUT"))
        assert isinstance(answer, LocalResponse)
        self.assertIn((b"Access-Control-Allow-Credentials", b"true"), answer.headers)

    def test_refused_preflights_are_bare_200s(self) -> None:
        """Unknown origin, disallowed method, unlisted header, bad header list: bare 200s."""
        for ctx in (
            preflight(b"https://evil.test", b"PUT"),
            preflight(APP, b"DELETE"),
            preflight(APP, b"POST"),
            preflight(APP, b"PUT", b"x-custom, x-secret"),
            preflight(APP, b"PUT", b"x custom"),
            preflight(b"https://api.example.com", b"PUT"),
        ):
            answer = self.policy.on_request(ctx)
            self.assertEqual(answer, LocalResponse(200))
            self.assertIsNone(ctx.response_extra)

    def test_star_origin(self) -> None:
        """An origin of `*` allows any origin, echoed."""
        policy = build({"publicResource": False, "originGroups": [{"origins": ["*"]}]})
        ctx = context(headers=((b"Origin", b"https://x.test"),))
        policy.on_request(ctx)
        self.assertEqual(extra(ctx)[b"access-control-allow-origin"], b"https://x.test")

    def test_on_response_replaces_upstream_cors_headers(self) -> None:
        """For an allowed request the upstream's own CORS headers are dropped (ours are added)."""
        ctx = context(headers=((b"Origin", APP),))
        self.policy.on_request(ctx)
        upstream = [
            (b"access-control-allow-origin", b"*"),
            (b"Access-Control-Expose-Headers", b"X-Old"),
            (b"Vary", b"Accept-Encoding"),
            (b"X-Other", b"1"),
        ]
        ctx.begin_response(200, upstream)
        self.policy.on_response(ctx)
        self.assertEqual(ctx.response_headers, [(b"Vary", b"Accept-Encoding"), (b"X-Other", b"1")])

    def test_on_response_leaves_disallowed_alone(self) -> None:
        """For a disallowed origin the upstream's headers pass untouched."""
        ctx = context(headers=((b"Origin", b"https://evil.test"),))
        self.policy.on_request(ctx)
        upstream = [(b"Access-Control-Allow-Origin", b"*")]
        ctx.begin_response(200, list(upstream))
        self.policy.on_response(ctx)
        self.assertEqual(ctx.response_headers, upstream)


SCHEMA_DENY = {"type": "object", "properties": {}, "additionalProperties": False}


@implementer(IPolicy)
@attrs.frozen
class DenyPolicy:
    """Answers every request with a local 401."""

    def on_request(self, ctx: PolicyContext) -> LocalResponse:
        """Refuse."""
        return LocalResponse.json_error(401, "Unauthorized")

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing."""


@implementer(IPolicyKind)
class DenyKind:
    """A test kind whose policy refuses everything."""

    name = "test-deny-policy"
    schema = SCHEMA_DENY
    phase = "inbound"

    def build(self, config: dict[str, Any], context: Any) -> DenyPolicy:
        """Build it."""
        return DenyPolicy()


CORS_BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: cors}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: cors-flex}
  order: 99
  config:
    publicResource: false
    originGroups:
      - origins: ["https://app.example.com"]
        accessControlMaxAge: 10
        allowedMethods:
          - {methodName: PUT, isAllowed: true}
        headers: [x-custom]
        exposedHeaders: [x-request-id]
"""

DENY_BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: deny}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: test-deny-policy}
  order: 1
  rules:
    - path: /private.*
"""


class EndToEndTests(TestCase):
    """cors-flex through a real gateway before a recording upstream."""

    def setUp(self) -> None:
        """A recording upstream that sends its own CORS header."""
        registry.register(DenyKind())
        self.addCleanup(registry.unregister, "test-deny-policy")
        responder = fixed(
            headers=((b"Content-Type", b"text/plain"), (b"Access-Control-Allow-Origin", b"*"))
        )
        self.upstream = RecordingUpstream(responder, reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, bindings: str) -> Gateway:
        """A gateway with one API and the given bindings."""
        return start_api_gateway(
            self, self.port, self.upstream.address[1], bindings
        )

    async def send(self, method: bytes, path: bytes, *headers: bytes) -> client.Response:
        """One request through the gateway."""
        raw = method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n"
        raw += b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_preflight_answered_not_forwarded(self) -> None:
        """A preflight gets 200 with allow headers from the gateway; the upstream sees nothing."""
        self.start(CORS_BINDING)
        response = await self.send(
            b"OPTIONS",
            b"/x",
            b"Origin: https://app.example.com",
            b"Access-Control-Request-Method: PUT",
            b"Access-Control-Request-Headers: X-Custom",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(
            response.header("access-control-allow-origin"), [b"https://app.example.com"]
        )
        self.assertEqual(response.header("access-control-allow-methods"), [b"PUT"])
        self.assertEqual(response.header("access-control-allow-headers"), [b"x-custom"])
        self.assertEqual(response.header("access-control-max-age"), [b"10"])
        self.assertEqual(self.upstream.received, [])

    async def test_refused_preflight_not_forwarded(self) -> None:
        """A preflight from another origin gets a bare 200; the upstream sees nothing."""
        self.start(CORS_BINDING)
        response = await self.send(
            b"OPTIONS", b"/x", b"Origin: https://evil.test", b"Access-Control-Request-Method: PUT"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(
            [k for k, _ in response.headers if k.lower().startswith(b"access-control")], []
        )
        self.assertEqual(self.upstream.received, [])

    async def test_options_without_origin_forwarded(self) -> None:
        """An OPTIONS without Origin is not CORS: it reaches the upstream untouched."""
        self.start(CORS_BINDING)
        response = await self.send(b"OPTIONS", b"/x")
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(self.upstream.received[0].method, b"OPTIONS")
        self.assertEqual(response.header("access-control-allow-origin"), [b"*"])  # upstream's own

    async def test_actual_request_headers_replace_upstreams(self) -> None:
        """An allowed GET is forwarded; the response carries our CORS headers, once."""
        self.start(CORS_BINDING)
        response = await self.send(b"GET", b"/x", b"Origin: https://app.example.com")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"ok\n")
        self.assertEqual(
            response.header("access-control-allow-origin"), [b"https://app.example.com"]
        )
        self.assertEqual(response.header("access-control-expose-headers"), [b"x-request-id"])
        self.assertEqual(response.header("vary"), [b"Origin"])
        self.assertEqual(self.upstream.received[0].header("origin"), [b"https://app.example.com"])

    async def test_disallowed_origin_forwarded_without_headers(self) -> None:
        """A GET from another origin is forwarded; only the upstream's own header comes back."""
        self.start(CORS_BINDING)
        response = await self.send(b"GET", b"/x", b"Origin: https://evil.test")
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(response.header("access-control-allow-origin"), [b"*"])
        self.assertEqual(response.header("vary"), [])

    async def test_cors_first_and_on_local_answers(self) -> None:
        """CORS (order 99) runs before a policy at order 1: preflights are still answered, and a
        later policy's local 401 carries the CORS headers a browser needs to read it."""
        self.start(CORS_BINDING + DENY_BINDING)
        answer = await self.send(
            b"OPTIONS",
            b"/private",
            b"Origin: https://app.example.com",
            b"Access-Control-Request-Method: PUT",
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.header("access-control-allow-methods"), [b"PUT"])
        denied = await self.send(b"GET", b"/private", b"Origin: https://app.example.com")
        self.assertEqual(denied.status, 401)
        self.assertEqual(denied.header("access-control-allow-origin"), [b"https://app.example.com"])
        self.assertEqual(self.upstream.received, [])

    async def test_config_error_located(self) -> None:
        """A bad origin keeps the API from being served and names the field."""
        gateway = self.start(CORS_BINDING.replace("https://app.example.com", "https://a b"))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.originGroups[0].origins[0]" for p in errors),
            [(p.field, p.message) for p in errors],
        )
        self.assertEqual(gateway.service.plan.listeners, ())
