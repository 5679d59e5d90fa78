"""header-injection-flex and header-removal-flex: both directions, expressions, protected headers, CR/LF refusal."""

from __future__ import annotations

from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.expressions import EvaluationError
from flexgw.policies.headers import (
    HeaderInjectionKind,
    HeaderInjectionPolicy,
    HeaderRemovalKind,
    HeaderRemovalPolicy,
)
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, free_port, start_api_gateway

BUILD = BuildContext(binding="default/headers", api="default/api")


def inject(config: dict[str, Any]) -> HeaderInjectionPolicy:
    """Build a header-injection-flex policy."""
    return HeaderInjectionKind().build(config, BUILD)


def remove(config: dict[str, Any]) -> HeaderRemovalPolicy:
    """Build a header-removal-flex policy."""
    return HeaderRemovalKind().build(config, BUILD)


def context(
    headers: tuple[tuple[bytes, bytes], ...] = (), target: bytes = b"/orders?id=7"
) -> PolicyContext:
    """A policy context for a GET with the given headers."""
    head = analyze_head(b"GET", target, "1.1", [(b"Host", b"t"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


class InjectionBuildTests(SynchronousTestCase):
    """header-injection-flex config: spellings, defaults and refusals."""

    def test_interfaces(self) -> None:
        """The kinds and policies provide the framework interfaces and are registered."""
        self.assertTrue(verifyObject(IPolicyKind, HeaderInjectionKind()))
        self.assertTrue(verifyObject(IPolicyKind, HeaderRemovalKind()))
        self.assertTrue(
            verifyObject(IPolicy, inject({"inboundHeaders": [{"key": "a", "value": "b"}]}))
        )
        self.assertTrue(verifyObject(IPolicy, remove({"inboundHeaders": ["a"]})))
        self.assertIs(type(registry.lookup("header-injection-flex")), HeaderInjectionKind)
        self.assertIs(type(registry.lookup("header-removal-flex")), HeaderRemovalKind)

    def test_schema(self) -> None:
        """`key` or `name` with `value` validate; an item with neither, or an unknown key, do not."""
        validator = jsonschema.Draft202012Validator(HeaderInjectionKind.schema)
        good = {
            "inboundHeaders": [{"key": "x-a", "value": "#[attributes.requestPath]"}],
            "outboundHeaders": [{"name": "x-b", "value": 3}],
        }
        self.assertEqual(list(validator.iter_errors(good)), [])
        self.assertEqual(len(list(validator.iter_errors({"inboundHeaders": [{"value": "v"}]}))), 1)
        unknown = {"inboundHeaders": [{"key": "a", "value": "v", "colour": "red"}]}
        self.assertEqual(len(list(validator.iter_errors(unknown))), 1)
        removal = jsonschema.Draft202012Validator(HeaderRemovalKind.schema)
        self.assertEqual(list(removal.iter_errors({"inboundHeaders": ["Access-Control.*"]})), [])
        self.assertEqual(len(list(removal.iter_errors({"inboundHeaders": [{"key": "a"}]}))), 1)

    def test_both_empty_refused(self) -> None:
        """inboundHeaders and outboundHeaders cannot both be empty (for either kind)."""
        for build in (inject, remove):
            with self.assertRaises(PolicyConfigError):
                build({})
            with self.assertRaises(PolicyConfigError):
                build({"inboundHeaders": [], "outboundHeaders": []})

    def test_protected_names_refused(self) -> None:
        """Framing and connection headers cannot be injected: the item's field is named."""
        for name in ("Host", "content-length", "Transfer-Encoding", "Connection", "Upgrade", "TE"):
            with self.assertRaises(PolicyConfigError) as caught:
                inject(
                    {"inboundHeaders": [{"key": "x-ok", "value": "1"}, {"key": name, "value": "1"}]}
                )
            self.assertEqual(caught.exception.field, "inboundHeaders.1.key")
        with self.assertRaises(PolicyConfigError) as caught:
            inject({"outboundHeaders": [{"name": "Content-Length", "value": "1"}]})
        self.assertEqual(caught.exception.field, "outboundHeaders.0.name")

    def test_invalid_name_refused(self) -> None:
        """A name that is not a header token is refused."""
        with self.assertRaises(PolicyConfigError) as caught:
            inject({"inboundHeaders": [{"key": "new inbound header", "value": "1"}]})
        self.assertEqual(caught.exception.field, "inboundHeaders.0.key")

    def test_crlf_literal_refused(self) -> None:
        """A literal value with CR/LF or NUL is refused at load time."""
        for value in ("a\r\nX-Evil: 1", "a\nb", "a\x00b"):
            with self.assertRaises(PolicyConfigError) as caught:
                inject({"outboundHeaders": [{"key": "x-a", "value": value}]})
            self.assertEqual(caught.exception.field, "outboundHeaders.0.value")

    def test_key_and_name_together_refused(self) -> None:
        """An item giving both spellings is ambiguous."""
        with self.assertRaises(PolicyConfigError) as caught:
            inject({"inboundHeaders": [{"key": "a", "name": "b", "value": "v"}]})
        self.assertEqual(caught.exception.field, "inboundHeaders.0")

    def test_bad_expression_refused(self) -> None:
        """A syntax error in an expression is a config error at its field."""
        with self.assertRaises(PolicyConfigError) as caught:
            inject({"inboundHeaders": [{"key": "x-a", "value": "#[attributes.requestPath ++]"}]})
        self.assertEqual(caught.exception.field, "inboundHeaders.0.value")
        with self.assertRaises(PolicyConfigError) as caught:
            inject({"inboundHeaders": [{"key": "#[attributes.nope]", "value": "1"}]})
        self.assertEqual(caught.exception.field, "inboundHeaders.0.key")

    def test_payload_expression_needs_body(self) -> None:
        """An inbound expression reading `payload` asks the chain to buffer the body."""
        self.assertTrue(
            inject({"inboundHeaders": [{"key": "x", "value": "#[payload.a]"}]}).needs_body
        )
        self.assertFalse(inject({"inboundHeaders": [{"key": "x", "value": "1"}]}).needs_body)


class InjectionTests(SynchronousTestCase):
    """header-injection-flex at request and response time."""

    def test_inbound_adds_without_overwriting(self) -> None:
        """An injected header is added next to an existing one of the same name."""
        policy = inject({"inboundHeaders": [{"key": "X-Tenant", "value": "gw"}]})
        ctx = context(((b"X-Tenant", b"client"),))
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(
            [v for k, v in ctx.request_headers if k.lower() == b"x-tenant"], [b"client", b"gw"]
        )

    def test_inbound_overwrites_flex_list(self) -> None:
        """content-type and access-control-allow-origin are overwritten, as Flex does."""
        policy = inject(
            {
                "inboundHeaders": [
                    {"key": "Content-Type", "value": "application/json"},
                    {"key": "Access-Control-Allow-Origin", "value": "https://a"},
                ]
            }
        )
        ctx = context(((b"content-type", b"text/plain"), (b"Access-Control-Allow-Origin", b"*")))
        policy.on_request(ctx)
        self.assertEqual(
            ctx.request_headers,
            [
                (b"Host", b"t"),
                (b"Content-Type", b"application/json"),
                (b"Access-Control-Allow-Origin", b"https://a"),
            ],
        )

    def test_expression_values_and_names(self) -> None:
        """Values and names may be expressions, evaluated per request."""
        policy = inject(
            {
                "inboundHeaders": [
                    {"key": "x-path", "value": "#[attributes.requestPath]"},
                    {
                        "name": "#['x-' ++ attributes.queryParams.id]",
                        "value": "#[attributes.method]",
                    },
                    {"key": "x-count", "value": 5},
                ]
            }
        )
        ctx = context()
        policy.on_request(ctx)
        self.assertEqual(
            ctx.request_headers[1:], [(b"x-path", b"/orders"), (b"x-7", b"GET"), (b"x-count", b"5")]
        )

    def test_crlf_from_expression_is_an_evaluation_error(self) -> None:
        """A value computed with CR/LF is refused (500), and nothing is half-applied."""
        policy = inject(
            {
                "inboundHeaders": [
                    {"key": "x-first", "value": "1"},
                    {"key": "x-v", "value": "#[attributes.queryParams.v]"},
                ]
            }
        )
        ctx = context(target=b"/x?v=a%0d%0aX-Evil:%201")
        self.assertRaises(EvaluationError, policy.on_request, ctx)
        self.assertFalse(ctx.request_headers_changed)
        nul = context(target=b"/x?v=a%00b")
        self.assertRaises(EvaluationError, policy.on_request, nul)

    def test_bad_name_from_expression_is_an_evaluation_error(self) -> None:
        """A computed name that is protected or not a token is refused per request."""
        policy = inject({"inboundHeaders": [{"key": "#[attributes.queryParams.n]", "value": "1"}]})
        for query in (b"n=Host", b"n=content-length", b"n=a%20b", b"n=a%0d%0ab", b"m=1"):
            ctx = context(target=b"/x?" + query)
            self.assertRaises(EvaluationError, policy.on_request, ctx)
        ok = context(target=b"/x?n=X-Ok")
        policy.on_request(ok)
        self.assertEqual(ok.request_header(b"x-ok"), b"1")

    def test_outbound(self) -> None:
        """Outbound headers go to the response: added, or overwritten for content-type; the
        status code is visible to expressions."""
        policy = inject(
            {
                "outboundHeaders": [
                    {"key": "X-Gw", "value": "flex"},
                    {"key": "Content-Type", "value": "application/json"},
                    {"key": "X-Status", "value": "#[attributes.statusCode]"},
                ]
            }
        )
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertFalse(ctx.request_headers_changed)
        ctx.begin_response(201, [(b"Content-Type", b"text/plain"), (b"X-Gw", b"upstream")])
        policy.on_response(ctx)
        self.assertEqual(
            ctx.response_headers,
            [
                (b"X-Gw", b"upstream"),
                (b"X-Gw", b"flex"),
                (b"Content-Type", b"application/json"),
                (b"X-Status", b"201"),
            ],
        )


class RemovalTests(SynchronousTestCase):
    """header-removal-flex at request and response time."""

    def test_names_and_regexes(self) -> None:
        """Whole-name, case-insensitive matches of names and regexes are removed."""
        policy = remove({"inboundHeaders": ["Cache-Control", "Access-Control.*"]})
        ctx = context(
            (
                (b"cache-control", b"no-cache"),
                (b"X-Cache-Control", b"kept"),
                (b"Access-Control-Request-Method", b"PUT"),
                (b"ACCESS-CONTROL-ALLOW-ORIGIN", b"*"),
                (b"X-Other", b"kept"),
            )
        )
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(
            ctx.request_headers,
            [(b"Host", b"t"), (b"X-Cache-Control", b"kept"), (b"X-Other", b"kept")],
        )

    def test_protected_never_removed(self) -> None:
        """`.*` removes everything except Flex's protected headers."""
        policy = remove({"inboundHeaders": [".*", "Host"], "outboundHeaders": [".*"]})
        ctx = context(
            (
                (b"Accept", b"*/*"),
                (b"Content-Type", b"text/plain"),
                (b"Date", b"x"),
                (b"X-Gone", b"1"),
            )
        )
        policy.on_request(ctx)
        self.assertEqual(
            [k for k, _ in ctx.request_headers], [b"Host", b"Accept", b"Content-Type", b"Date"]
        )
        ctx.begin_response(200, [(b"Date", b"d"), (b"Server", b"s"), (b"Content-Type", b"t")])
        policy.on_response(ctx)
        self.assertEqual([k for k, _ in ctx.response_headers or []], [b"Date", b"Content-Type"])

    def test_nothing_to_remove_copies_nothing(self) -> None:
        """When no header matches, the request header list is left alone."""
        policy = remove({"inboundHeaders": ["x-absent"]})
        ctx = context(((b"X-Present", b"1"),))
        policy.on_request(ctx)
        self.assertFalse(ctx.request_headers_changed)

    def test_outbound(self) -> None:
        """Outbound entries strip response headers only."""
        policy = remove({"outboundHeaders": ["Access-Control-Allow-Credentials", "x-internal-.*"]})
        ctx = context(((b"X-Internal-Id", b"kept on the request"),))
        policy.on_request(ctx)
        self.assertFalse(ctx.request_headers_changed)
        ctx.begin_response(
            200,
            [
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"X-Internal-Trace", b"1"),
                (b"X-Public", b"1"),
            ],
        )
        policy.on_response(ctx)
        self.assertEqual(ctx.response_headers, [(b"X-Public", b"1")])

    def test_expression_entry_names_headers(self) -> None:
        """A `#[...]` entry removes the header(s) it names, literally (never as a regex)."""
        policy = remove({"inboundHeaders": ["#[attributes.queryParams.drop]"]})
        ctx = context(((b"X-A", b"1"), (b"X-AB", b"2")), target=b"/x?drop=x-a")
        policy.on_request(ctx)
        self.assertEqual([k for k, _ in ctx.request_headers], [b"Host", b"X-AB"])
        regexish = context(((b"X-A", b"1"),), target=b"/x?drop=.*")
        policy.on_request(regexish)
        self.assertFalse(regexish.request_headers_changed)
        listed = remove({"inboundHeaders": ["#[attributes.queryParams.drop splitBy ',']"]})
        both = context(((b"X-A", b"1"), (b"X-B", b"2"), (b"X-C", b"3")), target=b"/x?drop=x-a,X-B")
        listed.on_request(both)
        self.assertEqual([k for k, _ in both.request_headers], [b"Host", b"X-C"])

    def test_invalid_regex_refused(self) -> None:
        """An entry that is not a valid regex is a config error at its index."""
        with self.assertRaises(PolicyConfigError) as caught:
            remove({"outboundHeaders": ["ok", "x-(unclosed"]})
        self.assertEqual(caught.exception.field, "outboundHeaders.1")


BINDINGS = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: inject}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: header-injection-flex}
  order: 1
  config:
    inboundHeaders:
      - {key: x-req-path, value: "#[attributes.requestPath]"}
      - {key: x-tenant, value: gateway}
      - {key: x-q, value: "#[attributes.queryParams.v default '']"}
    outboundHeaders:
      - {key: x-gw, value: flex}
      - {key: x-status, value: "#[attributes.statusCode]"}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: remove}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: header-removal-flex}
  order: 2
  config:
    inboundHeaders: ["Cache-Control", "X-Secret.*", "Host"]
    outboundHeaders: ["Server", "X-Powered-By"]
