"""The HTTP/1.1 pool: keep-alive connections to one upstream, with idle expiry."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.plan import HttpSettings, Timeouts, Upstream
from flexgw.upstream.connection import TLSUpstreamConnection, UpstreamConnection
from flexgw.upstream.interfaces import ConnectionWaiter, UpstreamTLSError
from flexgw.upstream.poolbase import PoolBase, connect_upstream

_log = Logger(namespace="flexgw.upstream")


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
