"""`ip-allowlist-flex` and `ip-blocklist-flex`: let through, or turn away, client addresses in a list.

Flex behaviour reproduced (docs `policies-included-ip-allowlist.adoc`,
`policies-included-ip-blocklist.adoc`, reference §2.2): config `ips` (required list) and
`ipExpression` (optional `#[...]`). Entries are an exact address (`192.168.1.1`, IPv6 too), a
CIDR range (`192.168.3.1/30`; host bits may be set, as in the docs' example) or leading IPv4
octets (`192.168.2` or `192.160`, also written with a trailing dot, `192.168.`: every address
starting with those octets). A rejected request gets a 403. When an `ipExpression` result holds
several comma-separated addresses (an `X-Forwarded-For` list), the first one is used, as Flex
does; an `ip:port`, `[v6]:port` or `/ip:port` result is reduced to the address.

The 403 body: Flex's is not documented or observed (reference §11). Flex reuses Mule Gateway's
messages for other policies (basic auth), so the body is Mule Gateway's documented one for the
IP policies (Salesforce KB 001114641): `{"error":"invalid_ip","description":"The IP Address is
invalid."}`, and `{"error":"invalid_ip","description":"Unable to identify the Client's IP
Address."}` when no address could be read.

Deliberate differences from Flex:
- **Default client address.** Flex's default `ipExpression` is
  `#[attributes.headers['x-forwarded-for']]`, whose first entry any client can forge. Without an
  `ipExpression` flexgw uses the socket peer; when the peer is one of the gateway's trusted
  proxies (`Configuration.spec.http.trustedProxies`) it walks `X-Forwarded-For` from the right,
  past every trusted proxy, and uses the first hop that is not one (the address the nearest
  trusted proxy saw). Writing Flex's default expression explicitly still gives Flex's
  (spoofable) behaviour, with a warning in the log at build time.
- An address that cannot be read (missing header, garbage) is refused with the 403 above by
  both lists: a blocklist that let unidentifiable clients through could be bypassed by sending
  garbage in the header its expression reads.
- IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`), in the list or on the request, compare as IPv4.
- An invalid entry is a config error naming its index (`ips.3`), not a silently dead entry.

Cost: entries are merged at build time into sorted, non-overlapping integer ranges per family;
a request costs one address parse and one binary search.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.expressions import Expression, ExpressionError, compile_value, to_text
from flexgw.policies.registry import register

_log = Logger(namespace="flexgw.policies.ip_filter")

ALLOWLIST = "ip-allowlist-flex"
BLOCKLIST = "ip-blocklist-flex"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_JSON = ((b"content-type", b"application/json"),)
REJECTED = LocalResponse(
    403, _JSON, b'{"error":"invalid_ip","description":"The IP Address is invalid."}'
)
UNIDENTIFIED = LocalResponse(
    403,
    _JSON,
    b'{"error":"invalid_ip","description":"Unable to identify the Client\'s IP Address."}',
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ips": {"type": "array", "items": {"type": "string"}},
        "ipExpression": {"type": "string"},
    },
    "required": ["ips"],
    "additionalProperties": False,
}

#: How far the X-Forwarded-For walk goes before giving up (a bound on per-request work).
MAX_HOPS = 64

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


# -- entries ---------------------------------------------------------------------------------


def parse_entry(text: str) -> IPNetwork:
    """One `ips` entry as a network: an address, a CIDR range, or 1 to 3 leading IPv4 octets."""
    entry = text.strip()
    if not entry or "%" in entry:
        raise ValueError("not an IP address, CIDR range or leading octets")
    if "/" in entry:
        network = ipaddress.ip_network(entry, strict=False)
    elif ":" in entry:
        network = ipaddress.ip_network(entry)
    else:
        octets = entry[:-1].split(".") if entry.endswith(".") else entry.split(".")
        if len(octets) == 4 and not entry.endswith("."):
            network = ipaddress.ip_network(entry)
        elif 1 <= len(octets) <= 3 and all(
            o.isascii() and o.isdigit() and len(o) <= 3 and int(o) <= 255 for o in octets
        ):
            # Leading octets: `192.168` is 192.168.0.0/16 (Flex docs).
            padded = ".".join(octets + ["0"] * (4 - len(octets)))
            network = ipaddress.ip_network(f"{padded}/{8 * len(octets)}")
        else:
            raise ValueError("not an IP address, CIDR range or leading octets")
    return _unmap_network(network)


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 range (inside ::ffff:0:0/96) as the IPv4 range it stands for."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{v4}/{network.prefixlen - 96}")
    return network


def _merged(networks: Iterable[IPNetwork]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted, non-overlapping, non-adjacent (start, end) integer ranges covering `networks`."""
    ranges = sorted((int(n.network_address), int(n.broadcast_address)) for n in networks)
    starts: list[int] = []
    ends: list[int] = []
    for start, end in ranges:
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return tuple(starts), tuple(ends)


