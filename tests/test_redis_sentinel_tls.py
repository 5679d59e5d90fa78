"""`sharedStorage.redis.sentinel` and `.tls`: config, and the client against real redis-server
processes (sentinels, failover, TLS with and without client certificates), through the gateway."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.plan import RedisSentinel
from flexgw.storage.interfaces import RateLimit
from flexgw.storage.redis import RedisClient, RedisError, RedisRateLimitStore, RedisUnavailable
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority
from flexgw.testing.upstream import RecordingUpstream
from flexgw.tls.contexts import client_creator
from flexgw.tls.settings import parse_tls
from tests.harness import Gateway, free_port
from tests.redisserver import RedisSentinelServer, RedisServer
from tests.test_policy_rate_limiting import api_file
from tests.test_rate_limiting_redis import rate_limit, storage_document

ONE_PER_MINUTE = (RateLimit(1, 60000),)
MASTER = "flexmaster"


def start(case: TestCase, server: RedisServer) -> RedisServer:
    """Start a server for this test, stopped in cleanup."""
    case.addCleanup(server.stop)
    return server.start()


def plain_client(case: TestCase, port: int) -> RedisClient:
    """An admin client to 127.0.0.1:port (plaintext), closed in cleanup."""
    admin = RedisClient(reactor, "127.0.0.1", port)
    case.addCleanup(admin.close)
    return admin


def sentinel_client(case: TestCase, *ports: int, password: str | None = None, **options: Any) -> RedisClient:
    """A client that finds MASTER through the sentinels on `ports` (in that order)."""
    sentinel = RedisSentinel(MASTER, tuple(("127.0.0.1", port) for port in ports), password)
    redis = RedisClient(reactor, "", 0, sentinel=sentinel, min_backoff=0.0, **options)
    case.addCleanup(redis.close)
    return redis


class SentinelConfigTests(TestCase):
    """`sharedStorage.redis.sentinel` and `.tls` become the plan's SharedStorage, or located errors."""

    def load(self, redis: str) -> Any:
        """Load one Configuration document; return the ConfigState."""
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "c.yaml"), "w", encoding="utf-8") as handle:
            handle.write(storage_document(redis))
        return load_config([root], {})

    def problems(self, state: Any) -> list[tuple[str, int, int, str]]:
        """(severity, line, column, message) of every problem."""
        return [(p.severity, p.line, p.column, p.message) for p in state.plan.problems]

    def test_sentinel_keys(self) -> None:
        """masterName, addresses (port defaulting to 26379) and password are read."""
        state = self.load(
            "sentinel:\n  masterName: mymaster\n  addresses: ['s1:26380', s2, '[::1]:5']\n"
            "  password: sp\npassword: mp\n"
        )
        storage = state.plan.shared_storage
        self.assertEqual(
            storage.sentinel,
            RedisSentinel("mymaster", (("s1", 26380), ("s2", 26379), ("::1", 5)), "sp"),
        )
        self.assertEqual((storage.password, storage.tls), ("mp", None))
        self.assertEqual(self.problems(state), [])

    def test_sentinel_beats_address(self) -> None:
        """With both, the sentinel is used and address is ignored with a warning at its key."""
        state = self.load("address: r:1\nsentinel: {addresses: [s:1], masterName: m}\n")
        self.assertEqual(state.plan.shared_storage.sentinel, RedisSentinel("m", (("s", 1),)))
        [(severity, line, column, message)] = self.problems(state)
        self.assertEqual((severity, line, column), ("warning", 7, 7))
        self.assertIn("address is ignored", message)

    def test_malformed_sentinel(self) -> None:
        """Each malformed sentinel field is an error at its line and column; Redis is not used."""
        cases = {
            "sentinel: {addresses: [s:1]}\n": (7, 7),  # no masterName: at the sentinel key
            "sentinel: {masterName: m, addresses: []}\n": (7, 33),
            "sentinel:\n  masterName: m\n  addresses: [ok, 'bad:port']\n": (9, 25),  # the item
            "sentinel: [s:1]\n": (7, 7),
            "sentinel: {masterName: m, addresses: [s], password: {a: 1}}\n": (7, 49),
        }
        for redis, where in cases.items():
            state = self.load(redis)
            self.assertIsNone(state.plan.shared_storage, redis)
            errors = [p[1:3] for p in self.problems(state) if p[0] == "error"]
            self.assertEqual(errors, [where], redis)

    def test_tls_block(self) -> None:
        """tls is parsed as tls-outbound (camelCase versions accepted); skipValidation warns."""
        ca = CertificateAuthority()
        state = self.load(
            "address: r:1\ntls:\n  trustedCA: |\n"
            + "".join(f"    {line}\n" for line in ca.pem.decode().splitlines())
            + "  minVersion: '1.3'\n  alpn: [http/1.1]\n"
        )
        tls = state.plan.shared_storage.tls
        self.assertEqual((tls.trusted_ca, tls.min_version), ((ca.pem,), (1, 3)))
        self.assertEqual(self.problems(state), [])
        state = self.load("address: r:1\ntls: {skipValidation: true}\n")
        self.assertTrue(state.plan.shared_storage.tls.skip_validation)
        [(severity, line, _, message)] = self.problems(state)
        self.assertEqual((severity, line), ("warning", 8))
        self.assertIn("not verified", message)

    def test_tls_files_are_watched(self) -> None:
        """A trustedCA given as a file:// reference is among the plan's watched TLS files."""
        ca_file = os.path.abspath(CertificateAuthority().write(self.mktemp()))
        state = self.load(f"address: r:1\ntls: {{trustedCA: 'file://{ca_file}'}}\n")
        self.assertIsNotNone(state.plan.shared_storage)
        self.assertIn(ca_file, state.plan.tls_files)

    def test_malformed_tls(self) -> None:
        """A bad trustedCA, an excluded cipher or a bad version is an error at its field."""
        cases = {
            "tls: {trustedCA: 'not pem'}\n": (8, 24),
            "tls:\n  ciphers: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_RSA_WITH_NULL_SHA]\n": (9, 58),
            "tls: {maxversion: '2.0'}\n": (8, 25),
            "tls: {skipValidation: 'yes'}\n": (8, 29),
            "tls: {certificate: {crt: 'file:///nonexistent.crt', key: x}}\n": (8, 32),
        }
        for redis, where in cases.items():
            state = self.load("address: r:1\n" + redis)
            self.assertIsNone(state.plan.shared_storage, redis)
            errors = [p[1:3] for p in self.problems(state) if p[0] == "error"]
            self.assertEqual(errors, [where], redis)


