"""spike-control-flex: sliding window, held and retried requests, queue bound, headers, 429."""

from __future__ import annotations

from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, IPolicy, LocalResponse, PolicyContext
from flexgw.policies.spike_control import KIND, NAME, SpikeControlConfig, SpikeControlPolicy
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port

BODY = b'{"error":"Too Many Requests"}'


def context() -> PolicyContext:
    """A policy context for one GET."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"t")], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def extra(ctx: PolicyContext) -> dict[bytes, bytes]:
    """The response headers the policy added, as a dict."""
    return dict(ctx.response_extra or [])


class Outcome:
    """What became of one request: 'accepted', 'held', or a status, as time goes by."""

    def __init__(self, result: Any) -> None:
        self.result: Any = "held"
        if result is None:
            self.result = "accepted"
        elif isinstance(result, LocalResponse):
            self.result = result.status
        else:
            self.deferred = result
            result.addCallback(self._fired)

    def _fired(self, value: Any) -> None:
        self.result = "accepted" if value is None else value.status
        self.response = value


class SpikeControlUnitTests(TestCase):
    """The policy on a fake clock, without a gateway."""

    def setUp(self) -> None:
        """A fake clock not at zero."""
        self.clock = Clock()
        self.clock.advance(100.0)

    def build(self, **config: Any) -> SpikeControlPolicy:
        """A policy from schema-valid config."""
        jsonschema.Draft202012Validator(KIND.schema).validate(config)
        return KIND.build(config, BuildContext(binding="b", api="a", clock=self.clock))

    def at(self, policy: SpikeControlPolicy, seconds: float) -> Outcome:
        """Move the clock to `seconds` after the start and send one request."""
        self.clock.advance(100.0 + seconds - self.clock.seconds())
        return Outcome(policy.on_request(context()))

    def until(self, seconds: float) -> None:
        """Move the clock to `seconds` after the start."""
        self.clock.advance(100.0 + seconds - self.clock.seconds())

    def test_registered(self) -> None:
        """The kind is registered under Flex's name and builds an IPolicy."""
        self.assertIs(registry.lookup(NAME), KIND)
        self.assertTrue(verifyObject(IPolicy, self.build()))

    def test_defaults(self) -> None:
        """Flex's defaults: 1 per 1000 ms, 1000 ms delay, 1 attempt, no queue, no headers."""
        self.assertEqual(self.build().config, SpikeControlConfig(1, 1000, 1000, 1, 0, False))

    def test_default_config_refuses_at_once(self) -> None:
        """With queuingLimit 0 (the default) a request over the window is refused at once."""
        policy = self.build()
        first, second = self.at(policy, 0), self.at(policy, 0.5)
        self.assertEqual((first.result, second.result), ("accepted", 429))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusal(self) -> None:
        """The 429 has Flex's JSON body and no Retry-After."""
        policy = self.build()
        policy.on_request(context())
        refused = policy.on_request(context())
        self.assertEqual(refused.status, 429)
        self.assertEqual(refused.body, BODY)
        self.assertEqual(refused.headers, ((b"content-type", b"application/json"),))

    def test_sliding_window(self) -> None:
        """An accepted request uses quota for exactly timePeriodInMilliseconds."""
        policy = self.build(maximumRequests=2, timePeriodInMilliseconds=1000)
        results = [self.at(policy, t).result for t in (0, 0.4, 0.5, 0.999, 1.0, 1.2, 1.4)]
        self.assertEqual(results, ["accepted", "accepted", 429, 429, "accepted", 429, "accepted"])

    def test_docs_timeline(self) -> None:
        """The docs' example: 2 per second, 499 ms delay, 1 attempt, queue of 5."""
        policy = self.build(maximumRequests=2, timePeriodInMilliseconds=1000,
                            delayTimeInMillis=499, delayAttempts=1, queuingLimit=5)
        r1, r2, r3, r4 = (self.at(policy, t) for t in (0, 0.3, 0.6, 0.7))
        self.assertEqual([r.result for r in (r1, r2, r3, r4)],
                         ["accepted", "accepted", "held", "held"])
        self.until(1.098)
        self.assertEqual((r3.result, r4.result), ("held", "held"))
        self.until(1.099)  # r3 retried: r1 left the window at 1.0
        self.assertEqual((r3.result, r4.result), ("accepted", "held"))
        self.until(1.199)  # r4 retried: r2 (until 1.3) and r3 fill the window; no attempts left
        self.assertEqual(r4.result, 429)
        self.assertEqual(r4.response.body, BODY)
        self.assertEqual(self.at(policy, 1.35).result, "accepted")  # r2 has aged out
        self.assertEqual(policy.held, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_several_attempts(self) -> None:
        """A held request is retried every delayTimeInMillis, up to delayAttempts times."""
        policy = self.build(maximumRequests=1, timePeriodInMilliseconds=10000,
                            delayTimeInMillis=100, delayAttempts=3, queuingLimit=1)
        self.at(policy, 0)
        held = self.at(policy, 0)
        for t in (0.1, 0.2):
            self.until(t)
            self.assertEqual(held.result, "held")
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.until(0.3)
        self.assertEqual(held.result, 429)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_request_accepted_when_quota_frees(self) -> None:
        """A held request passes at the first retry that finds quota, with its headers."""
        policy = self.build(maximumRequests=1, timePeriodInMilliseconds=250,
                            delayTimeInMillis=100, delayAttempts=5, queuingLimit=1,
                            exposeHeaders=True)
        self.at(policy, 0)
        ctx = context()
        held = Outcome(policy.on_request(ctx))
        self.until(0.2)
        self.assertEqual(held.result, "held")
        self.until(0.3)
        self.assertEqual(held.result, "accepted")
        self.assertEqual(extra(ctx), {b"x-ratelimit-limit": b"1", b"x-ratelimit-remaining": b"0",
                                      b"x-ratelimit-reset": b"250"})

    def test_queuing_limit(self) -> None:
        """At most queuingLimit requests are held at once; the others are refused at once."""
        policy = self.build(maximumRequests=1, timePeriodInMilliseconds=10000,
                            delayTimeInMillis=100, delayAttempts=1, queuingLimit=2)
        self.at(policy, 0)
        outcomes = [self.at(policy, 0.01).result for _ in range(4)]
        self.assertEqual(outcomes, ["held", "held", 429, 429])
        self.assertEqual(len(policy.held), 2)
        self.until(0.11)  # both retried and refused: the queue is free again
        self.assertEqual(len(policy.held), 0)
        self.assertEqual(self.at(policy, 0.2).result, "held")

    def test_no_attempts_no_wait(self) -> None:
        """delayAttempts 0 refuses at once even with room in the queue."""
        policy = self.build(delayAttempts=0, queuingLimit=5)
        self.at(policy, 0)
        self.assertEqual(self.at(policy, 0).result, 429)

    def test_cancel_frees_slot_and_timer(self) -> None:
        """A held request cancelled (client gone) leaves the queue and the clock at once."""
        policy = self.build(maximumRequests=1, timePeriodInMilliseconds=10000,
                            delayTimeInMillis=100, delayAttempts=1, queuingLimit=1)
        self.at(policy, 0)
        held = self.at(policy, 0)
        self.assertEqual(self.at(policy, 0).result, 429)  # queue full
        held.deferred.addErrback(lambda f: f.trap(CancelledError))
        held.deferred.cancel()
        self.assertEqual(policy.held, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.at(policy, 0).result, "held")  # the slot is free

    def test_expose_headers(self) -> None:
        """Remaining counts down; Reset is 0 while quota remains, then the oldest's time left."""
        policy = self.build(maximumRequests=2, timePeriodInMilliseconds=1000, exposeHeaders=True)
        seen = []
        for t in (0, 0.25):
            self.until(t)
            ctx = context()
            self.assertIsNone(policy.on_request(ctx))
            seen.append(extra(ctx))
        self.assertEqual(seen, [
            {b"x-ratelimit-limit": b"2", b"x-ratelimit-remaining": b"1", b"x-ratelimit-reset": b"0"},
            {b"x-ratelimit-limit": b"2", b"x-ratelimit-remaining": b"0",
             b"x-ratelimit-reset": b"750"},
        ])
        self.until(0.5)
        refused = policy.on_request(context())
        self.assertEqual(refused.headers, (
            (b"content-type", b"application/json"),
            (b"x-ratelimit-limit", b"2"),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", b"500"),
        ))

    def test_no_clock_uses_the_reactor_at_first_request(self) -> None:
        """Built without a clock (validate), the policy takes the reactor only when used."""
        policy = KIND.build({}, BuildContext(binding="b", api="a"))
        self.assertIsNone(policy.clock)
        self.assertIsNone(policy.on_request(context()))
        self.assertIs(policy.clock, reactor)

    def test_schema(self) -> None:
        """Non-negative integers, a positive window and quota, no unknown keys."""
        validator = jsonschema.Draft202012Validator(KIND.schema)
        for bad in ({"maximumRequests": 0}, {"timePeriodInMilliseconds": 0},
                    {"delayTimeInMillis": -1}, {"delayAttempts": -1}, {"queuingLimit": -1},
                    {"queuingLimit": "5"}, {"exposeHeaders": "true"}, {"rateLimits": []}):
            self.assertFalse(validator.is_valid(bad), bad)
        self.assertTrue(validator.is_valid({
            "maximumRequests": 100000, "timePeriodInMilliseconds": 1000, "delayTimeInMillis": 0,
            "delayAttempts": 0, "queuingLimit": 0, "exposeHeaders": True}))


class WatchedClock(Clock):
    """A fake clock that tells the test when a timer is scheduled or cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[tuple[str, Deferred[None]]] = []

    def event(self, kind: str) -> Deferred[None]:
        """Fires (on the real reactor's next turn) when a timer is next scheduled/cancelled."""
        d: Deferred[None] = Deferred()
        self.waiters.append((kind, d))
        return d

    def _notify(self, kind: str) -> None:
        for waiter in [w for w in self.waiters if w[0] == kind]:
            self.waiters.remove(waiter)
            reactor.callLater(0, waiter[1].callback, None)

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> DelayedCall:
        """Schedule as Clock does, then notify."""
        call = DelayedCall(self.seconds() + delay, f, args, kw, self._cancelled,
                           lambda c: None, self.seconds)
        self.calls.append(call)
        self._sortCalls()
        self._notify("scheduled")
        return call

    def _cancelled(self, call: DelayedCall) -> None:
        self.calls.remove(call)
        self._notify("cancelled")


class SpikeControlGatewayTests(TestCase):
    """spike-control-flex through a real gateway, its timers on a fake clock."""

    async def test_end_to_end(self) -> None:
        """Accepted, held then refused, held then accepted; a held client that disconnects
        frees its queue slot and timer."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        files = {"api.yaml": (
            "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
            "metadata: {name: sc-api}\n"
            f"spec:\n  address: http://127.0.0.1:{port}\n"
            f"  services:\n    b:\n      address: http://127.0.0.1:{upstream.address[1]}\n"
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: sc}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: sc-api}\n"
            "  policyRef: {name: spike-control-flex}\n"
            "  config:\n    maximumRequests: 1\n    timePeriodInMilliseconds: 1000\n"
            "    delayTimeInMillis: 300\n    delayAttempts: 1\n    queuingLimit: 1\n"
            "    exposeHeaders: true\n"
        )}
        clock = WatchedClock()
        gateway = Gateway(self, files)
        gateway.service.runtime = PolicyRuntime(reactor=reactor, clock=clock)
        gateway.start()
        policy = gateway.service.plan.listeners[0].apis[0].policies[0].policy
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"

        def send() -> Deferred[client.Response]:
            return client.request(reactor, "127.0.0.1", port, raw)

        first = await send()
        self.assertEqual(first.status, 200)
        self.assertEqual(first.header("x-ratelimit-remaining"), [b"0"])
        self.assertEqual(first.header("x-ratelimit-reset"), [b"1000"])

        # held, retried after 300 ms (the window still full), refused
        scheduled = clock.event("scheduled")
        pending = send()
        await scheduled
        self.assertEqual(len(policy.held), 1)
        clock.advance(0.3)
        refused = await pending
        self.assertEqual(refused.status, 429)
        self.assertEqual(refused.body, BODY)
        self.assertEqual(refused.header("x-ratelimit-reset"), [b"700"])

        # held, the client goes away: slot and timer freed at once
        scheduled = clock.event("scheduled")
        conn = await client.connect(reactor, "127.0.0.1", port)
        conn.send(raw)
        await scheduled
        self.assertEqual(len(policy.held), 1)
        cancelled = clock.event("cancelled")
        await conn.abort()
        await cancelled
        self.assertEqual(policy.held, set())
        self.assertEqual(clock.getDelayedCalls(), [])

        # held again (the slot is free), accepted when the first request leaves the window
        clock.advance(0.6)  # t = 0.9
        scheduled = clock.event("scheduled")
        pending = send()
        await scheduled
        clock.advance(0.3)  # t = 1.2: retried, the window is empty
        accepted = await pending
        self.assertEqual(accepted.status, 200)
        self.assertEqual(len(upstream.received), 2)
        self.assertEqual([r["status"] for r in gateway.records()][:2], [200, 429])
