"""What every upstream pool (HTTP/1.1 and HTTP/2) holds: its upstream, the reactor, and the
settings a reload re-applies through `configure`."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTCP, IReactorTime

from flexgw.plan import HttpSettings, Timeouts, Upstream


class PoolBase:
    """The reactor, the upstream and the reloadable settings of one pool."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        upstream: Upstream,
        http: HttpSettings,
        timeouts: Timeouts,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.upstream = upstream
        self.configure(http, timeouts, upstream)

    def configure(self, http: HttpSettings, timeouts: Timeouts, upstream: Upstream) -> None:
        """Apply the gateway's settings and the Service's `idle-timeout-flex`. `upstream` is the
        current plan's copy: equal to the one the pool was made for, but its idle timeout (not
        part of its identity) may have changed."""
        self.max_idle = http.max_idle_per_upstream
        self.connect_timeout = http.connect_timeout
        self.idle_timeout = upstream.idle_timeout or timeouts.upstream_idle
