"""Service names re-resolved on their records' TTL: flexgw.upstream.dns.RecordResolver against
a real DNS server on loopback (flexgw.testing.dns), and a cluster's refresh bounded by
dnsMinRefreshSeconds/dnsMaxRefreshSeconds, the last good set kept on SERVFAIL and timeouts."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from flexgw.plan import Balancing, Upstream
from flexgw.testing.cluster import load
from flexgw.testing.dns import SERVFAIL, SILENT, ZoneServer
from flexgw.upstream.dns import Answer, RecordResolver, ResolvConf
from flexgw.upstream.manager import PoolManager
from tests.test_upstream_cluster import NAME, ClusterCase

#: Query timeout of the tests' resolvers: one try of 0.3 s (a silent server fails fast).
TIMEOUT = (0.3,)


class ResolvConfTests(SynchronousTestCase):
    """What flexgw reads of resolv.conf and the names it queries."""

    def test_parse(self) -> None:
        """Nameservers, the last search line, ndots; comments ignored; no nameserver: the
        local one."""
        conf = ResolvConf.parse(
            "# comment\nnameserver 10.0.0.1\nnameserver 10.0.0.2 ; x\ndomain a.example\n"
            "search ns.svc.cluster.local svc.cluster.local.\noptions ndots:5 timeout:1\n"
        )
        self.assertEqual(conf.servers, (("10.0.0.1", 53), ("10.0.0.2", 53)))
        self.assertEqual(conf.search, ("ns.svc.cluster.local", "svc.cluster.local"))
        self.assertEqual(conf.ndots, 5)
        self.assertEqual(ResolvConf.parse("").servers, (("127.0.0.1", 53),))

    def test_candidates(self) -> None:
        """Fewer dots than ndots: the search domains first (a Kubernetes short name);
        enough dots: the name first; a trailing dot: the name only."""
        conf = ResolvConf(search=("ns.svc", "svc"), ndots=2)
        self.assertEqual(conf.candidates("api"), ["api.ns.svc", "api.svc", "api"])
        self.assertEqual(conf.candidates("a.b.c"), ["a.b.c", "a.b.c.ns.svc", "a.b.c.svc"])
        self.assertEqual(conf.candidates("a.b."), ["a.b"])


class DNSServerMixin:
    """A real DNS server on loopback and a RecordResolver asking it."""

    def start_dns(self: Any, hosts: str = "", origin: str = "flexgw.test") -> None:
        """Start the server (stopped at cleanup) and a resolver (`hosts`: its hosts file)."""
        self.dns = ZoneServer(reactor, origin)
        self.addCleanup(self.dns.stop)
        hosts_path = self.mktemp()
        with open(hosts_path, "w") as f:
            f.write(hosts)
        self.records = RecordResolver(
            reactor, servers=[self.dns.address], hosts=hosts_path, timeout=TIMEOUT
        )


class RecordResolverTests(DNSServerMixin, TestCase):
    """RecordResolver against twisted.names' server on loopback."""

    def setUp(self) -> None:
        """The server and a resolver with a hosts file naming one host."""
        self.start_dns(hosts="127.0.0.9 pinned.flexgw.test # pinned\n")

    @inlineCallbacks
    def test_a_records_with_ttl(self) -> Any:
        """A records: their addresses and the smallest TTL; AAAA asked too."""
        self.dns.set("api.flexgw.test", ["127.0.0.2", "127.0.0.3"], ttl=7)
        answer = yield self.records.resolve_addresses("api.flexgw.test")
        self.assertEqual(answer, Answer(("127.0.0.2", "127.0.0.3"), 7.0))
        self.assertEqual(
            sorted(self.dns.queries), [("api.flexgw.test", dns.A), ("api.flexgw.test", dns.AAAA)]
        )

    @inlineCallbacks
    def test_ipv6_only_and_ipv4_preferred(self) -> Any:
        """AAAA records alone: the IPv6 addresses; both kinds: the IPv4 ones."""
        self.dns.set("six.flexgw.test", ["::1"], ttl=3)
        answer = yield self.records.resolve_addresses("six.flexgw.test")
        self.assertEqual(answer, Answer(("::1",), 3.0))
        self.dns.set("both.flexgw.test", ["::1", "127.0.0.4"], ttl=3)
        answer = yield self.records.resolve_addresses("both.flexgw.test")
        self.assertEqual(answer, Answer(("127.0.0.4",), 3.0))

    @inlineCallbacks
    def test_cname_smallest_ttl(self) -> Any:
        """A CNAME to a name of the zone: the target's addresses, the smaller of both TTLs."""
        self.dns.set("target.flexgw.test", ["127.0.0.5"], ttl=30)
        self.dns.set_cname("alias.flexgw.test", "target.flexgw.test", ttl=4)
        answer = yield self.records.resolve_addresses("alias.flexgw.test")
        self.assertEqual(answer, Answer(("127.0.0.5",), 4.0))

    @inlineCallbacks
    def test_hosts_file_first_without_ttl(self) -> Any:
        """A name in the hosts file: its address, no TTL, no query sent."""
        self.dns.set("pinned.flexgw.test", ["127.0.0.2"], ttl=7)
        answer = yield self.records.resolve_addresses("pinned.flexgw.test")
        self.assertEqual(answer, Answer(("127.0.0.9",), None))
        self.assertEqual(self.dns.queries, [])

    @inlineCallbacks
    def test_failures(self) -> Any:
        """No such name, a name without address records, SERVFAIL and a silent server (the
        query times out) all fail with DNSLookupError naming the name."""
        self.dns.set("empty.flexgw.test", [], ttl=7)
        for name, mode in (
            ("missing.flexgw.test", None),
            ("empty.flexgw.test", None),
            ("api.flexgw.test", SERVFAIL),
            ("api.flexgw.test", SILENT),
        ):
            if mode is not None:
                self.dns.set_mode(mode)
            with self.assertRaises(DNSLookupError) as caught:
                yield self.records.resolve_addresses(name)
            self.assertIn(name, str(caught.exception))


