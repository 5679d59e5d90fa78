"""ip-allowlist-flex / ip-blocklist-flex: entry forms, matching, client address, 403s, end to end."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.expressions import EvaluationError
from flexgw.policies.ip_filter import (
    ALLOWLIST_KIND,
    BLOCKLIST_KIND,
    SCHEMA,
    AddressSet,
    address_key,
    forwarded_client,
    parse_entry,
)
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port

DOCS_IPS = ["192.168.1.1", "192.168.3.1/30", "192.168.2", "192.160"]
INVALID = {"error": "invalid_ip", "description": "The IP Address is invalid."}
UNIDENTIFIED = {"error": "invalid_ip", "description": "Unable to identify the Client's IP Address."}
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def context(
    peer: str, *headers: tuple[bytes, bytes], trusted: tuple[Any, ...] = ()
) -> PolicyContext:
    """A PolicyContext for a GET from `peer` with extra headers."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"api"), *headers], True)
    assert isinstance(head, RequestHead)
    ctx = PolicyContext(head, peer, "http", "default/api")
    ctx.trusted_proxies = trusted
    return ctx


def allowlist(ips: list[str], **extra: Any) -> Any:
    """An allowlist policy."""
    return ALLOWLIST_KIND.build({"ips": ips, **extra}, BuildContext("default/ip", "default/api"))


def blocklist(ips: list[str], **extra: Any) -> Any:
    """A blocklist policy."""
    return BLOCKLIST_KIND.build({"ips": ips, **extra}, BuildContext("default/ip", "default/api"))


class EntryTests(TestCase):
    """The forms an `ips` entry may take."""

    def test_forms(self) -> None:
        """Exact, CIDR (host bits allowed), leading octets (with or without a dot), IPv6,
        IPv4-mapped IPv6 as IPv4."""
        cases = {
            "192.168.1.1": "192.168.1.1/32",
            " 192.168.3.1/30 ": "192.168.3.0/30",
            "192.168.2": "192.168.2.0/24",
            "192.160": "192.160.0.0/16",
            "192.168.": "192.168.0.0/16",
            "10": "10.0.0.0/8",
            "2001:db8::1": "2001:db8::1/128",
            "2001:db8::/32": "2001:db8::/32",
            "::ffff:1.2.3.4": "1.2.3.4/32",
            "::ffff:10.0.0.0/104": "10.0.0.0/8",
        }
        for entry, network in cases.items():
            self.assertEqual(parse_entry(entry), ipaddress.ip_network(network), entry)

    def test_invalid_entries_name_their_index(self) -> None:
        """Each bad entry is a config error at `ips.<index>`."""
        bad = [
            "",
            "300.1.1.1",
            "192.168.1.1.",
            "1.2.3.4.5",
            "192.168.x",
            "256",
            "10.0.0.0/33",
            "host.example",
            "fe80::1%eth0",
            "2001:db8:",
            "1.2.3.4/",
        ]
        for entry in bad:
            with self.assertRaises(PolicyConfigError) as caught:
                allowlist(["10.0.0.1", entry])
            self.assertEqual(caught.exception.field, "ips.1", entry)
            self.assertIn(repr(entry), caught.exception.message)

    def test_non_string_entry(self) -> None:
        """A number in the list (YAML `- 10`) is a config error at its index."""
        with self.assertRaises(PolicyConfigError) as caught:
            allowlist(["10.0.0.1", 10])  # type: ignore[list-item]
        self.assertEqual(caught.exception.field, "ips.1")

    def test_bad_expression(self) -> None:
        """A syntax error in ipExpression is a config error on that field."""
        with self.assertRaises(PolicyConfigError) as caught:
            allowlist(["10.0.0.1"], ipExpression="#[attributes.headers[")
        self.assertEqual(caught.exception.field, "ipExpression")

    def test_schema_lists_flex_keys(self) -> None:
        """The schema knows exactly Flex's keys."""
        self.assertEqual(set(SCHEMA["properties"]), {"ips", "ipExpression"})
        self.assertEqual(SCHEMA["required"], ["ips"])

    def test_ranges_merged(self) -> None:
        """Overlapping and adjacent entries become one range."""
        policy = allowlist(
            ["10.0.0.0/9", "10.128.0.0/9", "10.1.2.3", "11.0.0.0/8", "2001:db8::/32"]
        )
        self.assertEqual(policy.addresses.v4_starts, (int(ipaddress.ip_address("10.0.0.0")),))
        self.assertEqual(policy.addresses.v4_ends, (int(ipaddress.ip_address("11.255.255.255")),))
        self.assertEqual(len(policy.addresses.v6_starts), 1)


