"""circuit-breaker-flex (thresholds; opening, half-open probe, closing) and idle-timeout-flex, on hand-made requests and end to end."""

from __future__ import annotations

from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies.base import BuildContext, LocalResponse, PolicyContext
from flexgw.policies.circuit_breaker import BREAKER_KIND, BREAKER_SCHEMA, IDLE_KIND
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream, fixed, never
from tests.harness import free_port
from tests.outbound import outbound_binding, service_api, start_outbound_gateway


def context() -> PolicyContext:
    """A plain GET."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"api")], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


class BreakerUnitTests(TestCase):
    """The policy with a fake clock; on_done called as the gateway calls it."""

    def setUp(self) -> None:
        """A clock and a runtime whose shared state survives rebuilds."""
        self.clock = Clock()
        self.runtime = PolicyRuntime(reactor=None, clock=self.clock)

    def build(self, **config: Any) -> Any:
        """A breaker binding `default/cb` (schema-checked)."""
        jsonschema.Draft202012Validator(BREAKER_SCHEMA).validate(config)
        return BREAKER_KIND.build(
            config, BuildContext("default/cb", None, clock=self.clock, services=self.runtime)
        )

    def admit(self, policy: Any) -> tuple[PolicyContext, Any]:
        """Run on_request on a new request."""
        ctx = context()
        return ctx, policy.on_request(ctx)

    def test_max_requests_overflow(self) -> None:
        """Over maxRequests in flight: 503 circuit_overflow; a finished request frees its slot."""
        policy = self.build(thresholds={"maxRequests": 2, "maxConnections": 5})
        first, r1 = self.admit(policy)
        _, r2 = self.admit(policy)
        _, r3 = self.admit(policy)
        self.assertEqual((r1, r2), (None, None))
        self.assertIsInstance(r3, LocalResponse)
        self.assertEqual((r3.status, r3.cause), (503, "circuit_overflow"))
        self.assertIn((b"x-flexgw-error", b"circuit_overflow"), r3.headers)
        policy.on_done(first, 200, None)
        self.assertIsNone(self.admit(policy)[1])

    def test_max_connections_bounds_in_flight(self) -> None:
        """maxConnections (one request per HTTP/1.1 connection) bounds requests in flight too."""
        policy = self.build(thresholds={"maxConnections": 1})
        self.assertIsNone(self.admit(policy)[1])
        self.assertEqual(self.admit(policy)[1].status, 503)

    def test_opens_after_consecutive_errors_then_half_open_then_closes(self) -> None:
        """N consecutive failures open it; after openSeconds one probe goes; success closes."""
        policy = self.build(consecutiveErrors=3, openSeconds=10)
        for outcome in ((502, "upstream_reset"), (500, None), (503, "upstream_connect_failure")):
            ctx, result = self.admit(policy)
            self.assertIsNone(result)
            policy.on_done(ctx, *outcome)
        refused = self.admit(policy)[1]
        self.assertEqual((refused.status, refused.cause), (503, "circuit_open"))
        self.clock.advance(9.9)
        self.assertEqual(self.admit(policy)[1].cause, "circuit_open")
        self.clock.advance(0.2)
        probe, result = self.admit(policy)
        self.assertIsNone(result)  # the half-open probe
        self.assertEqual(self.admit(policy)[1].cause, "circuit_open")  # only one probe
        policy.on_done(probe, 200, None)
        for _ in range(3):
            ctx, result = self.admit(policy)
            self.assertIsNone(result)
            policy.on_done(ctx, 200, None)

    def test_failed_probe_reopens(self) -> None:
        """A failed half-open probe opens the circuit for another openSeconds."""
        policy = self.build(consecutiveErrors=1, openSeconds=5)
        ctx, _ = self.admit(policy)
        policy.on_done(ctx, 504, "upstream_timeout")
        self.clock.advance(5)
        probe, result = self.admit(policy)
        self.assertIsNone(result)
        policy.on_done(probe, 500, None)
        self.assertEqual(self.admit(policy)[1].cause, "circuit_open")
        self.clock.advance(5)
        self.assertIsNone(self.admit(policy)[1])

    def test_success_resets_and_neutral_outcomes(self) -> None:
        """Failures must be consecutive; client resets and later policy refusals count for nothing."""
        policy = self.build(consecutiveErrors=2)
        for outcome in ((500, None), (200, None), (500, None), (0, "downstream_reset"),
                        (401, "policy_rejected")):
            ctx, result = self.admit(policy)
            self.assertIsNone(result)
            policy.on_done(ctx, *outcome)
        self.assertIsNone(self.admit(policy)[1])

    def test_without_consecutive_errors_never_opens(self) -> None:
        """Flex's own config (thresholds only) never opens on errors."""
        policy = self.build(thresholds={"maxRequests": 100})
        for _ in range(50):
            ctx, result = self.admit(policy)
            self.assertIsNone(result)
            policy.on_done(ctx, 500, None)

    def test_state_survives_rebuild(self) -> None:
        """A reload builds a new policy on the same state: in-flight counts and an open circuit stay."""
        old = self.build(thresholds={"maxRequests": 1}, consecutiveErrors=1)
        ctx, _ = self.admit(old)
        new = self.build(thresholds={"maxRequests": 1}, consecutiveErrors=1)
        self.assertEqual(self.admit(new)[1].cause, "circuit_overflow")
        old.on_done(ctx, 500, None)
        self.assertEqual(self.admit(new)[1].cause, "circuit_open")

    def test_schema(self) -> None:
        """Flex's threshold keys are accepted; others and negative counts are refused."""
        self.build(thresholds={"maxConnections": 1, "maxPendingRequests": 1, "maxRequests": 1,
                               "maxRetries": 1, "maxConnectionPools": 1})
        for config in ({"thresholds": {"maxConnections": -1}}, {"thresholds": {"other": 1}},
                       {"consecutiveErrors": 0}):
            with self.assertRaises(jsonschema.ValidationError, msg=config):
                self.build(**config)


