"""The policy chain end to end: order, rules, local answers, async policies, failures, response phase."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from flexgw.policies import registry
from flexgw.policies.base import (
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port, start_api_gateway

SCHEMA = {
    "type": "object",
    "properties": {
        "tag": {"type": "string"},
        "deny": {"type": "boolean"},
        "fail": {"type": "boolean"},
        "delay": {"type": "boolean"},
    },
    "required": ["tag"],
    "additionalProperties": False,
}


@implementer(IPolicy)
@attrs.frozen
class TagPolicy:
    """Appends its tag to `X-Trail` on the way in and to `X-Back` on the way out."""

    tag: str
    deny: bool = False
    fail: bool = False
    delay: bool = False

    def on_request(self, ctx: PolicyContext) -> Any:
        """Tag the request; deny, raise or wait when configured to."""
        if self.fail:
            raise RuntimeError("boom")
        trail = ctx.request_header(b"X-Trail") or b""
        ctx.set_request_header(b"X-Trail", trail + self.tag.encode())
        if self.deny:
            ctx.add_response_header(b"X-Denied-By", self.tag.encode())
            return LocalResponse.json_error(403, f"denied by {self.tag}")
        if self.delay:
            return deferLater(reactor, 0, lambda: None)
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Record the response-phase order."""
        assert ctx.response_headers is not None
        ctx.response_headers.append((b"X-Back", self.tag.encode()))


@implementer(IPolicyKind)
class TagKind:
    """A test policy kind."""

    name = "test-tag-policy"
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: Any) -> TagPolicy:
        """Build from config; the tag 'bad' is a config error a schema cannot catch."""
        if config["tag"] == "bad":
            raise PolicyConfigError("tag 'bad' is not allowed", "tag")
        return TagPolicy(**config)


def binding(name: str, tag: str, order: int | None = None, extra: str = "", rules: str = "") -> str:
    """A PolicyBinding document for the test kind."""
    text = (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
        "  policyRef: {name: test-tag-policy}\n"
        f"  config: {{tag: {tag}{extra}}}\n"
    )
    if order is not None:
        text += f"  order: {order}\n"
    if rules:
        text += "  rules:\n" + rules
    return text


class PolicyChainTests(TestCase):
    """Bindings of a registered kind run in order around the upstream call."""

    def setUp(self) -> None:
        """Register the test kind and start a recording upstream."""
        registry.register(TagKind())
        self.addCleanup(registry.unregister, "test-tag-policy")
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, bindings: str) -> Gateway:
        """A gateway with one API and the given bindings."""
        return start_api_gateway(
            self, self.port, self.upstream.address[1], bindings
        )

    async def get(self, path: bytes = b"/x", method: bytes = b"GET") -> client.Response:
        """One request through the gateway."""
        return await client.request(
            reactor, "127.0.0.1", self.port, method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        )

    async def test_order_and_reverse_response_phase(self) -> None:
        """Policies run by `order` on the request and in reverse on the response."""
        self.start(binding("p-b", "B", 20) + binding("p-a", "A", 10) + binding("p-c", "C"))
        response = await self.get()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].header("x-trail"), [b"ABC"])
        self.assertEqual(response.header("x-back"), [b"C", b"B", b"A"])

    async def test_local_response_stops_the_chain(self) -> None:
        """A policy's local answer goes to the client; later policies and the upstream do not run."""
        gateway = self.start(binding("p-a", "A", 1, ", deny: true") + binding("p-b", "B", 2))
        response = await self.get()
        self.assertEqual(response.status, 403)
        self.assertEqual(response.header("x-denied-by"), [b"A"])
        self.assertIn(b"denied by A", response.body)
        # The response phase runs for local answers too, only for the policies that ran.
        self.assertEqual(response.header("x-back"), [b"A"])
        self.assertEqual(self.upstream.received, [])
        self.assertEqual(gateway.records()[-1]["status"], 403)

    async def test_rules_select_requests(self) -> None:
        """A binding whose rules do not match the request is skipped."""
        rules = "    - methods: POST\n"
        self.start(binding("p-a", "A", 1, ", deny: true", rules) + binding("p-b", "B", 2))
        response = await self.get()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].header("x-trail"), [b"B"])
        denied = await self.get(method=b"POST")
        self.assertEqual(denied.status, 403)

    async def test_async_policy(self) -> None:
        """A policy returning a Deferred pauses the chain, which then goes on."""
        self.start(binding("p-a", "A", 1, ", delay: true") + binding("p-b", "B", 2))
        response = await self.get()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].header("x-trail"), [b"AB"])

    async def test_raising_policy_is_a_500_with_correlation_id(self) -> None:
        """A policy that raises answers 500 with a correlation id; the connection stays usable."""
        self.start(binding("p-a", "A", 1, ", fail: true"))
        response = await self.get()
        self.assertEqual(response.status, 500)
        self.assertEqual(response.header("x-flexgw-error"), [b"policy_error"])
        correlation = response.header("x-correlation-id")[0]
        self.assertIn(correlation, response.body)
        self.assertEqual(self.upstream.received, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_config_error_fails_closed(self) -> None:
        """A binding the kind refuses to build keeps its API from being served, with its location."""
        gateway = self.start(binding("p-a", "bad", 1))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(any("tag 'bad'" in p.message and p.field == "spec.config.tag" for p in errors))
        self.assertEqual(gateway.service.plan.listeners, ())

    async def test_schema_error_located(self) -> None:
        """A config key outside the kind's schema is reported at its line (warning, not strict)."""
        gateway = self.start(binding("p-a", "A", 1, ", colour: red"))
        warnings = [p for p in gateway.service.state.problems if "colour" in p.message]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0].severity, "warning")
        self.assertEqual((warnings[0].line, warnings[0].column), (16, 20))