def _network(draw: Any, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    bits = 32 if version == 4 else 128
    value = draw(st.integers(0, 2**bits - 1))
    prefix = draw(st.integers(0, bits))
    return ipaddress.ip_network((value, prefix), strict=False)


@st.composite
def networks_and_address(draw: Any) -> tuple[list[Any], Any]:
    """A few networks of both families and an address, often near or inside one of them."""
    nets = [_network(draw, draw(st.sampled_from([4, 6]))) for _ in range(draw(st.integers(0, 6)))]
    if nets and draw(st.booleans()):
        net = draw(st.sampled_from(nets))
        span = int(net.broadcast_address) - int(net.network_address)
        offset = draw(st.integers(-2, span + 2))
        bits = 32 if net.version == 4 else 128
        value = min(max(int(net.network_address) + offset, 0), 2**bits - 1)
        address = ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)
    else:
        version = draw(st.sampled_from([4, 6]))
        bits = 32 if version == 4 else 128
        value = draw(st.integers(0, 2**bits - 1))
        address = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
    return nets, address


class MatchingPropertyTests(TestCase):
    """Membership agrees with Python's ipaddress."""

    @settings(max_examples=400, deadline=None)
    @given(networks_and_address())
    def test_membership_matches_ipaddress(self, case: tuple[list[Any], Any]) -> None:
        """An address matches iff ipaddress puts it in one of the (non-mapped) networks."""
        nets, address = case
        nets = [
            n
            for n in nets
            if not (n.version == 6 and n.subnet_of(ipaddress.ip_network("::ffff:0:0/96")))
        ]
        if address.version == 6 and address.ipv4_mapped is not None:
            return  # mapped addresses have their own test
        expected = any(address in n for n in nets)
        key = address_key(str(address))
        self.assertEqual(key in AddressSet.of(nets), expected)
        policy = allowlist([str(n) for n in nets])
        outcome = policy.on_request(context(str(address)))
        self.assertEqual(outcome is None, expected)
        blocked = blocklist([str(n) for n in nets]).on_request(context(str(address)))
        self.assertEqual(blocked is None, not expected)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
    def test_mapped_addresses_compare_as_ipv4(self, net: int, prefix: int, value: int) -> None:
        """`::ffff:a.b.c.d` on the request, or in the list, is the IPv4 address."""
        network = ipaddress.ip_network((net, prefix), strict=False)
        v4 = ipaddress.IPv4Address(value)
        mapped = f"::ffff:{v4}"
        expected = v4 in network
        self.assertEqual(allowlist([str(network)]).on_request(context(mapped)) is None, expected)
        mapped_net = f"::ffff:{network.network_address}/{prefix + 96}"
        self.assertEqual(allowlist([mapped_net]).on_request(context(str(v4))) is None, expected)