class SentinelClientTests(TestCase):
    """The client finds the master through real sentinels and follows a failover."""

    def setUp(self) -> None:
        """A master and a sentinel monitoring it."""
        self.master = start(self, RedisServer())
        self.sentinel = start(self, RedisSentinelServer(MASTER, self.master.port))

    async def test_first_sentinel_that_answers(self) -> None:
        """A dead sentinel listed first is skipped; the hit lands in the master it named."""
        redis = sentinel_client(self, free_port(), self.sentinel.port)
        store = RedisRateLimitStore(redis, Clock(), "s:")
        self.assertTrue((await store.hit("k", ONE_PER_MINUTE)).allowed)
        self.assertFalse((await store.hit("k", ONE_PER_MINUTE)).allowed)
        self.assertEqual(redis.master, ("127.0.0.1", self.master.port))
        self.assertEqual(await plain_client(self, self.master.port).execute("EXISTS", "s:k"), 1)

    async def test_unknown_master(self) -> None:
        """No sentinel knows the name: unavailable, naming every sentinel asked."""
        dead = free_port()
        redis = RedisClient(
            reactor, "", 0, sentinel=RedisSentinel("nope", (("127.0.0.1", dead), ("127.0.0.1", self.sentinel.port)))
        )
        self.addCleanup(redis.close)
        with self.assertRaises(RedisUnavailable) as caught:
            await redis.execute("PING")
        message = str(caught.exception)
        self.assertIn("no sentinel named master 'nope'", message)
        self.assertIn(f"127.0.0.1:{dead}: ", message)
        self.assertIn(f"127.0.0.1:{self.sentinel.port}: does not know master", message)

    async def test_failover_readonly(self) -> None:
        """The master becomes a replica of a new one the sentinel now names: the write refused
        with READONLY is sent again to the new master, and the request is counted there."""
        redis = sentinel_client(self, self.sentinel.port)
        store = RedisRateLimitStore(redis, Clock(), "f:")
        self.assertTrue((await store.hit("old", ONE_PER_MINUTE)).allowed)
        first = redis._protocol
        new = start(self, RedisServer())
        old_admin = plain_client(self, self.master.port)
        await old_admin.execute("REPLICAOF", "127.0.0.1", new.port)
        sentinel_admin = plain_client(self, self.sentinel.port)
        await sentinel_admin.execute("SENTINEL", "REMOVE", MASTER)
        await sentinel_admin.execute("SENTINEL", "MONITOR", MASTER, "127.0.0.1", new.port, 1)
        self.assertTrue((await store.hit("new", ONE_PER_MINUTE)).allowed)
        self.assertEqual(redis.master, ("127.0.0.1", new.port))
        self.assertIsNot(redis._protocol, first)
        self.assertEqual(await plain_client(self, new.port).execute("EXISTS", "f:new"), 1)
        self.assertEqual(redis.connections, 2)

    async def test_failover_connection_lost(self) -> None:
        """The master dies and the sentinel names another: the next command reaches it."""
        redis = sentinel_client(self, self.sentinel.port)
        await redis.execute("SET", "a", "1")
        new = start(self, RedisServer())
        sentinel_admin = plain_client(self, self.sentinel.port)
        await sentinel_admin.execute("SENTINEL", "REMOVE", MASTER)
        await sentinel_admin.execute("SENTINEL", "MONITOR", MASTER, "127.0.0.1", new.port, 1)
        lost = redis._protocol.lost
        self.master.stop()
        await lost
        self.assertEqual(await redis.execute("SET", "b", "2"), "OK")
        self.assertEqual(redis.master, ("127.0.0.1", new.port))
        self.assertEqual(await plain_client(self, new.port).execute("GET", "b"), b"2")

    async def test_named_server_is_a_replica(self) -> None:
        """A sentinel naming a server that says ROLE slave: unavailable (no write goes there)."""
        replica = start(self, RedisServer(extra=("--replicaof", "127.0.0.1", str(self.master.port))))
        sentinel_admin = plain_client(self, self.sentinel.port)
        await sentinel_admin.execute("SENTINEL", "REMOVE", MASTER)
        await sentinel_admin.execute("SENTINEL", "MONITOR", MASTER, "127.0.0.1", replica.port, 1)
        redis = sentinel_client(self, self.sentinel.port)
        with self.assertRaises(RedisUnavailable) as caught:
            await redis.execute("SET", "a", "1")
        self.assertIn("is not a master", str(caught.exception))


