"""Forward-proxy destination checks in memory: literal normalisation, blocked ranges, allowlist."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from flexgw.policies.base import BuildContext, PolicyConfigError
from flexgw.policies.destinations import (
    DEFAULT_BLOCKED,
    AddressGuard,
    BadHost,
    normalise_host,
    parse_allow_rule,
    parse_authority,
)
from flexgw.policies.forward_proxy import KIND, ForwardProxyConfig

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


class NormaliseHostTests(SynchronousTestCase):
    """Every spelling of an IP literal becomes the address it stands for."""

    def test_ipv4_spellings(self) -> None:
        """Decimal, octal, hex, short forms and a trailing dot all mean 127.0.0.1."""
        for spelling in (
            "127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1",
            "127.0.1", "0x7F.0.0.1", "127.0.0.1.", "017700000001", "0x7f.0x0.0.01",
        ):
            self.assertEqual(normalise_host(spelling), LOOPBACK, spelling)

    def test_ipv6_literals(self) -> None:
        """Bracketed IPv6; an IPv4-mapped one is its IPv4 address."""
        self.assertEqual(normalise_host("[::ffff:127.0.0.1]"), LOOPBACK)
        self.assertEqual(normalise_host("[::ffff:7f00:1]"), LOOPBACK)
        self.assertEqual(normalise_host("[::1]"), ipaddress.IPv6Address("::1"))

    def test_names_are_lower_cased(self) -> None:
        """Names lose case and one trailing dot."""
        self.assertEqual(normalise_host("API.Partner.Test."), "api.partner.test")

    def test_invalid_hosts(self) -> None:
        """Malformed literals and names are refused, never guessed."""
        for bad in (
            "256.0.0.1", "1.2.3.4.5", "0x1g.1", "08.0.0.1", "a..b", "-a.test", "[::1",
            "[fe80::1%eth0]", "foo.123", "4294967296", "", "a b",
        ):
            with self.assertRaises(BadHost, msg=bad):
                normalise_host(bad)

    def test_authority(self) -> None:
        """host:port with defaults; CONNECT (no default) needs a port."""
        self.assertEqual(parse_authority("Example.test", 80), ("example.test", 80))
        self.assertEqual(parse_authority("[::1]:8443", None), (ipaddress.IPv6Address("::1"), 8443))
        self.assertEqual(parse_authority("0x7f.1:443", None), (LOOPBACK, 443))
        for bad in ("example.test", "example.test:0", "example.test:99999", "[::1]x"):
            with self.assertRaises(BadHost, msg=bad):
                parse_authority(bad, None)

    @given(st.integers(min_value=0, max_value=2**32 - 1))
    def test_decimal_and_hex_agree(self, value: int) -> None:
        """A 32-bit number in decimal or hex is the same address as its dotted quad."""
        expected = ipaddress.IPv4Address(value)
        self.assertEqual(normalise_host(str(value)), expected)
        self.assertEqual(normalise_host(hex(value)), expected)
        self.assertEqual(normalise_host(str(expected)), expected)


class GuardTests(SynchronousTestCase):
    """The default blocked ranges, their IPv6 embeddings, and exceptions."""

    guard = AddressGuard.from_strings(DEFAULT_BLOCKED)

    def test_blocked_by_default(self) -> None:
        """Loopback, RFC 1918, link-local (metadata), CGNAT, multicast, ULA and embeddings."""
        for text in (
            "127.0.0.1", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
            "169.254.169.254", "100.64.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.0",
            "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
            "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "2002:a9fe:a9fe::1",
            "64:ff9b::7f00:1", "::127.0.0.1",
        ):
            self.assertTrue(self.guard.blocked_address(ipaddress.ip_address(text)), text)

    def test_public_addresses_pass(self) -> None:
        """Public addresses (and 6to4 / NAT64 forms of public IPv4) are not blocked."""
        for text in ("8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:4860::8888",
                     "2002:0808:0808::1", "64:ff9b::808:808", "::ffff:8.8.8.8"):
            self.assertFalse(self.guard.blocked_address(ipaddress.ip_address(text)), text)

    def test_exceptions(self) -> None:
        """An exception lets an address through, in its IPv4-mapped form too; not its neighbours."""
        guard = AddressGuard.from_strings(DEFAULT_BLOCKED, ["127.0.0.1/32"])
        self.assertFalse(guard.blocked_address(LOOPBACK))
        self.assertFalse(guard.blocked_address(ipaddress.ip_address("::ffff:127.0.0.1")))
        self.assertTrue(guard.blocked_address(ipaddress.ip_address("127.0.0.2")))
        self.assertTrue(guard.blocked_address(ipaddress.ip_address("::1")))


def _teredo(client: ipaddress.IPv4Address, server: str = "65.54.227.120") -> str:
    """A Teredo address (2001::/32) for `client`: server, flags, port, client inverted."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= (0x8000 << 48) | (0x63BF << 32) | (int(client) ^ 0xFFFFFFFF)
    return str(ipaddress.IPv6Address(value))


