"""Name resolution for the forward proxy through an injected IHostnameResolver.

The gateway uses the reactor's `nameResolver` unless one is injected (tests inject a
`flexgw.testing.resolver.StaticResolver`, never real DNS). Every address of the answer is
returned, so that the caller can check each one before connecting to one of them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IReactorTime, IResolutionReceiver
from zope.interface import implementer

from flexgw.policies.destinations import IPAddress


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects the addresses of one resolution."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.addresses: list[IPAddress] = []
        self.done: Deferred[list[IPAddress]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        """Nothing to keep."""

    def addressResolved(self, address: Any) -> None:
        """One address of the answer (IPv4Address / IPv6Address from twisted.internet.address)."""
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return
        if ip not in self.addresses:
            self.addresses.append(ip)

    def resolutionComplete(self) -> None:
        """The answer is complete: fire (a failure when there is no address)."""
        if self.done.called:
            return
        if self.addresses:
            self.done.callback(self.addresses)
        else:
            self.done.errback(DNSLookupError(self.host))


def resolve_all(
    resolver: IHostnameResolver, clock: IReactorTime, host: str, port: int, timeout: float
) -> Deferred[list[IPAddress]]:
    """Every address `host` resolves to (TCP), or a DNSLookupError / TimeoutError failure."""
    receiver = _Receiver(host)
    try:
        resolver.resolveHostName(receiver, host, port, transportSemantics="TCP")
    except Exception as exc:  # noqa: BLE001 (a resolver that raises is a lookup failure)
        if not receiver.done.called:
            receiver.done.errback(DNSLookupError(f"{host}: {exc}"))
    return receiver.done.addTimeout(timeout, clock)
