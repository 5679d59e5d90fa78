"""The supervisor-held counters of `--workers`, reached over a real AMP connection in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import TestCase

from flexgw.policies.base import BuildContext, LocalResponse
from flexgw.policies.rate_limiting import RateLimitKind
from flexgw.policies.spike_control import SpikeControlKind, SupervisedSpikeControlPolicy
from flexgw.service import ampcommands as commands
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.storage.interfaces import HitResult, RateLimit
from flexgw.storage.memory import MemoryRateLimitStore
from flexgw.storage.redis import RedisRateLimitStore
from flexgw.storage.supervised import (
    MAX_KEY_CHARS,
    SupervisedRateLimitStore,
    SupervisorCounters,
)
from tests.storage_conformance import RateLimitStoreConformanceMixin


class _Supervisor(amp.AMP):
    """The supervisor's responders for the counters (as SupervisorProtocol has them)."""

    def __init__(self, counters: SupervisorCounters) -> None:
        super().__init__()
        self.counters = counters
        self.keys_seen: list[str] = []

    @commands.RateLimitHit.responder
    def hit(self, namespace: str, key: str, limits: list[int]) -> dict[str, Any]:
        """Delegate to the counters."""
        self.keys_seen.append(key)
        return self.counters.amp_hit(namespace, key, limits)

    @commands.SpikeTake.responder
    def take(self, namespace: str, maximum: int, period_ms: int) -> dict[str, Any]:
        """Delegate to the counters."""
        return self.counters.amp_spike(namespace, maximum, period_ms)


def connected(clock: Clock) -> tuple[_Supervisor, amp.AMP, iosim.IOPump]:
    """A supervisor and a worker AMP protocol connected in memory; the pump moves bytes."""
    supervisor = _Supervisor(SupervisorCounters(clock))
    worker = amp.AMP()
    pump = iosim.connect(
        supervisor, iosim.makeFakeServer(supervisor), worker, iosim.makeFakeClient(worker)
    )
    return supervisor, worker, pump


class SupervisedStoreConformanceTests(RateLimitStoreConformanceMixin, TestCase):
    """The shared store conformance tests, through AMP to the supervisor's counters."""

    def make_store(self, clock: Clock) -> SupervisedRateLimitStore:
        """A worker's store for one namespace, its supervisor on `clock`."""
        self.supervisor, worker, self.pump = connected(clock)
        return SupervisedRateLimitStore(worker, "ns")

    async def hit(self, key: str, *limits: RateLimit) -> HitResult:
        """One hit, the bytes pumped both ways before its answer is awaited."""
        result = self.store.hit(key, limits or (RateLimit(3, 6000),))
        self.assertIsInstance(result, Deferred)
        self.pump.flush()
        answer = await result
        assert isinstance(answer, HitResult)
        return answer


class SharedQuotaTests(TestCase):
    """Several workers' stores on one supervisor share one quota per namespace."""

    def setUp(self) -> None:
        """One supervisor counters object, two workers connected to it."""
        self.clock = Clock()
        self.counters = SupervisorCounters(self.clock)
        self.pumps = []
        self.workers = []
        for _ in range(2):
            supervisor = _Supervisor(self.counters)
            worker = amp.AMP()
            self.pumps.append(
                iosim.connect(
                    supervisor, iosim.makeFakeServer(supervisor), worker, iosim.makeFakeClient(worker)
                )
            )
            self.workers.append(worker)

    def hit(self, worker: int, namespace: str = "ns", key: str = "k") -> HitResult:
        """One hit from worker `worker`, answered."""
        d = SupervisedRateLimitStore(self.workers[worker], namespace).hit(key, [RateLimit(5, 1000)])
        self.pumps[worker].flush()
        return self.successResultOf(d)

    def test_quota_exact_across_workers(self) -> None:
        """5 per window: alternating workers admit exactly 5 of 8."""
        allowed = [self.hit(i % 2).allowed for i in range(8)]
        self.assertEqual(allowed, [True] * 5 + [False] * 3)

    def test_namespaces_are_separate(self) -> None:
        """Another binding (namespace) has its own counters."""
        for i in range(5):
            self.hit(i % 2)
        self.assertFalse(self.hit(0).allowed)
        self.assertTrue(self.hit(1, namespace="other").allowed)

    def test_long_keys_sent_as_digest(self) -> None:
        """A key longer than an AMP value may be is sent as its digest, and still counted apart."""
        supervisor = _Supervisor(self.counters)
        worker = amp.AMP()
        pump = iosim.connect(
            supervisor, iosim.makeFakeServer(supervisor), worker, iosim.makeFakeClient(worker)
        )
        store = SupervisedRateLimitStore(worker, "ns")
        one, two = "a" * 100_000, "a" * 99_999 + "b"
        results = []
        for key in (one, one, two):
            d = store.hit(key, [RateLimit(1, 1000)])
            pump.flush()
            results.append(self.successResultOf(d).allowed)
        self.assertEqual(results, [True, False, True])
        self.assertTrue(all(len(k) <= MAX_KEY_CHARS for k in supervisor.keys_seen))

    def test_supervisor_gone_fails_the_hit(self) -> None:
        """With the connection lost, a hit fails (the policy then applies blockOnUnknownQuota)."""
        self.workers[0].transport.loseConnection()
        self.pumps[0].flush()
        d = SupervisedRateLimitStore(self.workers[0], "ns").hit("k", [RateLimit(5, 1000)])
        self.failureResultOf(d)

    def test_namespace_bound(self) -> None:
        """Beyond max_namespaces, the least recently used namespace is forgotten."""
        counters = SupervisorCounters(self.clock, max_namespaces=2)
        counters.hit("a", "k", [RateLimit(1, 1000)])
        counters.hit("b", "k", [RateLimit(1, 1000)])
        counters.hit("a", "k", [RateLimit(1, 1000)])  # a is now the most recent
        counters.hit("c", "k", [RateLimit(1, 1000)])
        self.assertEqual(list(counters.stores), ["a", "c"])


