"""A Service with several addresses: one pool per address, a balancer over those in rotation,
the address set re-resolved periodically (Envoy's strict DNS) or given explicitly
(`Service.spec.addresses`, Kubernetes Endpoints), and per-address statistics.

An address leaves the rotation when passive outlier detection ejects it
(flexgw.upstream.outlier) or active health checks find it unhealthy (flexgw.upstream.health);
below the panic threshold (or with none left) the cluster fails open to every address, or
answers `no_healthy_upstream`, as configured.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.plan import Balancing, Endpoint, Upstream
from flexgw.upstream.balancer import BALANCERS
from flexgw.upstream.dns import IRecordResolver
from flexgw.upstream.health import HealthChecker
from flexgw.upstream.interfaces import ConnectionWaiter, IUpstreamPool
from flexgw.upstream.retry import RetryBudget

_log = Logger(namespace="flexgw.upstream")

#: The first wait before resolving a name again after it resolved to nothing (then doubled up
#: to `Balancing.dns_failure_refresh`).
DNS_RETRY_BASE = 0.5


def is_ip(host: str) -> bool:
    """`host` is an IP literal (nothing to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def needs_cluster(upstream: Upstream) -> bool:
    """Whether `upstream` is served by a Cluster: it names a host to resolve, lists
    addresses, or has a balancer, retry, outlier or health-check setting. A forward-proxy
    destination (`connect_host`) or a Service reached through the forward proxy is one pool."""
    if upstream.connect_host is not None or upstream.proxy is not None:
        return False
    return (
        upstream.balancing is not None
        or upstream.outlier is not None
        or upstream.health is not None
        or upstream.retry is not None
        or not is_ip(upstream.host)
    )


class Member:
    """One address of a cluster: its pool, its state in the rotation and its statistics."""

    __slots__ = (
        "address",
        "cluster",
        "ejected_until",
        "ejections",
        "errors",
        "failures",
        "health_failures",
        "health_successes",
        "healthy",
        "host",
        "key",
        "pool",
        "port",
        "requests",
        "retries",
        "weight",
    )

    def __init__(self, cluster: Cluster, endpoint: Endpoint, pool: IUpstreamPool) -> None:
        self.cluster = cluster
        self.host = endpoint.host
        self.port = endpoint.port
        self.weight = endpoint.weight
        self.key = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.address = f"{cluster.upstream.scheme}://{self.key}"
        self.pool = pool
        pool.member = self  # type: ignore[attr-defined]
        self.healthy = True  # active health checks' verdict (True until checked)
        self.health_successes = 0
        self.health_failures = 0
        self.ejected_until = 0.0  # outlier detection: out of rotation until then
        self.ejections = 0  # times ejected (the ejection time grows with it)
        self.errors = 0  # consecutive failures (outlier detection)
        self.requests = 0  # requests sent to this address
        self.failures = 0  # of which failed (5xx, connect failure, reset, timeout)
        self.retries = 0  # retries sent to this address

    def outstanding(self) -> int:
        """Requests in flight (or waiting for a connection) on this address."""
        pool = self.pool
        return pool.active + pool.connecting

    @property
    def ejected(self) -> bool:
        """Out of rotation by outlier detection now."""
        return self.ejected_until > self.cluster.clock.seconds()

    def state(self) -> str:
        """`healthy`, `unhealthy` (active checks) or `ejected` (outlier detection)."""
        if not self.healthy:
            return "unhealthy"
        if self.ejected:
            return "ejected"
        return "healthy"


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects one resolution's addresses for a cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.addresses: list[str] = []

    def resolutionBegan(self, resolution: Any) -> None:
        """A resolution started."""

    def addressResolved(self, address: Any) -> None:
        """One address of the name."""
        if isinstance(address, (IPv4Address, IPv6Address)):
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        """All addresses are in."""
        self.cluster.resolved(self, self.addresses)


class Cluster:
    """The pools of one Service's addresses, and which of them takes the next request."""

    def __init__(self, manager: Any, upstream: Upstream, rng: random.Random | None = None) -> None:
        self.manager = manager
        self.clock = manager.clock
        self.upstream = upstream
        self.balancing = upstream.balancing or Balancing()
        self.rng = rng or random.Random()
        self.members: dict[tuple[str, int], Member] = {}
        self.in_rotation: list[Member] = []
        self.balancer: Any = None
        self.all_balancer: Any = None  # over every member (panic mode)
        self.panic = False
        self.waiters: list[tuple[ConnectionWaiter, str | None]] = []
        self.receiver: object | None = None  # the resolution in progress (its token)
        self.lookup: Any = None  # its Deferred (an IRecordResolver's)
        self.resolve_timer: Any = None
        self.dns_backoff = DNS_RETRY_BASE
        self.dns_failures = 0  # resolutions that gave nothing (metrics)
        self.resolutions = 0
        self.retired = False
        # The retry budget (`upstream-retry`), and the health checker (`upstream-health-check`)
        self.budget = RetryBudget(upstream.retry) if upstream.retry is not None else None
        self.health: HealthChecker | None = None
        if upstream.health is not None:
            self.health = HealthChecker(self, upstream.health, self.rng)
        self.ejection_timers: dict[Member, Any] = {}
        endpoints = self.balancing.endpoints
        self.named = not endpoints and not is_ip(upstream.host)
        if endpoints:
            self.set_endpoints(endpoints)
        elif not self.named:
            self.set_endpoints((Endpoint(upstream.host, upstream.port),))
        elif self.health is not None:
            self.resolve()  # checked from now
        # (otherwise a name is resolved on the first request: `pick`)

    # -- the address set -------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Any) -> None:
        """Serve exactly `endpoints` from now: new addresses get a pool, gone ones are retired
        (their requests in flight finish), kept ones keep their pool and state."""
        wanted = {(e.host, e.port): e for e in endpoints}
        for key in [k for k in self.members if k not in wanted]:
            member = self.members.pop(key)
            member.pool.retire()
            if self.health is not None:
                self.health.forget(member)
            timer = self.ejection_timers.pop(member, None)
            if timer is not None and timer.active():
                timer.cancel()
        for key, endpoint in wanted.items():
            member = self.members.get(key)
            if member is not None and member.weight != endpoint.weight:
                member.weight = endpoint.weight
            if member is None:
                pool = self.manager.make_pool(
                    attrs.evolve(self.upstream, connect_host=endpoint.host, port=endpoint.port)
                )
                member = self.members[key] = Member(self, endpoint, pool)
                if self.health is not None:
                    self.health.watch(member)
        self.rebuild()

    def rebuild(self) -> None:
        """Rebuild the balancer over the addresses in rotation (after any change of the set or
        of an address's health or ejection)."""
        members = sorted(self.members.values(), key=lambda m: (m.host, m.port))
        now = self.clock.seconds()
        in_rotation = [m for m in members if m.healthy and m.ejected_until <= now]
        make = BALANCERS[self.balancing.algorithm]
        threshold = self.balancing.panic_threshold
        self.panic = bool(members) and (
            not in_rotation or len(in_rotation) * 100 < threshold * len(members)
        )
        self.in_rotation = in_rotation
        self.balancer = make(in_rotation, self.rng) if in_rotation else None
        self.all_balancer = make(members, self.rng) if members else None

    def resolve(self) -> None:
        """Resolve the Service's host now (a resolution in progress is left to finish): with
        the records' TTL when the resolver gives them (IRecordResolver), else without."""
        if self.receiver is not None or self.retired:
            return
        self.resolve_timer = None
        self.resolutions += 1
        resolver: Any = self.manager.resolver
        if IRecordResolver.providedBy(resolver):
            token = self.receiver = object()
            lookup = resolver.resolve_addresses(self.upstream.host)
            if self.receiver is token:  # (not answered at once)
                self.lookup = lookup
            lookup.addCallbacks(
                lambda answer: self.resolved(token, list(answer.addresses), answer.ttl),
                lambda failure: self.resolved(token, [], None, failure),
            )
            return
        receiver = self.receiver = _Receiver(self)
        hostnames: IHostnameResolver = resolver
        hostnames.resolveHostName(receiver, self.upstream.host, self.upstream.port)

    def refresh_delay(self, ttl: float | None) -> float:
        """The wait before the next resolution after a good answer: the records' TTL bounded
        by dnsMinRefreshSeconds..dnsMaxRefreshSeconds, or dnsRefreshSeconds without a TTL."""
        balancing = self.balancing
        if ttl is None:
            return balancing.dns_refresh
        return min(max(ttl, balancing.dns_min_refresh), balancing.dns_max_refresh)

    def resolved(
        self,
        receiver: object,
        addresses: list[str],
        ttl: float | None = None,
        failure: Failure | None = None,
    ) -> None:
        """A resolution ended: serve its addresses (IPv4 ones when there are any, as the
        reactor's own lookup does) until the TTL says to ask again, or keep the last good set
        and try again sooner (`failure`: the resolver's reason)."""
        if receiver is not self.receiver or self.retired:
            return
        self.receiver = self.lookup = None
        ipv4 = [a for a in addresses if ":" not in a]
        found = sorted(set(ipv4 or addresses))
        if found:
            self.dns_backoff = DNS_RETRY_BASE
            self.set_endpoints(tuple(Endpoint(a, self.upstream.port) for a in found))
            delay = self.refresh_delay(ttl)
        else:
            self.dns_failures += 1
            delay = self.dns_backoff
            self.dns_backoff = min(self.dns_backoff * 2, self.balancing.dns_failure_refresh)
            error = failure.value if failure is not None else DNSLookupError(self.upstream.host)
            if self.members:
                self.manager.dns_failed(
                    self.upstream.host,
                    self.upstream.key,
                    Failure(error),
                    f"; keeping its last {len(self.members)} address(es)",
                )
            else:
                self.manager.dns_failed(self.upstream.host, self.upstream.key, Failure(error))
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter, key in waiters:
                pool = self.pick(key)
                if pool is None:
                    waiter.upstream_connect_failed(Failure(DNSLookupError(self.upstream.host)))
                else:
                    waiter.pool = pool  # type: ignore[attr-defined]
                    pool.acquire(waiter)
        if self.members:
            # (with no address ever found, the next request resolves again: nothing to refresh)
            self.resolve_timer = self.clock.callLater(delay, self.resolve)

    # -- picking an address ----------------------------------------------------------------------

    def pick(self, key: str | None = None, exclude: Any = None) -> Any:
        """The pool of the address that takes the next request; `self` (which queues the
        request) while the first resolution is under way; None when no address may take it
        (503 `no_healthy_upstream`). `exclude`: another pool than this one when possible."""
        balancer = self.balancer
        if balancer is None or self.panic:
            if not self.members:
                if self.named:
                    # No address yet: resolve (if not under way), this object queues the
                    # request meanwhile (`acquire`), or fails it as a DNS failure.
                    self.resolve()
                    self._queued_key = key  # for the `acquire` that follows
                    return self
                return None
            if self.balancing.fail_open:
                balancer = self.all_balancer  # panic mode: every address, healthy or not
            elif balancer is None:
                return None  # whenNoneHealthy: reject
        member = balancer.pick(key, exclude.member if exclude is not None else None)
        member.requests += 1
        return member.pool

    def requests_in_flight(self) -> int:
        """Requests in flight (or waiting for a connection) on every address."""
        return sum(m.outstanding() for m in self.members.values()) + len(self.waiters)

    # -- passive health: outlier detection (`upstream-outlier-detection`) -------------------------

    def try_failed(self, member: Member, kind: str) -> None:
        """A try on `member` failed (`5xx`, connect-failure, reset, timeout): count it; with
        outlier detection, `consecutiveErrors` of them in a row eject the address."""
        member.failures += 1
        outlier = self.upstream.outlier
        if outlier is None:
            return
        member.errors += 1
        if member.errors >= outlier.consecutive_errors and not member.ejected:
            self.eject(member)

    def eject(self, member: Member) -> bool:
        """Take `member` out of rotation for baseEjectionSeconds times the number of its
        ejections (capped at maxEjectionSeconds), unless that would eject more than
        maxEjectionPercent of the addresses (one may always be ejected)."""
        outlier = self.upstream.outlier
        now = self.clock.seconds()
        ejected = sum(1 for m in self.members.values() if m.ejected_until > now)
        allowed = max(1, int(len(self.members) * outlier.max_ejection_percent / 100))
        member.errors = 0
        if ejected + 1 > allowed:
            return False
        member.ejections += 1
        duration = min(outlier.base_ejection * member.ejections, outlier.max_ejection)
        member.ejected_until = now + duration
        _log.warn(
            "Upstream {upstream}: address {address} ejected for {duration}s after"
            " {errors} consecutive failures (ejection {n})",
            upstream=self.upstream.key,
            address=member.address,
            duration=duration,
            errors=outlier.consecutive_errors,
            n=member.ejections,
        )
        timer = self.ejection_timers.pop(member, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.ejection_timers[member] = self.clock.callLater(duration, self._unejected, member)
        self.rebuild()
        return True

    def _unejected(self, member: Member) -> None:
        """An ejection ended: the address is back in rotation."""
        self.ejection_timers.pop(member, None)
        if self.members.get((member.host, member.port)) is member:
            self.rebuild()

    # The queue of requests waiting for the first resolution (this object stands in as their
    # pool until then).

    _queued_key: str | None = None

    def acquire(self, waiter: ConnectionWaiter, fresh: bool = False) -> None:
        """Queue `waiter` until the name is resolved (with the hash key `pick` was given); a
        resolver that answered at once: connect now, or fail as a DNS failure."""
        key = self._queued_key
        if self.receiver is not None:
            self.waiters.append((waiter, key))
            return
        pool = self.pick(key) if self.members else None
        if pool is None or pool is self:
            waiter.upstream_connect_failed(Failure(DNSLookupError(self.upstream.host)))
            return
        waiter.pool = pool  # type: ignore[attr-defined]
        pool.acquire(waiter)

    def cancel(self, waiter: ConnectionWaiter) -> None:
        """A queued waiter gave up."""
        self.waiters = [(w, k) for w, k in self.waiters if w is not waiter]

    member = None  # (the queue is no address)

    # -- life cycle ------------------------------------------------------------------------------

    def retire(self) -> None:
        """The Service left the configuration (or changed): stop resolving and checking, close
        idle connections (in-flight ones close when done)."""
        self.retired = True
        self.lookup = None  # (a resolution under way is ignored when it ends: `resolved`)
        if self.resolve_timer is not None and self.resolve_timer.active():
            self.resolve_timer.cancel()
        self.resolve_timer = None
        for timer in self.ejection_timers.values():
            if timer.active():
                timer.cancel()
        self.ejection_timers.clear()
        if self.health is not None:
            self.health.stop()
        for member in self.members.values():
            member.pool.retire()
        waiters, self.waiters = self.waiters, []
        for waiter, _ in waiters:
            waiter.upstream_connect_failed(Failure(DNSLookupError(self.upstream.host)))

    def pools(self) -> list[Any]:
        """Every address's pool."""
        return [m.pool for m in self.members.values()]

    def status(self) -> dict[str, Any]:
        """The cluster's state for `/status`."""
        return {
            "upstream": self.upstream.key,
            "algorithm": self.balancing.algorithm,
            "resolved": self.named,
            "panic": self.panic,
            "healthChecked": self.health is not None,
            "outlierDetection": self.upstream.outlier is not None,
            "retryBudget": None
            if self.budget is None
            else {"active": self.budget.active, "exhausted": self.budget.exhausted},
            "addresses": [
                {
                    "address": m.address,
                    "weight": m.weight,
                    "state": m.state(),
                    # active checks' verdict (None: not checked), outlier ejection now
                    "health": None
                    if self.health is None
                    else ("healthy" if m.healthy else "unhealthy"),
                    "ejected": m.ejected,
                    "active": m.pool.active,
                    "idle": len(m.pool.idle),
                    "requests": m.requests,
                    "failures": m.failures,
                    "retries": m.retries,
                    "ejections": m.ejections,
                }
                for m in sorted(self.members.values(), key=lambda m: (m.host, m.port))
            ],
        }
