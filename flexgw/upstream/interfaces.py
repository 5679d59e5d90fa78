"""What the upstream pieces promise each other: a pool to the exchanges and the pool manager
(`IUpstreamPool`), a pool to its connections (`ConnectionOwner`), an exchange to the pool
(`ConnectionWaiter`). The HTTP/1.1 pool (`pool.py`) and the HTTP/2 pool (`h2.py`) both
implement `IUpstreamPool`; the manager (`manager.py`) is the only module that knows both."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from flexgw.plan import HttpSettings, Timeouts, Upstream


class UpstreamTLSError(Exception):
    """The TLS handshake with an upstream failed (certificate, host name, protocol)."""


class ConnectionWaiter(Protocol):
    """Whoever asked the pool for a connection (an exchange)."""

    def upstream_ready(self, connection: Any, reused: bool) -> None: ...
    def upstream_connect_failed(self, reason: Failure) -> None: ...


@runtime_checkable
class ConnectionOwner(Protocol):
    """What an upstream connection (HTTP/1.1 or HTTP/2) needs from the pool that made it."""

    clock: IReactorTime
    upstream: Upstream
    connect_timeout: float

    def connection_made(self, connection: Any) -> None: ...
    def release(self, connection: Any) -> None: ...
    def connection_lost(self, connection: Any, reason: Failure | None = None) -> None: ...


@runtime_checkable
class IUpstreamPool(ConnectionOwner, Protocol):
    """The connections to one upstream, as exchanges and the pool manager use them."""

    active: int
    connecting: int

    @property
    def idle(self) -> list[Any]: ...
    def acquire(self, waiter: ConnectionWaiter, fresh: bool = False) -> None: ...
    def cancel(self, waiter: ConnectionWaiter) -> None: ...
    def discard(self, connection: Any) -> None: ...
    def configure(self, http: HttpSettings, timeouts: Timeouts, upstream: Upstream) -> None: ...
    def expire_idle(self) -> None: ...
    def retire(self) -> None: ...
    def close_all(self) -> None: ...
