"""The outage breaker of a shared store, in memory: states, probe schedule, log records, counts."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from flexgw.storage.breaker import OutageBreaker
from flexgw.storage.interfaces import RateLimit, StoreUnavailable
from flexgw.storage.redis import (
    RedisClient,
    RedisError,
    RedisRateLimitStore,
    RedisRefused,
    RedisTimeout,
    RedisUnavailable,
    RespProtocol,
)


class BreakerTests(TestCase):
    """OutageBreaker on a MemoryReactorClock with a scripted probe."""

    def setUp(self) -> None:
        """A clock, a probe whose answers the test gives, and a logger kept in a list."""
        self.clock = MemoryReactorClock()
        self.clock.advance(100.0)
        self.probes: list[Deferred[Any]] = []
        self.events: list[dict[str, Any]] = []
        self.breaker = OutageBreaker(
            self.clock, "Store at x", self.probe, min_interval=0.1, max_interval=0.5,
            summary_interval=60.0, log=Logger(namespace="test", observer=self.events.append),
        )
        self.addCleanup(self.breaker.close)

    def probe(self) -> Deferred[Any]:
        """A probe the test answers later."""
        answer: Deferred[Any] = Deferred()
        self.probes.append(answer)
        return answer

    def kinds(self) -> list[str]:
        """The storage_event of every record logged so far."""
        return [event["storage_event"] for event in self.events]

    def test_up_until_tripped(self) -> None:
        """A new breaker is up, schedules nothing and logs nothing."""
        self.assertFalse(self.breaker.down)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.successResultOf(self.breaker.when_up()) is None)
        self.assertEqual(self.events, [])

    def test_trip_logs_once_and_counts(self) -> None:
        """The first trip marks it down with one `error` record; later trips and refusals only
        count, and refusals return the unavailable exception naming the reason."""
        self.breaker.trip("connection refused")
        self.breaker.trip("connection lost")
        refused = [self.breaker.refuse() for _ in range(1000)]
        self.assertTrue(self.breaker.down)
        self.assertEqual(self.kinds(), ["down"])
        self.assertEqual(self.events[0]["log_level"].name, "error")
        self.assertIn("connection refused", self.events[0]["reason"])
        self.assertIsInstance(refused[0], StoreUnavailable)
        self.assertIn("Store at x is down (connection refused)", str(refused[0]))
        self.assertEqual((self.breaker.affected, self.breaker.outages), (1002, 1))

    def test_probe_backoff_then_recovery(self) -> None:
        """Probes start min_interval after the trip and back off (doubling) to max_interval
        between a failed probe and the next; the first probe that succeeds closes the breaker
        with one `info` record counting the affected calls, and fires when_up."""
        self.breaker.trip("timeout")
        up = self.breaker.when_up()
        delays = []
        for n in range(6):
            delay = self.next_call() - self.clock.seconds()
            delays.append(round(delay, 6))
            self.clock.advance(delay)
            self.assertEqual(len(self.probes), n + 1)
            self.clock.advance(1.0)  # the probe itself takes a second, then fails
            self.probes[-1].errback(StoreUnavailable(f"still refused {n}"))
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
        self.assertEqual(self.breaker.reason, "still refused 5")
        self.assertNoResult(up)
        self.breaker.refuse()
        self.clock.advance(0.5)
        self.probes[-1].callback("PONG")
        self.assertFalse(self.breaker.down)
        self.successResultOf(up)
        self.assertEqual(self.kinds(), ["down", "up"])
        self.assertEqual(self.events[1]["log_level"].name, "info")
        self.assertEqual(self.events[1]["affected"], 2)
        self.assertAlmostEqual(self.events[1]["duration"], sum(delays) + 6 * 1.0 + 0.5)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no probe, no summary left

    def next_call(self) -> float:
        """When the earliest delayed call is due (the next probe: the summary is a minute away)."""
        return min(call.getTime() for call in self.clock.getDelayedCalls())

    def test_second_outage_starts_afresh(self) -> None:
        """After a recovery the next trip logs again and probes from min_interval."""
        self.breaker.trip("one")
        self.clock.advance(0.1)
        self.probes[-1].callback(None)
        self.breaker.trip("two")
        self.clock.advance(0.1)
        self.assertEqual(len(self.probes), 2)
        self.assertEqual(self.kinds(), ["down", "up", "down"])
        self.assertEqual((self.breaker.affected, self.breaker.affected_total, self.breaker.outages), (1, 2, 2))

    def test_periodic_summary(self) -> None:
        """While down, a `warn` record every summary_interval with the total and recent counts."""
        self.breaker.trip("refused")
        for _ in range(4):
            self.breaker.refuse()
        self.clock.pump([1.0] * 60)  # probes keep failing meanwhile
        for probe in self.probes:
            if not probe.called:
                probe.errback(StoreUnavailable("refused"))
        for _ in range(3):
            self.breaker.refuse()
        self.clock.pump([1.0] * 60)
        summaries = [e for e in self.events if e["storage_event"] == "still_down"]
        self.assertEqual([(e["affected"], e["recent"]) for e in summaries], [(5, 5), (8, 3)])
        self.assertEqual(summaries[0]["log_level"].name, "warn")

    def test_probe_raising_is_a_failed_probe(self) -> None:
        """A probe that raises counts as failed: the next one is scheduled."""
        calls = []

        def raising() -> Deferred[Any]:
            calls.append(1)
            raise OSError("no")

        self.breaker.probe = raising
        self.breaker.trip("x")
        self.clock.advance(0.1)
        self.clock.advance(0.2)
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.breaker.reason, "no")

    def test_close_cancels_probe_and_summary(self) -> None:
        """close() leaves no delayed call behind, and a late probe answer changes nothing."""
        self.breaker.trip("x")
        self.clock.advance(0.1)
        self.breaker.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.probes[-1].callback(None)
        self.assertTrue(self.breaker.down)
        self.assertEqual(self.kinds(), ["down"])


class RedisClientBreakerTests(TestCase):
    """RedisClient trips its breaker on a timeout, in memory (StringTransport, MemoryReactorClock)."""

    def setUp(self) -> None:
        """A client whose connection is a StringTransport, as if connected."""
        self.clock = MemoryReactorClock()
        self.client = RedisClient(self.clock, "127.0.0.1", 6379, command_timeout=0.5)
        self.client.breaker.log = Logger(namespace="test", observer=lambda event: None)
        self.addCleanup(self.client.breaker.close)
        self.protocol = RespProtocol(self.client)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.client._protocol = self.protocol

    def test_timeout_trips_and_aborts_the_stalled_connection(self) -> None:
        """The first command without a reply fails at its timeout and marks Redis down; the
        connection is aborted, so a command sent later on it fails then too, not at its own
        timeout; later commands fail at once without being written."""
        first = self.client.execute("PING")
        self.clock.advance(0.4)
        second = self.client.execute("PING")
        self.clock.advance(0.1)
        self.assertIsInstance(self.failureResultOf(first, RedisTimeout).value, TimeoutError)
        self.assertTrue(self.client.breaker.down)
        self.assertTrue(self.transport.disconnected)  # aborted
        self.protocol.connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(second, RedisUnavailable)  # at 0.5 s, not at 0.9 s
        written = self.transport.value()
        self.failureResultOf(self.client.execute("PING"), RedisUnavailable)
        store = RedisRateLimitStore(self.client, self.clock, "n:")
        self.assertRaises(RedisUnavailable, store.hit, "k", (RateLimit(1, 1000),))
        self.assertEqual(self.transport.value(), written)  # nothing more was sent
        self.assertEqual(self.client.breaker.affected, 4)

    def test_error_reply_is_not_an_outage(self) -> None:
        """An error reply fails its command but leaves Redis up and the connection open."""
        answer = self.client.execute("EVALSHA", "x", 0)
        self.protocol.dataReceived(b"-ERR something\r\n")
        self.failureResultOf(answer, RedisError)
        self.assertFalse(self.client.breaker.down)
        self.assertFalse(self.transport.disconnecting)

    def test_not_now_replies_are_outages(self) -> None:
        """LOADING, BUSY and MASTERDOWN replies mark Redis down (the connection is kept)."""
        for reply in (
            b"-LOADING Redis is loading the dataset in memory\r\n", b"-BUSY script\r\n",
            b"-MASTERDOWN Link with MASTER is down\r\n",
        ):
            self.setUp()
            answer = self.client.execute("EVALSHA", "x", 0)
            self.protocol.dataReceived(reply)
            self.assertIn(reply[1:8].decode(), str(self.failureResultOf(answer, RedisUnavailable).value))
            self.assertTrue(self.client.breaker.down)
            self.assertFalse(self.transport.disconnecting)

    def test_refusals_logged_at_a_bounded_rate(self) -> None:
        """An error reply to a check fails it with RedisRefused (a StoreUnavailable: the policy
        does not log it) while Redis stays up; the breaker logs one record for the first and
        then at most one per summary_interval, with the count since the last."""
        events: list[dict[str, Any]] = []
        self.client.breaker.log = Logger(namespace="test", observer=events.append)
        store = RedisRateLimitStore(self.client, self.clock, "n:")
        oom = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
        for second in (0, 1, 2, 61, 62):
            self.clock.advance(second - self.clock.seconds())
            answer = store.hit("k", (RateLimit(1, 1000),))
            self.protocol.dataReceived(oom)
            self.assertIsInstance(self.failureResultOf(answer, RedisRefused).value, StoreUnavailable)
        self.assertFalse(self.client.breaker.down)
        self.assertEqual(
            [(e["storage_event"], e["count"]) for e in events],
            [("refused", 1), ("refused", 3)],  # at 0 s; then at 61 s for 1, 2 and 61
        )
        self.assertEqual(self.client.breaker.refusals, 5)
