"""rate-limiting-flex: fixed windows per key, several limits, headers, 429 body, config, reloads."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.rate_limiting import KIND, NAME, RateLimitPolicy
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.storage.interfaces import IRateLimitStore, RateLimit, StoreUnavailable
from flexgw.storage.memory import MemoryRateLimitStore
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port

BODY = b'{"error":"Too Many Requests"}'


def context(method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None) -> PolicyContext:
    """A policy context for one request."""
    head = analyze_head(method, b"/x", "1.1", [(b"Host", b"t"), *(headers or [])], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def limits(*pairs: tuple[int, int]) -> list[dict[str, int]]:
    """rateLimits items from (maximumRequests, timePeriodInMilliseconds) pairs."""
    return [{"maximumRequests": m, "timePeriodInMilliseconds": p} for m, p in pairs]


def extra(ctx: PolicyContext) -> dict[bytes, bytes]:
    """The response headers the policy added, as a dict."""
    return dict(ctx.response_extra or [])


class RateLimitUnitTests(TestCase):
    """The policy on a fake clock, without a gateway."""

    def setUp(self) -> None:
        """A fake clock that does not start at zero."""
        self.clock = Clock()
        self.clock.advance(500.0)

    def build(self, clock: Any = "default", services: Any = None, api: str = "default/api",
              binding: str = "default/rl", **config: Any) -> RateLimitPolicy:
        """Build a policy with `config` (rateLimits defaults to 3 per 6 s)."""
        config.setdefault("rateLimits", limits((3, 6000)))
        jsonschema.Draft202012Validator(KIND.schema).validate(config)
        return KIND.build(config, BuildContext(
            binding=binding, api=api, clock=self.clock if clock == "default" else clock,
            services=services))

    def statuses(self, policy: RateLimitPolicy, n: int, **request: Any) -> list[int]:
        """Statuses of n requests in a row (200 for a request let through)."""
        out = []
        for _ in range(n):
            result = policy.on_request(context(**request))
            out.append(200 if result is None else result.status)
        return out

    def test_registered(self) -> None:
        """The kind is registered under Flex's name and builds an IPolicy."""
        self.assertIs(registry.lookup(NAME), KIND)
        self.assertTrue(verifyObject(IPolicy, self.build()))

    def test_quota_then_429(self) -> None:
        """maximumRequests pass; the next one is a 429 with Flex's body and a Retry-After."""
        policy = self.build()
        self.assertEqual(self.statuses(policy, 3), [200, 200, 200])
        self.clock.advance(1.2)
        refused = policy.on_request(context())
        self.assertIsInstance(refused, LocalResponse)
        self.assertEqual(refused.status, 429)
        self.assertEqual(refused.body, BODY)
        self.assertEqual(json.loads(refused.body), {"error": "Too Many Requests"})
        self.assertEqual(
            refused.headers, ((b"content-type", b"application/json"), (b"retry-after", b"5"))
        )

    def test_fixed_window_from_first_request(self) -> None:
        """The window starts at the first request and the quota resets exactly when it ends."""
        policy = self.build()
        self.assertEqual(self.statuses(policy, 1), [200])
        self.clock.advance(5.0)
        self.assertEqual(self.statuses(policy, 3), [200, 200, 429])
        self.clock.advance(0.999)
        self.assertEqual(self.statuses(policy, 1), [429])
        self.clock.advance(0.001)
        self.assertEqual(self.statuses(policy, 4), [200, 200, 200, 429])

    def test_retry_after_rounds_up(self) -> None:
        """Retry-After is the wait in whole seconds, rounded up (never 0)."""
        policy = self.build(rateLimits=limits((1, 2500)))
        policy.on_request(context())
        seen = []
        for step in (0.0, 0.6, 0.899, 0.9999):
            self.clock.advance(step)
            seen.append(dict(policy.on_request(context()).headers)[b"retry-after"])
        # waits of 2500, 1900, 1001 and 1 ms
        self.assertEqual(seen, [b"3", b"2", b"2", b"1"])

    def test_expose_headers_on_allowed_and_refused(self) -> None:
        """With exposeHeaders, limit/remaining/reset (ms) are on every response, 429 included."""
        policy = self.build(exposeHeaders=True)
        seen = []
        for _ in range(3):
            ctx = context()
            self.assertIsNone(policy.on_request(ctx))
            seen.append(extra(ctx))
            self.clock.advance(1.0)
        self.assertEqual(
            [(h[b"x-ratelimit-limit"], h[b"x-ratelimit-remaining"], h[b"x-ratelimit-reset"])
             for h in seen],
            [(b"3", b"2", b"6000"), (b"3", b"1", b"5000"), (b"3", b"0", b"4000")],
        )
        refused = policy.on_request(context())
        self.assertEqual(refused.status, 429)
        self.assertEqual(
            refused.headers,
            (
                (b"content-type", b"application/json"),
                (b"x-ratelimit-limit", b"3"),
                (b"x-ratelimit-remaining", b"0"),
                (b"x-ratelimit-reset", b"3000"),
                (b"retry-after", b"3"),
            ),
        )

    def test_no_headers_by_default(self) -> None:
        """exposeHeaders defaults to false: no x-ratelimit headers, even on the 429."""
        policy = self.build(rateLimits=limits((1, 1000)))
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertIsNone(ctx.response_extra)
        refused = policy.on_request(context())
        self.assertFalse(any(name.startswith(b"x-ratelimit") for name, _ in refused.headers))

    def test_allowed_requests_take_the_fast_path(self) -> None:
        """Without exposeHeaders an allowed request is counted by the memory store's `counted`
        (no HitResult made): `hit` runs only to open the window and to refuse. A store set
        later is the one counted."""
        policy = self.build()
        store = policy.store
        hits: list[str] = []
        real_hit = store.hit

        def hit(key: str, limits: Any) -> Any:
            hits.append(key)
            return real_hit(key, limits)

        store.hit = hit
        self.assertEqual(self.statuses(policy, 4), [200, 200, 200, 429])
        self.assertEqual(len(hits), 2)
        replacement = MemoryRateLimitStore(self.clock)
        policy.store = replacement
        self.assertEqual(self.statuses(policy, 4), [200, 200, 200, 429])
        self.assertIn("", replacement)
        self.assertEqual(len(hits), 2)

    def test_key_selector_separate_counters(self) -> None:
        """keySelector gives each value its own counters and its own window."""
        policy = self.build(rateLimits=limits((2, 6000)), keySelector="#[attributes.method]",
                            exposeHeaders=True)
        self.assertEqual(self.statuses(policy, 3, method=b"GET"), [200, 200, 429])
        self.clock.advance(2.0)
        ctx = context(method=b"POST")
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(extra(ctx)[b"x-ratelimit-reset"], b"6000")  # POST's own window
        self.assertEqual(self.statuses(policy, 2, method=b"POST"), [200, 429])
        self.clock.advance(4.0)  # GET's window ended, POST's has 2 s left
        self.assertEqual(self.statuses(policy, 1, method=b"GET"), [200])
        self.assertEqual(self.statuses(policy, 1, method=b"POST"), [429])

    def test_missing_key_value_is_the_empty_bucket(self) -> None:
        """Requests whose key is null share one bucket (the empty string), apart from others."""
        policy = self.build(rateLimits=limits((1, 6000)),
                            keySelector="#[attributes.headers['x-client']]")
        self.assertEqual(self.statuses(policy, 2), [200, 429])
        self.assertEqual(self.statuses(policy, 2, headers=[(b"X-Client", b"a")]), [200, 429])
        self.assertEqual(self.statuses(policy, 1, headers=[(b"X-Client", b"")]), [429])

    def test_constant_key_selector(self) -> None:
        """A plain-string keySelector is one constant bucket."""
        policy = self.build(rateLimits=limits((1, 6000)), keySelector="everyone")
        self.assertEqual(self.statuses(policy, 1, method=b"GET"), [200])
        self.assertEqual(self.statuses(policy, 1, method=b"POST"), [429])

    def test_several_limits(self) -> None:
        """Every limit must have quota; headers show the limit with the fewest requests left."""
        policy = self.build(rateLimits=limits((5, 1000), (3, 10000)), exposeHeaders=True)
        shown = []
        for _ in range(3):
            ctx = context()
            self.assertIsNone(policy.on_request(ctx))
            h = extra(ctx)
            shown.append((h[b"x-ratelimit-limit"], h[b"x-ratelimit-remaining"]))
        # 5/s has 4, 3, 2 left; 3/10s has 2, 1, 0 left: the latter is shown
        self.assertEqual(shown, [(b"3", b"2"), (b"3", b"1"), (b"3", b"0")])
        other = self.build(rateLimits=limits((2, 1000), (5, 10000)), exposeHeaders=True)
        ctx = context()
        other.on_request(ctx)
        self.assertEqual((extra(ctx)[b"x-ratelimit-limit"], extra(ctx)[b"x-ratelimit-remaining"]),
                         (b"2", b"1"))
        self.clock.advance(1.0)  # the 5/s window ended; 3/10s is spent for 9 s more
        refused = policy.on_request(context())
        headers = dict(refused.headers)
        self.assertEqual(refused.status, 429)
        self.assertEqual(
            (headers[b"x-ratelimit-limit"], headers[b"x-ratelimit-reset"], headers[b"retry-after"]),
            (b"3", b"9000", b"9"),
        )

    def test_several_limits_ties_show_the_later_reset(self) -> None:
        """With equal remaining quota the headers show the limit whose window ends last."""
        policy = self.build(rateLimits=limits((2, 1000), (2, 4000)), exposeHeaders=True)
        ctx = context()
        policy.on_request(ctx)
        self.assertEqual(extra(ctx)[b"x-ratelimit-reset"], b"4000")

    def test_refused_when_short_limit_spent(self) -> None:
        """A spent short limit refuses even when the long one has quota; that uses none of it."""
        policy = self.build(rateLimits=limits((1, 1000), (3, 10000)), exposeHeaders=True)
        self.assertEqual(self.statuses(policy, 3), [200, 429, 429])
        self.clock.advance(1.0)
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(extra(ctx)[b"x-ratelimit-remaining"], b"0")  # 1/s spent again
        self.clock.advance(1.0)
        self.assertEqual(self.statuses(policy, 2), [200, 429])  # third of the 3/10s quota

    def test_nested_keys_accepted(self) -> None:
        """keySelector and exposeHeaders inside a rateLimits item work as at the top level."""
        items = limits((1, 6000))
        items[0].update(keySelector="#[attributes.method]", exposeHeaders=True, clusterizable=False)
        policy = self.build(rateLimits=items)
        self.assertEqual(policy.config.clusterizable, False)
        ctx = context()
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(extra(ctx)[b"x-ratelimit-limit"], b"1")
        self.assertEqual(self.statuses(policy, 1, method=b"POST"), [200])
        self.assertEqual(self.statuses(policy, 1, method=b"GET"), [429])

    def test_defaults(self) -> None:
        """Defaults as Flex: no key selector, headers off, clusterizable and blockOnUnknownQuota on."""
        config = self.build().config
        self.assertEqual(
            (config.key_selector, config.expose_headers, config.clusterizable,
             config.block_on_unknown_quota),
            (None, False, True, True),
        )

    def test_conflicting_nested_values_are_a_config_error(self) -> None:
        """A key given different values at the top level and in an item names the item's field."""
        items = limits((1, 1000), (5, 6000))
        items[1]["exposeHeaders"] = False
        error = self.assertRaises(PolicyConfigError, self.build, rateLimits=items, exposeHeaders=True)
        self.assertEqual(error.field, "rateLimits.1.exposeHeaders")

    def test_bad_key_selector_is_a_config_error(self) -> None:
        """A keySelector that does not parse is a config error on that field, with the offset."""
        error = self.assertRaises(PolicyConfigError, self.build, keySelector="#[attributes.method ==]")
        self.assertEqual(error.field, "keySelector")
        self.assertIn("offset", error.message)
        items = limits((1, 1000))
        items[0]["keySelector"] = "#[attributes.nope]"
        error = self.assertRaises(PolicyConfigError, self.build, rateLimits=items)
        self.assertEqual(error.field, "rateLimits.0.keySelector")

    def test_schema(self) -> None:
        """The schema requires rateLimits with positive integers and refuses unknown keys."""
        validator = jsonschema.Draft202012Validator(KIND.schema)
        bad = [
            {},
            {"rateLimits": []},
            {"rateLimits": [{"maximumRequests": 1}]},
            {"rateLimits": limits((0, 1000))},
            {"rateLimits": limits((1, 0))},
            {"rateLimits": [{"maximumRequests": "3", "timePeriodInMilliseconds": 1000}]},
            {"rateLimits": limits((1, 1000)), "exposeHeaders": "yes"},
            {"rateLimits": limits((1, 1000)), "colour": "red"},
            {"rateLimits": [{"maximumRequests": 1, "timePeriodInMilliseconds": 1, "x": 1}]},
        ]
        for config in bad:
            self.assertFalse(validator.is_valid(config), config)
        good = {"rateLimits": limits((1, 1000)), "keySelector": "#[attributes.method]",
                "exposeHeaders": True, "clusterizable": False, "blockOnUnknownQuota": False}
        self.assertTrue(validator.is_valid(good))

    def test_counters_survive_rebuild_with_same_config(self) -> None:
        """A binding rebuilt (reload) with the same limits and key keeps its counters."""
        runtime = PolicyRuntime(reactor=None, clock=self.clock)
        first = self.build(clock=None, services=runtime, exposeHeaders=False)
        self.assertEqual(self.statuses(first, 3), [200, 200, 200])
        again = self.build(clock=None, services=runtime, exposeHeaders=True)  # headers don't matter
        self.assertIs(again.store, first.store)
        self.assertEqual(self.statuses(again, 1), [429])

    def test_changed_limits_or_other_binding_start_afresh(self) -> None:
        """Changed limits or key selector, another binding or another API: fresh counters."""
        runtime = PolicyRuntime(reactor=None, clock=self.clock)
        first = self.build(services=runtime)
        self.statuses(first, 3)
        for other in (
            self.build(services=runtime, rateLimits=limits((3, 7000))),
            self.build(services=runtime, keySelector="#[attributes.method]"),
            self.build(services=runtime, binding="default/other"),
            self.build(services=runtime, api="default/other-api"),
        ):
            self.assertIsNot(other.store, first.store)
            self.assertEqual(self.statuses(other, 1), [200])
        # the changed binding replaced the old store: one store per binding and API is kept
        self.assertEqual(len(runtime.shared), 3)

    def test_no_clock_uses_the_reactor_at_first_request(self) -> None:
        """Built without a clock (validate), the policy takes the reactor only when used."""
        policy = self.build(clock=None)
        self.assertIsNone(policy.store)
        self.assertIsNone(policy.on_request(context()))
        self.assertIs(policy.clock, reactor)
        self.assertIsInstance(policy.store, MemoryRateLimitStore)

    def test_expired_windows_evicted_with_many_keys(self) -> None:
        """Many distinct keys do not accumulate: ended windows are dropped as new keys arrive."""
        policy = self.build(rateLimits=limits((1, 1000)),
                            keySelector="#[attributes.headers['x-client']]")
        for n in range(500):
            policy.on_request(context(headers=[(b"X-Client", b"a%d" % n)]))
        self.assertEqual(len(policy.store), 500)
        self.clock.advance(1.0)
        for n in range(500):
            policy.on_request(context(headers=[(b"X-Client", b"b%d" % n)]))
        self.assertEqual(len(policy.store), 500)

    def test_store_bound_applies(self) -> None:
        """The policy's store is bounded (max_keys) even when no window has ended."""
        policy = self.build(keySelector="#[attributes.headers['x-client']]")
        policy.store = MemoryRateLimitStore(self.clock, max_keys=50)
        for n in range(200):
            policy.on_request(context(headers=[(b"X-Client", b"c%d" % n)]))
        self.assertEqual(len(policy.store), 50)


