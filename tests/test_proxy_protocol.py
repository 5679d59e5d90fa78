"""PROXY protocol v1/v2 on listeners: the carried client address reaches ip-allowlist, X-Forwarded-For and the access log; bad or missing headers close the connection."""

from __future__ import annotations

import os
import socket
import struct
import textwrap
from typing import Any

from twisted.internet import reactor, task, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from flexgw.ingress.proxyprotocol import ProxyHeaderWrapper, wrap_proxy_protocol
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, client_options
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def v1(source: str, dest: str = "127.0.0.1", sport: int = 40000, dport: int = 80) -> bytes:
    """A PROXY v1 line for a TCP4 connection."""
    return f"PROXY TCP4 {source} {dest} {sport} {dport}\r\n".encode()


def v2(source: str, dest: str = "127.0.0.1", sport: int = 40000, dport: int = 80,
       command: int = 0x1) -> bytes:
    """A PROXY v2 header (version 2, `command` 1 = PROXY, 0 = LOCAL) for TCP over IPv4."""
    addresses = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", 12) + addresses


def v2_ipv6(source: str, dest: str = "::1", sport: int = 40000, dport: int = 80) -> bytes:
    """A PROXY v2 header for TCP over IPv6."""
    addresses = (
        socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
        + struct.pack("!HH", sport, dport)
    )
    return V2_SIGNATURE + bytes([0x21, 0x21]) + struct.pack("!H", 36) + addresses


ALLOWLIST = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: allow}
spec:
  targetRef: {name: test-api}
  policyRef: {name: ip-allowlist-flex}
  config:
    ips: ["203.0.113.0/24", "2001:db8::/32"]
"""

PROXY_ON = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Configuration
metadata: {name: lb}
spec:
  proxyProtocol: {enabled: true}
  http: {headerTimeoutSeconds: 0.3}
"""


class ProxyProtocolEndToEndTests(TestCase):
    """A gateway with proxyProtocol enabled and an IP allowlist, in front of a recording upstream."""

    def setUp(self) -> None:
        """Upstream, then the gateway."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()
        self.gateway = Gateway(
            self, {"api.yaml": api_document(self.port, self.upstream.address[1]) + ALLOWLIST + PROXY_ON}
        )
        self.gateway.start()

    async def send(self, *pieces: bytes) -> client.Response:
        """Send `pieces` as separate writes (each after the previous arrived), read the response."""
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        for piece in pieces:
            conn.send(piece)
        return await conn.read_response()

    async def assertClosedWithoutAnswer(self, data: bytes) -> None:
        """The gateway closes the connection and sends nothing."""
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(data)
        await conn.wait_closed()
        self.assertEqual(conn.received_raw, b"")
        self.assertEqual(self.upstream.received, [])

    async def test_v1_client_address_everywhere(self) -> None:
        """v1: allowlist sees 203.0.113.7, upstream X-Forwarded-For too, and the access log."""
        response = await self.send(v1("203.0.113.7") + REQUEST)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[0].header("x-forwarded-for"), [b"203.0.113.7"])
        self.assertEqual(self.gateway.records()[-1]["client"], "203.0.113.7")
        # The wrapper stepped aside: the front talks to the TCP transport itself (its direct
        # send path applies), which reports the carried address.
        (front,) = self.gateway.service.factories[("127.0.0.1", self.port)].connections
        self.assertIs(type(front.transport), tcp.Server)
        self.assertEqual(front.transport.getPeer().host, "203.0.113.7")

    async def test_v2_ipv4_and_ipv6(self) -> None:
        """v2 headers (bytes built here) for IPv4 and IPv6 clients."""
        self.assertEqual((await self.send(v2("203.0.113.9") + REQUEST)).status, 200)
        self.assertEqual((await self.send(v2_ipv6("2001:db8::5") + REQUEST)).status, 200)
        self.assertEqual(
            [r.header("x-forwarded-for") for r in self.upstream.received],
            [[b"203.0.113.9"], [b"2001:db8::5"]],
        )

    async def test_blocked_address_from_header(self) -> None:
        """The allowlist refuses a client the header names outside it (403, upstream untouched)."""
        response = await self.send(v1("198.51.100.1") + REQUEST)
        self.assertEqual(response.status, 403)
        self.assertEqual(self.upstream.received, [])

    async def test_local_command_keeps_socket_peer(self) -> None:
        """v2 LOCAL (a health check) is valid; the client is the socket peer (not allowed here)."""
        response = await self.send(v2("203.0.113.7", command=0x0) + REQUEST)
        self.assertEqual(response.status, 403)

    async def test_header_split_across_writes(self) -> None:
        """A header arriving in pieces is assembled, not refused."""
        header = v2("203.0.113.7")
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(header[:5])
        await self.gateway_reads()
        conn.send(header[5:20])
        await self.gateway_reads()
        conn.send(header[20:] + REQUEST)
        response = await conn.read_response()
        self.assertEqual(response.status, 200)

    async def gateway_reads(self) -> None:
        """Let the reactor run one round so the gateway reads what was sent."""
        await task.deferLater(reactor, 0, lambda: None)

    async def test_missing_header_closes(self) -> None:
        """Plain HTTP without a PROXY header: closed, no response, nothing upstream."""
        await self.assertClosedWithoutAnswer(REQUEST)

    async def test_malformed_headers_close(self) -> None:
        """A bad v1 line and a bad v2 version are refused the same way."""
        await self.assertClosedWithoutAnswer(b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n" + REQUEST)
        await self.assertClosedWithoutAnswer(
            V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12 + REQUEST
        )

    async def test_reload_switches_without_rebinding(self) -> None:
        """Turning the setting off by reload: plain requests are served on the same socket."""
        port_before = self.gateway.service.ports[("127.0.0.1", self.port)]
        self.gateway.write(
            {"api.yaml": api_document(self.port, self.upstream.address[1]) + ALLOWLIST}
        )
        self.assertTrue(self.gateway.service.reload())
        self.assertIs(self.gateway.service.ports[("127.0.0.1", self.port)], port_before)
        response = await client.request(reactor, "127.0.0.1", self.port, REQUEST)
        self.assertEqual(response.status, 403)  # served (127.0.0.1 is not on the allowlist)

    async def test_header_timeout_closes(self) -> None:
        """A connection that sends nothing is closed after headerTimeoutSeconds."""
        await self.assertClosedWithoutAnswer(b"")


class WrapperUnitTests(TestCase):
    """The wrapper with a fake clock and transport."""

    def setUp(self) -> None:
        """A wrapped recording protocol."""
        self.clock = Clock()
        self.seen: list[tuple[str, object]] = []
        seen = self.seen

        class Recorder(Protocol):
            """Records connectionMade's peer and the data it gets."""

            def connectionMade(self) -> None:
                """Record the peer as the transport reports it."""
                seen.append(("made", self.transport.getPeer()))

            def dataReceived(self, data: bytes) -> None:
                """Record data."""
                seen.append(("data", data))

        self.enabled = True
        self.factory = wrap_proxy_protocol(
            Factory.forProtocol(Recorder), lambda: self.enabled, self.clock, lambda: 5.0
        )

    def test_connection_made_after_header(self) -> None:
        """connectionMade runs once the header is parsed, with the carried peer."""
        proto = self.factory.buildProtocol(None)
        self.assertIsInstance(proto, ProxyHeaderWrapper)
        proto.makeConnection(StringTransport())
        self.assertEqual(self.seen, [])
        proto.dataReceived(v1("203.0.113.7") + b"hello")
        self.assertEqual(self.seen[0][0], "made")
        self.assertEqual(self.seen[0][1].host, "203.0.113.7")
        self.assertEqual(self.seen[1], ("data", b"hello"))

    def test_timeout_aborts(self) -> None:
        """No header within the timeout: aborted; the wrapped protocol never connected."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.seen, [])

    def test_disabled_is_unwrapped(self) -> None:
        """With the setting off, the wrapped factory's protocol is returned as is."""
        self.enabled = False
        self.assertNotIsInstance(self.factory.buildProtocol(None), ProxyHeaderWrapper)

    def test_starting_line_says_proxy_only_when_on(self) -> None:
        """A listening port's "... starting on PORT" log line names PROXY only with the setting on."""
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if "starting on" in text:
                lines.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for enabled in (False, True):
            self.enabled = enabled
            port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
        self.assertEqual(len(lines), 2, lines)
        self.assertNotIn("PROXY", lines[0])
        self.assertTrue(lines[0].startswith("Factory starting on"), lines[0])
        self.assertTrue(lines[1].startswith("Factory (PROXY) starting on"), lines[1])


