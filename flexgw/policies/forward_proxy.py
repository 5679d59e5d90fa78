"""`forward-proxy`: flexgw's own policy kind that makes an ApiInstance a forward-proxy listener.

Bound to an ApiInstance (whose address is the proxy port, alone on it), it holds:

- `allowedDestinations`: host patterns with ports; default deny. `api.partner.com:443`,
  `*.partner.com:443` (subdomains), `api.partner.com:80,443`, `host:*` (any port),
  `203.0.113.7:8443`, `[2001:db8::7]:443`, `*:443`. Without a port: 80 and 443.
- `connectPorts`: ports CONNECT may reach (default [443]).
- `allowPlainHttp`: whether absolute-form `http://` requests are proxied (default true).
- `blockedAddresses`: CIDR ranges never connected to (default: loopback, RFC 1918, link-local
  incl. 169.254.169.254, CGNAT, multicast, reserved, IPv6 ULA/link-local/multicast, SIIT
  ::ffff:0:0:0/96, local-use NAT64 64:ff9b:1::/48, Teredo 2001::/32; the IPv4-mapped,
  -compatible, SIIT, 6to4, NAT64 and Teredo forms of blocked IPv4 addresses are blocked too).
- `blockedAddressExceptions`: CIDR ranges allowed although inside a blocked range.
- `services`: the Services (`name`, in the binding's namespace, or `namespace/name`) whose
  address a plain-HTTP destination may stand for: such a destination goes to that Service with
  its outbound chain and TLS origination, and its address (the operator's) is not checked
  against the blocked ranges. Any other destination, whatever Services exist, is an ordinary
  one (allowlist, blocked ranges, lookup). A Service that does not exist is a config error
  located at its entry (compile step: the kind does not see the other resources).

The other policies bound to the same ApiInstance (basic auth, which then reads
`Proxy-Authorization` and answers 407, rate limiting, IP filters, message logging) run as
usual, before the destination checks. The front that uses this configuration is
flexgw.egress.front.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs
from zope.interface import implementer

from flexgw.http.errors import EGRESS_DENIED, GatewayError
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.destinations import (
    DEFAULT_BLOCKED,
    AddressGuard,
    AllowRule,
    BadHost,
    IPAddress,
    parse_allow_rule,
)
from flexgw.policies.registry import register

NAME = "forward-proxy"


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "allowedDestinations": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "connectPorts": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 65535},
        },
        "allowPlainHttp": {"type": "boolean"},
        "blockedAddresses": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "blockedAddressExceptions": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
        },
        "services": {
            "description": (
                "Services (name in the binding's namespace, or namespace/name) a plain-HTTP "
                "destination may be mapped to; no other Service is ever matched"
            ),
            "type": "array",
            "items": {"type": "string", "pattern": "^([^/\\s]+/)?[^/\\s]+$"},
            "uniqueItems": True,
        },
    },
    "additionalProperties": False,
}


@implementer(IPolicy)
@attrs.frozen
class ForwardProxyConfig:
    """One `forward-proxy` binding compiled: what the forward-proxy front checks."""

    allow: tuple[AllowRule, ...] = ()
    connect_ports: frozenset[int] = frozenset({443})
    allow_plain_http: bool = True
    guard: AddressGuard = attrs.field(factory=lambda: AddressGuard.from_strings(DEFAULT_BLOCKED))
    #: `namespace/name` keys of the Services a destination may be mapped to, in config order.
    services: tuple[str, ...] = ()

    def check(
        self, host: str | IPAddress, port: int, connect: bool, guarded: bool = True
    ) -> GatewayError | None:
        """The synchronous checks (before any lookup): None when allowed so far. With
        `guarded` False (a Service address, the operator's) a literal address is not checked
        against the blocked ranges."""
        if connect:
            if port not in self.connect_ports:
                return EGRESS_DENIED
        elif not self.allow_plain_http:
            return EGRESS_DENIED
        if not any(rule.matches(host, port) for rule in self.allow):
            return EGRESS_DENIED
        if guarded and not isinstance(host, str) and self.guard.blocked_address(host):
            return EGRESS_DENIED
        return None

    #: Not part of the request chain: the forward-proxy front applies it (see module doc).
    response_phase = False

    def on_request(self, ctx: PolicyContext) -> None:
        """Nothing: the front checks destinations itself."""

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing."""


@implementer(IPolicyKind)
class ForwardProxyKind:
    """The `forward-proxy` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> ForwardProxyConfig:
        """Parse the destination patterns and address ranges."""
        rules = []
        for i, entry in enumerate(config.get("allowedDestinations", [])):
            try:
                rules.append(parse_allow_rule(entry))
            except BadHost as exc:
                raise PolicyConfigError(f"{entry!r}: {exc}", f"allowedDestinations.{i}") from None
        guard_parts: dict[str, list[str]] = {}
        for field, default in (("blockedAddresses", DEFAULT_BLOCKED), ("blockedAddressExceptions", ())):
            values = list(config.get(field, default))
            for i, value in enumerate(values):
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError as exc:
                    raise PolicyConfigError(f"{value!r}: {exc}", f"{field}.{i}") from None
            guard_parts[field] = values
        namespace = context.binding.partition("/")[0] if "/" in context.binding else "default"
        services = tuple(
            name if "/" in name else f"{namespace}/{name}" for name in config.get("services", ())
        )
        return ForwardProxyConfig(
            allow=tuple(rules),
            services=services,
            connect_ports=frozenset(config.get("connectPorts", [443])),
            allow_plain_http=bool(config.get("allowPlainHttp", True)),
            guard=AddressGuard.from_strings(
                guard_parts["blockedAddresses"], guard_parts["blockedAddressExceptions"]
            ),
        )


KIND = register(ForwardProxyKind())
