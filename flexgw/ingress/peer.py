"""Who is at the other end of a downstream connection, worked out once per connection.

A Peer is built when the connection is made: after the PROXY header when the listener expects
one (the wrapper makes the transport report the address the header carries), so the address
here is the client's either way. HTTP/1.1, HTTP/2 (its streams share their connection's) and
forward-proxy fronts all read the same Peer: policies, X-Forwarded-For, the trusted-proxy check
and the access log see one address and one scheme.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.frozen
class Peer:
    """The client of a connection, and the forwarded lines every request on it carries."""

    address: str  # the client's address ("" when the transport has none, e.g. a unix socket)
    address_bytes: bytes  # the same, for X-Forwarded-For
    trusted: bool  # the client is one of `http.trustedProxies`: its X-Forwarded-* are kept
    scheme: str  # the listener's scheme: "http" or "https"
    proto_line: bytes  # "X-Forwarded-Proto: <scheme>\r\n", plus the XFCC line over mTLS
    xfcc_line: bytes = b""  # "X-Forwarded-Client-Cert: ...\r\n" over mTLS, else b""
    # The same two as HTTP/2 field values (flexgw.ingress.h2request): the X-Forwarded-Proto
    # value (b"" before the connection is made) and the XFCC one (b"" without mTLS).
    proto: bytes = b""
    xfcc: bytes = b""
    # The verified client certificate (a pyOpenSSL X509) over mTLS, else None: policies that
    # send it on (ext_authz's includePeerCertificate) read it through PolicyContext.
    certificate: Any = None

    @classmethod
    def of(cls, transport: Any, scheme: str, trusted_proxies: Sequence[Any] = ()) -> Peer:
        """The peer of `transport` (its getPeer(): the PROXY header's address if it had one)."""
        host = getattr(transport.getPeer(), "host", "") or ""
        if host.startswith("::ffff:"):
            # An IPv4 client on a dual-stack listener: it is that IPv4 address (logs, policies,
            # X-Forwarded-For and the trusted-proxy check all see the IPv4 form).
            try:
                mapped = ipaddress.IPv6Address(host).ipv4_mapped
            except ValueError:
                mapped = None
            if mapped is not None:
                host = str(mapped)
        trusted = False
        if trusted_proxies and host:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                address = None
            if address is not None:
                trusted = any(address in net for net in trusted_proxies)
        return cls(
            address=host,
            address_bytes=host.encode("ascii", "replace"),
            trusted=trusted,
            scheme=scheme,
            proto_line=b"X-Forwarded-Proto: " + scheme.encode("ascii") + b"\r\n",
            proto=scheme.encode("ascii"),
        )

    def with_client_cert(self, xfcc_value: bytes | None, certificate: Any = None) -> Peer:
        """The same peer, authenticated by a client certificate (forwarded as XFCC unless
        `xfcc_value` is None)."""
        if xfcc_value is None:
            return attrs.evolve(self, certificate=certificate)
        line = b"X-Forwarded-Client-Cert: " + xfcc_value + b"\r\n"
        return attrs.evolve(
            self, xfcc_line=line, proto_line=self.proto_line + line, xfcc=xfcc_value,
            certificate=certificate,
        )


#: The peer of a front not connected yet.
NOBODY = Peer(address="", address_bytes=b"", trusted=False, scheme="http", proto_line=b"")