class BreakerEndToEndTests(TestCase):
    """Through a real gateway in front of a recording upstream."""

    def setUp(self) -> None:
        """A gateway port; upstreams are started per test."""
        self.port = free_port()

    def upstream(self, responder: Any) -> RecordingUpstream:
        """A recording upstream with `responder`."""
        upstream = RecordingUpstream(responder, reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        return upstream

    async def get(self) -> client.Response:
        """One GET through the gateway."""
        return await client.request(
            reactor, "127.0.0.1", self.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )

    async def test_opens_on_upstream_5xx(self) -> None:
        """Two 500s from the upstream open the breaker: the third request never reaches it."""
        upstream = self.upstream(fixed(500, body=b"boom"))
        gateway = start_outbound_gateway(
            self, self.port, upstream.address[1],
            outbound_binding("cb", "circuit-breaker-flex", "consecutiveErrors: 2\nopenSeconds: 60\n"),
        )
        self.assertEqual([(await self.get()).status for _ in range(2)], [500, 500])
        refused = await self.get()
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.header("x-flexgw-error"), [b"circuit_open"])
        self.assertEqual(len(upstream.received), 2)
        self.assertEqual(gateway.records()[-1]["error"], "circuit_open")

    async def test_opens_on_connect_failures(self) -> None:
        """Connect failures count as failures."""
        start_outbound_gateway(
            self, self.port, free_port(),
            outbound_binding("cb", "circuit-breaker-flex", "consecutiveErrors: 1\n"),
        )
        first = await self.get()
        self.assertEqual(first.header("x-flexgw-error"), [b"upstream_connect_failure"])
        second = await self.get()
        self.assertEqual(second.header("x-flexgw-error"), [b"circuit_open"])

    async def test_max_requests_end_to_end(self) -> None:
        """maxRequests 1: while one request waits on the upstream, a second gets 503 overflow."""
        upstream = self.upstream(never())
        start_outbound_gateway(
            self, self.port, upstream.address[1],
            outbound_binding("cb", "circuit-breaker-flex", "thresholds: {maxRequests: 1}\n"),
        )
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await upstream.wait_for_requests(1)
        refused = await self.get()
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.header("x-flexgw-error"), [b"circuit_overflow"])
        await conn.abort()
        # The gateway drops the upstream connection when the client goes away, in the same
        # call that frees the breaker slot: once the upstream sees it close, the slot is free.
        await upstream.wait_for_disconnections(1)
        conn2 = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn2.abort)
        conn2.send(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        requests = await upstream.wait_for_requests(2)
        self.assertEqual(requests[1].target, b"/again")


    async def hold_one(self, upstream: RecordingUpstream) -> None:
        """Send a request the upstream never answers; return once it arrived there."""
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await upstream.wait_for_requests(len(upstream.received) + 1)

    async def test_configuration_defaults_and_binding_override(self) -> None:
        """Configuration.spec.circuitBreaker.thresholds apply to a Service without a binding;
        a circuit-breaker-flex binding on the Service replaces them."""
        upstream = self.upstream(never())
        defaults = (
            "---\napiVersion: gateway.mulesoft.com/v1beta1\nkind: Configuration\n"
            "metadata: {name: cb}\nspec:\n  circuitBreaker:\n    thresholds: {maxRequests: 1}\n"
        )
        gateway = start_outbound_gateway(self, self.port, upstream.address[1], "", extra=defaults)
        self.assertEqual([p for p in gateway.service.state.problems], [])
        await self.hold_one(upstream)
        refused = await self.get()
        self.assertEqual(refused.header("x-flexgw-error"), [b"circuit_overflow"])
        gateway.write({"api.yaml": service_api(self.port, upstream.address[1]) + outbound_binding(
            "cb", "circuit-breaker-flex", "thresholds: {maxRequests: 3}\n") + defaults})
        self.assertTrue(gateway.service.reload())
        await self.hold_one(upstream)
        await self.hold_one(upstream)  # two in flight under the binding's own limit of 3
        self.assertEqual(len(upstream.received), 3)


class IdleTimeoutTests(TestCase):
    """idle-timeout-flex sets the Service pool's idle timeout."""

    def test_build_and_not_in_chain(self) -> None:
        """The policy carries the timeout and is not a chain member."""
        policy = IDLE_KIND.build({"timeout": 3}, BuildContext("default/idle", None))
        self.assertEqual(policy.upstream_idle_timeout, 3.0)
        self.assertFalse(policy.chain_member)
        self.assertEqual(IDLE_KIND.build({}, BuildContext("d/i", None)).upstream_idle_timeout, 60)

    async def test_pool_closes_idle_connection(self) -> None:
        """With timeout 0.2 the pooled connection is closed once idle (gateway default: 60 s)."""
        upstream = RecordingUpstream(fixed(200), reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = start_outbound_gateway(
            self, port, upstream.address[1],
            outbound_binding("idle", "idle-timeout-flex", "timeout: 0.2\n"),
        )
        destination = gateway.service.plan.listeners[0].apis[0].routes[0].destinations[0]
        self.assertEqual(destination.upstream.idle_timeout, 0.2)
        self.assertEqual(destination.chain, ())  # nothing runs per request
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        pool = gateway.service.pools.pool_for(destination.upstream)
        self.assertEqual(pool.idle_timeout, 0.2)
        await upstream.wait_for_disconnections(1)  # the reaper runs every second
        self.assertEqual(pool.idle, [])