def _embeddings(v4: ipaddress.IPv4Address) -> dict[str, list[str]]:
    """Every spelling of the SIIT, local-use NAT64 and Teredo forms of `v4`, by form."""
    hi, lo = int(v4) >> 16, int(v4) & 0xFFFF
    a, b, c, d = v4.packed
    siit = f"::ffff:0:{hi:x}:{lo:x}"
    return {
        "siit": [
            f"::ffff:0:{v4}", siit, siit.upper(), f"0:0:0:0:ffff:0:{hi:x}:{lo:x}",
            f"0000:0000:0000:0000:ffff:0000:{hi:04x}:{lo:04x}", f"::FFFF:0000:{v4}",
        ],
        "nat64-local": [
            f"64:ff9b:1::{v4}", f"64:ff9b:1::{hi:x}:{lo:x}", f"64:FF9B:0001:0:0:0:{hi:x}:{lo:x}",
            f"0064:ff9b:0001:0000:0000:0000:{v4}",
            f"64:ff9b:1:{a:02x}{b:02x}:{c:x}:{d:02x}00::",  # /48 (u octet skipped)
            f"64:ff9b:1:{a:x}:{b:02x}:{c:02x}{d:02x}::",  # /56
            f"64:ff9b:1:0:{a:x}:{b:02x}{c:02x}:{d:02x}00:0",  # /64
        ],
        "teredo": [_teredo(v4), _teredo(v4).upper(), ipaddress.IPv6Address(_teredo(v4)).exploded],
    }


class EmbeddedFormsTests(SynchronousTestCase):
    """SIIT (::ffff:0:0:0/96), local-use NAT64 (64:ff9b:1::/48) and Teredo (2001::/32):
    blocked by default, and checked by their embedded IPv4 address under any blocked list."""

    default = AddressGuard.from_strings(DEFAULT_BLOCKED)
    #: Only the IPv4 ranges: the embedded address alone decides.
    ipv4_only = AddressGuard.from_strings([net for net in DEFAULT_BLOCKED if ":" not in net])

    def check_every_spelling(
        self, v4: ipaddress.IPv4Address, guard: AddressGuard, blocked: bool, forms: tuple[str, ...] = ()
    ) -> None:
        """Each spelling (of `forms`, default all), as a bracketed destination host, is (not)
        blocked."""
        for form, spellings in _embeddings(v4).items():
            if forms and form not in forms:
                continue
            for text in spellings:
                address = normalise_host(f"[{text}]")
                self.assertIsInstance(address, ipaddress.IPv6Address, text)
                self.assertEqual(address, ipaddress.IPv6Address(text), text)
                self.assertEqual(guard.blocked_address(address), blocked, f"{form}: {text}")

    def test_blocked_by_default(self) -> None:
        """Every spelling of the three forms is blocked, whatever address they carry."""
        for v4 in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "8.8.8.8"):
            self.check_every_spelling(ipaddress.IPv4Address(v4), self.default, True)

    def test_issue_examples(self) -> None:
        """The spellings from the report, as destination hosts."""
        for host in ("[::ffff:0:127.0.0.1]", "[64:ff9b:1::127.0.0.1]", "[64:ff9b:1::7f00:1]",
                     "[2001:0:4136:e378:8000:63bf:80ff:fffe]"):
            self.assertTrue(self.default.blocked_address(normalise_host(host)), host)  # type: ignore[arg-type]

    def test_embedded_address_decides(self) -> None:
        """Under a list of IPv4 ranges only, a blocked embedded address blocks; a public one
        passes. A local-use NAT64 address is read at every RFC 6052 position, so one of them
        lands in 0.0.0.0/8 (blocked) unless the list leaves that range out."""
        self.check_every_spelling(LOOPBACK, self.ipv4_only, True)
        self.check_every_spelling(ipaddress.IPv4Address("169.254.169.254"), self.ipv4_only, True)
        public = ipaddress.IPv4Address("8.8.8.8")
        self.check_every_spelling(public, self.ipv4_only, False, ("siit", "teredo"))
        self.check_every_spelling(public, self.ipv4_only, True, ("nat64-local",))
        loopback_only = AddressGuard.from_strings(["127.0.0.0/8"])
        self.check_every_spelling(public, loopback_only, False)
        self.check_every_spelling(LOOPBACK, loopback_only, True)

    @given(st.sampled_from([net for net in DEFAULT_BLOCKED if ":" not in net]), st.integers(0, 2**32 - 1))
    def test_any_blocked_ipv4_embedded(self, network: str, offset: int) -> None:
        """Any address of any blocked IPv4 range is blocked in every embedding form."""
        net = ipaddress.IPv4Network(network)
        v4 = net[offset % net.num_addresses]
        self.check_every_spelling(v4, self.ipv4_only, True)