@implementer(IPolicy)
@attrs.frozen
class BodyPolicy:
    """Sees the buffered body; rejects bodies containing `evil`, and can override timeouts."""

    needs_body = True
    response_timeout: float | None = None

    def on_request(self, ctx: PolicyContext) -> Any:
        """Reject bodies with 'evil'; copy the body length upstream; set a timeout override."""
        assert ctx.body is not None
        if b"evil" in ctx.body:
            return LocalResponse.json_error(400, "evil body")
        ctx.set_request_header(b"X-Body-Length", str(len(ctx.body)).encode())
        if self.response_timeout is not None:
            ctx.response_timeout = self.response_timeout
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing on the way back."""


@implementer(IPolicyKind)
class BodyKind:
    """A test kind whose policy needs the request body."""

    name = "test-body-policy"
    schema: dict[str, Any] = {  # noqa: RUF012 (a constant)
        "type": "object",
        "properties": {"responseTimeout": {"type": "number"}},
        "additionalProperties": False,
    }
    phase = "inbound"

    def build(self, config: dict[str, Any], context: Any) -> BodyPolicy:
        """Build from config."""
        return BodyPolicy(config.get("responseTimeout"))


class BodyBufferingTests(TestCase):
    """Policies with needs_body get the whole body, bounded; the upstream still gets it intact."""

    def setUp(self) -> None:
        """Register the body kind; start a recording upstream."""
        registry.register(BodyKind())
        self.addCleanup(registry.unregister, "test-body-policy")
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, config: str = "{}", settings: str = "") -> Gateway:
        """A gateway whose API binds the body policy."""
        text = api_document(self.port, self.upstream.address[1]) + (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: body}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            f"  policyRef: {{name: test-body-policy}}\n  config: {config}\n"
        )
        if settings:
            text += (
                "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                "metadata: {name: s}\nspec:\n" + settings
            )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        return gateway

    async def post(self, body: bytes, chunked: bool = False) -> client.Response:
        """POST `body` (Content-Length or in two chunks)."""
        if chunked:
            half = len(body) // 2
            framed = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]) if part
            )
            raw = (
                b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + framed
                + b"0\r\n\r\n"
            )
        else:
            raw = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_body_seen_and_forwarded(self) -> None:
        """The policy sees the whole body; the upstream receives it unchanged (both framings)."""
        self.start()
        for chunked in (False, True):
            body = b"hello world " * 1000
            response = await self.post(body, chunked)
            self.assertEqual(response.status, 200)
            seen = self.upstream.received[-1]
            self.assertEqual(seen.body, body)
            self.assertEqual(seen.header("x-body-length"), [str(len(body)).encode()])

    async def test_policy_rejects_on_body(self) -> None:
        """A policy can reject on the body's content; the upstream sees nothing."""
        self.start()
        response = await self.post(b"some evil content")
        self.assertEqual(response.status, 400)
        self.assertEqual(self.upstream.received, [])

    async def test_over_limit_is_413(self) -> None:
        """A body over the buffering limit is refused with 413 before the upstream sees it."""
        self.start(settings="  http: {bodyBufferLimitBytes: 1000}\n")
        response = await self.post(b"x" * 5000)
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("x-flexgw-error"), [b"payload_too_large"])
        self.assertEqual(self.upstream.received, [])

    async def test_response_timeout_override(self) -> None:
        """A policy's response timeout override applies to that request (504)."""
        from flexgw.testing.upstream import never

        self.upstream.responder = never()
        self.start(config="{responseTimeout: 0.2}")
        response = await self.post(b"slow please")
        self.assertEqual(response.status, 504)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_timeout"])