class FixedAddressReadonlyTests(TestCase):
    """Without sentinels, a READONLY reply is an error like any other: the connection is kept."""

    async def test_replica_address_keeps_connection(self) -> None:
        """`address` naming a replica: the write fails with READONLY, no reconnection happens."""
        master = start(self, RedisServer())
        replica = start(self, RedisServer(extra=("--replicaof", "127.0.0.1", str(master.port))))
        redis = RedisClient(reactor, "127.0.0.1", replica.port)
        self.addCleanup(redis.close)
        with self.assertRaises(RedisError) as caught:
            await redis.execute("SET", "k", "v")
        self.assertTrue(str(caught.exception).startswith("READONLY"))
        self.assertEqual(await redis.execute("PING"), "PONG")
        self.assertEqual(redis.connections, 1)


class SentinelFailoverTests(TestCase):
    """A failover done by a real sentinel, promoting a real replica."""

    async def test_master_dies_and_sentinel_promotes_the_replica(self) -> None:
        """The master is killed: checks fail (Redis down) until `SENTINEL FAILOVER` promotes the
        replica; then the probe finds the new master through the sentinel, and the counts
        made before the failover (replicated) still hold."""
        old = start(self, RedisServer(extra=("--repl-diskless-sync-delay", "0")))
        replica = RedisServer(extra=("--replicaof", "127.0.0.1", str(old.port)))
        replica.ready = b"MASTER <-> REPLICA sync: Finished with success"
        start(self, replica)
        sentinel = start(self, RedisSentinelServer(MASTER, old.port))
        sentinel.wait_for(f"+slave slave 127.0.0.1:{replica.port}".encode())  # it knows the replica
        redis = sentinel_client(self, sentinel.port)
        store = RedisRateLimitStore(redis, Clock(), "fo:")
        self.assertTrue((await store.hit("k", (RateLimit(2, 60000),))).allowed)
        await redis.execute("WAIT", 1, 1000)  # the count reached the replica
        lost = redis._protocol.lost
        old.stop()
        await lost
        with self.assertRaises(RedisUnavailable):
            await store.hit("k", (RateLimit(2, 60000),))
        self.assertEqual(
            await plain_client(self, sentinel.port).execute("SENTINEL", "FAILOVER", MASTER), "OK"
        )
        sentinel.wait_for(b"+switch-master", timeout=30)
        await redis.when_up()  # the breaker's probe found the new master through the sentinel
        result = await store.hit("k", (RateLimit(2, 60000),))
        self.assertEqual((result.allowed, result.quotas[0].remaining), (True, 0))
        self.assertEqual(redis.master, ("127.0.0.1", replica.port))
        self.assertFalse((await store.hit("k", (RateLimit(2, 60000),))).allowed)