class SpikeWindowTests(TestCase):
    """The supervisor's sliding windows for spike control."""

    def test_sliding_window(self) -> None:
        """2 per second: the third in the window is refused; a slot frees when the oldest ages out."""
        clock = Clock()
        counters = SupervisorCounters(clock)
        self.assertEqual(counters.spike_take("s", 2, 1000), (True, 1, 0))
        clock.advance(0.4)
        self.assertEqual(counters.spike_take("s", 2, 1000), (True, 0, 600))
        self.assertEqual(counters.spike_take("s", 2, 1000), (False, 0, 600))
        clock.advance(0.6)  # the first request leaves the window
        self.assertEqual(counters.spike_take("s", 2, 1000), (True, 0, 400))

    def test_lowered_maximum(self) -> None:
        """A reload lowering the maximum trims the window to it."""
        clock = Clock()
        counters = SupervisorCounters(clock)
        for _ in range(3):
            counters.spike_take("s", 3, 1000)
        self.assertEqual(counters.spike_take("s", 1, 1000), (False, 0, 1000))


class _Ctx:
    """The little of PolicyContext that spike control uses."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    def add_response_header(self, name: bytes, value: bytes) -> None:
        """Record a response header."""
        self.headers.append((name, value))


class SupervisedPolicyTests(TestCase):
    """The policies build their supervised variants when the runtime has a supervisor."""

    def setUp(self) -> None:
        """Two workers' runtimes on one supervisor, on a fake clock."""
        self.clock = Clock()
        self.counters = SupervisorCounters(self.clock)
        self.pumps: list[iosim.IOPump] = []
        self.runtimes = []
        for _ in range(2):
            supervisor = _Supervisor(self.counters)
            worker = amp.AMP()
            self.pumps.append(
                iosim.connect(
                    supervisor, iosim.makeFakeServer(supervisor), worker, iosim.makeFakeClient(worker)
                )
            )
            runtime = PolicyRuntime(reactor=self.clock, clock=self.clock)
            runtime.supervisor = worker
            self.runtimes.append(runtime)

    def context(self, worker: int) -> BuildContext:
        """The build context of worker `worker`."""
        return BuildContext(
            binding="default/limit", api="default/api", clock=self.clock, services=self.runtimes[worker]
        )

    def answer(self, worker: int, result: Any) -> Any:
        """Pump worker `worker`'s connection and return what a Deferred result fired with."""
        self.pumps[worker].flush()
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def test_rate_limit_shared_by_two_workers(self) -> None:
        """Two workers' builds of one binding share its quota; a 429 once it is spent."""
        config = {"rateLimits": [{"maximumRequests": 3, "timePeriodInMilliseconds": 10000}]}
        policies = [RateLimitKind().build(config, self.context(i)) for i in range(2)]
        outcomes = []
        for i in range(5):
            outcomes.append(self.answer(i % 2, policies[i % 2].on_request(_Ctx())))
        self.assertEqual(outcomes[:3], [None, None, None])
        self.assertTrue(all(isinstance(o, LocalResponse) and o.status == 429 for o in outcomes[3:]))

    def test_redis_wins_over_the_supervisor(self) -> None:
        """With Redis configured, a worker's rate limiting uses Redis (shared by every gateway),
        not the supervisor; `clusterizable: false` then falls back to the supervisor's counters."""
        runtime = self.runtimes[0]
        runtime.redis = object()  # stands for the RedisClient the runtime would hold
        config = {"rateLimits": [{"maximumRequests": 3, "timePeriodInMilliseconds": 10000}]}
        policy = RateLimitKind().build(config, self.context(0))
        self.assertIsInstance(policy.store, RedisRateLimitStore)
        local = RateLimitKind().build(dict(config, clusterizable=False), self.context(0))
        self.assertIsInstance(local.store, SupervisedRateLimitStore)

    def test_single_process_keeps_memory_store(self) -> None:
        """Without a supervisor (--workers 1) the counters stay in the process: no AMP hop."""
        context = BuildContext(
            binding="default/limit", api="default/api", clock=self.clock,
            services=PolicyRuntime(reactor=self.clock, clock=self.clock),
        )
        config = {"rateLimits": [{"maximumRequests": 3, "timePeriodInMilliseconds": 10000}]}
        self.assertIsInstance(RateLimitKind().build(config, context).store, MemoryRateLimitStore)
        self.assertNotIsInstance(
            SpikeControlKind().build({"maximumRequests": 2}, context), SupervisedSpikeControlPolicy
        )

    def test_spike_control_shared_and_held(self) -> None:
        """One window for both workers; a request over it is held, retried, and let through
        once the window has room again."""
        config = {
            "maximumRequests": 2,
            "timePeriodInMilliseconds": 1000,
            "delayTimeInMillis": 600,
            "delayAttempts": 1,
            "queuingLimit": 1,
            "exposeHeaders": True,
        }
        policies = [SpikeControlKind().build(config, self.context(i)) for i in range(2)]
        self.assertIsInstance(policies[0], SupervisedSpikeControlPolicy)
        self.assertIsNone(self.answer(0, policies[0].on_request(_Ctx())))
        self.clock.advance(0.5)
        self.assertIsNone(self.answer(1, policies[1].on_request(_Ctx())))
        held_ctx = _Ctx()
        held = policies[0].on_request(held_ctx)
        self.pumps[0].flush()
        self.assertNoResult(held)  # held: the window is full
        refused = self.answer(0, policies[0].on_request(_Ctx()))  # worker 0 holds one already
        self.assertIsInstance(refused, LocalResponse)
        self.assertEqual(refused.status, 429)
        self.clock.advance(0.6)  # the first request left the window at 1.0
        self.pumps[0].flush()
        self.assertIsNone(self.successResultOf(held))
        self.assertIn((b"x-ratelimit-remaining", b"0"), held_ctx.headers)

    def test_spike_control_refuses_without_supervisor(self) -> None:
        """The supervisor gone: the request is refused, not let through."""
        policy = SpikeControlKind().build({"maximumRequests": 5}, self.context(0))
        self.runtimes[0].supervisor.transport.loseConnection()
        self.pumps[0].flush()
        answer = self.answer(0, policy.on_request(_Ctx()))
        self.assertEqual(answer.status, 429)
        self.flushLoggedErrors()


class BigBytesTests(TestCase):
    """Values beyond AMP's 64 KiB limit cross in chunks."""

    def test_round_trip(self) -> None:
        """A 200 KB value survives toBox/fromBox, and every chunk fits AMP's limit."""
        value = bytes(range(256)) * 800
        strings: dict[bytes, bytes] = {}
        commands.BigBytes().toBox(b"text", strings, {"text": value}, None)
        self.assertTrue(all(len(v) <= amp.MAX_VALUE_LENGTH for v in strings.values()))
        self.assertGreater(len(strings), 3)
        objects: dict[str, Any] = {}
        commands.BigBytes().fromBox(b"text", strings, objects, None)
        self.assertEqual(objects["text"], value)

    def test_empty(self) -> None:
        """An empty value is one empty key."""
        strings: dict[bytes, bytes] = {}
        commands.BigBytes().toBox(b"text", strings, {"text": b""}, None)
        objects: dict[str, Any] = {}
        commands.BigBytes().fromBox(b"text", strings, objects, None)
        self.assertEqual((strings, objects["text"]), ({b"text": b""}, b""))
