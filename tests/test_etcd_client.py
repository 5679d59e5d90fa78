"""The etcd v3 JSON-API client against a real etcd (one member, or a three-member cluster)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from flexgw.config.sources.etcd_client import (
    Compare,
    Delete,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Event,
    Put,
    Watch,
    WatchEnd,
    prefix_end,
)
from flexgw.testing.certs import CertificateAuthority
from flexgw.tls.contexts import SideCallTLSPolicy
from flexgw.tls.settings import CertificateKey, TLSSettings
from tests.etcdserver import start_etcd
from tests.harness import free_port


def real_reactor() -> Any:
    """The reactor trial runs (tests may use it; only tap.py imports it in flexgw itself)."""
    from twisted.internet import reactor

    return reactor


class Recorder:
    """Collects a watch's events and fires a Deferred once `count` of them have arrived."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.waiting: list[tuple[int, defer.Deferred[list[Event]]]] = []

    def __call__(self, events: list[Event], revision: int) -> None:
        """The watch's callback."""
        self.events.extend(events)
        for entry in list(self.waiting):
            count, d = entry
            if len(self.events) >= count:
                self.waiting.remove(entry)
                d.callback(self.events[:count])

    def until(self, count: int) -> defer.Deferred[list[Event]]:
        """Fires with the first `count` events (bounded by the test's own timeout)."""
        if len(self.events) >= count:
            return defer.succeed(self.events[:count])
        d: defer.Deferred[list[Event]] = defer.Deferred()
        self.waiting.append((count, d))
        return d.addTimeout(10, real_reactor())


class PrefixEndTests(TestCase):
    """range_end for a prefix: the smallest key above every key under it."""

    def test_prefix_end(self) -> None:
        """The last byte is incremented; trailing 0xff bytes are dropped first; empty: all keys."""
        self.assertEqual(prefix_end(b"/flexgw/"), b"/flexgw0")
        self.assertEqual(prefix_end(b"a\xff\xff"), b"b")
        self.assertEqual(prefix_end(b""), b"\0")


def watch_on_wire(on_events: Any, max_line: int = 1000) -> tuple[Watch, StringTransport]:
    """A Watch whose stream is connected to an in-memory transport."""
    watch = Watch(on_events, max_line)
    transport = StringTransport()
    watch.stream.makeConnection(transport)
    return watch, transport


def result_line(result: dict[str, Any]) -> bytes:
    """One watch message as etcd's gateway writes it."""
    return json.dumps({"result": result}).encode() + b"\n"


class WatchStreamTests(TestCase):
    """The watch stream's parsing, in memory: messages split anywhere, bad input ends it."""

    def test_messages_split_anywhere(self) -> None:
        """Created, then events (PUT is etcd's default type, so it is left out on the wire)
        arriving byte by byte are reported once each, in order."""
        seen: list[tuple[str, bytes, int]] = []
        watch, _ = watch_on_wire(lambda events, rev: seen.extend((e.type, e.kv.key, rev) for e in events))
        data = result_line({"header": {"revision": "7"}, "created": True}) + result_line({
            "header": {"revision": "9"},
            "events": [
                {"kv": {"key": "L2E=", "mod_revision": "8"}},
                {"type": "DELETE", "kv": {"key": "L2I=", "mod_revision": "9"}},
            ],
        })
        for i in range(len(data)):
            watch.stream.dataReceived(data[i:i + 1])
        self.assertEqual(self.successResultOf(watch.created), 7)
        self.assertEqual(seen, [("PUT", b"/a", 9), ("DELETE", b"/b", 9)])
        self.assertNoResult(watch.done)

    def test_not_json_ends_the_watch(self) -> None:
        """A line that is not JSON fails the watch and drops the connection."""
        watch, transport = watch_on_wire(lambda events, rev: None)
        watch.stream.dataReceived(b"{nope\n")
        self.failureResultOf(watch.created, EtcdError)
        self.failureResultOf(watch.done, EtcdError)
        self.assertEqual(transport.producerState, "stopped")

    def test_oversized_message_ends_the_watch(self) -> None:
        """A message longer than the bound fails the watch without waiting for its end."""
        watch, transport = watch_on_wire(lambda events, rev: None, max_line=100)
        watch.stream.dataReceived(b"x" * 101)
        self.failureResultOf(watch.created, EtcdError)
        self.failureResultOf(watch.done, EtcdError)
        self.assertEqual(transport.producerState, "stopped")

    def test_consumer_error_ends_the_watch(self) -> None:
        """An exception in the events callback fails the watch (reported, not swallowed)."""

        def broken(events: list[Event], revision: int) -> None:
            raise ValueError("consumer bug")

        watch, transport = watch_on_wire(broken)
        watch.stream.dataReceived(result_line({"created": True}))
        watch.stream.dataReceived(result_line({"events": [{"kv": {"key": "L2E="}}]}))
        self.failureResultOf(watch.done, ValueError)
        self.assertEqual(transport.producerState, "stopped")


