"""The HTTP/1.1 front's state machine in memory: a plan built in code, StringTransports, a
memory reactor (flexgw.testing.memory), no YAML and no socket."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.gate import Hold
from flexgw.testing.memory import connect_client, connect_upstream, memory_factory

GET_A = b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"
GET_B = b"GET /b HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class PipelineTests(SynchronousTestCase):
    """Pipelined requests wait their turn; reading stops meanwhile; close ends the connection."""

    def test_pipelined_requests_in_turn(self) -> None:
        """Two requests in one read: the second goes upstream (on the same connection) only
        after the first response, reading is held meanwhile, and its `close` closes."""
        factory = memory_factory()
        selector, down = connect_client(factory)
        front = selector.h1
        selector.dataReceived(GET_A + GET_B)
        conn, up = connect_upstream(factory.reactor)
        self.assertTrue(up.value().startswith(b"GET /a HTTP/1.1\r\n"))
        self.assertNotIn(b"GET /b", up.value())
        self.assertEqual(Hold(front.gate.reasons), Hold.PIPELINE)
        self.assertEqual(down.producerState, "paused")
        up.clear()
        conn.dataReceived(OK)
        self.assertTrue(down.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(up.value().startswith(b"GET /b HTTP/1.1\r\n"))
        self.assertEqual(len(factory.reactor.tcpClients), 1)  # the pooled connection, reused
        self.assertEqual(front.gate.reasons, 0)
        self.assertEqual(down.producerState, "producing")
        down.clear()
        conn.dataReceived(OK)
        self.assertIn(b"\r\nConnection: close\r\n", down.value())
        self.assertTrue(down.disconnecting)