@implementer(IRateLimitStore)
class ScriptedStore:
    """A store that answers from a script: a result, a Deferred, or a failure."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.keys: list[str] = []

    def hit(self, key: str, limits: Any) -> Any:
        """Record the key and answer as scripted."""
        self.keys.append(key)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer()

    def __len__(self) -> int:
        """Keys seen."""
        return len(set(self.keys))


class StoreAnswerTests(TestCase):
    """The policy works with stores that answer later (Deferred) or not at all."""

    def build(self, store: Any, **config: Any) -> RateLimitPolicy:
        """A policy on `store`."""
        config.setdefault("rateLimits", limits((1, 1000)))
        policy = KIND.build(config, BuildContext(binding="b", api="a", clock=Clock()))
        policy.store = store
        return policy

    def test_deferred_store(self) -> None:
        """A store answering with a Deferred makes on_request return one with the outcome."""
        real = MemoryRateLimitStore(Clock())
        store = ScriptedStore(None)
        store.answer = lambda: succeed(real.hit("k", (RateLimit(1, 1000),)))
        policy = self.build(store, exposeHeaders=True)
        ctx = context()
        first = policy.on_request(ctx)
        self.assertIsInstance(first, Deferred)
        self.assertIsNone(self.successResultOf(first))
        self.assertEqual(extra(ctx)[b"x-ratelimit-remaining"], b"0")
        second = self.successResultOf(policy.on_request(context()))
        self.assertEqual((second.status, second.body), (429, BODY))

    def test_unknown_quota_blocks_by_default(self) -> None:
        """A store that fails (raising or errback) refuses with a 429 when blockOnUnknownQuota."""
        policy = self.build(ScriptedStore(ConnectionError("redis down")))
        self.assertEqual(policy.on_request(context()).status, 429)
        policy = self.build(ScriptedStore(lambda: fail(ConnectionError("redis down"))))
        self.assertEqual(self.successResultOf(policy.on_request(context())).status, 429)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 2)

    def test_store_unavailable_has_its_own_cause_and_count(self) -> None:
        """A store known down (StoreUnavailable, raised or through the Deferred): 429 with
        `x-flexgw-error: quota_unavailable`, counted in the runtime by API and outcome, and not
        logged per request (the store logs the outage); let through when blockOnUnknownQuota
        is false, counted as allowed."""
        runtime = PolicyRuntime(reactor=reactor, clock=Clock())
        down = StoreUnavailable("Redis at r:1 is down")
        for block, answer in ((True, down), (True, lambda: fail(down)), (False, down)):
            config = {"rateLimits": limits((1, 1000)), "blockOnUnknownQuota": block}
            policy = KIND.build(config, BuildContext("b", "a", clock=Clock(), services=runtime))
            policy.store = ScriptedStore(answer)
            result = policy.on_request(context())
            if isinstance(result, Deferred):
                result = self.successResultOf(result)
            if block:
                self.assertEqual((result.status, result.body, result.cause), (429, BODY, "quota_unavailable"))
                self.assertIn((b"x-flexgw-error", b"quota_unavailable"), result.headers)
            else:
                self.assertIsNone(result)
        self.assertEqual(runtime.unknown_quota, {("a", "refused"): 2, ("a", "allowed"): 1})
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unknown_quota_allows_when_configured(self) -> None:
        """blockOnUnknownQuota: false lets the request through when the store fails."""
        policy = self.build(ScriptedStore(ConnectionError("redis down")), blockOnUnknownQuota=False)
        self.assertIsNone(policy.on_request(context()))
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)


def api_file(port: int, upstream_port: int, config: str) -> str:
    """An API with one rate-limiting-flex binding."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        "metadata: {name: rl-api}\n"
        f"spec:\n  address: http://127.0.0.1:{port}\n"
        f"  services:\n    b:\n      address: http://127.0.0.1:{upstream_port}\n"
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: rl}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: rl-api}\n"
        "  policyRef: {name: rate-limiting-flex}\n"
        f"  config:\n{config}"
    )


