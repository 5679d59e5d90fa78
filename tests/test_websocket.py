"""WebSocket through the gateway on real loopback sockets: handshake, echo, closes, policies, idle."""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import websocket as ws
from flexgw.testing.client import connect
from flexgw.testing.upstream import RecordingUpstream, fixed
from tests.harness import free_port, start_api_gateway

AUTH = """---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: auth}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: http-basic-authentication-flex}
  config: {username: chris, password: secret}
"""


def idle_timeout(seconds: float) -> str:
    """A Configuration document with a short stream idle timeout."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
        f"metadata: {{name: t}}\nspec:\n  timeouts:\n    streamIdleSeconds: {seconds}\n"
    )


class WebSocketTests(TestCase):
    """A WebSocket echo upstream behind the gateway, a hand-framed client in front of it."""

    timeout = 20

    def start(self, responder: Any = None, documents: str = "") -> None:
        """Start an upstream (WebSocket echo unless told) and a gateway in front of it."""
        self.responder = responder if responder is not None else ws.echo()
        self.upstream = RecordingUpstream(self.responder, reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.gateway = start_api_gateway(self, self.port, self.upstream.address[1], documents)

    async def handshake(self, extra: bytes = b"", early: bytes = b"") -> Any:
        """Connect, send a WebSocket handshake (and `early` bytes with it), read the answer."""
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        request, key = ws.handshake_request(extra=extra)
        conn.send(request + early)
        response = await conn.read_final_response()
        return conn, response, key

    async def test_echo_through_the_gateway(self) -> None:
        """The handshake reaches the upstream with its Upgrade; frames are echoed both ways;
        the access log records a 101 with the tunnel's byte counts when it ends."""
        self.start()
        conn, response, key = await self.handshake()
        self.assertEqual(response.status, 101)
        self.assertEqual(response.header("sec-websocket-accept"), [ws.accept_key(key)])
        self.assertEqual(response.header("upgrade"), [b"websocket"])
        self.assertEqual(response.header("connection"), [b"Upgrade"])
        [seen] = self.upstream.received
        self.assertEqual(seen.header("upgrade"), [b"websocket"])
        self.assertEqual(seen.header("connection"), [b"Upgrade"])
        self.assertEqual(seen.header("sec-websocket-key"), [key])
        text = ws.encode_frame(ws.TEXT, b"hello", mask=True)
        conn.send(text)
        echoed = await conn.wait_tunnel_bytes(7)
        self.assertEqual(ws.decode_frames(bytearray(echoed)), [(ws.TEXT, b"hello")])
        big = bytes(range(256)) * 400  # 102400 bytes: a 64-bit length frame
        frame = ws.encode_frame(ws.BINARY, big, mask=True)
        conn.send(frame)
        echoed = await conn.wait_tunnel_bytes(10 + len(big))
        self.assertEqual(ws.decode_frames(bytearray(echoed)), [(ws.BINARY, big)])
        close = ws.encode_frame(ws.CLOSE, b"\x03\xe8", mask=True)
        conn.send(close)
        await conn.wait_closed()
        self.assertEqual(bytes(conn.tunnel_data), ws.encode_frame(ws.CLOSE, b"\x03\xe8", False))
        self.assertEqual(
            [opcode for opcode, _ in self.responder.received], [ws.TEXT, ws.BINARY, ws.CLOSE]
        )
        await self.upstream.wait_for_disconnections(1)
        [record] = [r for r in self.gateway.records() if r["status"] == 101]
        self.assertEqual(record["bytes_in"], len(text) + len(frame) + len(close))
        self.assertEqual(record["bytes_out"], 7 + 10 + len(big) + 4)
        self.assertIsNone(record["error"])

    async def test_early_frames_wait_for_the_switch(self) -> None:
        """Frames sent right behind the handshake reach the upstream after it, as tunnel bytes."""
        self.start()
        early = ws.encode_frame(ws.TEXT, b"early", mask=True)
        conn, response, _ = await self.handshake(early=early)
        self.assertEqual(response.status, 101)
        echoed = await conn.wait_tunnel_bytes(7)
        self.assertEqual(ws.decode_frames(bytearray(echoed)), [(ws.TEXT, b"early")])
        self.assertEqual(len(self.upstream.received), 1)

    async def test_client_close_closes_upstream(self) -> None:
        """The client dropping its connection closes the upstream side of the tunnel."""
        self.start()
        conn, response, _ = await self.handshake()
        self.assertEqual(response.status, 101)
        await conn.abort()
        await self.upstream.wait_for_disconnections(1)

    async def test_upstream_close_closes_client(self) -> None:
        """The upstream closing (after a last frame) closes the client, the frame delivered."""
        self.start()
        conn, response, _ = await self.handshake()
        self.assertEqual(response.status, 101)
        [upstream_conn] = self.upstream.connections
        upstream_conn.transport.write(ws.encode_frame(ws.TEXT, b"bye", mask=False))
        upstream_conn.close()
        await conn.wait_closed()
        self.assertEqual(bytes(conn.tunnel_data), ws.encode_frame(ws.TEXT, b"bye", mask=False))

    async def test_tunnel_connection_is_never_pooled(self) -> None:
        """After a tunnel, a plain request to the same upstream opens a new connection."""
        self.start(responder=_EchoOrOk())
        _conn, response, _ = await self.handshake()
        self.assertEqual(response.status, 101)
        plain = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(plain.abort)
        plain.send(b"GET /plain HTTP/1.1\r\nHost: a.test\r\n\r\n")
        answer = await plain.read_final_response()
        self.assertEqual(answer.status, 200)
        self.assertEqual(len(self.upstream.connections), 2)
        [pool] = self.gateway.service.pools.pools.values()
        self.assertEqual((pool.active, len(pool.idle)), (0, 1))

    async def test_basic_auth_runs_before_the_upgrade(self) -> None:
        """Without credentials: 401, the upstream sees nothing, the connection closes; with
        them the handshake goes through."""
        self.start(documents=AUTH)
        conn, response, _ = await self.handshake(early=ws.encode_frame(ws.TEXT, b"x", True))
        self.assertEqual(response.status, 401)
        await conn.wait_closed()
        self.assertEqual(self.upstream.received, [])
        token = base64.b64encode(b"chris:secret")
        conn, response, _ = await self.handshake(extra=b"Authorization: Basic " + token + b"\r\n")
        self.assertEqual(response.status, 101)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_refused_upgrade_is_an_ordinary_response(self) -> None:
        """A non-101 answer goes to the client as is, then the connection closes: bytes the
        client sent for the new protocol are never read as a request."""
        self.start(responder=fixed(403, body=b"nope"))
        smuggled = b"GET /admin HTTP/1.1\r\nHost: a.test\r\n\r\n"
        conn, response, _ = await self.handshake(early=smuggled)
        self.assertEqual(response.status, 403)
        self.assertEqual(response.body, b"nope")
        self.assertEqual(response.header("connection"), [b"close"])
        await conn.wait_closed()
        self.assertEqual([r.target for r in self.upstream.received], [b"/ws"])

    async def test_h2c_upgrade_is_not_tunnelled(self) -> None:
        """`Upgrade: h2c` goes upstream as a plain request, without Upgrade."""
        self.start(responder=fixed(200))
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(
            b"GET /x HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings"
            b"\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        response = await conn.read_final_response()
        self.assertEqual(response.status, 200)
        [seen] = self.upstream.received
        self.assertEqual(seen.header("upgrade"), [])
        self.assertEqual(seen.header("http2-settings"), [])

    async def test_drain_gives_tunnels_time_then_cuts(self) -> None:
        """On shutdown a tunnel keeps working during the drain, then is cut at its deadline."""
        self.start()
        conn, response, _ = await self.handshake()
        self.assertEqual(response.status, 101)
        self.gateway.service.drain_seconds = 0.5
        stopped = self.gateway.service.stopService()
        conn.send(ws.encode_frame(ws.TEXT, b"still here", mask=True))
        echoed = await conn.wait_tunnel_bytes(12)
        self.assertEqual(ws.decode_frames(bytearray(echoed)), [(ws.TEXT, b"still here")])
        self.assertFalse(stopped.called)
        await conn.wait_closed()
        await stopped

    async def test_idle_tunnel_is_closed(self) -> None:
        """No frame either way for stream idle timeout: both sides are closed, and the access
        log says why."""
        self.start(documents=idle_timeout(0.3))
        conn, response, _ = await self.handshake()
        self.assertEqual(response.status, 101)
        await conn.wait_closed()
        await self.upstream.wait_for_disconnections(1)
        [record] = [r for r in self.gateway.records() if r["status"] == 101]
        self.assertEqual(record["error"], "stream_idle_timeout")


class _EchoOrOk(ws.WebSocketEchoResponder):
    """WebSocket handshakes are echoed; other requests get an empty 200."""

    def respond(self, ex: Any) -> None:
        """Handshake or a plain 200."""
        if ex.request.header("upgrade"):
            super().respond(ex)
        else:
            ex.respond(200, [(b"Content-Length", b"0")])


class SecureWebSocketTests(TestCase):
    """wss: the tunnel on a TLS listener (the client's side of the tunnel is TLS-wrapped)."""

    timeout = 20

    async def test_echo_over_tls(self) -> None:
        """Handshake and frames both ways through an https listener, then a clean close."""
        from flexgw.testing.certs import CertificateAuthority, client_options
        from tests.harness import Gateway
        from tests.test_tls_ingress import api, tls_binding

        directory = os.path.abspath(self.mktemp())
        authority = CertificateAuthority("ws CA")
        crt, key = authority.issue("api.test", dns=["api.test"]).write(directory, "server")
        responder = ws.echo()
        upstream = RecordingUpstream(responder, reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        gateway = Gateway(
            self,
            {"api.yaml": api("secure", port, upstream.address[1]) + "---\n"
             + tls_binding("secure-tls", "secure", crt, key)},
        )
        gateway.start()
        conn = await connect(reactor, "127.0.0.1", port, tls=client_options("api.test", authority))
        self.addCleanup(conn.abort)
        request, key_sent = ws.handshake_request(host=b"api.test")
        conn.send(request)
        response = await conn.read_final_response()
        self.assertEqual(response.status, 101)
        self.assertEqual(response.header("sec-websocket-accept"), [ws.accept_key(key_sent)])
        payload = b"x" * 200_000  # more than one TLS record and socket buffer
        conn.send(ws.encode_frame(ws.BINARY, payload, mask=True))
        echoed = await conn.wait_tunnel_bytes(10 + len(payload))
        self.assertEqual(ws.decode_frames(bytearray(echoed)), [(ws.BINARY, payload)])
        conn.send(ws.encode_frame(ws.CLOSE, b"\x03\xe8", mask=True))
        await conn.wait_closed()
        await upstream.wait_for_disconnections(1)
        [record] = [r for r in gateway.records() if r["status"] == 101]
        self.assertEqual(record["bytes_out"], 10 + len(payload) + 4)