@attrs.frozen
class AddressSet:
    """A set of IPv4 and IPv6 ranges, answering membership with one binary search."""

    v4_starts: tuple[int, ...]
    v4_ends: tuple[int, ...]
    v6_starts: tuple[int, ...]
    v6_ends: tuple[int, ...]

    @classmethod
    def of(cls, networks: Sequence[IPNetwork]) -> AddressSet:
        """The set covering every network (IPv4-mapped IPv6 ranges count as IPv4)."""
        networks = [_unmap_network(n) for n in networks]
        v4 = _merged(n for n in networks if n.version == 4)
        v6 = _merged(n for n in networks if n.version == 6)
        return cls(v4[0], v4[1], v6[0], v6[1])

    def __contains__(self, key: object) -> bool:
        """True when the address key (from `address_key`) is in one of the ranges."""
        if not isinstance(key, tuple):
            return False
        version: int = key[0]
        value: int = key[1]
        if version == 4:
            starts, ends = self.v4_starts, self.v4_ends
        else:
            starts, ends = self.v6_starts, self.v6_ends
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]


# -- addresses on the request ----------------------------------------------------------------


def address_key(text: str) -> tuple[int, int] | None:
    """`(4, n)` or `(6, n)` for an address given as `ip`, `ip:port`, `[v6]:port` or `/ip:port`
    (Mule's remoteAddress form), IPv4-mapped IPv6 as IPv4; None when it is not an address."""
    text = text.strip().removeprefix("/")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    if not text or len(text) > 64:
        return None
    try:
        return 4, int.from_bytes(inet_pton(AF_INET, text), "big")
    except (OSError, ValueError):
        pass
    try:
        value = int.from_bytes(inet_pton(AF_INET6, text), "big")
    except (OSError, ValueError):
        try:
            address = ipaddress.ip_address(text)  # forms inet_pton refuses (zone ids)
        except ValueError:
            return None
        if address.version == 4:
            return 4, int(address)
        value = int(address)
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _as_address(key: tuple[int, int]) -> IPAddress:
    """The ipaddress object for an address key."""
    if key[0] == 4:
        return ipaddress.IPv4Address(key[1])
    return ipaddress.IPv6Address(key[1])


