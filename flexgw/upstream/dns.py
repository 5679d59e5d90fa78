"""Resolving a Service's name with the records' TTLs (twisted.names): /etc/hosts first (no TTL
there), then A and AAAA queries to the nameservers of resolv.conf with its search list, so a
cluster re-resolves on the TTL like Envoy's strict DNS with `respect_dns_ttl`."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.names.error import DNSNameError
from twisted.names.hosts import searchFileForAll
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import Interface, implementer

#: What one name's queries may fail with (any of them: the next candidate name is tried).
_QUERY_ERRORS = (
    dns_error.DomainError,
    dns_error.DNSFormatError,
    dns_error.DNSServerError,
    dns_error.DNSNotImplementedError,
    dns_error.DNSQueryRefusedError,
    dns_error.DNSUnknownError,
    dns_error.ResolverError,
    defer.TimeoutError,
    ValueError,
    OSError,
)

#: How long one query waits for an answer, then each retry (seconds).
QUERY_TIMEOUT = (1.0, 3.0)


@attrs.frozen
class Answer:
    """The addresses a name resolved to, and the smallest TTL of the records that gave them
    (None: the source has no TTL, e.g. /etc/hosts; the cluster's configured refresh applies)."""

    addresses: tuple[str, ...]
    ttl: float | None


class IRecordResolver(Interface):
    """Resolves a name to its addresses with their TTL (an IHostnameResolver reports none)."""

    def resolve_addresses(name: str) -> Deferred[Answer]:
        """The IPv4 addresses of `name` if it has any, else its IPv6 ones, with their TTL; a
        failure (DNSLookupError) when it has none or the servers fail or time out."""


#: The nameserver when resolv.conf names none (as the C library does).
LOCAL_SERVERS = (("127.0.0.1", 53),)


@attrs.frozen
class ResolvConf:
    """What flexgw reads of resolv.conf(5): nameservers, search list, ndots."""

    servers: tuple[tuple[str, int], ...] = LOCAL_SERVERS
    search: tuple[str, ...] = ()
    ndots: int = 1

    @classmethod
    def parse(cls, text: str) -> ResolvConf:
        """The settings of a resolv.conf text (the last `search`/`domain` line wins)."""
        servers: list[tuple[str, int]] = []
        search: tuple[str, ...] = ()
        ndots = 1
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            if words[0] == "nameserver" and len(words) > 1:
                servers.append((words[1], 53))
            elif words[0] in ("search", "domain"):
                search = tuple(w.rstrip(".") for w in words[1:] if w.rstrip("."))
            elif words[0] == "options":
                for option in words[1:]:
                    if option.startswith("ndots:") and option[6:].isdigit():
                        ndots = min(int(option[6:]), 15)
        return cls(tuple(servers) or LOCAL_SERVERS, search, ndots)

    def candidates(self, name: str) -> list[str]:
        """The names to query for `name`, in order (as the C library does): a name with at
        least `ndots` dots as given first, then with each search domain; a name ending in a
        dot only as given."""
        if name.endswith("."):
            return [name.rstrip(".")]
        searched = [f"{name}.{domain}" for domain in self.search]
        if name.count(".") >= self.ndots:
            return [name, *searched]
        return [*searched, name]


@implementer(IRecordResolver)
class RecordResolver:
    """IRecordResolver over twisted.names: the hosts file, then the nameservers (re-read when
    resolv.conf changes; `servers` fixes them instead, for tests)."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]] | None = None,
        resolv_conf: str = "/etc/resolv.conf",
        hosts: str = "/etc/hosts",
        timeout: Sequence[float] = QUERY_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.servers = tuple(servers) if servers is not None else None
        self.resolv_conf = resolv_conf
        self.hosts = FilePath(hosts)
        self.timeout = tuple(timeout)
        self._conf_stamp: Any = None
        self.conf = ResolvConf()
        self._client: Any = None

    def _current(self) -> Any:
        """The twisted.names client for the current resolv.conf (rebuilt when it changed)."""
        if self.servers is not None:
            if self._client is None:
                self.conf = ResolvConf(self.servers)
                self._client = client.Resolver(servers=list(self.servers), reactor=self.reactor)
            return self._client
        try:
            stat = os.stat(self.resolv_conf)
            stamp: Any = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if self._client is None or stamp != self._conf_stamp:
            self._conf_stamp = stamp
            try:
                with open(self.resolv_conf, encoding="utf-8", errors="replace") as f:
                    self.conf = ResolvConf.parse(f.read())
            except OSError:
                self.conf = ResolvConf()
            self._client = client.Resolver(servers=list(self.conf.servers), reactor=self.reactor)
        return self._client

    def resolve_addresses(self, name: str) -> Deferred[Answer]:
        """See IRecordResolver."""
        listed = searchFileForAll(self.hosts, name.encode())
        if listed:
            ipv4 = [a for a in listed if ":" not in a]
            return defer.succeed(Answer(tuple(ipv4 or listed), None))
        return Deferred.fromCoroutine(self._query(self._current(), name))

    async def _query(self, resolver: Any, name: str) -> Answer:
        """Each candidate name in turn until one has addresses."""
        error: Failure | None = None
        for candidate in self.conf.candidates(name):
            try:
                answer = await self._ask(resolver, candidate)
            except _QUERY_ERRORS:
                failure = Failure()
                if error is None or error.check(DNSNameError):
                    error = failure
                continue
            if answer.addresses:
                return answer
        reason = "" if error is None else f": {error.getErrorMessage() or error.type.__name__}"
        raise DNSLookupError(f"{name}{reason}")

    async def _ask(self, resolver: Any, name: str) -> Answer:
        """A and AAAA for one name at once: the IPv4 addresses when there are any; either
        query failing is that name's failure unless the other gave addresses."""
        results = await defer.DeferredList(
            [
                resolver.lookupAddress(name, self.timeout),
                resolver.lookupIPV6Address(name, self.timeout),
            ],
            consumeErrors=True,
        )
        failure: Failure | None = None
        for ok, result in results:
            if not ok:
                failure = failure or result
                continue
            answer = _records(result[0])
            if answer.addresses:
                return answer  # (the A answer first: IPv4 preferred)
        if failure is not None:
            failure.raiseException()
        return Answer((), None)


def _records(answers: Sequence[dns.RRHeader]) -> Answer:
    """The addresses of one answer section (CNAMEs followed as the server listed them) and
    the smallest TTL on the way."""
    addresses: list[str] = []
    ttl: float | None = None
    for record in answers:
        if record.type not in (dns.A, dns.AAAA, dns.CNAME):
            continue
        ttl = record.ttl if ttl is None else min(ttl, record.ttl)
        if record.type == dns.A:
            addresses.append(socket.inet_ntop(socket.AF_INET, record.payload.address))
        elif record.type == dns.AAAA:
            addresses.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    return Answer(tuple(addresses), float(ttl) if addresses and ttl is not None else None)
