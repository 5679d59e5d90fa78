"""Parse ApiInstance and Service addresses (`scheme://host:port[/path]`, IPv6 in brackets)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import attrs

RESERVED_PORTS = frozenset({9998, 9999})
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$"
)


class AddressError(ValueError):
    """An address that cannot be used; the message says why."""


@attrs.frozen
class Address:
    """A parsed address: scheme, host (IPv6 without brackets), port and a normalised path."""

    scheme: str
    host: str
    port: int
    path: str  # "" or "/x/y" (no trailing slash)


def normalise_path(path: str) -> str:
    """The empty string for "" or "/", otherwise the path with a leading and no trailing slash."""
    path = path.strip()
    stripped = path.rstrip("/")
    if not stripped:
        return ""
    return stripped if stripped.startswith("/") else "/" + stripped


def _check_host(host: str) -> None:
    if not host:
        raise AddressError("the address has no host")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise AddressError(f"invalid host {host!r}")


def parse_address(
    text: str, *, default_port: bool, schemes: tuple[str, ...] = ("http", "https")
) -> Address:
    """Parse `http|https://host[:port][/path]` (or another of `schemes`); raises AddressError
    with a readable reason."""
    if not isinstance(text, str) or "://" not in text:
        raise AddressError("expected scheme://host:port[/path]")
    if any(ch.isspace() for ch in text):
        raise AddressError("the address contains whitespace")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        expected = ", ".join(schemes[:-1]) + " or " + schemes[-1]
        raise AddressError(f"unsupported scheme {parts.scheme!r} (expected {expected})")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise AddressError("the address must not have a query or fragment")
    if "@" in parts.netloc:
        raise AddressError("the address must not have user information")
    netloc = parts.netloc
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise AddressError("unterminated IPv6 literal")
        host = netloc[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"invalid IPv6 address {host!r}") from None
        rest = netloc[end + 1 :]
    else:
        host, sep, port_text = netloc.partition(":")
        if ":" in port_text:
            raise AddressError("IPv6 addresses must be written in brackets, e.g. http://[::1]:8080")
        rest = sep + port_text
        _check_host(host)
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise AddressError(f"invalid port {rest[1:]!r}")
        port = int(rest[1:])
        if not 1 <= port <= 65535:
            raise AddressError(f"port {port} out of range 1..65535")
    elif default_port:
        port = 443 if scheme in ("https", "h2") else 80
    else:
        raise AddressError("the address needs a port, e.g. http://0.0.0.0:8081")
    return Address(scheme=scheme, host=host.lower(), port=port, path=normalise_path(parts.path))


def parse_api_address(text: str) -> Address:
    """An ApiInstance address: explicit port, not a reserved one; path becomes the base path."""
    address = parse_address(text, default_port=False)
    if address.port in RESERVED_PORTS:
        raise AddressError(f"port {address.port} is reserved (9998 and 9999 cannot be used)")
    return address


def parse_service_address(text: str) -> Address:
    """A Service address: the port defaults to the scheme's; the path becomes a prefix.

    `h2c://` is an HTTP/2 upstream spoken with prior knowledge (no TLS, no upgrade); `h2://` is
    HTTP/2 over TLS (ALPN h2; port 443 by default).
    """
    return parse_address(text, default_port=True, schemes=("http", "https", "h2c", "h2"))
