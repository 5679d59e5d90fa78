"""Twisted's PROXY protocol pieces (v1/v2 header parsers, the wrapping protocol and factory).

`twisted.protocols.haproxy` makes only `proxyEndpoint` public: a server endpoint wrapper that
cannot be switched per connection on reload, runs the wrapped protocol's `connectionMade`
before the header is parsed and refuses a header split across reads. flexgw's
`ingress/proxyprotocol.py` builds its own wrapper on the parsers below.

Private API: `twisted.protocols.haproxy._info.ProxyInfo`, `._exceptions.InvalidProxyHeader`,
`._v1parser.V1Parser`, `._v2parser.V2Parser`, `._wrapper.HAProxyProtocolWrapper` and
`.HAProxyWrappingFactory`. Kept: no public parser.
"""

from __future__ import annotations

from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

__all__ = [
    "HAProxyProtocolWrapper",
    "HAProxyWrappingFactory",
    "InvalidProxyHeader",
    "ProxyInfo",
    "V1Parser",
    "V2Parser",
]
