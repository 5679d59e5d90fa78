"""send_now on real loopback sockets: the direct send is taken when nothing is queued."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from flexgw.http.fastwrite import send_now


class _Collect(protocol.Protocol):
    """The receiving side: collects bytes, fires `done` once `expected` bytes arrived."""

    def __init__(self, expected: int, done: defer.Deferred[bytes]) -> None:
        self.expected = expected
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        """Collect."""
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(self.data)


class SendNowSocketTests(TestCase):
    """A real tcp.Server transport: which path send_now takes, and that bytes arrive in order."""

    async def _pair(self, expected: int) -> tuple[Any, defer.Deferred[bytes]]:
        """A connected (server transport, Deferred of what the client received) pair."""
        server_side: defer.Deferred[Any] = defer.Deferred()

        class _Server(protocol.Protocol):
            def connectionMade(self) -> None:
                server_side.callback(self.transport)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        received: defer.Deferred[bytes] = defer.Deferred()
        client = protocol.ClientCreator(reactor, _Collect, 0, received)
        collector = await client.connectTCP("127.0.0.1", port.getHost().port)
        collector.expected = expected
        transport = await server_side
        self.addCleanup(transport.loseConnection)
        self.addCleanup(collector.transport.loseConnection)
        return transport, received

    def _record_writes(self, transport: Any) -> list[bytes]:
        """Record what goes through transport.write (Twisted's queued path)."""
        queued: list[bytes] = []
        write = transport.write

        def recording(data: bytes) -> None:
            queued.append(data)
            write(data)

        transport.write = recording
        return queued

    async def test_fast_path_taken_when_nothing_is_queued(self) -> None:
        """With an empty write queue the bytes go straight to the socket: write is not used."""
        transport, received = await self._pair(len(b"hello, socket"))
        queued = self._record_writes(transport)
        send_now(transport, b"hello, socket")
        self.assertEqual(queued, [])
        self.assertEqual(await received, b"hello, socket")

    async def test_queued_bytes_keep_their_order(self) -> None:
        """Bytes already queued by write: send_now queues behind them instead of overtaking."""
        transport, received = await self._pair(len(b"first second"))
        queued = self._record_writes(transport)
        transport.write(b"first ")
        send_now(transport, b"second")
        self.assertEqual(queued, [b"first ", b"second"])
        self.assertEqual(await received, b"first second")
