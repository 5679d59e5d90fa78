"""The pools of every upstream in use (HTTP/1.1 or HTTP/2 per Service), kept across reloads."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHostnameResolver, IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.alpn import AlpnUpstreamPool
from flexgw.upstream.cluster import Cluster, needs_cluster
from flexgw.upstream.dns import IRecordResolver
from flexgw.upstream.h2 import H2UpstreamPool
from flexgw.upstream.interfaces import IUpstreamPool
from flexgw.upstream.pool import UpstreamPool

_log = Logger(namespace="flexgw.upstream")


class ThrottledLog:
    """Which records of a repeating failure get written: one per key, and at most `burst`
    keys, per `interval` seconds; the others are counted, and the count goes into the next
    record written (a flood of failing requests writes a few lines, not one per request)."""

    def __init__(self, clock: IReactorTime, interval: float = 10.0, burst: int = 5) -> None:
        self.clock = clock
        self.interval = interval
        self.burst = burst
        self.window_start = float("-inf")
        self.keys: set[str] = set()
        self.skipped = 0

    def admit(self, key: str) -> int | None:
        """None: skip this record; else write it, saying how many were skipped before it."""
        now = self.clock.seconds()
        if now - self.window_start >= self.interval:
            self.window_start = now
            self.keys.clear()
        if key in self.keys or len(self.keys) >= self.burst:
            self.skipped += 1
            return None
        self.keys.add(key)
        skipped, self.skipped = self.skipped, 0
        return skipped


class PoolManager:
    """The pools of every upstream in use, kept across reloads while an upstream is unchanged."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        resolver: IHostnameResolver | IRecordResolver | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        # Names of Services are resolved with this: an IRecordResolver (the records' TTLs
        # drive re-resolution; `twistd flexgw` gives flexgw.upstream.dns.RecordResolver) or an
        # IHostnameResolver (default: the reactor's own, `installNameResolver` in tests).
        self.name_resolver = resolver
        self.pools: dict[Upstream, IUpstreamPool] = {}  # Services of one IP address
        self.clusters: dict[Upstream, Cluster] = {}  # the others (flexgw.upstream.cluster)
        self.http = HttpSettings()
        self.timeouts = Timeouts()
        self._reaper: LoopingCall | None = None
        # Failed name lookups (reverse-proxy upstreams and forward-proxy destinations alike)
        self.dns_log = ThrottledLog(clock)

    @property
    def resolver(self) -> IHostnameResolver | IRecordResolver:
        """The resolver of Service names (the reactor's unless one was given)."""
        if self.name_resolver is not None:
            return self.name_resolver
        return self.reactor.nameResolver  # type: ignore[attr-defined,no-any-return]

    def dns_failed(self, name: str, upstream: str, reason: Failure, note: str = "") -> None:
        """Log that `name` (for `upstream`) did not resolve, with the resolver's error; rate-
        limited by `dns_log`."""
        skipped = self.dns_log.admit(name)
        if skipped is None:
            return
        _log.warn(
            "Name lookup for {name} (upstream {upstream}) failed: {error}{note}"
            + (" ({skipped} more lookup failures not logged before this one)" if skipped else ""),
            name=name,
            upstream=upstream,
            error=reason.getErrorMessage(),
            note=note,
            skipped=skipped,
        )

    def configure(self, http: HttpSettings, timeouts: Timeouts, upstreams: set[Upstream]) -> None:
        """Apply a new plan: new settings for new pools, and retire pools of removed upstreams."""
        self.http, self.timeouts = http, timeouts
        for upstream in [u for u in self.pools if u not in upstreams]:
            self.pools.pop(upstream).retire()
        for upstream in [u for u in self.clusters if u not in upstreams]:
            self.clusters.pop(upstream).retire()
        for upstream in upstreams:
            pool = self.pools.get(upstream)
            if pool is not None:
                pool.configure(http, timeouts, upstream)
            cluster = self.clusters.get(upstream)
            if cluster is not None:
                for pool in cluster.pools():
                    pool.configure(http, timeouts, pool.upstream)
            elif upstream.health is not None and needs_cluster(upstream):
                # Checked from now, not from the first request.
                self.clusters[upstream] = Cluster(self, upstream)

    def make_pool(self, upstream: Upstream) -> IUpstreamPool:
        """A new pool for `upstream` (HTTP/2 for `h2c`/`h2` Services, by ALPN for an https://
        Service whose `alpn` lists h2)."""
        kind: Any = H2UpstreamPool if upstream.scheme in ("h2c", "h2") else UpstreamPool
        if kind is UpstreamPool and upstream.tls is not None and upstream.tls.h2_creator:
            kind = AlpnUpstreamPool  # https:// with h2 in alpn: what the upstream picks
        return kind(  # type: ignore[no-any-return]
            self.reactor, self.clock, upstream, self.http, self.timeouts
        )

    def pool_for(self, upstream: Upstream) -> IUpstreamPool:
        """The pool for `upstream` as one address, created on first use."""
        pool = self.pools.get(upstream)
        if pool is None:
            pool = self.pools[upstream] = self.make_pool(upstream)
        return pool

    def pick(self, upstream: Upstream, key: str | None = None, exclude: Any = None) -> Any:
        """The pool that takes the next request to `upstream`: its only pool, or the one of the
        address its cluster's balancer picks (`key`: the hash key; `exclude`: a pool to avoid,
        for a retry). None: no address may take it (`no_healthy_upstream`). While a name is
        first resolved, the cluster itself queues the request (its `acquire`)."""
        pool = self.pools.get(upstream)
        if pool is not None:
            return pool
        cluster = self.clusters.get(upstream)
        if cluster is None:
            if not needs_cluster(upstream):
                return self.pool_for(upstream)
            cluster = self.clusters[upstream] = Cluster(self, upstream)
        return cluster.pick(key, exclude)

    def all_pools(self) -> list[tuple[Upstream, str, IUpstreamPool]]:
        """Every pool: (the Service's upstream, the address it connects to, the pool)."""
        found: list[tuple[Upstream, str, IUpstreamPool]] = [
            (upstream, f"{upstream.scheme}://{upstream.authority}", pool)
            for upstream, pool in self.pools.items()
        ]
        for upstream, cluster in self.clusters.items():
            for member in cluster.members.values():
                found.append((upstream, member.address, member.pool))
        found.sort(key=lambda item: (item[0].key, item[1]))
        return found

    def start(self, interval: float = 1.0) -> None:
        """Start the periodic expiry of idle connections."""
        self._reaper = LoopingCall(self.expire_idle)
        self._reaper.clock = self.clock
        self._reaper.start(interval, now=False)

    def expire_idle(self) -> None:
        """Expire idle connections in every pool; forget forward-proxy destinations' pools
        once they hold nothing (there is one per destination a client asked for)."""
        for cluster in self.clusters.values():
            for member_pool in cluster.pools():
                member_pool.expire_idle()
        unused = []
        for upstream, pool in self.pools.items():
            pool.expire_idle()
            if (
                upstream.connect_host is not None
                and not pool.idle
                and not pool.active
                and not pool.connecting
            ):
                unused.append(upstream)
        for upstream in unused:
            del self.pools[upstream]

    def stop(self) -> None:
        """Stop expiry and close all idle connections."""
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        for pool in self.pools.values():
            pool.close_all()
        for cluster in self.clusters.values():
            cluster.retire()
