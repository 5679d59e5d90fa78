"""The Redis rate-limit store against a real redis-server: conformance, atomic script, failures."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.storage.interfaces import RateLimit
from flexgw.storage.redis import (
    RedisClient,
    RedisError,
    RedisRateLimitStore,
    RedisUnavailable,
    encode_command,
    parse_reply,
)
from tests.harness import free_port
from tests.redisserver import RedisServer
from tests.storage_conformance import RateLimitStoreConformanceMixin

ONE_PER_MINUTE = (RateLimit(1, 60000),)


def real_reactor() -> Any:
    """The reactor trial runs (tests may use it; only tap.py imports it in flexgw itself)."""
    from twisted.internet import reactor

    return reactor


def start_server(case: TestCase) -> RedisServer:
    """A redis-server for this test, killed in cleanup."""
    server = RedisServer()
    case.addCleanup(server.stop)
    return server.start()


def client_for(case: TestCase, port: int, **options: Any) -> RedisClient:
    """A client to 127.0.0.1:port, closed in cleanup (before the server is stopped)."""
    client = RedisClient(real_reactor(), "127.0.0.1", port, **options)
    case.addCleanup(client.close)
    return client


class RedisStoreConformanceTests(RateLimitStoreConformanceMixin, TestCase):
    """RedisRateLimitStore passes the store conformance tests against a real redis-server."""

    def setUp(self) -> None:
        """One server and one client per test."""
        self.server = start_server(self)
        self.client = client_for(self, self.server.port)
        super().setUp()

    def make_store(self, clock: Clock) -> Any:
        """A Redis store on the fake clock."""
        return RedisRateLimitStore(self.client, clock, "test:")


class RedisStoreTests(TestCase):
    """What only the Redis store does: shared counters, namespaces, AUTH/SELECT, failures."""

    async def test_two_stores_share_counters(self) -> None:
        """Two stores (two clients, as two gateways) on one Redis admit the quota together."""
        server = start_server(self)
        clock = Clock()
        first = RedisRateLimitStore(client_for(self, server.port), clock, "ns:")
        second = RedisRateLimitStore(client_for(self, server.port), clock, "ns:")
        limits = (RateLimit(3, 60000),)
        answers = await defer.gatherResults(
            [(first if n % 2 else second).hit("k", limits) for n in range(8)]
        )
        self.assertEqual(sum(1 for a in answers if a.allowed), 3)

    async def test_namespaces_are_independent(self) -> None:
        """Stores with different namespaces keep different counters for the same key value."""
        server = start_server(self)
        client = client_for(self, server.port)
        clock = Clock()
        one = RedisRateLimitStore(client, clock, "a:")
        other = RedisRateLimitStore(client, clock, "b:")
        self.assertTrue((await one.hit("k", ONE_PER_MINUTE)).allowed)
        self.assertFalse((await one.hit("k", ONE_PER_MINUTE)).allowed)
        self.assertTrue((await other.hit("k", ONE_PER_MINUTE)).allowed)

    async def test_key_expires_when_its_windows_end(self) -> None:
        """The Redis key gets a TTL of its longest window plus the 5 s margin (no key lives
        forever)."""
        server = start_server(self)
        client = client_for(self, server.port)
        store = RedisRateLimitStore(client, Clock(), "ttl:")
        await store.hit("k", (RateLimit(5, 1000), RateLimit(5, 60000)))
        ttl = await client.execute("PTTL", "ttl:k")
        self.assertTrue(64000 < ttl <= 65000, ttl)

    async def test_script_loaded_once(self) -> None:
        """After the first EVAL the server knows the script: later hits send only its SHA."""
        server = start_server(self)
        client = client_for(self, server.port)
        store = RedisRateLimitStore(client, Clock(), "s:")
        await store.hit("k", ONE_PER_MINUTE)
        await store.hit("k", ONE_PER_MINUTE)
        info = (await client.execute("INFO", "commandstats")).decode()
        self.assertIn("cmdstat_eval:calls=1,", info)
        self.assertIn("cmdstat_evalsha:calls=2,", info)

    async def test_auth_and_select(self) -> None:
        """With a password the client sends AUTH, with a db SELECT, on each connection."""
        server = start_server(self)
        admin = client_for(self, server.port)
        await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
        client = client_for(self, server.port, password="s3cret", db=3)
        store = RedisRateLimitStore(client, Clock(), "db:")
        self.assertTrue((await store.hit("k", ONE_PER_MINUTE)).allowed)
        self.assertEqual(await client.execute("EXISTS", "db:k"), 1)
        self.assertEqual(await admin.execute("EXISTS", "db:k"), 0)  # admin is on db 0

    async def test_wrong_password_fails(self) -> None:
        """A refused AUTH fails the hit as unavailable, with the server's reason."""
        server = start_server(self)
        admin = client_for(self, server.port)
        await admin.execute("CONFIG", "SET", "requirepass", "s3cret")
        store = RedisRateLimitStore(client_for(self, server.port, password="nope"), Clock(), "x:")
        with self.assertRaises(RedisUnavailable) as caught:
            await store.hit("k", ONE_PER_MINUTE)
        self.assertIn("WRONGPASS", str(caught.exception))

    async def test_unreachable_fails_then_fails_at_once(self) -> None:
        """Nothing listening: the hit fails and Redis is marked down; the next one fails at
        once, synchronously, without a connection attempt."""
        client = client_for(self, free_port(), min_backoff=60.0)
        store = RedisRateLimitStore(client, Clock(), "x:")
        with self.assertRaises(RedisUnavailable):
            await store.hit("k", ONE_PER_MINUTE)
        self.assertTrue(client.breaker.down)
        with self.assertRaises(RedisUnavailable):
            store.hit("k", ONE_PER_MINUTE)
        self.assertIsNone(client._waiting)  # no connection attempt
        self.assertEqual(client.breaker.affected, 2)

    async def test_reconnects_after_server_restart(self) -> None:
        """A lost connection is reopened by the next command; the lost one's command fails."""
        server = start_server(self)
        client = client_for(self, server.port, min_backoff=0.0)
        store = RedisRateLimitStore(client, Clock(), "r:")
        self.assertTrue((await store.hit("k", ONE_PER_MINUTE)).allowed)
        lost = client._protocol.lost
        await client.execute("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")
        await lost
        self.assertTrue((await store.hit("other", ONE_PER_MINUTE)).allowed)
        self.assertEqual(client.connections, 2)

    async def test_command_timeout(self) -> None:
        """A server that does not answer fails the command after command_timeout."""
        server = start_server(self)
        admin = client_for(self, server.port)
        client = client_for(self, server.port, command_timeout=0.2)
        await client.execute("PING")
        paused = admin.execute("CLIENT", "PAUSE", "1000", "ALL")
        await paused
        with self.assertRaises(defer.TimeoutError):
            await client.execute("PING")
        await admin.execute("CLIENT", "UNPAUSE")


class RespTests(TestCase):
    """The RESP encoder and parser."""

    def test_encode(self) -> None:
        """Commands are arrays of bulk strings."""
        self.assertEqual(encode_command(["GET", "kë", 12]), b"*3\r\n$3\r\nGET\r\n$3\r\nk\xc3\xab\r\n$2\r\n12\r\n")

    def test_parse_nested(self) -> None:
        """Every reply type, nested, with its end position."""
        data = b"*5\r\n+OK\r\n:-3\r\n$3\r\na\r\n\r\n$-1\r\n*1\r\n-ERR x\r\n"
        value, end = parse_reply(data)
        self.assertEqual(end, len(data))
        self.assertEqual(value[:4], ["OK", -3, b"a\r\n", None])
        self.assertIsInstance(value[4][0], RedisError)

    def test_parse_incomplete(self) -> None:
        """A partial reply raises _Incomplete, whatever the cut."""
        data = b"*2\r\n$5\r\nhello\r\n:1\r\n"
        for cut in range(len(data)):
            with self.assertRaises(Exception) as caught:
                parse_reply(data[:cut])
            self.assertEqual(type(caught.exception).__name__, "_Incomplete")
