"""A real DNS server for tests (twisted.names' own server on 127.0.0.1, UDP, a port the
listener picks): an authoritative zone whose A/AAAA records and TTLs the test changes between
queries, and which can answer SERVFAIL or nothing at all (the client times out)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.names import authority, dns, server

#: What the zone does with a query: answer it, answer SERVFAIL, or stay silent.
ANSWER, SERVFAIL, SILENT = "answer", "servfail", "silent"


class ServerFailure(Exception):
    """The zone was told to fail (answered SERVFAIL, not logged as an error)."""


class _Zone(authority.FileAuthority):
    """An authoritative zone held in memory."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.mode = ANSWER
        self.queries: list[tuple[str, int]] = []  # (name, record type) in arrival order
        super().__init__(origin)

    def loadFile(self, filename: Any) -> None:
        """No file: the SOA of `origin`, no records yet."""
        origin = self.origin.encode()
        soa = dns.Record_SOA(
            mname=b"ns." + origin, rname=b"admin." + origin, serial=1, minimum=0, expire=0
        )
        self.soa = (origin, soa)
        self.records: dict[bytes, list[Any]] = {origin: [soa]}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        """Record the query, then answer it as the mode says."""
        self.queries.append((name.decode(), type))
        if self.mode == SERVFAIL:
            return defer.fail(ServerFailure(name.decode()))
        if self.mode == SILENT:
            return defer.Deferred()
        return super()._lookup(name, cls, type, timeout)


class _Factory(server.DNSServerFactory):
    """A DNS server factory that answers a ServerFailure with SERVFAIL without logging it."""

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        """SERVFAIL for the zone's told failures; Twisted's handling for anything else."""
        if failure.check(ServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


class ZoneServer:
    """An authoritative DNS server for the zone `origin` on 127.0.0.1 (`address`); stop it
    with `stop()` (a Deferred)."""

    def __init__(self, reactor: Any, origin: str = "flexgw.test") -> None:
        self.zone = _Zone(origin)
        self.factory = _Factory(authorities=[self.zone])
        self.protocol = dns.DNSDatagramProtocol(self.factory)
        self.port = reactor.listenUDP(0, self.protocol, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    @property
    def queries(self) -> list[tuple[str, int]]:
        """The (name, type) of every query the server got."""
        return self.zone.queries

    def set_mode(self, mode: str) -> None:
        """ANSWER, SERVFAIL or SILENT from now on."""
        self.zone.mode = mode

    def set(self, name: str, addresses: Iterable[str], ttl: int) -> None:
        """`name` has these A (and, for addresses with a colon, AAAA) records with `ttl`
        from now on (none: the name has no address records)."""
        records: list[Any] = []
        for address in addresses:
            if ":" in address:
                records.append(dns.Record_AAAA(address, ttl=ttl))
            else:
                records.append(dns.Record_A(address, ttl=ttl))
        self.zone.records[name.lower().encode()] = records

    def set_cname(self, name: str, target: str, ttl: int) -> None:
        """`name` is a CNAME of `target` with `ttl`."""
        self.zone.records[name.lower().encode()] = [dns.Record_CNAME(target.encode(), ttl=ttl)]

    def stop(self) -> Any:
        """Stop listening."""
        return self.port.stopListening()