class SingleEtcdTests(TestCase):
    """One etcd member: key/value, transactions, watch, compaction, leases."""

    async def client(self, **kwargs: Any) -> EtcdClient:
        """An etcd of this test's own and a client for it."""
        self.etcd = await start_etcd(self, real_reactor())
        return EtcdClient(real_reactor(), self.etcd.urls, timeout=5.0, **kwargs)

    async def test_range_after_txn(self) -> None:
        """Several puts in one transaction all appear at one revision in a prefix range; keys
        beside the prefix do not."""
        client = await self.client()
        await client.put(b"/other/x", b"no")
        result = await client.txn(
            compare=[Compare(b"/flexgw/a", "VERSION", "EQUAL", 0)],
            success=[Put(b"/flexgw/a", b"1"), Put(b"/flexgw/b", b"2"), Put(b"/flexgw/c/d", b"\x00\xff")],
        )
        self.assertTrue(result.succeeded)
        found = await client.range_prefix(b"/flexgw/")
        self.assertEqual(
            [(kv.key, kv.value) for kv in found.kvs],
            [(b"/flexgw/a", b"1"), (b"/flexgw/b", b"2"), (b"/flexgw/c/d", b"\x00\xff")],
        )
        self.assertEqual({kv.mod_revision for kv in found.kvs}, {result.revision})
        self.assertEqual(found.revision, result.revision)
        self.assertEqual(found.count, 3)

    async def test_txn_compare_fails(self) -> None:
        """A compare that does not hold applies the failure branch, not the success one."""
        client = await self.client()
        await client.put(b"/k", b"old")
        result = await client.txn(
            compare=[Compare(b"/k", "VALUE", "EQUAL", b"other")],
            success=[Put(b"/k", b"new")],
            failure=[Delete(b"/k")],
        )
        self.assertFalse(result.succeeded)
        self.assertEqual((await client.range(b"/k")).kvs, ())

    async def test_watch_sees_puts_and_deletes_in_order(self) -> None:
        """A prefix watch reports puts and deletes in order, each with its revision, and only
        under the prefix; cancel ends it with "cancelled"."""
        client = await self.client()
        recorder = Recorder()
        watch = await client.watch_prefix(b"/w/", recorder)
        first = await client.put(b"/w/a", b"1")
        await client.put(b"/elsewhere", b"x")
        second = await client.put(b"/w/b", b"2")
        third = await client.delete(b"/w/a")
        fourth = await client.txn(success=[Put(b"/w/c", b"3"), Delete(b"/w/b")])
        events = await recorder.until(5)
        self.assertEqual(
            [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events],
            [
                ("PUT", b"/w/a", b"1", first.revision),
                ("PUT", b"/w/b", b"2", second.revision),
                ("DELETE", b"/w/a", b"", third.revision),
                ("PUT", b"/w/c", b"3", fourth.revision),
                ("DELETE", b"/w/b", b"", fourth.revision),
            ],
        )
        self.assertEqual(watch.revision, fourth.revision)
        watch.cancel()
        self.assertEqual(await watch.done, WatchEnd("cancelled"))

    async def test_watch_from_start_revision(self) -> None:
        """A watch from an old revision replays the changes made since then."""
        client = await self.client()
        first = await client.put(b"/w/a", b"1")
        await client.put(b"/w/a", b"2")
        recorder = Recorder()
        watch = await client.watch_prefix(b"/w/", recorder, start_revision=first.revision)
        self.addCleanup(watch.cancel)
        events = await recorder.until(2)
        self.assertEqual([e.kv.value for e in events], [b"1", b"2"])

    async def test_compaction_reported(self) -> None:
        """A watch from a compacted revision ends with "compacted" and the compact revision."""
        client = await self.client()
        first = await client.put(b"/w/a", b"1")
        last = await client.put(b"/w/a", b"2")
        await client.put(b"/w/a", b"3")
        await client.compact(last.revision)
        watch = await client.watch_prefix(b"/w/", Recorder(), start_revision=first.revision)
        self.assertEqual(await watch.done, WatchEnd("compacted", last.revision))

    async def test_lease(self) -> None:
        """A key under a lease lives while the lease is kept alive and goes when it is revoked."""
        client = await self.client()
        lease, ttl = await client.lease_grant(30)
        self.assertEqual(ttl, 30)
        await client.put(b"/gateways/g1", b"up", lease=lease)
        self.assertEqual(await client.lease_keepalive(lease), 30)
        self.assertEqual((await client.range(b"/gateways/g1")).kvs[0].lease, lease)
        await client.lease_revoke(lease)
        self.assertEqual((await client.range(b"/gateways/g1")).kvs, ())
        self.assertEqual(await client.lease_keepalive(lease), 0)

    async def test_silent_endpoint_times_out(self) -> None:
        """An endpoint that accepts connections but never answers costs one timeout; the
        call and a watch then go to the next endpoint."""
        from twisted.internet.protocol import Factory, Protocol

        silent = real_reactor().listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        self.etcd = await start_etcd(self, real_reactor())
        urls = [f"http://127.0.0.1:{silent.getHost().port}", self.etcd.url]
        client = EtcdClient(real_reactor(), urls, timeout=0.5)
        await client.put(b"/t", b"1")
        self.assertEqual(client.current, 1)
        client.current = 0
        watch = await client.watch_prefix(b"/t", Recorder())
        self.addCleanup(watch.cancel)
        self.assertEqual(watch.endpoint, self.etcd.url)

    async def test_watch_stream_broken_before_created(self) -> None:
        """An endpoint that starts a watch answer and hangs up before etcd's "created" makes
        the watch move to the next endpoint."""
        from twisted.internet.protocol import Factory, Protocol

        class HangUp(Protocol):
            """Answers 200 with a chunked body, then closes."""

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                self.transport.loseConnection()

        broken = real_reactor().listenTCP(0, Factory.forProtocol(HangUp), interface="127.0.0.1")
        self.addCleanup(broken.stopListening)
        self.etcd = await start_etcd(self, real_reactor())
        urls = [f"http://127.0.0.1:{broken.getHost().port}", self.etcd.url]
        client = EtcdClient(real_reactor(), urls, timeout=2.0)
        watch = await client.watch_prefix(b"/t", Recorder())
        self.addCleanup(watch.cancel)
        self.assertEqual(watch.endpoint, self.etcd.url)

    async def test_auth(self) -> None:
        """With auth enabled, a client with the right password reads and writes (its token in
        the Authorization header); no credentials or a wrong password are refused."""
        admin = await self.client()
        await admin.call("/v3/auth/role/add", {"name": "root"})
        await admin.call("/v3/auth/user/add", {"name": "root", "password": "s3cret"})
        await admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await admin.call("/v3/auth/enable", {})
        client = EtcdClient(real_reactor(), self.etcd.urls, user="root", password="s3cret")
        await client.put(b"/a", b"1")
        self.assertEqual((await client.range(b"/a")).kvs[0].value, b"1")
        self.assertIsNotNone(client.token)
        recorder = Recorder()
        watch = await client.watch_prefix(b"/a", recorder)
        self.addCleanup(watch.cancel)
        await client.put(b"/a", b"2")
        self.assertEqual((await recorder.until(1))[0].kv.value, b"2")
        client.token = "not-a-token"  # an expired token is renewed once, for a call...
        self.assertEqual((await client.range(b"/a")).kvs[0].value, b"2")
        client.token = "not-a-token"  # ... and for a watch (etcd refuses it at creation)
        later = Recorder()
        second = await client.watch_prefix(b"/a", later)
        self.addCleanup(second.cancel)
        await client.put(b"/a", b"3")
        self.assertEqual((await later.until(1))[0].kv.value, b"3")
        with self.assertRaises(EtcdError):
            await admin.range(b"/a")
        wrong = EtcdClient(real_reactor(), self.etcd.urls, user="root", password="nope")
        with self.assertRaises(EtcdError) as raised:
            await wrong.range(b"/a")
        self.assertIn("authentication failed", str(raised.exception))


class TLSEtcdTests(TestCase):
    """etcd serving https and requiring a client certificate."""

    async def test_client_certificate(self) -> None:
        """A client trusting the CA and presenting a client certificate reads and writes and
        watches; one without a client certificate is refused by every endpoint."""
        ca = CertificateAuthority()
        directory = self.mktemp()
        server_crt, server_key = ca.issue(
            "127.0.0.1", ips=["127.0.0.1"], server_and_client=True
        ).write(directory, "server")
        issued = ca.issue("flexgw", client=True)
        etcd = await start_etcd(self, real_reactor(), extra=(
            "--cert-file", server_crt, "--key-file", server_key,
            "--trusted-ca-file", ca.write(directory), "--client-cert-auth",
        ))
        self.assertTrue(etcd.url.startswith("https://"))

        def policy(client: bool) -> SideCallTLSPolicy:
            """Trust the CA; present the client certificate when `client`."""
            certificate = CertificateKey((issued.cert_pem,), issued.key_pem) if client else None
            return SideCallTLSPolicy(
                TLSSettings(certificate=certificate, trusted_ca=(ca.pem,), alpn=("http/1.1",))
            )

        client = EtcdClient(real_reactor(), etcd.urls, tls_policy=policy(True))
        recorder = Recorder()
        watch = await client.watch_prefix(b"/s/", recorder)
        self.addCleanup(watch.cancel)
        await client.put(b"/s/a", b"1")
        self.assertEqual((await recorder.until(1))[0].kv.value, b"1")
        self.assertEqual((await client.range_prefix(b"/s/")).kvs[0].value, b"1")
        anonymous = EtcdClient(real_reactor(), etcd.urls, tls_policy=policy(False), timeout=2.0)
        with self.assertRaises(EtcdUnavailable):
            await anonymous.range(b"/s/a")


