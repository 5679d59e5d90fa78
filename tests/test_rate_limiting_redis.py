"""rate-limiting-flex with `sharedStorage.redis`: config, gateways sharing a quota, Redis down."""

from __future__ import annotations

import os
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.plan import SharedStorage
from flexgw.policies.base import BuildContext
from flexgw.policies.rate_limiting import KIND
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.storage.memory import MemoryRateLimitStore
from flexgw.storage.redis import RedisClient, RedisRateLimitStore
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port
from tests.redisserver import RedisServer
from tests.test_policy_rate_limiting import api_file


def storage_document(redis: str) -> str:
    """A Configuration with `sharedStorage.redis` given as YAML lines (indented by the caller)."""
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
        "metadata: {name: storage}\n"
        "spec:\n  sharedStorage:\n    redis:\n" + textwrap.indent(textwrap.dedent(redis), "      ")
    )


def rate_limit(maximum: int, block: bool = True) -> str:
    """A binding config: `maximum` requests a minute, exposed headers, blockOnUnknownQuota."""
    return (
        f"    rateLimits:\n      - maximumRequests: {maximum}\n"
        "        timePeriodInMilliseconds: 60000\n"
        f"    blockOnUnknownQuota: {'true' if block else 'false'}\n"
    )


class SharedStorageConfigTests(TestCase):
    """`Configuration.spec.sharedStorage` becomes the plan's SharedStorage."""

    def load(self, redis: str) -> Any:
        """Load one Configuration document; return the ConfigState."""
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "c.yaml"), "w", encoding="utf-8") as handle:
            handle.write(storage_document(redis))
        return load_config([root], {})

    def messages(self, state: Any) -> list[str]:
        """Every problem's message."""
        return [f"{p.severity}: {p.field}: {p.message}" for p in state.plan.problems]

    def test_all_keys(self) -> None:
        """address, username, password and db are read; no "not supported" warning."""
        state = self.load("address: redis.local:6380\nusername: u\npassword: p\ndb: 7\n")
        self.assertEqual(state.plan.shared_storage, SharedStorage("redis.local", 6380, "u", "p", 7))
        self.assertEqual(self.messages(state), [])

    def test_alternative_spellings_and_defaults(self) -> None:
        """`user` and `DB` as in Flex's examples; the port defaults to 6379, db to 0."""
        state = self.load("address: 10.0.0.5\nuser: u\nDB: 2\n")
        self.assertEqual(state.plan.shared_storage, SharedStorage("10.0.0.5", 6379, "u", None, 2))
        self.assertEqual(self.load("address: '[::1]:7000'\n").plan.shared_storage,
                         SharedStorage("::1", 7000))

    def test_bad_address_and_db(self) -> None:
        """An unusable address or db is an error and Redis is not used."""
        for redis in ("address: 'a:b:c'\n", "address: r:99999\n", "address: r:1\ndb: -1\n", "password: p\n"):
            state = self.load(redis)
            self.assertIsNone(state.plan.shared_storage, redis)
            self.assertTrue(any(m.startswith("error") for m in self.messages(state)), redis)

    def test_outage_timings(self) -> None:
        """The flexgw timing keys reach the plan and the client; without them, the defaults."""
        state = self.load(
            "address: r:1\ncommandTimeoutSeconds: 0.25\nprobeIntervalSeconds: 1\n"
            "outageSummarySeconds: 30\n"
        )
        self.assertEqual(self.messages(state), [])
        storage = state.plan.shared_storage
        self.assertEqual(
            (storage.command_timeout, storage.probe_interval, storage.summary_interval),
            (0.25, 1.0, 30.0),
        )
        runtime = PolicyRuntime(reactor=reactor, clock=reactor)
        runtime.use_shared_storage(storage)
        redis = runtime.redis
        self.addCleanup(redis.close)
        self.assertEqual((redis.connect_timeout, redis.command_timeout), (0.25, 0.25))
        self.assertEqual(
            (redis.breaker.max_interval, redis.breaker.summary_interval), (1.0, 30.0)
        )
        default = self.load("address: r:1\n").plan.shared_storage
        self.assertEqual(
            (default.command_timeout, default.probe_interval, default.summary_interval),
            (2.0, 0.5, 60.0),
        )

    def test_bad_outage_timings(self) -> None:
        """A timing out of range or not a number is an error at its field; Redis is not used.
        A probe interval over a second is refused (Redis back within a second)."""
        for key, value in (
            ("commandTimeoutSeconds", "0"), ("commandTimeoutSeconds", "soon"),
            ("probeIntervalSeconds", "2"), ("probeIntervalSeconds", "-1"),
            ("outageSummarySeconds", "0.5"), ("commandTimeoutSeconds", "true"),
        ):
            state = self.load(f"address: r:1\n{key}: {value}\n")
            self.assertIsNone(state.plan.shared_storage, (key, value))
            errors = [m for m in self.messages(state) if m.startswith("error")]
            self.assertEqual(len(errors), 1, errors)
            self.assertIn(f"redis.{key}: {key} must be a number of seconds", errors[0])
            self.assertEqual(state.plan.problems[0].line, 8, (key, value))  # the key's own line

    def test_runtime_gets_a_client(self) -> None:
        """Loading with a runtime gives it a client for the settings, replaced when they change."""
        runtime = PolicyRuntime(reactor=reactor, clock=reactor)
        root = self.mktemp()
        os.makedirs(root)
        path = os.path.join(root, "c.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(storage_document("address: 127.0.0.1:1\n"))
        load_config([root], {}, runtime=runtime)
        first = runtime.redis
        self.assertIsInstance(first, RedisClient)
        self.assertEqual((first.host, first.port), ("127.0.0.1", 1))
        load_config([root], {}, runtime=runtime)
        self.assertIs(runtime.redis, first)  # unchanged settings: same client
        os.remove(path)
        load_config([root], {}, runtime=runtime)
        self.assertIsNone(runtime.redis)


class StoreChoiceTests(TestCase):
    """clusterizable bindings use Redis when the runtime has a client, memory otherwise."""

    def build(self, runtime: PolicyRuntime, **config: Any) -> Any:
        """Build a binding with the runtime as services; return its store."""
        config = {"rateLimits": [{"maximumRequests": 1, "timePeriodInMilliseconds": 1000}], **config}
        context = BuildContext("default/rl", "default/api", clock=reactor, services=runtime)
        return KIND.build(config, context).store

    def test_choice(self) -> None:
        """Redis for clusterizable (the default) with a client; memory without, or when false."""
        runtime = PolicyRuntime(reactor=reactor, clock=reactor)
        self.assertIsInstance(self.build(runtime), MemoryRateLimitStore)
        runtime.redis = RedisClient(reactor, "127.0.0.1", 1)
        store = self.build(runtime)
        self.assertIsInstance(store, RedisRateLimitStore)
        self.assertTrue(store.namespace.startswith("flexgw:rl:default/api:default/rl:"))
        self.assertIsInstance(self.build(runtime, clusterizable=False), MemoryRateLimitStore)


class SharedQuotaGatewayTests(TestCase):
    """Gateways sharing one Redis share the quota; an unreachable Redis obeys blockOnUnknownQuota."""

    def setUp(self) -> None:
        """A recording upstream."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, redis_port: int, config: str) -> tuple[Gateway, int]:
        """A started gateway using Redis on 127.0.0.1:redis_port; (gateway, its port)."""
        port = free_port()
        files = {
            "api.yaml": api_file(port, self.upstream.address[1], config),
            "storage.yaml": storage_document(f"address: 127.0.0.1:{redis_port}\n"),
        }
        gateway = Gateway(self, files)
        gateway.start()
        runtime = gateway.service.runtime
        self.assertIsInstance(runtime.redis, RedisClient)
        self.addCleanup(runtime.redis.close)  # runs before the gateway stops: clean reactor
        return gateway, port

    async def get(self, port: int) -> int:
        """One GET through the gateway on `port`; its status."""
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        return response.status

    async def test_two_gateways_admit_the_quota_together(self) -> None:
        """Two GatewayServices on one Redis admit exactly maximumRequests between them."""
        server = RedisServer()
        self.addCleanup(server.stop)
        server.start()
        _, one = self.gateway(server.port, rate_limit(3))
        _, two = self.gateway(server.port, rate_limit(3))
        statuses = [await self.get(port) for port in (one, two, one, two, one, two)]
        self.assertEqual(sorted(statuses), [200, 200, 200, 429, 429, 429])
        self.assertEqual(statuses[:3], [200, 200, 200])
        self.assertEqual(len(self.upstream.received), 3)

    async def test_redis_down_blocks_by_default(self) -> None:
        """Nothing listening at the Redis address and blockOnUnknownQuota true: 429."""
        _, port = self.gateway(free_port(), rate_limit(3, block=True))
        self.assertEqual([await self.get(port) for _ in range(2)], [429, 429])
        self.assertEqual(len(self.upstream.received), 0)
        self.flushLoggedErrors()

    async def test_redis_down_passes_when_configured(self) -> None:
        """Nothing listening at the Redis address and blockOnUnknownQuota false: passes."""
        _, port = self.gateway(free_port(), rate_limit(1, block=False))
        self.assertEqual([await self.get(port) for _ in range(2)], [200, 200])
        self.assertEqual(len(self.upstream.received), 2)
        self.flushLoggedErrors()
