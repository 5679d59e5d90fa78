"""End-to-end smoke tests of the ingress proxy over real loopback sockets."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.testing import client
from tests.harness import gateway_with_upstream


class ProxySmokeTests(TestCase):
    """A request goes through the gateway to the upstream and back."""

    async def test_get_is_proxied_with_rewrite(self) -> None:
        """The upstream receives the rewritten path and Host; the client gets the upstream body."""
        gateway, upstream, port = await gateway_with_upstream(
            self, rules="- path: /api(/.*)", destination_path="/v1"
        )
        response = await client.request(
            reactor, "127.0.0.1", port,
            b"GET /api/items/7?x=1 HTTP/1.1\r\nHost: example.test\r\nX-Case: Keep\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(len(upstream.received), 1)
        seen = upstream.received[0]
        self.assertEqual(seen.target, b"/v1/items/7?x=1")
        self.assertEqual(seen.header("host"), [f"127.0.0.1:{upstream.address[1]}".encode()])
        self.assertIn((b"X-Case", b"Keep"), seen.headers)
        self.assertEqual(seen.header("x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header("x-forwarded-host"), [b"example.test"])
        records = gateway.records()
        self.assertEqual(records[-1]["status"], 200)
        self.assertEqual(records[-1]["api"], "default/test-api")