class UnreachableTests(TestCase):
    """No etcd at all: a clear EtcdUnavailable naming every endpoint."""

    async def test_unavailable(self) -> None:
        """Two closed ports: the call fails with both endpoints and their reasons."""
        urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
        client = EtcdClient(real_reactor(), urls, timeout=2.0)
        with self.assertRaises(EtcdUnavailable) as raised:
            await client.range(b"/a")
        self.assertEqual([url for url, _ in raised.exception.reasons], urls)
        with self.assertRaises(EtcdUnavailable):
            await client.watch_prefix(b"/a", Recorder())


class ClusterTests(TestCase):
    """A three-member etcd cluster on loopback with one member killed."""

    async def test_failover(self) -> None:
        """With the member it used killed, the client moves to the next endpoint for calls and
        a new watch resumes from the last revision seen without missing a change."""
        cluster = await start_etcd(self, real_reactor(), size=3)
        # The client lists two followers first and kills the first: the cluster keeps its
        # leader, so no election makes the next member's answer depend on timing.
        leaders = set()
        for url in cluster.urls:
            status = await EtcdClient(real_reactor(), [url]).call("/v3/maintenance/status", {})
            leaders.add(status["leader"])
            if status["header"]["member_id"] == status["leader"]:
                leader = cluster.urls.index(url)
        self.assertEqual(len(leaders), 1)
        order = [i for i in range(3) if i != leader] + [leader]
        urls = [cluster.urls[i] for i in order]
        client = EtcdClient(real_reactor(), urls, timeout=3.0)
        recorder = Recorder()
        watch = await client.watch_prefix(b"/f/", recorder)
        self.assertEqual(watch.endpoint, urls[0])
        await client.put(b"/f/a", b"1")
        await recorder.until(1)
        await cluster.kill(order[0])
        with self.assertRaises(ConnectionLost):
            await watch.done  # the stream broke with its member
        written = await client.put(b"/f/b", b"2")  # made while no watch runs
        self.assertEqual(client.endpoints[client.current], urls[1])
        resumed = await client.watch_prefix(b"/f/", recorder, start_revision=watch.revision + 1)
        self.addCleanup(resumed.cancel)
        self.assertEqual(resumed.endpoint, urls[1])
        events = await recorder.until(2)
        self.assertEqual([(e.kv.key, e.kv.mod_revision) for e in events][1], (b"/f/b", written.revision))
        found = await client.range_prefix(b"/f/")
        self.assertEqual([kv.value for kv in found.kvs], [b"1", b"2"])
