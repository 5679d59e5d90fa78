"""javascript-scripting-flex: exports, filters, immediate responses, limits (CPU, memory), end to end."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.javascript_scripting import KIND, JavaScriptKind, exports_of
from flexgw.testing import client
from flexgw.testing.upstream import fixed
from tests.harness import PolicyGatewayCase, assert_loads_cleanly

SCRIPT = """\
let count = 0;
export function requestFilter(request) {
  count += 1;
  console.log(`request ${count}`);
  if (request.headers["x-block"]) {
    return {statusCode: 403, headers: {"content-type": "text/plain"}, body: "blocked " + count};
  }
  if (request.headers["x-loop"]) { while (true) {} }
  if (request.headers["x-hog"]) { const a = []; while (true) a.push(new Array(100000).fill(count)); }
  if (request.headers["x-throw"]) throw new Error("boom");
  request.headers["x-count"] = String(count);
  if (request.body) request.body = request.body.toUpperCase();
}
function seen(response, requestData) {
  response.headers["x-seen"] = requestData.headers["x-count"] || "none";
  response.headers["x-utf8-bytes"] = String(new TextEncoder().encode("\u00e9").length);
  if (response.statusCode === 404) response.statusCode = 410;
  if (response.body.startsWith("wrap")) response.body = "[" + response.body + "]";
}
export { seen as responseFilter };
"""


def build(script: str = SCRIPT) -> Any:
    """The policy for `script`."""
    return KIND.build({"script": script}, BuildContext("default/js", "default/api"))


def context(headers: list[tuple[bytes, bytes]] = (), body: bytes | None = None) -> PolicyContext:
    """A GET (or a POST with `body`) context."""
    extra = [(b"Content-Length", b"%d" % len(body))] if body is not None else []
    method = b"POST" if body is not None else b"GET"
    head = analyze_head(method, b"/x?a=1", "1.1", [(b"Host", b"t"), *headers, *extra], True)
    ctx = PolicyContext(head, "127.0.0.1", "http", "default/api")
    ctx.body = body
    return ctx


def binding(script: str = SCRIPT) -> str:
    """A PolicyBinding document with `script` inline."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: js}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: javascript-scripting-flex}\n"
        "  config:\n    script: |\n" + textwrap.indent(script, "      ")
    )


class PolicyTests(TestCase):
    """The policy on hand-made requests."""

    def test_exports(self) -> None:
        """Declarations and export lists (with `as`) are found; none is a config error."""
        self.assertEqual(exports_of(SCRIPT), {"requestFilter": "requestFilter", "responseFilter": "seen"})
        with self.assertRaises(PolicyConfigError):
            build("function requestFilter(r) {}\n")
        for broken in ("export function requestFilter(r) {\n", "import x from 'y';\nexport function requestFilter(r) {}\n"):
            with self.assertRaises(PolicyConfigError) as caught:
                build(broken)
            self.assertEqual(caught.exception.field, "script")

    def test_request_and_response_filters(self) -> None:
        """Headers and the body are changed, module state persists, the response filter sees the
        request as the script left it; an object with statusCode answers at once."""
        policy = build()
        ctx = context(body=b"hello")
        self.assertIsNone(policy.on_request(ctx))
        self.assertIn((b"x-count", b"1"), ctx.request_headers)
        self.assertEqual((ctx.body, ctx.body_replaced), (b"HELLO", True))
        ctx.begin_response(404, [(b"Content-Type", b"text/plain")])
        policy.on_response(ctx)
        for hook in ctx.response_body_hooks:
            hook([b"wrap", b" me"], None)
        self.assertEqual(ctx.response_status, 410)
        self.assertEqual((ctx.response_body, ctx.response_body_replaced), (b"[wrap me]", True))
        self.assertIn((b"x-seen", b"1"), ctx.response_headers)
        self.assertIn((b"x-utf8-bytes", b"2"), ctx.response_headers)
        answer = policy.on_request(context([(b"x-block", b"1")]))
        self.assertEqual((answer.status, answer.body), (403, b"blocked 2"))

    def test_errors_limits_are_500s(self) -> None:
        """A thrown error, an endless loop (stopped by the CPU limit) and a heap hog (stopped by
        the memory limit) are 500s; the policy keeps working after each."""
        policy = build()
        for header, cause in ((b"x-throw", b"script_error"), (b"x-loop", b"script_timeout"),
                              (b"x-hog", b"script_memory")):
            response = policy.on_request(context([(header, b"1")]))
            self.assertIsInstance(response, LocalResponse)
            self.assertEqual(response.status, 500)
            self.assertEqual(dict(response.headers)[b"x-flexgw-error"], cause)
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertTrue(any(name == b"x-count" for name, _ in ctx.request_headers))

    def test_registered_and_validates_with_template_literals(self) -> None:
        """Registered under Flex's name; `${...}` in the script is not taken for an environment
        variable by the config pipeline."""
        self.assertIsInstance(registry.lookup("javascript-scripting-flex"), JavaScriptKind)
        assert_loads_cleanly(self, binding())


class EndToEndTests(PolicyGatewayCase):
    """Through a real gateway and a recording upstream."""

    async def test_filters_through_the_gateway(self) -> None:
        """The upstream gets the changed header and the re-framed body; the client gets the
        response filter's header; a blocked request and a runaway script answer 403 and 500."""
        upstream, port = self.upstream, self.port
        self.start(binding())
        body = b"hello world"
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-seen"), [b"1"])
        self.assertEqual(response.body, b"ok\n")  # not replaced: the script leaves it
        upstream.responder = fixed(body=b"wrapped body")
        wrapped = await client.request(reactor, "127.0.0.1", port,
                                       b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual((wrapped.body, wrapped.header("content-length")),
                         (b"[wrapped body]", [b"14"]))
        upstream.responder = fixed()
        received = upstream.received[0]
        self.assertEqual(received.body, b"HELLO WORLD")
        self.assertEqual(received.header("x-count"), [b"1"])
        self.assertEqual(received.header("content-length"), [b"11"])
        blocked = await client.request(reactor, "127.0.0.1", port,
                                       b"GET /x HTTP/1.1\r\nHost: t\r\nX-Block: 1\r\n\r\n")
        self.assertEqual((blocked.status, blocked.body), (403, b"blocked 3"))
        stuck = await client.request(reactor, "127.0.0.1", port,
                                     b"GET /x HTTP/1.1\r\nHost: t\r\nX-Loop: 1\r\n\r\n")
        self.assertEqual(stuck.status, 500)
        self.assertEqual(json.loads(stuck.body), {"error": "JavaScript policy error"})
        self.assertEqual(len(upstream.received), 2)
