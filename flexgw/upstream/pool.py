"""Pools of keep-alive upstream connections, one per upstream, with idle expiry."""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.connection import TLSUpstreamConnection, UpstreamConnection
from flexgw.upstream.poolbase import PoolBase
from flexgw.upstream.tunnel import connect_upstream

_log = Logger(namespace="flexgw.upstream")


class UpstreamTLSError(Exception):
    """The TLS handshake with an upstream failed (certificate, host name, protocol)."""


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


class ConnectionWaiter(TypingProtocol):
    """Whoever asked the pool for a connection."""

    def upstream_ready(self, connection: UpstreamConnection, reused: bool) -> None: ...
    def upstream_connect_failed(self, reason: Failure) -> None: ...


class _Connect(ClientFactory):
    """One connection attempt on behalf of one waiter."""

    noisy = False

    def __init__(self, pool: UpstreamPool, waiter: ConnectionWaiter) -> None:
        self.pool = pool
        self.waiter = waiter
        self.connector: Any = None
        self.cancelled = False  # the waiter gave up (see UpstreamPool.cancel)

    def buildProtocol(self, addr: object) -> UpstreamConnection:
        """Build the connection; the pool hands it to the waiter once connected (over TLS:
        once the handshake, with its certificate checks, completed)."""
        pool = self.pool
        if pool.upstream.tls is not None:
            connection: UpstreamConnection = TLSUpstreamConnection(pool)
        else:
            connection = UpstreamConnection(pool)
        self.pool._pending[connection] = self
        return connection

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        """Connect refused, unreachable or timed out."""
        if self.cancelled:
            return
        pool = self.pool
        pool.connecting -= 1
        del pool._attempts[self.waiter]
        self.waiter.upstream_connect_failed(reason)


class UpstreamPool(PoolBase):
    """Idle keep-alive connections to one upstream, reused most-recently-idle first."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        upstream: Upstream,
        http: HttpSettings,
        timeouts: Timeouts,
    ) -> None:
        super().__init__(reactor, clock, upstream, http, timeouts)
        self.idle: list[UpstreamConnection] = []
        self.active = 0
        self.connecting = 0
        self._attempts: dict[ConnectionWaiter, _Connect] = {}  # by waiter, until connected
        self._pending: dict[UpstreamConnection, _Connect] = {}  # built, not connected yet

    def acquire(self, waiter: ConnectionWaiter, fresh: bool = False) -> None:
        """Give `waiter` an idle connection now, or connect one and give it when connected.

        With `fresh`, always connect (a retry after a pooled connection turned out dead: the
        other pooled ones may have died the same way).
        """
        idle = self.idle
        if idle and not fresh:
            now = self.clock.seconds()
            while idle:
                connection = idle.pop()
                if now - connection.idle_since < self.idle_timeout and connection.reusable:
                    self.active += 1
                    waiter.upstream_ready(connection, True)
                    return
                connection.abort()
        self.connecting += 1
        upstream = self.upstream
        attempt = self._attempts[waiter] = _Connect(self, waiter)
        factory: Any = attempt
        tls = upstream.tls
        if tls is not None:
            from flexgw.tls.contexts import QuietTLSFactory

            factory = QuietTLSFactory(tls.creator, True, factory)
        # Configuration.spec.forwardProxy: to the proxy; plain HTTP then goes in absolute form
        # (Upstream.request_prefix), TLS through a CONNECT tunnel (the handshake, with its
        # checks against the Service host, runs inside it).
        attempt.connector = connect_upstream(
            self.reactor, self.clock, upstream, factory, self.connect_timeout
        )

    def cancel(self, waiter: ConnectionWaiter) -> None:
        """`waiter` gave up before its connection was handed over: stop the attempt (a
        connection that completes anyway is closed, never kept)."""
        attempt = self._attempts.pop(waiter, None)
        if attempt is None:
            return
        attempt.cancelled = True
        self.connecting -= 1
        if attempt.connector is not None:
            attempt.connector.disconnect()

    def connection_made(self, connection: UpstreamConnection) -> None:
        """A new connection is up: give it to the waiter that asked for it."""
        attempt = self._pending.pop(connection)
        if attempt.cancelled:
            connection.abort()
            return
        self.connecting -= 1
        waiter = attempt.waiter
        del self._attempts[waiter]
        self.active += 1
        waiter.upstream_ready(connection, False)

    def release(self, connection: UpstreamConnection) -> None:
        """An exchange is done with `connection`: keep it idle, or close it."""
        self.active -= 1
        if connection.reusable and len(self.idle) < self.max_idle:
            connection.idle_since = self.clock.seconds()
            self.idle.append(connection)
        else:
            connection.reusable = False
            connection.transport.loseConnection()

    def discard(self, connection: UpstreamConnection) -> None:
        """An exchange abandons `connection` midway: close it, never reuse it."""
        self.active -= 1
        connection.abort()

    def detach(self, connection: UpstreamConnection) -> None:
        """`connection` leaves the pool's account for good: it was lost under its exchange, or
        it became a tunnel's (the pool neither reuses nor closes it)."""
        self.active -= 1

    def connection_lost(self, connection: UpstreamConnection, reason: Failure | None = None) -> None:
        """Forget a closed connection."""
        attempt = self._pending.pop(connection, None)
        if attempt is not None:
            # Connected, then lost before connectionMade (or the TLS handshake) completed: the
            # attempt failed; over TLS `reason` says why (a certificate check, say).
            if attempt.cancelled:
                return
            self.connecting -= 1
            waiter = attempt.waiter
            del self._attempts[waiter]
            if connection.tls_failed:
                cause = reason.value if reason is not None else None
                _log.warn(
                    "TLS handshake with upstream {upstream} ({host}:{port}) failed: {cause!r}",
                    upstream=self.upstream.key,
                    host=self.upstream.host,
                    port=self.upstream.port,
                    cause=cause,
                )
                reason = Failure(UpstreamTLSError(cause))
            else:
                reason = Failure(ConnectionError("connection lost at connect"))
            waiter.upstream_connect_failed(reason)
            return
        try:
            self.idle.remove(connection)
        except ValueError:
            pass

    def expire_idle(self) -> None:
        """Close connections idle longer than the upstream idle timeout."""
        if not self.idle:
            return
        limit = self.clock.seconds() - self.idle_timeout
        keep = []
        for connection in self.idle:
            if connection.idle_since > limit:
                keep.append(connection)
            else:
                connection.reusable = False
                connection.transport.loseConnection()
        self.idle = keep

    def retire(self) -> None:
        """The upstream left the configuration: close idle connections now, in-flight ones when done."""
        self.max_idle = 0
        self.close_all()

    def close_all(self) -> None:
        """Close every idle connection (shutdown, or the upstream left the configuration)."""
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.reusable = False
            connection.transport.loseConnection()


