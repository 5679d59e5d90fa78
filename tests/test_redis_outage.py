"""Redis outages through a real gateway and a real redis-server: SIGSTOP and SIGKILL fail fast
(429 quota_unavailable or pass, per blockOnUnknownQuota), are logged once, counted, and end
within a second of Redis answering again."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from flexgw.service.metrics import make_registry, render
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port
from tests.redisserver import RedisServer
from tests.test_admin import samples
from tests.test_policy_rate_limiting import api_file
from tests.test_rate_limiting_redis import rate_limit, storage_document

API = "default/rl-api"
#: The command timeout the gateways here use (commandTimeoutSeconds): long enough that twenty
#: requests answered at once take far less on a loaded machine.
TIMEOUT = 2.0
#: Their probe interval while Redis is down (probeIntervalSeconds).
PROBE = 0.25


class RedisOutageTests(TestCase):
    """A gateway with a rate-limiting-flex binding in Redis while Redis stops, dies, returns."""

    def setUp(self) -> None:
        """A recording upstream, a redis-server, and every log event kept."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.server = self.start_server(RedisServer())
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start_server(self, server: RedisServer) -> RedisServer:
        """Start a redis-server, killed (by its PID) in cleanup."""
        self.addCleanup(server.stop)
        return server.start()

    def gateway(self, block: bool) -> tuple[Gateway, int]:
        """A started gateway: 3 requests a minute in Redis, the given blockOnUnknownQuota."""
        port = free_port()
        storage = (
            f"address: 127.0.0.1:{self.server.port}\ncommandTimeoutSeconds: {TIMEOUT}\n"
            f"probeIntervalSeconds: {PROBE}\n"
        )
        gateway = Gateway(self, {
            "api.yaml": api_file(port, self.upstream.address[1], rate_limit(3, block=block)),
            "storage.yaml": storage_document(storage),
        })
        gateway.start()
        redis = gateway.service.runtime.redis
        self.assertEqual((redis.command_timeout, redis.breaker.max_interval), (TIMEOUT, PROBE))
        self.addCleanup(redis.close)  # before the gateway stops: a clean reactor
        return gateway, port

    async def get(self, port: int) -> tuple[int, bytes | None]:
        """One GET through the gateway: (status, x-flexgw-error or None)."""
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        return response.status, dict(response.headers).get(b"x-flexgw-error")

    def storage_events(self) -> list[str]:
        """The breaker's records so far ("down", "still_down", "up")."""
        return [e["storage_event"] for e in self.events if "storage_event" in e]

    def metrics(self, gateway: Gateway) -> dict[Any, float]:
        """The gateway's /metrics samples."""
        return samples(render(make_registry(gateway.service, process=False)))

    async def test_stopped_redis_fails_fast_then_recovers(self) -> None:
        """SIGSTOP: the first request waits the command timeout, then every request is refused
        at once with 429 quota_unavailable (none waits the timeout), logged once and counted as
        such (metrics and access log), not as rate-limit rejections; SIGCONT: Redis is used
        again within a second, with one recovery record."""
        gateway, port = self.gateway(block=True)
        self.assertEqual(await self.get(port), (200, None))
        self.server.signal(signal.SIGSTOP)
        started = reactor.seconds()
        self.assertEqual(await self.get(port), (429, b"quota_unavailable"))
        first = reactor.seconds() - started
        self.assertGreaterEqual(first, TIMEOUT * 0.9)
        started = reactor.seconds()
        answers = [await self.get(port) for _ in range(20)]
        self.assertEqual(answers, [(429, b"quota_unavailable")] * 20)
        self.assertLess(reactor.seconds() - started, TIMEOUT)  # twenty answers in less than one timeout
        self.assertEqual(self.storage_events(), ["down"])
        self.server.signal(signal.SIGCONT)
        resumed = reactor.seconds()
        await gateway.service.runtime.redis.when_up()
        self.assertLess(reactor.seconds() - resumed, 1.0)
        self.assertEqual(self.storage_events(), ["down", "up"])
        self.assertEqual([e["affected"] for e in self.events if e.get("storage_event") == "up"], [21])
        # Redis ran the check that timed out once it resumed (it had been sent): 3 of 3 now
        self.assertEqual(await self.get(port), (200, None))
        self.assertEqual(await self.get(port), (429, None))  # an ordinary rejection
        self.assertEqual(len(self.upstream.received), 2)
        got = self.metrics(gateway)
        route = {"api": API, "route": "rl-api-b-route-1"}

        def value(name: str, **labels: str) -> float | None:
            return got.get((name, tuple(sorted(labels.items()))))

        self.assertEqual(value("flexgw_rate_limit_unknown_quota_total", api=API, outcome="refused"), 21)
        self.assertEqual(
            value("flexgw_requests_total", status_class="4xx", cause="quota_unavailable", **route), 21
        )
        self.assertEqual(value("flexgw_rate_limit_rejections_total", api=API), 1)
        self.assertEqual(value("flexgw_shared_storage_up"), 1)
        self.assertEqual(value("flexgw_shared_storage_outages_total"), 1)
        errors = [r["error"] for r in gateway.records()]
        self.assertEqual(errors.count("quota_unavailable"), 21)
        self.assertEqual(errors.count("policy_rejected"), 1)

    async def test_killed_redis_logs_once_and_recovers_on_restart(self) -> None:
        """SIGKILL with blockOnUnknownQuota false: requests pass (counted as allowed), one
        outage record and no traceback whatever the number of requests; a redis-server
        restarted on the same port is used again within a second, with one recovery record."""
        gateway, port = self.gateway(block=False)
        self.assertEqual(await self.get(port), (200, None))
        redis = gateway.service.runtime.redis
        lost = redis._protocol.lost
        self.server.signal(signal.SIGKILL)
        await lost
        answers = [await self.get(port) for _ in range(50)]
        self.assertEqual(answers, [(200, None)] * 50)
        self.assertEqual(self.storage_events(), ["down"])
        self.assertEqual([e for e in self.events if e.get("log_failure") is not None], [])
        self.assertEqual(self.metrics(gateway)[
            ("flexgw_rate_limit_unknown_quota_total", (("api", API), ("outcome", "allowed")))
        ], 50)
        self.assertEqual(self.metrics(gateway)[("flexgw_shared_storage_up", ())], 0)
        self.start_server(RedisServer(port=self.server.port))
        restarted = reactor.seconds()
        await redis.when_up()
        self.assertLess(reactor.seconds() - restarted, 1.0)
        self.assertEqual(self.storage_events(), ["down", "up"])
        statuses = [(await self.get(port))[0] for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])  # a fresh Redis: the quota starts anew
        self.assertEqual(len(self.upstream.received), 1 + 50 + 3)

    async def test_refusing_redis_logged_at_a_bounded_rate(self) -> None:
        """Redis up but out of memory (maxmemory reached, noeviction): every check is refused
        with an error reply, so 429 quota_unavailable, one `refused` record for all of them, no
        traceback, and Redis is not marked down."""
        gateway, port = self.gateway(block=True)
        self.assertEqual(await self.get(port), (200, None))
        redis = gateway.service.runtime.redis
        await redis.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await redis.execute("CONFIG", "SET", "maxmemory", "1")
        answers = [await self.get(port) for _ in range(10)]
        self.assertEqual(answers, [(429, b"quota_unavailable")] * 10)
        self.assertEqual(self.storage_events(), ["refused"])
        self.assertIn("OOM", next(e for e in self.events if "storage_event" in e)["reason"])
        self.assertFalse(redis.breaker.down)
        got = self.metrics(gateway)
        self.assertEqual(got[("flexgw_shared_storage_refusals_total", ())], 10)
        self.assertEqual(got[("flexgw_shared_storage_up", ())], 1)