class HeaderFirst(ProtocolWrapper):
    """Sends the factory's PROXY header in clear, then lets the wrapped (TLS) protocol start."""

    def makeConnection(self, transport: Any) -> None:
        """Header first, then the handshake."""
        transport.write(self.factory.header)
        super().makeConnection(transport)


class ProxyProtocolWithTLSTests(TestCase):
    """On a TLS port the PROXY header comes before the handshake."""

    async def test_header_then_tls(self) -> None:
        """A v2 header in clear, then TLS: the request is served with the carried address."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority("server CA")
        crt, key = ca.issue("api.test", dns=["api.test"]).write(directory, "server")
        port = free_port()
        text = textwrap.dedent(
            f"""\
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: ApiInstance
            metadata: {{name: secure}}
            spec:
              address: https://127.0.0.1:{port}
              services:
                b: {{address: "http://127.0.0.1:{upstream.address[1]}"}}
            ---
            apiVersion: gateway.mulesoft.com/v1alpha1
            kind: PolicyBinding
            metadata: {{name: secure-tls}}
            spec:
              targetRef: {{kind: ApiInstance, name: secure}}
              policyRef: {{name: tls}}
              config:
                certificate: {{crt: "file://{crt}", key: "file://{key}"}}
            """
        )
        # Without PROXY_ON's 0.3 s header timeout: it covers the TLS handshake too, which a
        # loaded machine did not always finish in time (a 408 instead of the request).
        gateway = Gateway(self, {"api.yaml": text + PROXY_ON.replace("  http: {headerTimeoutSeconds: 0.3}\n", "")})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        conn = client.RawConnection()
        tls = TLSMemoryBIOFactory(
            client_options("api.test", ca), True, Factory.forProtocol(lambda: conn)
        )
        wrapping = WrappingFactory(tls)
        wrapping.protocol = HeaderFirst
        wrapping.header = v2("203.0.113.44")
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(wrapping)
        self.addCleanup(lambda: conn.transport.abortConnection())
        conn.send(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
        response = await conn.read_response()
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].header("x-forwarded-for"), [b"203.0.113.44"])
        self.assertEqual(upstream.received[0].header("x-forwarded-proto"), [b"https"])