CONFIG = (
    "    rateLimits:\n      - maximumRequests: 2\n        timePeriodInMilliseconds: 60000\n"
    "    exposeHeaders: true\n"
)


class RateLimitGatewayTests(TestCase):
    """rate-limiting-flex through a real gateway and upstream."""

    def setUp(self) -> None:
        """A recording upstream."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    async def get(self) -> client.Response:
        """One GET through the gateway."""
        return await client.request(
            reactor, "127.0.0.1", self.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )

    async def test_end_to_end_and_reload(self) -> None:
        """Two requests pass with headers, the third is a 429; counters survive a reload of
        the same config and restart when the limits change."""
        gateway = Gateway(self, {"api.yaml": api_file(self.port, self.upstream.address[1], CONFIG)})
        gateway.start()
        first, second, third = [await self.get() for _ in range(3)]
        self.assertEqual([first.status, second.status, third.status], [200, 200, 429])
        self.assertEqual(first.header("X-Ratelimit-Limit"), [b"2"])
        self.assertEqual(first.header("X-Ratelimit-Remaining"), [b"1"])
        self.assertEqual(second.header("X-Ratelimit-Remaining"), [b"0"])
        reset = int(second.header("X-Ratelimit-Reset")[0])
        self.assertTrue(55000 < reset <= 60000, reset)
        self.assertEqual(third.body, BODY)
        self.assertEqual(third.header("content-type"), [b"application/json"])
        self.assertEqual(third.header("x-ratelimit-remaining"), [b"0"])
        wait_ms = int(third.header("x-ratelimit-reset")[0])
        self.assertEqual(third.header("retry-after"), [b"%d" % -(-wait_ms // 1000)])
        self.assertEqual(len(self.upstream.received), 2)
        self.assertEqual(gateway.records()[-1]["status"], 429)

        # same config, reloaded (the file is rewritten): the spent quota stays spent
        gateway.write({"api.yaml": api_file(self.port, self.upstream.address[1], CONFIG + "\n")})
        self.assertTrue(gateway.service.reload())
        self.assertEqual((await self.get()).status, 429)

        # changed limits: new counters
        changed = CONFIG.replace("maximumRequests: 2", "maximumRequests: 3")
        gateway.write({"api.yaml": api_file(self.port, self.upstream.address[1], changed)})
        self.assertTrue(gateway.service.reload())
        response = await self.get()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-ratelimit-remaining"), [b"2"])
        self.assertEqual(len(self.upstream.received), 3)