"""


class EndToEndTests(TestCase):
    """Both policies through a real gateway before a recording upstream."""

    def setUp(self) -> None:
        """A recording upstream with chatty response headers."""
        responder = fixed(
            status=202,
            headers=(
                (b"Content-Type", b"text/plain"),
                (b"Server", b"upstream/1.0"),
                (b"X-Powered-By", b"php"),
                (b"X-Gw", b"upstream"),
            ),
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

    async def send(self, target: bytes, *headers: bytes) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n"
        raw += b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_both_directions(self) -> None:
        """Injected and removed headers, inbound at the upstream and outbound at the client."""
        self.start(BINDINGS)
        response = await self.send(
            b"/orders/7?v=abc",
            b"Cache-Control: no-cache",
            b"X-Secret-Token: s3cr3t",
            b"X-Tenant: client",
        )
        self.assertEqual(response.status, 202)
        seen = self.upstream.received[0]
        self.assertEqual(seen.header("x-req-path"), [b"/orders/7"])
        self.assertEqual(seen.header("x-tenant"), [b"client", b"gateway"])
        self.assertEqual(seen.header("x-q"), [b"abc"])
        self.assertEqual(seen.header("cache-control"), [])
        self.assertEqual(seen.header("x-secret-token"), [])
        self.assertEqual(len(seen.header("host")), 1)  # protected: kept (the gateway sets it)
        self.assertEqual(response.header("server"), [])
        self.assertEqual(response.header("x-powered-by"), [])
        self.assertEqual(response.header("x-gw"), [b"upstream", b"flex"])
        self.assertEqual(response.header("x-status"), [b"202"])
        self.assertEqual(response.body, b"ok\n")

    async def test_crlf_from_request_data_is_a_500(self) -> None:
        """A query parameter decoding to CR/LF never becomes a header: 500, upstream untouched."""
        self.start(BINDINGS)
        response = await self.send(b"/x?v=a%0d%0aX-Injected:%201")
        self.assertEqual(response.status, 500)
        self.assertEqual(response.header("x-flexgw-error"), [b"policy_error"])
        self.assertEqual(self.upstream.received, [])
        self.assertEqual(len(self.flushLoggedErrors(EvaluationError)), 1)
        again = await self.send(b"/x?v=fine")
        self.assertEqual(again.status, 202)
        self.assertEqual(self.upstream.received[0].header("x-q"), [b"fine"])
        self.assertEqual(self.upstream.received[0].header("x-injected"), [])

    async def test_protected_injection_located(self) -> None:
        """Injecting Content-Length fails the binding at load time, naming the item."""
        bad = BINDINGS.replace(
            "{key: x-tenant, value: gateway}", "{key: Content-Length, value: '0'}"
        )
        gateway = self.start(bad)
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.inboundHeaders[1].key" for p in errors),
            [(p.field, p.message) for p in errors],
        )
        self.assertEqual(gateway.service.plan.listeners, ())
