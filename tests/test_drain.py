"""Graceful drain on stop: listeners close, idle connections close, requests in flight finish or
are cut at the drain deadline."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from flexgw.testing.client import IncompleteResponse
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import Gateway, free_port, start_api_gateway
from tests.test_ingress_upstream import Held

GET = b"GET /items HTTP/1.1\r\nHost: example.test\r\n\r\n"


class DrainTests(TestCase):
    """GatewayService.stopService drains instead of cutting connections."""

    timeout = 15

    def started(self, responder: object, drain_seconds: float = 30.0) -> tuple[Gateway, int]:
        """A gateway in front of an upstream answering with `responder`; (gateway, port)."""
        upstream = RecordingUpstream(responder, reactor=reactor)  # type: ignore[arg-type]
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = start_api_gateway(self, port, upstream.address[1])
        gateway.service.drain_seconds = drain_seconds
        return gateway, port

    async def test_request_in_flight_completes_with_connection_close(self) -> None:
        """A slow request started before stop completes, says Connection: close, and the
        connection closes; a new connection attempt is refused; stop fires once drained."""
        held = Held()
        gateway, port = self.started(held.responder)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await held.wait(1)
        stopped = gateway.service.stopService()
        self.assertFalse(stopped.called)
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", port, timeout=5)
        self.assertFalse(gateway.service.reload())  # no listener comes back while draining
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", port, timeout=5)
        self.assertFalse(stopped.called)
        held.answer_all(b"slow")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"slow"))
        self.assertEqual(response.header("connection"), [b"close"])
        await conn.wait_closed()
        await stopped
        self.assertEqual([r["status"] for r in gateway.records()], [200])

    async def test_idle_keepalive_connection_closes_at_once(self) -> None:
        """An idle keep-alive connection is closed when the drain starts, not at any timeout."""
        gateway, port = self.started(fixed(body=b"hi"))
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        response = await conn.read_final_response()
        self.assertEqual(response.header("connection"), [])  # kept alive before the drain
        stopped = gateway.service.stopService()
        await conn.wait_closed()
        await stopped
        self.assertEqual(gateway.service.draining, set())

    async def test_streaming_response_started_before_drain_closes_after(self) -> None:
        """A response whose keep-alive head went out before the drain ends its connection."""
        held = Held()
        gateway, port = self.started(held.responder)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        first_bytes: defer.Deferred[None] = defer.Deferred()
        received = conn.dataReceived

        def data_received(data: bytes) -> None:
            received(data)
            if not first_bytes.called:
                first_bytes.callback(None)

        conn.dataReceived = data_received  # type: ignore[method-assign]
        conn.send(GET)
        await held.wait(1)
        exchange = held.waiting.pop()
        exchange.send_head(200, [(b"Content-Length", b"4")])
        exchange.write(b"do")
        await first_bytes  # the head reached the client: it said keep-alive
        stopped = gateway.service.stopService()
        self.assertFalse(stopped.called)
        exchange.write(b"ne")
        exchange.finish()
        response = await conn.read_final_response()
        self.assertEqual(response.body, b"done")
        self.assertEqual(response.header("connection"), [])
        await conn.wait_closed()
        await stopped

    async def test_request_at_deadline_is_aborted(self) -> None:
        """A request still running when the (short) drain time ends is cut, and stop fires."""
        held = Held()
        gateway, port = self.started(held.responder, drain_seconds=0.05)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await held.wait(1)
        stopped = gateway.service.stopService()
        with self.assertRaises(IncompleteResponse):
            await conn.read_final_response()
        await stopped
        self.assertEqual(gateway.service.draining, set())
        self.assertEqual(len(gateway.records()), 1)

    async def test_drain_now_cuts_at_once(self) -> None:
        """drain_now() (a second SIGTERM) aborts what is in flight without waiting the drain time."""
        held = Held()
        gateway, port = self.started(held.responder, drain_seconds=3600)
        conn = await client.connect(reactor, "127.0.0.1", port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await held.wait(1)
        stopped = gateway.service.stopService()
        again = gateway.service.stopService()  # a second stop waits for the same drain
        gateway.service.drain_now()
        await conn.wait_closed()
        await defer.gatherResults([stopped, again])

    async def test_stop_without_connections_fires_at_once(self) -> None:
        """With nothing connected, stop fires as soon as the listeners are closed."""
        gateway, port = self.started(fixed())
        await gateway.service.stopService()
        with self.assertRaises(ConnectionRefusedError):
            await client.connect(reactor, "127.0.0.1", port, timeout=5)