class SentinelPasswordTests(TestCase):
    """A sentinel with requirepass: the sentinel password is sent to it, not the master's."""

    async def test_sentinel_password(self) -> None:
        """The right password finds the master; a wrong one is refused with the sentinel's reason."""
        master = start(self, RedisServer())
        sentinel = start(self, RedisSentinelServer(MASTER, master.port, password="sent1nel"))
        redis = sentinel_client(self, sentinel.port, password="sent1nel")
        self.assertEqual(await redis.execute("PING"), "PONG")
        wrong = sentinel_client(self, sentinel.port, password="wrong")
        with self.assertRaises(RedisUnavailable) as caught:
            await wrong.execute("PING")
        self.assertIn("WRONGPASS", str(caught.exception))


class TLSCase(TestCase):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, written to files."""

    def setUp(self) -> None:
        """Issue and write the certificates."""
        self.ca = CertificateAuthority()
        self.dir = os.path.abspath(self.mktemp())
        ca_file = self.ca.write(self.dir)
        cert, key = self.ca.issue("redis", ips=["127.0.0.1"]).write(self.dir, "server")
        self.server_files = (cert, key, ca_file)
        self.client_cert, self.client_key = self.ca.issue("gw", client=True).write(self.dir, "client")
        self.ca_file = ca_file

    def tls_client(self, port: int, config: dict[str, Any], **options: Any) -> RedisClient:
        """A client with the given tls block (parsed as the config does)."""
        settings = parse_tls(config, outbound=True)
        redis = RedisClient(
            reactor, "127.0.0.1", port, tls=lambda host: client_creator(settings, host), **options
        )
        self.addCleanup(redis.close)
        return redis


class TLSClientTests(TLSCase):
    """The client over TLS to a real TLS redis-server (and sentinel)."""

    async def test_trusted_ca(self) -> None:
        """Verified against trustedCA (IP SAN 127.0.0.1): commands work."""
        server = start(self, RedisServer(tls=self.server_files))
        redis = self.tls_client(server.port, {"trustedCA": f"file://{self.ca_file}"})
        self.assertEqual(await redis.execute("SET", "k", "v"), "OK")
        self.assertEqual(redis.connections, 1)

    async def test_untrusted_ca_refused_and_backs_off(self) -> None:
        """A server certificate from another CA fails the connection attempt: Redis is down."""
        server = start(self, RedisServer(tls=self.server_files))
        other = CertificateAuthority("other CA")
        redis = self.tls_client(server.port, {"trustedCA": other.pem.decode()}, min_backoff=60.0)
        with self.assertRaises(RedisUnavailable) as caught:
            await redis.execute("PING")
        self.assertIn("certificate verify failed", str(caught.exception))
        self.assertEqual(redis.connections, 0)
        self.assertTrue(redis.breaker.down)  # a failed attempt: commands fail at once

    async def test_certificate_for_another_host_refused(self) -> None:
        """Signed by the trusted CA but issued for 127.0.0.2: refused for 127.0.0.1 (the
        certificate is checked against the host connected to); skipValidation accepts it."""
        cert, key = self.ca.issue("elsewhere", ips=["127.0.0.2"]).write(self.dir, "elsewhere")
        server = start(self, RedisServer(tls=(cert, key, self.ca_file)))
        redis = self.tls_client(server.port, {"trustedCA": f"file://{self.ca_file}"})
        with self.assertRaises(RedisUnavailable):
            await redis.execute("PING")
        self.assertEqual(redis.connections, 0)
        unverified = self.tls_client(server.port, {"skipValidation": True})
        self.assertEqual(await unverified.execute("PING"), "PONG")

    async def test_skip_validation(self) -> None:
        """skipValidation accepts the certificate of an unknown CA."""
        server = start(self, RedisServer(tls=self.server_files))
        redis = self.tls_client(server.port, {"skipValidation": True})
        self.assertEqual(await redis.execute("PING"), "PONG")

    async def test_mutual_tls(self) -> None:
        """A server requiring client certificates accepts ours and refuses a client without."""
        server = start(self, RedisServer(tls=self.server_files, client_certificates=True))
        certificate = {"crt": f"file://{self.client_cert}", "key": f"file://{self.client_key}"}
        trusted = f"file://{self.ca_file}"
        redis = self.tls_client(server.port, {"trustedCA": trusted, "certificate": certificate})
        self.assertEqual(await redis.execute("PING"), "PONG")
        anonymous = self.tls_client(server.port, {"trustedCA": trusted})
        with self.assertRaises(RedisUnavailable):
            await anonymous.execute("PING")

    async def test_sentinel_and_master_over_tls(self) -> None:
        """With sentinel and tls, the sentinel and the master are both spoken to over TLS."""
        master = start(self, RedisServer(tls=self.server_files))
        sentinel = start(self, RedisSentinelServer(MASTER, master.port, tls=self.server_files))
        settings = parse_tls({"trustedCA": f"file://{self.ca_file}"}, outbound=True)
        redis = sentinel_client(
            self, sentinel.port, tls=lambda host: client_creator(settings, host)
        )
        self.assertEqual(await redis.execute("SET", "k", "v"), "OK")
        self.assertEqual(redis.master, ("127.0.0.1", master.port))


class GatewayTests(TLSCase):
    """Gateways configured with sentinel / tls share a quota, and obey blockOnUnknownQuota."""

    def setUp(self) -> None:
        """Certificates and a recording upstream."""
        super().setUp()
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)

    def gateway(self, storage: str, config: str) -> int:
        """A started gateway with this sharedStorage.redis YAML; its port."""
        port = free_port()
        gateway = Gateway(
            self,
            {
                "api.yaml": api_file(port, self.upstream.address[1], config),
                "storage.yaml": storage_document(storage),
            },
        )
        gateway.start()
        runtime = gateway.service.runtime
        self.assertIsInstance(runtime.redis, RedisClient)
        self.addCleanup(runtime.redis.close)
        return port

    async def get(self, port: int) -> int:
        """One GET through the gateway on `port`; its status."""
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        return response.status

    async def test_quota_through_sentinel(self) -> None:
        """Two gateways finding the master through a sentinel admit exactly the quota together."""
        master = start(self, RedisServer())
        sentinel = start(self, RedisSentinelServer(MASTER, master.port))
        storage = f"sentinel:\n  masterName: {MASTER}\n  addresses: ['127.0.0.1:{sentinel.port}']\n"
        one = self.gateway(storage, rate_limit(2))
        two = self.gateway(storage, rate_limit(2))
        statuses = [await self.get(port) for port in (one, two, one, two)]
        self.assertEqual(statuses, [200, 200, 429, 429])
        self.assertEqual(len(self.upstream.received), 2)
        keys = await plain_client(self, master.port).execute("KEYS", "flexgw:rl:*")
        self.assertEqual(len(keys), 1)

    async def test_quota_over_mutual_tls(self) -> None:
        """tls with trustedCA and a client certificate, to a server requiring one: quota kept."""
        server = start(self, RedisServer(tls=self.server_files, client_certificates=True))
        storage = (
            f"address: 127.0.0.1:{server.port}\ntls:\n  trustedCA: file://{self.ca_file}\n"
            f"  certificate: {{crt: 'file://{self.client_cert}', key: 'file://{self.client_key}'}}\n"
        )
        port = self.gateway(storage, rate_limit(2))
        self.assertEqual([await self.get(port) for _ in range(3)], [200, 200, 429])
        self.assertEqual(len(self.upstream.received), 2)

    async def test_untrusted_ca_follows_block_on_unknown_quota(self) -> None:
        """The server's CA is not trusted: 429 with blockOnUnknownQuota, 200 without."""
        server = start(self, RedisServer(tls=self.server_files))
        other = self.ca.__class__("other CA").write(self.dir, "other")
        storage = f"address: 127.0.0.1:{server.port}\ntls:\n  trustedCA: file://{other}\n"
        blocking = self.gateway(storage, rate_limit(5, block=True))
        self.assertEqual(await self.get(blocking), 429)
        passing = self.gateway(storage, rate_limit(5, block=False))
        self.assertEqual(await self.get(passing), 200)
        self.assertEqual(len(self.upstream.received), 1)
        self.flushLoggedErrors()
