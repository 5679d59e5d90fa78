"""HTTP/2 by ALPN for `https://` Services whose `tls-outbound` binding's `alpn` lists h2: the
gateway offers `h2,http/1.1` and speaks what the upstream picks, as Flex does.

`AlpnUpstreamPool` holds an HTTP/2 pool (connections offering h2) and an HTTP/1.1 pool
(connections offering http/1.1 only). Requests go to the HTTP/2 pool until an upstream picks
HTTP/1.1 (or no protocol) in a handshake: from then on, and for the requests that waited on
that connection, the HTTP/1.1 pool serves (the choice holds for the pool's life: a reload that
changes the Service makes a new pool, which asks again). Connections report to the pool that
made them; an exchange's release, discard and detach go there through `connection.pool`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.python.failure import Failure

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.h2 import H2UpstreamPool
from flexgw.upstream.interfaces import ConnectionWaiter
from flexgw.upstream.pool import UpstreamPool


class AlpnUpstreamPool:
    """The connections to an https:// upstream that may pick h2 or HTTP/1.1 by ALPN."""

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
        self.clock = clock
        self.upstream = upstream
        self.h1 = UpstreamPool(reactor, clock, upstream, http, timeouts)
        self.h2 = H2UpstreamPool(reactor, clock, upstream, http, timeouts)
        self.h2.tls_creator = upstream.tls.h2_creator
        self.h2.on_http1 = self._http1
        self.chosen: Any = self.h2  # the pool new requests go to

    @property
    def protocol(self) -> str:
        """What the upstream is spoken to in: "h2" until it picked HTTP/1.1."""
        return "h2" if self.chosen is self.h2 else "http/1.1"

    def _http1(self, waiters: list[ConnectionWaiter]) -> None:
        """The upstream picked HTTP/1.1: from now on, HTTP/1.1 (the waiters first)."""
        self.chosen = self.h1
        for waiter in waiters:
            self.h1.acquire(waiter)

    @property
    def connect_timeout(self) -> float:
        """The connect timeout (both pools have the same)."""
        return self.h1.connect_timeout

    @property
    def active(self) -> int:
        """Streams and connections in use."""
        return self.h1.active + self.h2.active

    @property
    def connecting(self) -> int:
        """Connection attempts under way."""
        return self.h1.connecting + self.h2.connecting

    @property
    def idle(self) -> list[Any]:
        """Connections with nothing to do."""
        return self.h1.idle + self.h2.idle

    def acquire(self, waiter: ConnectionWaiter, fresh: bool = False) -> None:
        """A connection (or stream) for `waiter` from the protocol the upstream picked."""
        self.chosen.acquire(waiter, fresh)

    def cancel(self, waiter: ConnectionWaiter) -> None:
        """`waiter` gave up (it waits in one of the pools, or in none any more)."""
        self.h2.cancel(waiter)
        self.h1.cancel(waiter)

    def release(self, connection: Any) -> None:
        """An exchange is done with `connection`: to the pool that made it."""
        connection.pool.release(connection)

    def discard(self, connection: Any) -> None:
        """An exchange abandons `connection` midway."""
        connection.pool.discard(connection)

    def detach(self, connection: Any) -> None:
        """`connection` was lost under its exchange."""
        connection.pool.detach(connection)

    def connection_made(self, connection: Any) -> None:
        """Connections report to their own pool; never called here."""
        connection.pool.connection_made(connection)

    def connection_lost(self, connection: Any, reason: Failure | None = None) -> None:
        """Connections report to their own pool; never called here."""
        connection.pool.connection_lost(connection, reason)

    def configure(self, http: HttpSettings, timeouts: Timeouts, upstream: Upstream) -> None:
        """A reload's settings, for both pools."""
        self.upstream = upstream
        self.h1.configure(http, timeouts, upstream)
        self.h2.configure(http, timeouts, upstream)

    def expire_idle(self) -> None:
        """Close connections idle for too long, in both pools."""
        self.h1.expire_idle()
        self.h2.expire_idle()

    def retire(self) -> None:
        """The upstream left the configuration."""
        self.h1.retire()
        self.h2.retire()

    def close_all(self) -> None:
        """Close every idle connection; busy ones close when done."""
        self.h1.close_all()
        self.h2.close_all()
