"""The CONNECT client: tunnels through a forward proxy (`Configuration.spec.forwardProxy`) for
upstream connections and side calls.

`ConnectTunnelFactory(inner, host, port, authorization, clock, timeout)` is a client factory to
pass to `connectTCP(proxy_host, proxy_port, ...)`: once connected it sends
`CONNECT host:port`, waits (at most `timeout` seconds) for the proxy's 2xx, and then hands the
very same TCP connection to `inner`'s protocol, as if `inner` had connected to `host:port`
itself (then calls `opened(protocol)`, when given). `inner` may be a TLS wrapping factory: the
handshake then runs inside the tunnel, end to end with the upstream. After the hand-over the tunnel adds nothing per read or write (the
transport talks to the inner protocol directly).

A proxy that refuses (any non-2xx), closes, answers garbage or nothing in time fails the
attempt through `inner.clientConnectionFailed`, with a `TunnelError` naming the proxy's status
(never its credentials).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="flexgw.upstream")  # its warnings are about upstream connections

#: The most of a CONNECT answer's head that is read.
MAX_ANSWER = 16 * 1024


class TunnelError(Exception):
    """The proxy did not open the tunnel."""


class _TunnelProtocol(Protocol):
    """Asks for the tunnel; on success, steps aside for the inner protocol."""

    transport: Any  # a TCP transport (abortConnection, and `protocol` to hand over)

    def __init__(self, factory: ConnectTunnelFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.buffer = b""
        self.timer: Any = None
        self.done = False

    def connectionMade(self) -> None:
        """Send the CONNECT request; start the answer's deadline."""
        factory = self.factory
        authority = factory.authority
        lines = [b"CONNECT " + authority + b" HTTP/1.1\r\n", b"Host: " + authority + b"\r\n"]
        if factory.authorization is not None:
            lines.append(b"Proxy-Authorization: " + factory.authorization + b"\r\n")
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        self.timer = factory.clock.callLater(factory.timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        """The proxy's answer: a 2xx head opens the tunnel; anything else fails the attempt."""
        if self.done:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_ANSWER:
                self._fail("an over-long answer")
            return
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._fail("a malformed answer")
            return
        status = int(parts[1])
        if not 200 <= status < 300:
            self._fail(f"status {status}")
            return
        self.done = True
        self._stop_timer()
        transport = self.transport
        inner = self.factory.inner.buildProtocol(self.addr)
        if inner is None:
            transport.abortConnection()
            return
        transport.protocol = inner  # from now on the connection is the inner protocol's
        inner.makeConnection(transport)
        if self.factory.opened is not None:
            self.factory.opened(inner)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Closed before the tunnel opened: the attempt failed."""
        self._stop_timer()
        if not self.done:
            self.done = True
            self.factory.failed(TunnelError("the proxy closed the connection"))

    def _fail(self, what: str) -> None:
        self.done = True
        self._stop_timer()
        self.factory.failed(TunnelError(f"the proxy refused the tunnel: {what}"))
        self.transport.abortConnection()

    def _expired(self) -> None:
        self.timer = None
        if not self.done:
            self._fail("no answer in time")

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()


class ConnectTunnelFactory(ClientFactory):
    """Connects `inner` to `host:port` through an HTTP proxy's CONNECT."""

    noisy = False

    def __init__(
        self,
        inner: ClientFactory,
        host: str,
        port: int,
        authorization: bytes | None,
        clock: IReactorTime,
        timeout: float,
        proxy_name: str = "",
        opened: Callable[[Protocol], object] | None = None,
    ) -> None:
        self.inner = inner
        self.opened = opened  # told the inner protocol once it is connected through the tunnel
        target = f"[{host}]" if ":" in host else host
        self.authority = f"{target}:{port}".encode("latin-1")
        self.authorization = authorization
        self.clock = clock
        self.timeout = timeout
        self.proxy_name = proxy_name
        self.connector: Any = None
        self._reported = False

    def startedConnecting(self, connector: Any) -> None:
        """Remember the connector (reported to `inner` on failure)."""
        self.connector = connector
        self.inner.startedConnecting(connector)

    def buildProtocol(self, addr: Any) -> _TunnelProtocol:
        """The protocol that asks for the tunnel."""
        return _TunnelProtocol(self, addr)

    def failed(self, error: Exception) -> None:
        """The tunnel could not be opened: the inner factory hears it as a failed connect."""
        if self._reported:
            return
        self._reported = True
        _log.warn(
            "Forward proxy {proxy}: CONNECT {target} failed: {error}",
            proxy=self.proxy_name,
            target=self.authority.decode("latin-1"),
            error=str(error),
        )
        self.inner.clientConnectionFailed(self.connector, Failure(error))

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        """The proxy itself could not be reached."""
        if not self._reported:
            self._reported = True
            self.inner.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        """A tunnel that was open closed: the inner factory's business (a failed one was
        reported already)."""
        if not self._reported:
            self.inner.clientConnectionLost(connector, reason)