class ResponsePhaseOptOutTests(TestCase):
    """A policy declaring `response_phase = False` is not called in the response phase."""

    def test_opted_out_policy_not_called(self) -> None:
        """Only the policies that have a response phase are remembered by the run."""
        from flexgw.http.request import analyze_head
        from flexgw.plan import BoundPolicy
        from flexgw.policies.chain import ChainRun

        calls: list[str] = []

        class Recorder:
            """Records its response phase calls."""

            def __init__(self, name: str, responds: bool) -> None:
                self.name = name
                self.response_phase = responds

            def on_request(self, ctx: PolicyContext) -> None:
                """Nothing on the way in."""

            def on_response(self, ctx: PolicyContext) -> None:
                """Record the call."""
                calls.append(self.name)

        def bound(name: str, responds: bool) -> BoundPolicy:
            policy = Recorder(name, responds)
            return BoundPolicy(name, "k", 50, (), policy, responds=policy.response_phase)

        head = analyze_head(b"GET", b"/", "1.1", [(b"Host", b"h")], True)
        run = ChainRun([bound("a", True), bound("b", False), bound("c", True)],
                       PolicyContext(head, "127.0.0.1", "http", "default/x"))
        self.assertIsNone(run.run())
        self.assertIsNone(run.respond())
        self.assertEqual(calls, ["c", "a"])


class NoResponsePhaseTests(TestCase):
    """When no policy that ran has a response phase, the exchange does not enter it; the
    headers the policies added on the way in still reach the client."""

    def test_response_phase_skipped_extra_headers_kept(self) -> None:
        """ChainRun.respond is never called; X-Added (from the request phase) and the
        upstream's own headers are sent, and the head the upstream got carries X-In."""
        from flexgw.plan import BoundPolicy
        from flexgw.policies.chain import ChainRun
        from flexgw.testing.memory import (
            connect_client,
            connect_upstream,
            memory_factory,
            one_api_listener,
        )

        class Adder:
            """Adds a request header and a response header; no response phase."""

            response_phase = False

            def on_request(self, ctx: PolicyContext) -> None:
                """Add both headers."""
                ctx.add_request_header(b"X-In", b"1")
                ctx.add_response_header(b"X-Added", b"yes")

            def on_response(self, ctx: PolicyContext) -> None:
                """Never called."""
                raise AssertionError("on_response called")

        def respond(run: ChainRun) -> None:
            raise AssertionError("the response phase ran")

        self.patch(ChainRun, "respond", respond)
        listener = one_api_listener()
        api = listener.apis[0]
        route = api.routes[0]
        destination = attrs.evolve(
            route.destinations[0],
            chain=(BoundPolicy("adder", "k", 50, (), Adder(), responds=False),),
        )
        route = attrs.evolve(route, destinations=(destination,))
        listener = attrs.evolve(listener, apis=(attrs.evolve(api, routes=(route,)),))
        factory = memory_factory(listener)
        front, down = connect_client(factory)
        front.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        conn, up = connect_upstream(factory.reactor)
        self.assertIn(b"\r\nX-In: 1\r\n", up.value())
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: u\r\n\r\nok")
        response = down.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"\r\nX-Up: u\r\n", response)
        self.assertIn(b"\r\nX-Added: yes\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\nok"), response)