class PolicyTests(TestCase):
    """Refusals, their bodies, and where the client address comes from."""

    def assertForbidden(self, response: Any, body: dict[str, str] = INVALID) -> None:
        """A 403 with the given JSON body."""
        self.assertIsInstance(response, LocalResponse)
        self.assertEqual(response.status, 403)
        self.assertEqual(list(response.headers), [(b"content-type", b"application/json")])
        self.assertEqual(json.loads(response.body), body)

    def test_docs_example_allowlist(self) -> None:
        """The docs' example list: each form lets its addresses in and keeps others out."""
        policy = allowlist(DOCS_IPS)
        for peer in ("192.168.1.1", "192.168.3.0", "192.168.3.3", "192.168.2.77", "192.160.200.1"):
            self.assertIsNone(policy.on_request(context(peer)), peer)
        for peer in ("192.168.1.2", "192.168.3.4", "192.161.0.1", "10.0.0.1", "::1"):
            self.assertForbidden(policy.on_request(context(peer)))

    def test_docs_example_blocklist(self) -> None:
        """The blocklist is the mirror image."""
        policy = blocklist(DOCS_IPS)
        self.assertForbidden(policy.on_request(context("192.168.2.77")))
        self.assertIsNone(policy.on_request(context("192.168.1.2")))

    def test_ipv6(self) -> None:
        """IPv6 entries and peers."""
        policy = allowlist(["2001:db8::/32", "::1"])
        self.assertIsNone(policy.on_request(context("2001:db8:ffff::5")))
        self.assertIsNone(policy.on_request(context("::1")))
        self.assertForbidden(policy.on_request(context("2001:db9::5")))

    def test_empty_lists(self) -> None:
        """An empty allowlist refuses everyone; an empty blocklist refuses no one."""
        self.assertForbidden(allowlist([]).on_request(context("10.0.0.1")))
        self.assertIsNone(blocklist([]).on_request(context("10.0.0.1")))

    def test_default_ignores_forwarded_for_from_untrusted_peer(self) -> None:
        """Without trusted proxies, X-Forwarded-For cannot make a client look allowed."""
        ctx = context("6.6.6.6", (b"X-Forwarded-For", b"192.168.1.1"))
        self.assertForbidden(allowlist(["192.168.1.1"]).on_request(ctx))

    def test_trusted_proxy_walk(self) -> None:
        """From a trusted peer, the rightmost hop that is not a trusted proxy is the client."""
        policy = allowlist(["192.168.2"])
        ok = context(
            "10.0.0.1", (b"X-Forwarded-For", b"6.6.6.6, 192.168.2.9, 10.9.9.9"), trusted=TRUSTED
        )
        self.assertIsNone(policy.on_request(ok))
        spoofed = context(
            "10.0.0.1", (b"X-Forwarded-For", b"192.168.2.9, 6.6.6.6"), trusted=TRUSTED
        )
        self.assertForbidden(policy.on_request(spoofed))

    def test_trusted_proxy_walk_details(self) -> None:
        """Repeated headers join, IPv6 and mapped hops work, garbage stops the walk."""

        def walk(*values: bytes) -> Any:
            headers = [(b"X-Forwarded-For", v) for v in values]
            return forwarded_client(context("10.0.0.1", *headers, trusted=TRUSTED))

        self.assertEqual(walk(b"1.1.1.1", b"2.2.2.2, 10.0.0.7"), address_key("2.2.2.2"))
        self.assertEqual(walk(), address_key("10.0.0.1"))
        self.assertEqual(walk(b"10.0.0.9, 10.0.0.8"), address_key("10.0.0.9"))
        self.assertEqual(walk(b"2001:db8::1, fd00::2"), address_key("2001:db8::1"))
        self.assertEqual(walk(b"::ffff:10.1.1.1, ::ffff:8.8.8.8"), address_key("8.8.8.8"))
        self.assertEqual(walk(b"[2001:db8::1]:443"), address_key("2001:db8::1"))
        self.assertIsNone(walk(b"1.1.1.1, junk, 10.0.0.2"))
        self.assertEqual(walk(b"junk, 1.1.1.1"), address_key("1.1.1.1"))
        self.assertIsNone(walk(b", ".join([b"10.0.0.1"] * 100)))

    def test_walk_only_from_trusted_peer(self) -> None:
        """An empty trusted set (peer not trusted) means the peer is the client."""
        ctx = context("10.0.0.1", (b"X-Forwarded-For", b"192.168.2.9"))
        self.assertEqual(forwarded_client(ctx), address_key("10.0.0.1"))

    def test_unidentifiable_peer(self) -> None:
        """A peer that is not an IP address (a unix socket) is refused by both lists."""
        self.assertForbidden(allowlist(["10.0.0.0/8"]).on_request(context("")), UNIDENTIFIED)
        self.assertForbidden(blocklist(["10.0.0.0/8"]).on_request(context("")), UNIDENTIFIED)

    def test_expression_first_forwarded_entry_as_flex(self) -> None:
        """Flex's default expression, written out, uses the first X-Forwarded-For entry."""
        policy = allowlist(["192.168.2"], ipExpression="#[attributes.headers['x-forwarded-for']]")
        ok = context("6.6.6.6", (b"X-Forwarded-For", b"192.168.2.1, 6.6.6.6"))
        self.assertIsNone(policy.on_request(ok))
        refused = context("192.168.2.1", (b"X-Forwarded-For", b"6.6.6.6, 192.168.2.1"))
        self.assertForbidden(policy.on_request(refused))

    def test_expression_missing_value_refused_by_both(self) -> None:
        """An expression yielding null or garbage: 403 'Unable to identify' for both lists."""
        for kind in (allowlist, blocklist):
            policy = kind(["192.168.2"], ipExpression="#[attributes.headers['x-real-ip']]")
            self.assertForbidden(policy.on_request(context("1.1.1.1")), UNIDENTIFIED)
            garbage = context("1.1.1.1", (b"X-Real-IP", b"not-an-ip"))
            self.assertForbidden(policy.on_request(garbage), UNIDENTIFIED)

    def test_expression_forms(self) -> None:
        """remoteAddress, an ip:port value, and an array result."""
        remote = allowlist(["127.0.0.1"], ipExpression="#[attributes.remoteAddress]")
        self.assertIsNone(remote.on_request(context("127.0.0.1")))
        port = allowlist(["1.2.3.4"], ipExpression="#[attributes.headers['x-peer']]")
        self.assertIsNone(port.on_request(context("9.9.9.9", (b"X-Peer", b"1.2.3.4:8080"))))
        self.assertIsNone(port.on_request(context("9.9.9.9", (b"X-Peer", b"/1.2.3.4:8080"))))
        split = allowlist(["1.2.3.4"], ipExpression="#[attributes.headers['x-peer'] splitBy ' ']")
        self.assertIsNone(split.on_request(context("9.9.9.9", (b"X-Peer", b"1.2.3.4 5.6.7.8"))))

    def test_expression_evaluation_error_raises(self) -> None:
        """An evaluation failure propagates (the chain turns it into a 500)."""
        policy = allowlist(["1.2.3.4"], ipExpression="#[attributes.headers[0]]")
        with self.assertRaises(EvaluationError):
            policy.on_request(context("1.1.1.1", (b"X", b"[1]")))

    def test_address_key_forms(self) -> None:
        """Address text forms accepted on the request."""
        self.assertEqual(address_key("1.2.3.4"), (4, 0x01020304))
        self.assertEqual(address_key(" 1.2.3.4:80 "), (4, 0x01020304))
        self.assertEqual(address_key("::ffff:1.2.3.4"), (4, 0x01020304))
        self.assertEqual(address_key("[::1]:80"), (6, 1))
        self.assertEqual(address_key("fe80::1%eth0"), (6, int(ipaddress.ip_address("fe80::1"))))
        for bad in ("", "1.2.3", "01.2.3.4", "[::1", "x" * 100, "1.2.3.4:80:90"):
            self.assertIsNone(address_key(bad), bad)