class AllowRuleTests(SynchronousTestCase):
    """Allowlist patterns and ports."""

    def test_patterns(self) -> None:
        """Exact names, subdomain wildcards, port lists, any port, literals in any spelling."""
        exact = parse_allow_rule("api.partner.test:443")
        self.assertTrue(exact.matches("api.partner.test", 443))
        self.assertFalse(exact.matches("api.partner.test", 80))
        self.assertFalse(exact.matches("x.api.partner.test", 443))
        wild = parse_allow_rule("*.Partner.test:80,443")
        self.assertTrue(wild.matches("a.b.partner.test", 80))
        self.assertFalse(wild.matches("partner.test", 80))
        self.assertFalse(wild.matches("evilpartner.test", 80))
        default = parse_allow_rule("api.partner.test")
        self.assertEqual(default.ports, frozenset({80, 443}))
        self.assertIsNone(parse_allow_rule("api.partner.test:*").ports)
        literal = parse_allow_rule("127.0.0.1:8080")
        self.assertTrue(literal.matches(normalise_host("0x7f.1"), 8080))
        self.assertTrue(parse_allow_rule("[::1]:443").matches(ipaddress.IPv6Address("::1"), 443))
        for bad in ("api.test:http", "*.127.0.0.1", "api.test:0", "[::1]443"):
            with self.assertRaises(BadHost, msg=bad):
                parse_allow_rule(bad)


class ForwardProxyKindTests(SynchronousTestCase):
    """The `forward-proxy` policy kind's defaults and config errors."""

    def build(self, **config: object) -> ForwardProxyConfig:
        """Build a binding's config."""
        return KIND.build(dict(config), BuildContext(binding="b", api="a"))

    def test_default_deny(self) -> None:
        """Without allowedDestinations nothing is allowed."""
        config = self.build()
        self.assertIsNotNone(config.check("api.partner.test", 443, connect=True))

    def test_checks(self) -> None:
        """CONNECT ports, plain HTTP switch, allowlist, literal addresses in blocked ranges."""
        config = self.build(allowedDestinations=["*:*"])
        self.assertIsNone(config.check("a.test", 443, connect=True))
        self.assertEqual(config.check("a.test", 22, connect=True).cause, "egress_denied")
        self.assertIsNone(config.check("a.test", 8080, connect=False))
        self.assertIsNotNone(config.check(LOOPBACK, 443, connect=True))
        no_http = self.build(allowedDestinations=["*:*"], allowPlainHttp=False)
        self.assertIsNotNone(no_http.check("a.test", 80, connect=False))
        excepted = self.build(allowedDestinations=["*:*"], blockedAddressExceptions=["127.0.0.0/8"])
        self.assertIsNone(excepted.check(LOOPBACK, 443, connect=True))

    def test_config_errors_name_the_field(self) -> None:
        """A bad pattern or range is a config error at its index."""
        with self.assertRaises(PolicyConfigError) as caught:
            self.build(allowedDestinations=["ok.test", "bad..test"])
        self.assertEqual(caught.exception.field, "allowedDestinations.1")
        with self.assertRaises(PolicyConfigError) as caught:
            self.build(blockedAddressExceptions=["10.0.0.0/33"])
        self.assertEqual(caught.exception.field, "blockedAddressExceptions.0")
