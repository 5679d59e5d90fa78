"""Forward-proxy destination checks: host normalisation, the allowlist and the SSRF guard.

A destination host is either a name or an IP literal. Literals come in many spellings that
resolve to the same address (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`,
`[::ffff:127.0.0.1]`); they are normalised here, with the rules browsers and `inet_aton` use
(WHATWG URL IPv4 parser: a host whose last label is numeric is an IPv4 address or invalid),
before any check, so that no spelling slips past the blocked ranges. An IPv6 address that
embeds an IPv4 one (IPv4-mapped, IPv4-compatible, SIIT IPv4-translated, 6to4, NAT64 with the
well-known or a local-use prefix, Teredo) is blocked when the embedded address is.

Names are resolved by the caller; every resolved address must pass `address_blocked`, and the
connection goes to a checked address (no second lookup).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The ranges a forward proxy never connects to unless excepted (issue 5).
DEFAULT_BLOCKED: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # CGNAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, incl. the cloud metadata address 169.254.169.254
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, incl. broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "100::/64",  # discard-only
    "fc00::/7",  # unique local (ULA)
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
    # Not globally reachable translation and tunnelling forms (their embedded IPv4 addresses
    # are also checked when these ranges are not blocked):
    "::ffff:0:0:0/96",  # SIIT IPv4-translated (RFC 6052 2.1, RFC 7915), ::ffff:0:a.b.c.d
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "2001::/32",  # Teredo (RFC 4380)
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")


class BadHost(ValueError):
    """A destination host that is neither a valid name nor a valid IP literal."""


def _ipv4_number(part: str) -> int:
    if not _NUMBER.fullmatch(part):
        raise BadHost(f"invalid IPv4 part {part!r}")
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part[0] == "0":
        if not set(part) <= set("01234567"):
            raise BadHost(f"invalid octal IPv4 part {part!r}")
        return int(part, 8)
    return int(part)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address:
    """The WHATWG IPv4 parser: 1 to 4 parts, decimal, octal (leading 0) or hex (0x); the last
    part fills the remaining bytes."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing dot
    if not parts or len(parts) > 4:
        raise BadHost("invalid IPv4 address")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise BadHost("IPv4 address part out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def normalise_host(host: str) -> str | IPAddress:
    """A lower-case name (no trailing dot), or the IP address any literal spelling stands for
    (IPv4-mapped IPv6 as its IPv4 address). Raises BadHost."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise BadHost("unterminated IPv6 literal")
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise BadHost(str(exc)) from None
        if address.scope_id is not None:
            raise BadHost("zone identifiers are not accepted")
        mapped = address.ipv4_mapped
        return mapped if mapped is not None else address
    name = host.lower()
    name = name.removesuffix(".")
    if not name:
        raise BadHost("empty host")
    labels = name.split(".")
    if _NUMBER.fullmatch(labels[-1]):
        return _parse_ipv4(name)
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadHost("invalid host name")
    return name


def parse_authority(authority: str, default_port: int | None) -> tuple[str | IPAddress, int]:
    """(normalised host, port) of `host[:port]` / `[v6][:port]`; raises BadHost."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadHost("unterminated IPv6 literal")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise BadHost("garbage after IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = authority.rpartition(":")
        if not colon:
            host, port_text = authority, None
        else:
            port_text = port_text_
    if port_text is None or port_text == "":
        if default_port is None:
            raise BadHost("a port is required")
        port = default_port
    else:
        if not port_text.isdigit() or len(port_text) > 5:
            raise BadHost("invalid port")
        port = int(port_text)
    if not 0 < port < 65536:
        raise BadHost("port out of range")
    return normalise_host(host), port


def _rfc6052(packed: bytes, prefix: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a /`prefix` NAT64 prefix (RFC 6052 2.2: bits 64-71,
    the "u" octet, are skipped)."""
    if prefix == 96:
        return ipaddress.IPv4Address(packed[12:])
    return ipaddress.IPv4Address((packed[prefix // 8 : 8] + packed[9:])[:4])


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 one may carry: IPv4-mapped, SIIT IPv4-translated, 6to4,
    NAT64 (64:ff9b::/96; a local-use 64:ff9b:1::/48 prefix at every RFC 6052 length that fits
    in it: /48, /56, /64, /96), Teredo (the client address: the last 32 bits inverted) or
    IPv4-compatible. Empty for the other addresses."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return (address.teredo[1],)
    if address in _LOCAL_NAT64:
        packed = address.packed
        return tuple(_rfc6052(packed, prefix) for prefix in (48, 56, 64, 96))
    if address in _NAT64 or address in _SIIT or (address in _COMPAT and int(address) > 1):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


@attrs.frozen
class AddressGuard:
    """The blocked ranges and the exceptions to them."""

    blocked: tuple[IPNetwork, ...]
    exceptions: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, blocked: Iterable[str], exceptions: Iterable[str] = ()) -> AddressGuard:
        """From CIDR strings (raises ValueError for a bad one)."""
        return cls(
            tuple(ipaddress.ip_network(b, strict=False) for b in blocked),
            tuple(ipaddress.ip_network(e, strict=False) for e in exceptions),
        )

    def blocked_address(self, address: IPAddress) -> bool:
        """True when `address` (or an IPv4 address it embeds) is in a blocked range and not
        excepted."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if self._excepted(address):
            return False
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            candidates.extend(embedded_ipv4(address))
        for candidate in candidates:
            if self._excepted(candidate):
                continue
            if any(candidate.version == net.version and candidate in net for net in self.blocked):
                return True
        return False

    def _excepted(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.exceptions)


@attrs.frozen
class AllowRule:
    """One allowed destination: a host pattern and its ports (None: any port)."""

    host: str | IPAddress  # a name, "*.suffix", "*", or an address
    ports: frozenset[int] | None

    def matches(self, host: str | IPAddress, port: int) -> bool:
        """True when (host, port) is allowed by this rule."""
        if self.ports is not None and port not in self.ports:
            return False
        pattern = self.host
        if pattern == "*":
            return True
        if isinstance(pattern, str) and pattern.startswith("*."):
            return isinstance(host, str) and host.endswith(pattern[1:])
        return pattern == host


def parse_allow_rule(entry: str) -> AllowRule:
    """`host`, `host:443`, `host:80,443`, `host:*`, `*.example.com:443`, `[2001:db8::1]:443`,
    `10.1.2.3:8080`. Without a port: 80 and 443. Raises BadHost."""
    text = entry.strip()
    if text.startswith("["):
        end = text.find("]")
        host_text, rest = text[: end + 1], text[end + 1 :]
    else:
        host_text, colon, ports = text.partition(":")
        rest = ":" + ports if colon else ""
    if rest and not rest.startswith(":"):
        raise BadHost("expected ':' and ports after the host")
    port_text = rest[1:]
    if not rest:
        ports_set: frozenset[int] | None = frozenset({80, 443})
    elif port_text == "*":
        ports_set = None
    else:
        values = []
        for item in port_text.split(","):
            item = item.strip()
            if not item.isdigit() or not 0 < int(item) < 65536:
                raise BadHost(f"invalid port {item!r}")
            values.append(int(item))
        ports_set = frozenset(values)
    if host_text == "*":
        return AllowRule("*", ports_set)
    if host_text.startswith("*."):
        suffix = normalise_host(host_text[2:])
        if not isinstance(suffix, str):
            raise BadHost("a wildcard applies to names, not addresses")
        return AllowRule("*." + suffix, ports_set)
    return AllowRule(normalise_host(host_text), ports_set)
