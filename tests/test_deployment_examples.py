"""The deployment-model examples under conf/ (standalone, sidecar, ingress), served as shipped.

Each test copies an example directory, moving only its addresses to free loopback ports and its
upstream to a local echo server (the files are otherwise as shipped), and checks what the README
promises for that model.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from flexgw.cli import demo_token
from flexgw.config.pipeline import load_config
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, client_options
from flexgw.testing.upstream import EchoUpstream, RecordingUpstream
from tests.conftools import EXAMPLES, example_files
from tests.harness import Gateway, free_port
from tests.test_proxy_protocol import HeaderFirst, v1


def basic(user: str, password: str) -> bytes:
    """An Authorization header value for HTTP Basic."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class ExampleCase(TestCase):
    """Starts an example with an echo upstream on a free port."""

    def serve(self, name: str, listen: str, upstream: str, probe: str) -> tuple[int, int]:
        """Serve conf/`name` with its listener, upstream and probe addresses moved; returns
        (gateway port, probe port)."""
        port_up = reactor.listenTCP(0, EchoUpstream(), interface="127.0.0.1")
        self.addCleanup(port_up.stopListening)
        port, probe_port = free_port(), free_port()
        files = example_files(
            name,
            {
                listen: f"127.0.0.1:{port}",
                upstream: f"127.0.0.1:{port_up.getHost().port}",
                f"port: {probe}": f"port: {probe_port}",
            },
        )
        gateway = Gateway(self, files)
        gateway.start()
        return port, probe_port

    async def get(self, port: int, path: str, *headers: tuple[bytes, bytes]) -> client.Response:
        """One GET on the gateway."""
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return await client.request(
            reactor,
            "127.0.0.1",
            port,
            b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n",
        )


class StandaloneTests(ExampleCase):
    """conf/standalone: an internal API with basic auth and a per-client rate limit."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings as shipped."""
        state = load_config([os.path.join(EXAMPLES, "standalone")], {})
        self.assertEqual([str(p) for p in state.problems], [])

    async def test_auth_rate_limit_and_probe(self) -> None:
        """Without credentials: 401 with Flex's challenge; with them: the request reaches
        /api/orders/... upstream with the rate-limit headers; the readiness probe answers."""
        port, probe = self.serve("standalone", "127.0.0.1:8080", "127.0.0.1:9000", "3000")
        refused = await self.get(port, "/orders/42")
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.header(b"www-authenticate"), [b'Basic realm="mule-realm"'])
        wrong = await self.get(port, "/orders/42", (b"Authorization", basic("orders", "nope")))
        self.assertEqual(wrong.status, 401)
        ok = await self.get(port, "/orders/42", (b"Authorization", basic("orders", "change-me")))
        self.assertEqual(ok.status, 200)
        self.assertEqual(json.loads(ok.body)["path"], "/api/orders/42")
        self.assertEqual(ok.header(b"x-ratelimit-limit"), [b"100"])
        self.assertEqual(ok.header(b"x-ratelimit-remaining"), [b"99"])
        ready = await self.get(probe, "/probes/readiness")
        self.assertEqual(ready.status, 200)

    async def test_rate_limit_answers_429(self) -> None:
        """The 101st request in the window is refused with 429 and Retry-After."""
        port, _ = self.serve("standalone", "127.0.0.1:8080", "127.0.0.1:9000", "3000")
        auth = (b"Authorization", basic("orders", "change-me"))
        statuses = []
        for _ in range(101):
            response = await self.get(port, "/orders/1", auth)
            statuses.append(response.status)
        self.assertEqual(statuses[:100], [200] * 100)
        self.assertEqual(statuses[100], 429)
        self.assertEqual(len(response.header(b"retry-after")), 1)
        self.assertEqual(response.header(b"x-ratelimit-remaining"), [b"0"])


class SidecarTests(ExampleCase):
    """conf/sidecar: one local service behind a small gateway."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings; the small-footprint settings are the ones applied."""
        state = load_config([os.path.join(EXAMPLES, "sidecar")], {})
        self.assertEqual([str(p) for p in state.problems], [])
        self.assertEqual(state.plan.http.max_idle_per_upstream, 8)
        self.assertEqual(state.plan.http.body_buffer_limit, 262144)
        self.assertEqual(state.plan.timeouts.stream_idle, 60.0)

    async def test_every_path_reaches_the_service(self) -> None:
        """Any path and query go to the local service unchanged; the probe answers."""
        port, probe = self.serve("sidecar", "127.0.0.1:8080", "127.0.0.1:8081", "3001")
        response = await self.get(port, "/anything/deep?x=1")
        self.assertEqual(response.status, 200)
        echoed = json.loads(response.body)
        self.assertEqual(echoed["path"], "/anything/deep?x=1")
        root = await self.get(port, "/")
        self.assertEqual(json.loads(root.body)["path"], "/")
        ready = await self.get(probe, "/probes/readiness")
        self.assertEqual(ready.status, 200)


