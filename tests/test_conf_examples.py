"""The shipped example configurations validate and behave as the README says."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.testing import client
from flexgw.testing.upstream import EchoUpstream
from tests.conftools import example_files
from tests.harness import Gateway, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "conf", "quickstart")


class QuickstartTests(TestCase):
    """conf/quickstart: what `make run` serves."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings: the example is what a user copies."""
        state = load_config([QUICKSTART], {})
        self.assertEqual([str(p) for p in state.problems], [])
        (listener,) = state.plan.listeners
        self.assertEqual((listener.host, listener.port), ("127.0.0.1", 8081))

    async def test_readme_curl(self) -> None:
        """`curl http://127.0.0.1:8081/api/hello` reaches the echo upstream as /v1/hello with
        the Host rewritten (ports moved to free ones for the test, the files otherwise as shipped)."""
        port_up = reactor.listenTCP(0, EchoUpstream(), interface="127.0.0.1")
        self.addCleanup(port_up.stopListening)
        up = port_up.getHost().port
        port = free_port()
        files = example_files(
            "quickstart", {"127.0.0.1:8081": f"127.0.0.1:{port}", "127.0.0.1:8082": f"127.0.0.1:{up}"}
        )
        gateway = Gateway(self, files)
        gateway.start()
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        echoed = json.loads(response.body)
        self.assertEqual(echoed["path"], "/v1/hello")
        self.assertIn(["Host", f"127.0.0.1:{up}"], echoed["headers"])
        missing = await client.request(
            reactor, "127.0.0.1", port, b"GET /other HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        self.assertEqual(missing.status, 404)


FORWARD_PROXY = os.path.join(ROOT, "conf", "forward-proxy")


class ForwardProxyExampleTests(TestCase):
    """conf/forward-proxy: the README's egress example."""

    def test_validates_cleanly(self) -> None:
        """No errors and no warnings; one forward-proxy listener on 127.0.0.1:3128."""
        state = load_config([FORWARD_PROXY], {})
        self.assertEqual([str(p) for p in state.problems], [])
        (listener,) = state.plan.listeners
        self.assertEqual((listener.host, listener.port), ("127.0.0.1", 3128))
        self.assertIsNotNone(listener.forward_proxy)

    async def test_readme_curl(self) -> None:
        """`curl -x http://app:change-me@127.0.0.1:3128 http://status.partner.example/` reaches
        the partner (names resolved by a test resolver, the partner on loopback allowed by an
        exception added for the test); without credentials 407; another host 403."""
        from flexgw.testing.resolver import StaticResolver

        port_up = reactor.listenTCP(0, EchoUpstream(), interface="127.0.0.1")
        self.addCleanup(port_up.stopListening)
        up = port_up.getHost().port
        port = free_port()
        files = example_files(
            "forward-proxy",
            {
                "127.0.0.1:3128": f"127.0.0.1:{port}",
                "status.partner.example:80": f"status.partner.example:{up}",
                "blockedAddressExceptions: []": "blockedAddressExceptions: [127.0.0.1/32]",
            },
        )
        resolver = StaticResolver({"status.partner.example": ["127.0.0.1"]})
        gateway = Gateway(self, files, resolver=resolver)
        gateway.start()
        target = f"http://status.partner.example:{up}/health".encode()
        host = f"status.partner.example:{up}".encode()
        denied = await client.request(
            reactor, "127.0.0.1", port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        )
        self.assertEqual(denied.status, 407)
        auth = b"Proxy-Authorization: Basic YXBwOmNoYW5nZS1tZQ==\r\n"  # app:change-me
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.body)["path"], "/health")
        other = await client.request(
            reactor, "127.0.0.1", port,
            b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n" + auth + b"\r\n",
        )
        self.assertEqual(other.status, 403)


class TlsExampleTests(TestCase):
    """conf/tls: an mTLS API, with certificates from $FLEXGW_TLS_DIR."""

    def setUp(self) -> None:
        """Demo certificates, written the way the README says."""
        from flexgw.testing.certs import main as write_certs

        self.certs = os.path.abspath(self.mktemp())
        write_certs(["--out", self.certs])

    def test_validates_cleanly(self) -> None:
        """No problems; one https listener on 127.0.0.1:8443 requiring client certificates."""
        state = load_config([os.path.join(ROOT, "conf", "tls")], {"FLEXGW_TLS_DIR": self.certs})
        self.assertEqual([str(p) for p in state.problems], [])
        (listener,) = state.plan.listeners
        self.assertEqual((listener.scheme, listener.host, listener.port), ("https", "127.0.0.1", 8443))
        self.assertTrue(listener.tls.settings.require_client_certificate)

    async def test_readme_curl(self) -> None:
        """The README's mTLS request (ports moved to free ones): 200 from the echo upstream,
        which sees the client certificate as x-forwarded-client-cert."""
        from twisted.internet import ssl

        port_up = reactor.listenTCP(0, EchoUpstream(), interface="127.0.0.1")
        self.addCleanup(port_up.stopListening)
        port = free_port()
        files = example_files(
            "tls",
            {
                "127.0.0.1:8443": f"127.0.0.1:{port}",
                "127.0.0.1:8082": f"127.0.0.1:{port_up.getHost().port}",
            },
        )
        gateway = Gateway(self, files, environ={"FLEXGW_TLS_DIR": self.certs})
        gateway.start()

        def read(name: str) -> bytes:
            with open(os.path.join(self.certs, name), "rb") as handle:
                return handle.read()

        options = ssl.optionsForClientTLS(
            "localhost",
            trustRoot=ssl.Certificate.loadPEM(read("ca.crt")),
            clientCertificate=ssl.PrivateCertificate.loadPEM(read("client.key") + read("client.crt")),
        )
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\n\r\n", tls=options,
        )
        self.assertEqual(response.status, 200)
        echoed = json.loads(response.body)
        self.assertEqual(echoed["path"], "/v1/hello")
        headers = {k.lower(): v for k, v in echoed["headers"]}
        self.assertEqual(headers["x-forwarded-proto"], "https")
        self.assertIn('Subject="CN=demo-client"', headers["x-forwarded-client-cert"])