class PoolManager:
    """The pools of every upstream in use, kept across reloads while an upstream is unchanged."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime) -> None:
        self.reactor = reactor
        self.clock = clock
        self.pools: dict[Upstream, UpstreamPool | H2UpstreamPool] = {}
        self.http = HttpSettings()
        self.timeouts = Timeouts()
        self._reaper: LoopingCall | None = None
        # Failed name lookups (reverse-proxy upstreams and forward-proxy destinations alike)
        self.dns_log = ThrottledLog(clock)

    def dns_failed(self, name: str, upstream: str, reason: Failure) -> None:
        """Log that `name` (for `upstream`) did not resolve, with the resolver's error; rate-
        limited by `dns_log`."""
        skipped = self.dns_log.admit(name)
        if skipped is None:
            return
        _log.warn(
            "Name lookup for {name} (upstream {upstream}) failed: {error}"
            + (" ({skipped} more lookup failures not logged before this one)" if skipped else ""),
            name=name,
            upstream=upstream,
            error=reason.getErrorMessage(),
            skipped=skipped,
        )

    def configure(self, http: HttpSettings, timeouts: Timeouts, upstreams: set[Upstream]) -> None:
        """Apply a new plan: new settings for new pools, and retire pools of removed upstreams."""
        self.http, self.timeouts = http, timeouts
        for upstream in [u for u in self.pools if u not in upstreams]:
            self.pools.pop(upstream).retire()
        for upstream in upstreams:
            pool = self.pools.get(upstream)
            if pool is not None:
                pool.configure(http, timeouts, upstream)

    def pool_for(self, upstream: Upstream) -> UpstreamPool | H2UpstreamPool:
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


# At the end: flexgw.upstream.h2 imports this module.
from flexgw.upstream.h2 import H2UpstreamPool