class IngressExampleTests(TestCase):
    """conf/ingress: HTTPS behind a PROXY-protocol load balancer, JWT, CORS."""

    SECRET = "flexgw-ingress-example-secret-0123456789"

    def setUp(self) -> None:
        """Demo certificates for localhost in a temp dir, as `python -m flexgw.testing.certs`."""
        self.tls_dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority("ingress example CA")
        self.ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"]).write(
            self.tls_dir, "server"
        )
        self.environ = {"FLEXGW_TLS_DIR": self.tls_dir, "FLEXGW_JWT_SECRET": self.SECRET}

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings with the two variables set; without them, errors that
        name them."""
        state = load_config([os.path.join(EXAMPLES, "ingress")], self.environ)
        self.assertEqual([str(p) for p in state.problems], [])
        unset = load_config([os.path.join(EXAMPLES, "ingress")], {})
        text = "\n".join(str(p) for p in unset.problems)
        self.assertIn("FLEXGW_TLS_DIR", text)
        self.assertIn("FLEXGW_JWT_SECRET", text)

    def serve(self) -> tuple[int, RecordingUpstream]:
        """The example on a free port, its upstream a recording server."""
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        files = example_files(
            "ingress",
            {
                "0.0.0.0:8443": f"127.0.0.1:{port}",
                "127.0.0.1:8082": f"127.0.0.1:{upstream.address[1]}",
                "port: 3000": f"port: {free_port()}\n    host: 127.0.0.1",
            },
        )
        gateway = Gateway(self, files, environ=self.environ)
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        return port, upstream

    async def connect(self, port: int, header: bytes | None) -> client.RawConnection:
        """A TLS connection to the gateway, preceded by `header` (None: no PROXY header)."""
        conn = client.RawConnection()
        tls = TLSMemoryBIOFactory(
            client_options("localhost", self.ca), True, Factory.forProtocol(lambda: conn)
        )
        factory: Any = tls
        if header is not None:
            factory = WrappingFactory(tls)
            factory.protocol = HeaderFirst
            factory.header = header
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.addCleanup(lambda: conn.transport.abortConnection())
        return conn

    def token(self, audience: str = "api.example.com") -> bytes:
        """An HS256 JWT for `audience`, valid for five minutes, as `flexgw demo-token` makes it."""
        return demo_token(self.SECRET, audience, "user-1", 300, time.time()).encode("ascii")

    async def test_https_proxy_protocol_jwt(self) -> None:
        """Through the load balancer's PROXY header and TLS: no token is refused, a valid token
        reaches /v1/... with the carried client address and X-Forwarded-Proto https, a token for
        another audience is refused; the upstream sees only the accepted request."""
        port, upstream = self.serve()
        conn = await self.connect(port, v1("198.51.100.23", dport=port))
        conn.send(b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        missing = await conn.read_response()
        self.assertEqual(missing.status, 400)
        conn.send(
            b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + self.token() + b"\r\n\r\n"
        )
        ok = await conn.read_response()
        self.assertEqual(ok.status, 200)
        conn.send(
            b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + self.token("someone.else") + b"\r\n\r\n"
        )
        wrong = await conn.read_response()
        self.assertEqual(wrong.status, 401)
        (received,) = upstream.received
        self.assertEqual(received.target, b"/v1/hello")
        self.assertEqual(received.header("x-forwarded-for"), [b"198.51.100.23"])
        self.assertEqual(received.header("x-forwarded-proto"), [b"https"])

    async def test_cors_preflight_answered_at_the_gateway(self) -> None:
        """A preflight from the allowed browser origin is answered by the gateway (no token
        needed, nothing forwarded); another origin gets no CORS grant."""
        port, upstream = self.serve()
        conn = await self.connect(port, v1("198.51.100.24", dport=port))
        preflight = (
            b"OPTIONS /api/orders HTTP/1.1\r\nHost: localhost\r\nOrigin: %s\r\n"
            b"Access-Control-Request-Method: POST\r\n\r\n"
        )
        conn.send(preflight % b"https://app.example.com")
        allowed = await conn.read_response()
        self.assertEqual(allowed.header("access-control-allow-origin"), [b"https://app.example.com"])
        self.assertEqual(allowed.header("access-control-allow-credentials"), [b"true"])
        conn.send(preflight % b"https://evil.example.net")
        refused = await conn.read_response()
        self.assertEqual(refused.header("access-control-allow-origin"), [])
        self.assertEqual(upstream.received, [])

    async def test_client_without_proxy_header_is_closed(self) -> None:
        """Only the load balancer may connect: a direct TLS client (no PROXY header) is closed
        before any request is read."""
        port, upstream = self.serve()
        conn = await self.connect(port, None)
        conn.send(b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await conn.wait_closed()
        self.assertEqual(conn.received_raw, b"")  # not even an error response
        self.assertFalse(conn.handshake_done)  # the TLS hello was taken as a bad PROXY header
        self.assertEqual(upstream.received, [])
