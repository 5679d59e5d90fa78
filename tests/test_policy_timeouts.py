"""response-timeout-flex and stream-idle-timeout-flex: config, per-request overrides, 504s end to end."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyContext
from flexgw.policies.timeouts import (
    ResponseTimeoutKind,
    StreamIdleTimeoutKind,
)
from flexgw.testing import client
from flexgw.testing.upstream import Exchange, RecordingUpstream, delayed, fixed, function, never
from tests.harness import Gateway, free_port, start_api_gateway

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def context() -> PolicyContext:
    """A PolicyContext for a plain GET."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"t")], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def schema_errors(kind: Any, config: dict[str, Any]) -> list[str]:
    """The JSON Schema errors of `config` against the kind's schema (what `flexgw validate` uses)."""
    validator = jsonschema.Draft202012Validator(kind.schema)
    return [error.message for error in validator.iter_errors(config)]


class TimeoutPolicyUnitTests(TestCase):
    """The policy objects set the context's overrides and nothing else."""

    def test_registered_under_flex_names(self) -> None:
        """Both kinds are built-ins under Flex's policyRef names."""
        self.assertIsInstance(registry.lookup("response-timeout-flex"), ResponseTimeoutKind)
        self.assertIsInstance(registry.lookup("stream-idle-timeout-flex"), StreamIdleTimeoutKind)

    def test_response_timeout_sets_override(self) -> None:
        """`timeout: 3` makes this request's response timeout 3 s; the stream timeout is untouched."""
        policy = ResponseTimeoutKind().build({"timeout": 3}, BuildContext("default/rt", None))
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(ctx.response_timeout, 3.0)
        self.assertIsInstance(ctx.response_timeout, float)
        self.assertIsNone(ctx.stream_idle_timeout)
        policy.on_response(ctx)
        self.assertEqual(ctx.response_timeout, 3.0)

    def test_stream_idle_timeout_sets_override(self) -> None:
        """`timeout: 0.5` makes this request's stream idle timeout 0.5 s."""
        policy = StreamIdleTimeoutKind().build({"timeout": 0.5}, BuildContext("default/si", None))
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(ctx.stream_idle_timeout, 0.5)
        self.assertIsNone(ctx.response_timeout)

    def test_defaults_are_flex_defaults(self) -> None:
        """Without `timeout`: 15 s (response) and 300 s (stream idle), Flex's documented values."""
        ctx = context()
        ResponseTimeoutKind().build({}, BuildContext("b", None)).on_request(ctx)
        StreamIdleTimeoutKind().build({}, BuildContext("b", None)).on_request(ctx)
        self.assertEqual((ctx.response_timeout, ctx.stream_idle_timeout), (15.0, 300.0))

    def test_schema(self) -> None:
        """Only `timeout`, a number above 0; booleans, strings, 0 and negatives are refused."""
        for kind in (ResponseTimeoutKind(), StreamIdleTimeoutKind()):
            self.assertEqual(set(kind.schema["properties"]), {"timeout"})
            self.assertFalse(kind.schema["additionalProperties"])
            self.assertEqual(schema_errors(kind, {"timeout": 3}), [])
            self.assertEqual(schema_errors(kind, {"timeout": 0.25}), [])
            self.assertEqual(schema_errors(kind, {}), [])
            for bad in (0, -1, "3", True, None):
                self.assertEqual(len(schema_errors(kind, {"timeout": bad})), 1, bad)
            self.assertEqual(len(schema_errors(kind, {"timeout": 3, "seconds": 3})), 1)


def binding(kind: str, config: str, name: str = "timeout") -> str:
    """A PolicyBinding document."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
        f"  policyRef: {{name: {kind}}}\n"
        f"  config: {config}\n"
    )


def gateway_timeouts(**values: float) -> str:
    """A Configuration document setting gateway-wide `spec.timeouts`."""
    lines = "".join(f"    {key}: {value}\n" for key, value in values.items())
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
        "metadata:\n  name: timeouts\nspec:\n  timeouts:\n" + lines
    )


class TimeoutPolicyEndToEndTests(TestCase):
    """Through a real gateway: the policy's value, not the gateway's, decides when 504 comes."""

    timeout = 20

    def start(self, responder: Any, documents: str) -> tuple[Gateway, RecordingUpstream, int]:
        """A gateway with one API (plus `documents`) in front of an upstream using `responder`."""
        upstream = RecordingUpstream(responder, reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = start_api_gateway(
            self, port, upstream.address[1], documents
        )
        return gateway, upstream, port

    def assert_gateway_504(self, gateway: Gateway, response: client.Response, cause: str) -> None:
        """The gateway's own 504: cause header, JSON body, access-log record."""
        self.assertEqual(response.status, 504)
        self.assertEqual(response.header("x-flexgw-error"), [cause.encode()])
        self.assertIn("error", json.loads(response.body))
        record = gateway.records()[-1]
        self.assertEqual((record["status"], record["error"]), (504, cause))

    async def test_response_timeout_shortens_the_gateway_default(self) -> None:
        """A silent upstream gets a 504 upstream_timeout after the policy's 0.3 s (the gateway's
        own response timeout is 15 s)."""
        gateway, upstream, port = self.start(
            never(), binding("response-timeout-flex", "{timeout: 0.3}")
        )
        started = reactor.seconds()  # type: ignore[attr-defined]
        response = await client.request(reactor, "127.0.0.1", port, GET)
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assert_gateway_504(gateway, response, "upstream_timeout")
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertLess(elapsed, 10)
        self.assertEqual(len(upstream.received), 1)

    async def test_response_timeout_lengthens_the_gateway_default(self) -> None:
        """With the gateway's response timeout at 0.2 s, the policy's 10 s lets a 0.5 s answer through."""
        _gateway, _upstream, port = self.start(
            delayed(fixed(200, body=b"late"), 0.5, reactor),
            gateway_timeouts(upstreamResponseSeconds=0.2)
            + binding("response-timeout-flex", "{timeout: 10}"),
        )
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"late")

    async def test_without_policy_the_gateway_default_applies(self) -> None:
        """Control for the test above: same upstream, no policy, the 0.2 s gateway value gives 504."""
        gateway, _upstream, port = self.start(
            delayed(fixed(200, body=b"late"), 0.5, reactor),
            gateway_timeouts(upstreamResponseSeconds=0.2),
        )
        response = await client.request(reactor, "127.0.0.1", port, GET)
        self.assert_gateway_504(gateway, response, "upstream_timeout")

    async def test_stream_idle_timeout_cuts_a_stalled_body(self) -> None:
        """An upstream that stalls mid-body is cut after the policy's 0.3 s (gateway default 300 s)."""

        def stall(ex: Exchange) -> None:
            ex.send_head(200, [(b"Content-Length", b"100")])
            ex.write(b"x" * 10)

        gateway, upstream, port = self.start(
            function(stall), binding("stream-idle-timeout-flex", "{timeout: 0.3}")
        )
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        failure = await self.assertFailure(conn.read_final_response(), client.IncompleteResponse)
        self.assertEqual(failure.partial.status, 200)
        self.assertEqual(failure.partial.body_length, 10)
        await upstream.wait_for_disconnections(1)
        self.assertEqual(gateway.records()[-1]["error"], "stream_idle_timeout")

    async def test_bad_timeout_is_a_located_error(self) -> None:
        """`timeout: 0` is a schema error on its field; the API is not served (fail closed)."""
        gateway, _upstream, _port = self.start(
            never(), binding("response-timeout-flex", "{timeout: 0}")
        )
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.timeout" for p in errors), [str(p) for p in errors]
        )
