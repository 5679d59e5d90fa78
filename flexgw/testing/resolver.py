"""A static IHostnameResolver for tests: names resolve only to what the test says, never DNS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from zope.interface import implementer


@implementer(IHostResolution)
class _Resolution:
    """The resolution in progress a receiver is told about (Twisted's own receivers read its
    name: ComplexResolverSimplifier, behind `reactor.resolve`, names it in DNSLookupError)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Answers are given at once: nothing to cancel."""


@implementer(IHostnameResolver)
class StaticResolver:
    """Resolves names from a mapping (name -> addresses, or a list of answers given in turn,
    for DNS-rebinding tests); records every lookup in `lookups`. Unknown names have no address.
    Inject it as a gateway's `resolver`, or as a reactor's name resolver
    (`reactor.installNameResolver`, restored after the test) for names that `connectTCP`
    resolves (reverse-proxy upstreams)."""

    def __init__(self, names: Mapping[str, Sequence[str] | Sequence[Sequence[str]]]) -> None:
        self.names = {name.lower(): value for name, value in names.items()}
        self.lookups: list[str] = []
        self._turn: dict[str, int] = {}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        """Report the configured addresses at once."""
        name = hostName.lower()
        self.lookups.append(name)
        answer: Any = self.names.get(name, [])
        if answer and not isinstance(answer[0], str):
            turn = self._turn.get(name, 0)
            self._turn[name] = turn + 1
            answer = answer[min(turn, len(answer) - 1)]
        resolutionReceiver.resolutionBegan(_Resolution(hostName))
        for text in answer:
            if ":" in text:
                resolutionReceiver.addressResolved(IPv6Address("TCP", text, portNumber))
            else:
                resolutionReceiver.addressResolved(IPv4Address("TCP", text, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver
