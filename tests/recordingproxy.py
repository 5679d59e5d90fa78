"""A tiny recording HTTP forward proxy on 127.0.0.1 for forwardProxy tests: CONNECT tunnels (piped to the real target) and absolute-form requests (answered by the proxy itself)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class _Pipe(Protocol):
    """The proxy's side towards the tunnel target: bytes go back to the client."""

    def __init__(self, client: ProxyProtocol) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        """Target -> client."""
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Target closed: close the client."""
        self.client.transport.loseConnection()


class ProxyProtocol(Protocol):
    """One client connection to the proxy."""

    factory: RecordingProxy

    def __init__(self) -> None:
        self.buffer = b""
        self.pipe: _Pipe | None = None

    def dataReceived(self, data: bytes) -> None:
        """Heads until a tunnel is open; then pipe."""
        if self.pipe is not None:
            self.pipe.transport.write(data)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and self.pipe is None:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
            length = sum(int(v) for k, v in headers if k.lower() == b"content-length")
            if len(rest) < length:
                return  # wait for the whole body
            body, self.buffer = rest[:length], rest[length:]
            self.factory.requests.append(
                {"method": method, "target": target, "headers": headers, "body": body}
            )
            self.factory._arrived()
            if self.factory.refuse is not None:
                self.transport.write(
                    b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    % self.factory.refuse
                )
                self.transport.loseConnection()
                return
            if method == b"CONNECT":
                self._tunnel(target)
                return
            status, body = 200, b"via proxy " + target
            if self.factory.answer is not None:
                status, body = self.factory.answer(target)
            self.transport.write(
                b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body
            )

    def _tunnel(self, target: bytes) -> None:
        host, _, port = target.decode().rpartition(":")
        self.transport.pauseProducing()
        pipe = _Pipe(self)
        host = self.factory.names.get(host, host)  # the proxy's own "DNS"
        endpoint = TCP4ClientEndpoint(self.factory.reactor, host.strip("[]"), int(port))
        d = connectProtocol(endpoint, pipe)

        def opened(_: Any) -> None:
            """Connected to the target: tell the client, pipe what it already sent."""
            self.pipe = pipe
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest, self.buffer = self.buffer, b""
            if rest:
                pipe.transport.write(rest)
            self.transport.resumeProducing()

        def failed(_: Failure) -> None:
            """The target is unreachable: 502."""
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.transport.loseConnection()

        d.addCallbacks(opened, failed)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Client closed: close the tunnel."""
        self.factory.connections.discard(self)
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.loseConnection()

    def connectionMade(self) -> None:
        """Track the connection."""
        self.factory.connections.add(self)


class RecordingProxy(Factory):
    """Records every request head it gets (`requests`); `refuse` (a status) refuses them all."""

    protocol = ProxyProtocol

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.requests: list[dict[str, Any]] = []
        self.refuse: int | None = None
        self.names: dict[str, str] = {}  # host name -> address, for CONNECT targets
        # `answer(target) -> (status, body)` for absolute-form requests (default: 200 "via proxy ...")
        self.answer: Any = None
        self.connections: set[ProxyProtocol] = set()
        self.port: Any = None

    def listen(self) -> int:
        """Listen on an ephemeral loopback port; returns it."""
        self.port = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        return int(self.port.getHost().port)

    def header(self, n: int, name: bytes) -> list[bytes]:
        """The values of header `name` in request `n`."""
        return [v for k, v in self.requests[n]["headers"] if k.lower() == name.lower()]

    def _arrived(self) -> None:
        pass

    def stop(self) -> defer.Deferred[Any]:
        """Close every connection and stop listening."""
        for conn in list(self.connections):
            conn.transport.abortConnection()
            if conn.pipe is not None and conn.pipe.transport is not None:
                conn.pipe.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)
