"""`Configuration.spec.forwardProxy`: the corporate HTTP proxy the gateway reaches upstream Services through.

Flex keys (reference §4.2): `https.address` (required: `http://host:port`), `https.basicAuth`
(`username`, `password`), `noProxy` (host names that bypass the proxy; an entry starting with a
dot matches every name under it). Flex routes upstream Services and the calls policies make
through it (not Redis or LDAP).

flexgw reads it so:
- A plain-HTTP Service is reached with absolute-form requests (`GET http://host:port/path`)
  on pooled connections to the proxy, with `Proxy-Authorization: Basic ...` when configured.
- An `https://` Service is reached through `CONNECT host:port` (the same credentials), then
  TLS end to end inside the tunnel.
- `noProxy` entries: exact host names (case-insensitive), `.suffix` (the suffix and every
  name under it), `*` (everything), and IP addresses or CIDR ranges (for Services addressed
  by IP). A Service whose host matches is connected to directly.
- User info in the address (`http://user:pass@proxy:8888`, as `flexctl --https-proxy`) is
  accepted as credentials when `basicAuth` is absent.
- An `https://` proxy address (TLS to the proxy itself) is not supported: a config error, and
  the gateway then connects directly, rather than sending credentials in the clear.

Several Configurations with `forwardProxy`: the last by resource id wins, with a warning.
"""

from __future__ import annotations

import ipaddress
from base64 import b64encode
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from flexgw.config.located import last_configuration_block
from flexgw.plan import Problem


@attrs.frozen
class ForwardProxy:
    """The proxy upstream connections go through, and the hosts that bypass it."""

    host: str
    port: int
    authorization: bytes | None = attrs.field(default=None, repr=False)  # Proxy-Authorization
    no_proxy: tuple[str, ...] = ()  # lower-case names, ".suffix" entries, "*"
    no_proxy_networks: tuple[Any, ...] = ()  # ipaddress networks

    def bypasses(self, host: str) -> bool:
        """True when connections to `host` go direct (a `noProxy` entry matches it)."""
        name = host.lower().rstrip(".")
        for entry in self.no_proxy:
            if entry == "*" or entry == name:
                return True
            if entry.startswith(".") and (name.endswith(entry) or name == entry[1:]):
                return True
        if self.no_proxy_networks:
            try:
                address = ipaddress.ip_address(name)
            except ValueError:
                return False
            return any(address in network for network in self.no_proxy_networks)
        return False

    @property
    def authority(self) -> bytes:
        """`host:port` of the proxy, for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode()


def resolve_forward_proxy(configurations: Sequence[Any], problems: list[Problem]) -> ForwardProxy | None:
    """The forward proxy of the last Configuration that has one (None: connect directly)."""
    chosen = last_configuration_block(configurations, "forwardProxy", problems)
    if chosen is None:
        return None
    block, origin = chosen
    proxy = block.get("https")
    if not isinstance(proxy, dict) or not proxy.get("address"):
        problems.append(
            origin.problem("error", "https.address is required; connecting directly", (), True)
        )
        return None
    address = str(proxy["address"]).strip()
    parts = urlsplit(address if "://" in address else "http://" + address)
    try:
        port = parts.port or 3128
        host = parts.hostname
    except ValueError:
        host = None
        port = 0
    if parts.scheme.lower() != "http" or not host:
        what = (
            "an https:// proxy (TLS to the proxy) is not supported"
            if parts.scheme.lower() == "https"
            else "is not an http://host:port address"
        )
        problems.append(
            origin.problem(
                "error", f"{what}; connecting directly", ("https", "address")
            )
        )
        return None
    authorization = None
    basic = proxy.get("basicAuth")
    username = password = None
    if isinstance(basic, dict) and basic.get("username"):
        username, password = str(basic["username"]), str(basic.get("password") or "")
    elif parts.username:
        username, password = unquote(parts.username), unquote(parts.password or "")
    if username is not None:
        if ":" in username:
            problems.append(
                origin.problem(
                    "error", "the username must not contain ':'; connecting directly",
                    ("https", "basicAuth", "username"),
                )
            )
            return None
        token = b64encode(f"{username}:{password}".encode())
        authorization = b"Basic " + token
    names: list[str] = []
    networks: list[Any] = []
    for n, entry in enumerate(block.get("noProxy") or ()):
        text = str(entry).strip().lower()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if text.startswith("*."):
            text = text[1:]
        names.append(text.rstrip("."))
    return ForwardProxy(
        host=host,
        port=port,
        authorization=authorization,
        no_proxy=tuple(names),
        no_proxy_networks=tuple(networks),
    )
