"""conf/egress served as shipped (addresses moved to loopback): the reverse-proxy egress API and
the forward proxy both reach the partner over verified TLS with injected credentials."""

from __future__ import annotations

import base64
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.config.pipeline import load_config
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, server_options
from flexgw.testing.upstream import RecordingUpstream, echo
from tests.conftools import example_files
from tests.harness import Gateway, free_port

EGRESS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "egress")
PARTNER_AUTH = b"Basic " + base64.b64encode(b"svc-user:svc-pass")


class EgressExampleTests(TestCase):
    """A TLS partner on 127.0.0.1 (certificate from a test CA) stands in for api.partner.example."""

    timeout = 20

    def setUp(self) -> None:
        """The partner, the CA file and the environment the example reads."""
        directory = os.path.abspath(self.mktemp())
        authority = CertificateAuthority("partner CA")
        self.environ = {
            "FLEXGW_PARTNER_CA": authority.write(directory, "ca"),
            "FLEXGW_PARTNER_USER": "svc-user",
            "FLEXGW_PARTNER_PASSWORD": "svc-pass",
        }
        self.partner = RecordingUpstream(echo(), reactor=reactor)
        self.partner.listen(reactor, tls=server_options(authority.issue("partner", ips=["127.0.0.1"])))
        self.addCleanup(self.partner.stop)

    def test_validates_cleanly(self) -> None:
        """No problem at all with the environment set: a forward proxy and an API."""
        state = load_config([EGRESS], self.environ)
        self.assertEqual([str(p) for p in state.problems], [])
        ports = {listener.port: listener.forward_proxy is not None for listener in state.plan.listeners}
        self.assertEqual(ports, {3128: True, 8081: False})

    async def test_both_ways_reach_the_partner(self) -> None:
        """/partner/... on the API and http://partner/... through the proxy both arrive over
        TLS with the injected credentials (the client's own Authorization replaced); another
        destination is refused by the proxy."""
        partner_port = self.partner.address[1]
        api_port, proxy_port = free_port(), free_port()
        moves = {
            "127.0.0.1:8081": f"127.0.0.1:{api_port}",
            "127.0.0.1:3128": f"127.0.0.1:{proxy_port}",
            "https://api.partner.example:443": f"https://127.0.0.1:{partner_port}",
            "api.partner.example:80,443": f"127.0.0.1:{partner_port}",
        }
        files = example_files("egress", moves)
        gateway = Gateway(self, files, environ=self.environ)
        gateway.start()
        self.assertEqual(gateway.service.unbound, set())
        via_api = await client.request(
            reactor, "127.0.0.1", api_port,
            b"GET /partner/orders HTTP/1.1\r\nHost: internal\r\nAuthorization: Basic eDp5\r\n\r\n",
        )
        self.assertEqual(via_api.status, 200)
        target = f"127.0.0.1:{partner_port}".encode()
        via_proxy = await client.request(
            reactor, "127.0.0.1", proxy_port,
            b"GET http://" + target + b"/orders?x=1 HTTP/1.1\r\nHost: " + target
            + b"\r\nAuthorization: Basic eDp5\r\n\r\n",
        )
        self.assertEqual(via_proxy.status, 200)
        first, second = self.partner.received
        self.assertEqual((first.target, second.target), (b"/orders", b"/orders?x=1"))
        self.assertEqual(first.header("authorization"), [PARTNER_AUTH])
        self.assertEqual(second.header("authorization"), [PARTNER_AUTH])
        denied = await client.request(
            reactor, "127.0.0.1", proxy_port,
            b"GET http://10.0.0.1/ HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
        )
        self.assertEqual(denied.status, 403)