def _first_of(value: Any) -> str | None:
    """The first address text of an expression result (a list's first item, a comma list's first
    entry, as Flex uses the first X-Forwarded-For entry); None for null or empty."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    text = to_text(value)
    first = text.split(",", 1)[0].strip()
    return first or None


def forwarded_client(ctx: PolicyContext) -> tuple[int, int] | None:
    """The client address: the socket peer, or, when the peer is a trusted proxy, the rightmost
    X-Forwarded-For hop that is not a trusted proxy (None if a hop on the way is not an address)."""
    peer = address_key(ctx.client_ip)
    trusted = ctx.trusted_proxies
    if not trusted or peer is None:
        return peer
    values = [v for k, v in ctx.head.headers if k.lower() == b"x-forwarded-for"]
    if not values:
        return peer
    hops = b",".join(values).split(b",")
    client = peer
    for count, hop in enumerate(reversed(hops)):
        if count >= MAX_HOPS:
            return None
        key = address_key(hop.decode("latin-1"))
        if key is None:
            return None  # garbage a trusted proxy passed on: cannot tell who the client is
        client = key
        address = _as_address(key)
        if not any(address in net for net in trusted):
            return key
    return client  # every hop is a trusted proxy: the leftmost one is the client


# -- the policies ----------------------------------------------------------------------------


@implementer(IPolicy)
@attrs.frozen
class IpFilterPolicy:
    """One allowlist or blocklist binding: the merged ranges and where the address comes from."""

    addresses: AddressSet
    allow: bool  # True: allowlist (listed addresses pass); False: blocklist (listed are refused)
    expression: Expression | str | None = None

    def client_address(self, ctx: PolicyContext) -> tuple[int, int] | None:
        """The address this binding checks, or None when it cannot be read."""
        expression = self.expression
        if expression is None:
            return forwarded_client(ctx)
        if isinstance(expression, str):
            text: str | None = expression  # a literal, not an expression: used as given
        else:
            text = _first_of(expression.evaluate(ctx.expression_context()))
        return None if text is None else address_key(text)

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Pass or refuse the request by its client address."""
        address = self.client_address(ctx)
        if address is None:
            return UNIDENTIFIED
        if (address in self.addresses) is self.allow:
            return None
        return REJECTED

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


def build_filter(config: dict[str, Any], context: BuildContext, allow: bool) -> IpFilterPolicy:
    """Parse the entries and the expression of an allowlist or blocklist binding."""
    ips = config.get("ips")
    if not isinstance(ips, list):
        raise PolicyConfigError("ips must be a list of addresses, CIDR ranges or octets", "ips")
    networks = []
    for index, entry in enumerate(ips):
        if not isinstance(entry, str):
            raise PolicyConfigError(f"ips[{index}] must be a string", f"ips.{index}")
        try:
            networks.append(parse_entry(entry))
        except ValueError:
            raise PolicyConfigError(
                f"ips[{index}] {entry!r} is not an IP address, a CIDR range or leading IPv4 "
                "octets (e.g. 192.168.1.1, 10.0.0.0/8, 2001:db8::/32, 192.168)",
                f"ips.{index}",
            ) from None
    expression: Expression | str | None = None
    source = config.get("ipExpression")
    if source is not None:
        if not isinstance(source, str):
            raise PolicyConfigError("ipExpression must be a string", "ipExpression")
        try:
            expression = compile_value(source)
        except ExpressionError as exc:
            raise PolicyConfigError(
                f"ipExpression: {exc.message} (at offset {exc.offset})", "ipExpression"
            ) from None
        if "x-forwarded-for" in source.lower():
            _log.warn(
                "{binding}: ipExpression reads X-Forwarded-For as sent by the client, which any "
                "client can forge; omit ipExpression to use the peer address, or the hop before "
                "the gateway's trusted proxies (Configuration http.trustedProxies)",
                binding=context.binding,
            )
    return IpFilterPolicy(AddressSet.of(networks), allow, expression)


@implementer(IPolicyKind)
class IpAllowlistKind:
    """The `ip-allowlist-flex` policy kind: only listed addresses get through."""

    name = ALLOWLIST
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> IpFilterPolicy:
        """Build an allowlist binding."""
        return build_filter(config, context, allow=True)


@implementer(IPolicyKind)
class IpBlocklistKind:
    """The `ip-blocklist-flex` policy kind: listed addresses are refused."""

    name = BLOCKLIST
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> IpFilterPolicy:
        """Build a blocklist binding."""
        return build_filter(config, context, allow=False)


ALLOWLIST_KIND = register(IpAllowlistKind())
BLOCKLIST_KIND = register(IpBlocklistKind())