def bindings(kind: str, ips: str, extra: str = "") -> str:
    """A PolicyBinding for an IP policy."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: ip}\n"
        "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
        f"  policyRef: {{name: {kind}}}\n"
        f"  config:\n    ips: {ips}\n{extra}"
    )


class IpFilterEndToEndTests(TestCase):
    """Through a real gateway on 127.0.0.1."""

    def setUp(self) -> None:
        """A recording upstream and a gateway port."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, text: str, trusted: bool = False) -> Gateway:
        """A gateway with one API, the given binding, and 127.0.0.1 as trusted proxy if asked."""
        api = api_document(self.port, self.upstream.address[1])
        files = {"api.yaml": api + text}
        if trusted:
            files["conf.yaml"] = (
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
                "metadata: {name: c}\nspec:\n  http:\n    trustedProxies: [127.0.0.1/32]\n"
            )
        gateway = Gateway(self, files)
        gateway.start()
        return gateway

    async def get(self, xff: bytes | None = None) -> client.Response:
        """One GET, with an X-Forwarded-For header if given."""
        extra = b"X-Forwarded-For: " + xff + b"\r\n" if xff is not None else b""
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_allowlist_peer(self) -> None:
        """The loopback peer is allowed by 127.0.0.1; a forged X-Forwarded-For changes nothing."""
        self.start(bindings("ip-allowlist-flex", "[127.0.0.1]"))
        self.assertEqual((await self.get(b"6.6.6.6")).status, 200)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_blocklist_peer(self) -> None:
        """A blocklisted peer gets the 403 body; the upstream sees nothing."""
        self.start(bindings("ip-blocklist-flex", "['127.0', '10.0.0.0/8']"))
        response = await self.get(b"8.8.8.8")
        self.assertEqual(response.status, 403)
        self.assertEqual(json.loads(response.body), INVALID)
        self.assertEqual(response.header("content-type"), [b"application/json"])
        self.assertEqual(self.upstream.received, [])

    async def test_trusted_proxy(self) -> None:
        """With 127.0.0.1 a trusted proxy, the hop before it decides; the leftmost is ignored."""
        self.start(bindings("ip-allowlist-flex", "['192.168.2']"), trusted=True)
        self.assertEqual((await self.get(b"6.6.6.6, 192.168.2.9")).status, 200)
        self.assertEqual((await self.get(b"192.168.2.9, 6.6.6.6")).status, 403)
        self.assertEqual((await self.get()).status, 403)  # no header: the proxy itself
        self.assertEqual(len(self.upstream.received), 1)

    async def test_flex_expression(self) -> None:
        """Flex's default expression written out: the first X-Forwarded-For entry (spoofable)."""
        expression = "    ipExpression: \"#[attributes.headers['x-forwarded-for']]\"\n"
        self.start(bindings("ip-allowlist-flex", "['192.168.2']", expression))
        self.assertEqual((await self.get(b"192.168.2.1, 6.6.6.6")).status, 200)
        response = await self.get()
        self.assertEqual(response.status, 403)
        self.assertEqual(json.loads(response.body), UNIDENTIFIED)

    async def test_invalid_entry_located(self) -> None:
        """A bad entry is an error at spec.config.ips.<n>; the API is not served."""
        gateway = self.start(bindings("ip-allowlist-flex", "['10.0.0.1', 'nope']"))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any("'nope'" in p.message and p.field == "spec.config.ips[1]" for p in errors),
            [(p.message, p.field) for p in errors],
        )
        self.assertEqual(gateway.service.plan.listeners, ())
