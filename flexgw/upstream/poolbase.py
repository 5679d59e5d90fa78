"""What every upstream pool (HTTP/1.1 and HTTP/2) holds: its upstream, the reactor, and the
settings a reload re-applies through `configure`; and how both connect (`connect_upstream`:
directly, or through the forward proxy)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory

from flexgw.http.connect import ConnectTunnelFactory
from flexgw.plan import HttpSettings, Timeouts, Upstream


class PoolBase:
    """The reactor, the upstream and the reloadable settings of one pool."""

    #: The flexgw.upstream.cluster.Member this pool serves (None: a Service of one address).
    member: Any = None

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


def connect_upstream(
    reactor: Any, clock: IReactorTime, upstream: Any, factory: ClientFactory, timeout: float
) -> Any:
    """`reactor.connectTCP` to `upstream` for `factory` (an HTTP/1.1 or HTTP/2 pool's attempt,
    TLS-wrapped or not), through `upstream.proxy` when there is one: directly to the proxy
    for a plain-HTTP upstream sent in absolute form (`upstream.request_prefix`), else through
    a CONNECT tunnel (TLS, h2c: anything that is not absolute-form HTTP/1.1). A forward-proxy
    destination connects directly to the address its SSRF check passed (`connect_host`).
    Returns the connector (`disconnect()` gives the attempt up)."""
    host, port = upstream.connect_host or upstream.host, upstream.port
    proxy = upstream.proxy
    if proxy is not None:
        host, port = proxy.host, proxy.port
        if not upstream.request_prefix:
            factory = ConnectTunnelFactory(
                factory,
                upstream.host,
                upstream.port,
                proxy.authorization,
                clock,
                timeout,
                proxy.authority.decode("latin-1"),
            )
    return reactor.connectTCP(host, port, factory, timeout=timeout)
