"""The pools of every upstream in use (HTTP/1.1 or HTTP/2 per Service), kept across reloads."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.h2 import H2UpstreamPool
from flexgw.upstream.interfaces import IUpstreamPool
from flexgw.upstream.pool import UpstreamPool


class PoolManager:
    """The pools of every upstream in use, kept across reloads while an upstream is unchanged."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime) -> None:
        self.reactor = reactor
        self.clock = clock
        self.pools: dict[Upstream, IUpstreamPool] = {}
        self.http = HttpSettings()
        self.timeouts = Timeouts()
        self._reaper: LoopingCall | None = None

    def configure(self, http: HttpSettings, timeouts: Timeouts, upstreams: set[Upstream]) -> None:
        """Apply a new plan: new settings for new pools, and retire pools of removed upstreams."""
        self.http, self.timeouts = http, timeouts
        for upstream in [u for u in self.pools if u not in upstreams]:
            self.pools.pop(upstream).retire()
        for upstream in upstreams:
            pool = self.pools.get(upstream)
            if pool is not None:
                pool.configure(http, timeouts, upstream)

    def pool_for(self, upstream: Upstream) -> IUpstreamPool:
        """The pool for `upstream`, created on first use (HTTP/2 for `h2c`/`h2` Services)."""
        pool = self.pools.get(upstream)
        if pool is None:
            kind = H2UpstreamPool if upstream.scheme in ("h2c", "h2") else UpstreamPool
            pool = self.pools[upstream] = kind(  # type: ignore[assignment]
                self.reactor, self.clock, upstream, self.http, self.timeouts
            )
        return pool

    def start(self, interval: float = 1.0) -> None:
        """Start the periodic expiry of idle connections."""
        self._reaper = LoopingCall(self.expire_idle)
        self._reaper.clock = self.clock
        self._reaper.start(interval, now=False)

    def expire_idle(self) -> None:
        """Expire idle connections in every pool; forget forward-proxy destinations' pools
        once they hold nothing (there is one per destination a client asked for)."""
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