class ClusterTTLTests(DNSServerMixin, TestCase):
    """A cluster's name re-resolved on the TTL (the cluster's timers on a memory clock, the
    queries to the real server)."""

    def setUp(self) -> None:
        """The server, and a pool manager on a memory clock whose connections go nowhere."""
        self.start_dns()
        self.clock = Clock()

        class Reactor:
            def connectTCP(self, host: str, port: int, factory: Any, timeout: float) -> Any:
                return None

        self.manager = PoolManager(Reactor(), self.clock, self.records)  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.upstream = Upstream(
            key="default/api",
            scheme="http",
            host="api.flexgw.test",
            port=8080,
            balancing=Balancing(dns_refresh=9.0, dns_min_refresh=2.0, dns_max_refresh=60.0),
        )

    def answered(self) -> Deferred[None]:
        """Fires once the cluster has taken the answer of its resolution under way."""
        done: Deferred[None] = Deferred()
        lookup = self.manager.clusters[self.upstream].lookup
        self.assertIsNotNone(lookup, "no resolution under way")
        lookup.addBoth(lambda result: done.callback(None) or result)
        return done

    def addresses(self) -> list[str]:
        """The cluster's addresses now."""
        return sorted(host for host, _ in self.manager.clusters[self.upstream].members)

    def next_resolution(self) -> float:
        """In how many seconds the cluster resolves again."""
        timer = self.manager.clusters[self.upstream].resolve_timer
        return float(timer.getTime() - self.clock.seconds())

    @inlineCallbacks
    def test_refresh_follows_ttl_within_bounds(self) -> Any:
        """Asked again after the TTL (7 s, not dnsRefreshSeconds 9); a changed answer replaces
        the set; a TTL under dnsMinRefreshSeconds waits the minimum, one over
        dnsMaxRefreshSeconds the maximum."""
        self.dns.set("api.flexgw.test", ["127.0.0.2", "127.0.0.3"], ttl=7)
        self.manager.pick(self.upstream)
        yield self.answered()
        self.assertEqual(self.addresses(), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(self.next_resolution(), 7.0)
        self.dns.set("api.flexgw.test", ["127.0.0.4"], ttl=1)
        self.clock.advance(6.9)
        self.assertEqual(len(self.dns.queries), 2)  # (A and AAAA once)
        self.clock.advance(0.1)
        yield self.answered()
        self.assertEqual(self.addresses(), ["127.0.0.4"])
        self.assertEqual(self.next_resolution(), 2.0)  # TTL 1 below the 2 s minimum
        self.dns.set("api.flexgw.test", ["127.0.0.4"], ttl=86400)
        self.clock.advance(2)
        yield self.answered()
        self.assertEqual(self.next_resolution(), 60.0)  # TTL a day above the 60 s maximum

    @inlineCallbacks
    def test_servfail_and_timeout_keep_last_good_set(self) -> Any:
        """SERVFAIL, then a server that does not answer: the last good set keeps serving,
        with a warning naming the error, asked again after 0.5 then 1 s (the backoff); an
        answer again restores the TTL's refresh."""
        self.dns.set("api.flexgw.test", ["127.0.0.2", "127.0.0.3"], ttl=5)
        self.manager.pick(self.upstream)
        yield self.answered()
        self.dns.set_mode(SERVFAIL)
        self.clock.advance(5)
        yield self.answered()
        self.assertEqual(self.addresses(), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(self.next_resolution(), 0.5)
        warned = [e for e in self.events if "Name lookup" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        self.assertIn("keeping its last 2 address(es)", warned[0]["note"])
        self.dns.set_mode(SILENT)
        self.clock.advance(0.5)
        yield self.answered()  # after the resolver's 0.3 s query timeout
        self.assertEqual(self.addresses(), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(self.next_resolution(), 1.0)
        self.dns.set_mode("answer")
        self.dns.set("api.flexgw.test", ["127.0.0.3"], ttl=4)
        self.clock.advance(1)
        yield self.answered()
        self.assertEqual(self.addresses(), ["127.0.0.3"])
        self.assertEqual(self.next_resolution(), 4.0)

    @inlineCallbacks
    def test_retired_cluster_ignores_its_lookup(self) -> Any:
        """A Service leaving the configuration mid-resolution: when the server's answer
        comes, the cluster takes no address and sets no timer."""
        self.dns.set("api.flexgw.test", ["127.0.0.2"], ttl=5)
        self.manager.pick(self.upstream)
        cluster = self.manager.clusters[self.upstream]
        self.manager.configure(self.manager.http, self.manager.timeouts, set())
        # The same question again shares the outstanding query: it fires after that answer.
        answer = yield self.records.resolve_addresses("api.flexgw.test")
        self.assertEqual(answer.addresses, ("127.0.0.2",))
        self.assertEqual(cluster.members, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])


class GatewayTTLTests(DNSServerMixin, ClusterCase):
    """A gateway's Service follows its DNS record on the record's TTL."""

    async def test_requests_follow_the_record(self) -> None:
        """`orders.test` has TTL 1 and dnsRefreshSeconds is an hour: requests go to the first
        record's address, and after the record changes, once the TTL has run out, to the new
        one (resolved again about 1 s after the first answer, not after an hour)."""
        self.start_dns(origin="test")
        self.dns.set(NAME, ["127.0.0.2"], ttl=1)
        gateway, upstreams, port = self.start(
            extra="  loadBalancer:\n    dnsRefreshSeconds: 3600\n    dnsMinRefreshSeconds: 0.1\n"
        )
        gateway.service.pools.name_resolver = self.records  # (resolved on the first request)
        self.assertEqual(await load(reactor, port, 6, 2), {200: 6})
        self.assertEqual(upstreams.counts(), [6, 0, 0])
        [cluster] = gateway.service.pools.clusters.values()
        first = reactor.seconds()
        self.dns.set(NAME, ["127.0.0.3"], ttl=1)
        moved: Deferred[float] = Deferred()
        resolved = cluster.resolved

        def spy(token: Any, addresses: list[str], *args: Any) -> None:
            resolved(token, addresses, *args)
            if addresses == ["127.0.0.3"] and not moved.called:
                moved.callback(reactor.seconds())

        cluster.resolved = spy
        self.assertGreater(await moved - first, 0.5)
        self.assertEqual(await load(reactor, port, 6, 2), {200: 6})
        self.assertEqual(upstreams.counts(), [6, 6, 0])
