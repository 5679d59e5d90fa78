"""Configuration.spec.forwardProxy: upstream Services reached through a recording local proxy (absolute-form for http, CONNECT for https), credentials, noProxy, refusals."""

from __future__ import annotations

import base64
import io
import json
import os
import textwrap

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from flexgw import cli
from flexgw.config.forwardproxy import ForwardProxy
from flexgw.sidecalls.proxy import ForwardProxyAgent, _TunnelEndpoints
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, server_options
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, free_port
from tests.keyserver import JsonServer
from tests.outbound import outbound_binding, service_api
from tests.recordingproxy import RecordingProxy


def forward_proxy(address: str, extra: str = "", auth: str = "") -> str:
    """A Configuration document with forwardProxy at `address`, `auth` (a basicAuth value)
    and `extra` YAML (e.g. noProxy) beside `https`."""
    body = textwrap.indent(textwrap.dedent(extra).strip("\n"), "    ")
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
        "metadata: {name: corp-proxy}\nspec:\n  forwardProxy:\n"
        f"    https:\n      address: {address}\n"
        + (f"      basicAuth: {auth}\n" if auth else "")
        + (body + "\n" if body else "")
    )


class BypassTests(TestCase):
    """noProxy matching."""

    def test_names_suffixes_star_and_networks(self) -> None:
        """Exact names, .suffix entries, CIDR ranges; everything with *."""
        import ipaddress

        proxy = ForwardProxy(
            "proxy", 3128, no_proxy=("fluentd", ".svc.cluster.local"),
            no_proxy_networks=(ipaddress.ip_network("10.0.0.0/8"),),
        )
        self.assertTrue(proxy.bypasses("FluentD"))
        self.assertTrue(proxy.bypasses("api.ns.svc.cluster.local"))
        self.assertTrue(proxy.bypasses("svc.cluster.local"))
        self.assertTrue(proxy.bypasses("10.1.2.3"))
        self.assertFalse(proxy.bypasses("fluentd.example.com"))
        self.assertFalse(proxy.bypasses("evilsvc.cluster.local"))
        self.assertFalse(proxy.bypasses("11.1.2.3"))
        self.assertTrue(ForwardProxy("p", 1, no_proxy=("*",)).bypasses("anything"))


class ForwardProxyEndToEndTests(TestCase):
    """A gateway whose Service is reached through a recording proxy."""

    def setUp(self) -> None:
        """The proxy, a recording upstream, a gateway port."""
        self.proxy = RecordingProxy(reactor)
        self.proxy_port = self.proxy.listen()
        self.addCleanup(self.proxy.stop)
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, api: str, proxy_config: str) -> Gateway:
        """A started gateway with `api` and the forwardProxy document."""
        gateway = Gateway(self, {"api.yaml": api + proxy_config})
        gateway.start()
        return gateway

    async def get(self) -> client.Response:
        """One GET through the gateway."""
        return await client.request(
            reactor, "127.0.0.1", self.port, b"GET /x?q=1 HTTP/1.1\r\nHost: t\r\n\r\n"
        )

    async def test_http_service_absolute_form_with_credentials(self) -> None:
        """Plain HTTP: absolute-form to the proxy with Proxy-Authorization (basicAuth); the
        Service's name is never resolved by the gateway."""
        gateway = self.start(
            service_api(self.port, 8080, upstream_host="api.partner.example"),
            forward_proxy(
                f"http://127.0.0.1:{self.proxy_port}",
                auth="{username: gw, password: 'p@ss'}",
            ),
        )
        self.assertEqual([p for p in gateway.service.state.problems if p.severity == "error"], [])
        first = await self.get()
        second = await self.get()
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(first.body, b"via proxy http://api.partner.example:8080/x?q=1")
        request = self.proxy.requests[0]
        self.assertEqual((request["method"], request["target"]),
                         (b"GET", b"http://api.partner.example:8080/x?q=1"))
        self.assertEqual(self.proxy.header(0, b"proxy-authorization"),
                         [b"Basic " + base64.b64encode(b"gw:p@ss")])
        self.assertEqual(self.proxy.header(0, b"host"), [b"api.partner.example:8080"])
        self.assertEqual(len(self.proxy.connections), 1)  # the pooled proxy connection is reused

    async def test_client_proxy_authorization_never_forwarded(self) -> None:
        """A client's own Proxy-Authorization is hop-by-hop: only the gateway's reaches the proxy."""
        self.start(
            service_api(self.port, 8080, upstream_host="api.partner.example"),
            forward_proxy(f"http://gw:secret@127.0.0.1:{self.proxy_port}"),
        )
        response = await client.request(
            reactor, "127.0.0.1", self.port,
            b"GET /x HTTP/1.1\r\nHost: t\r\nProxy-Authorization: Basic Y2xpZW50OnB3\r\n\r\n",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.proxy.header(0, b"proxy-authorization"),
                         [b"Basic " + base64.b64encode(b"gw:secret")])

    def tls_upstream(self, name: str) -> tuple[RecordingUpstream, str]:
        """A TLS recording upstream with a certificate for `name`; returns it and the CA file."""
        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority("partner CA")
        ca_path = ca.write(directory, "ca")
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor, tls=server_options(ca.issue("partner", dns=[name])))
        self.addCleanup(upstream.stop)
        self.proxy.names["api.partner.test"] = "127.0.0.1"
        return upstream, ca_path

    def tls_binding(self, ca_path: str) -> str:
        """tls-outbound on Service `partner`, trusting `ca_path`."""
        return outbound_binding("partner-tls", "tls-outbound", f'trustedCA: "file://{ca_path}"\n')

    async def test_https_service_connect_tunnel(self) -> None:
        """https Service: CONNECT host:port with the credentials, then TLS verified against the
        Service's host name inside the tunnel; the gateway never resolves the name itself."""
        upstream, ca_path = self.tls_upstream("api.partner.test")
        gateway = self.start(
            service_api(self.port, upstream.address[1], "api.partner.test", scheme="https")
            + self.tls_binding(ca_path),
            forward_proxy(
                f"http://127.0.0.1:{self.proxy_port}", auth="{username: gw, password: pw}"
            ),
        )
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        first, second = await self.get(), await self.get()
        self.assertEqual((first.status, second.status), (200, 200))
        request = self.proxy.requests[0]
        self.assertEqual(
            (request["method"], request["target"]),
            (b"CONNECT", f"api.partner.test:{upstream.address[1]}".encode()),
        )
        self.assertEqual(self.proxy.header(0, b"proxy-authorization"),
                         [b"Basic " + base64.b64encode(b"gw:pw")])
        self.assertEqual(len(self.proxy.requests), 1)  # one tunnel, pooled, for both requests
        self.assertEqual([r.target for r in upstream.received], [b"/x?q=1", b"/x?q=1"])
        self.assertEqual(upstream.received[0].header("proxy-authorization"), [])

    async def test_tunnel_tls_still_verified(self) -> None:
        """A certificate for another name, through the tunnel: 502 upstream_tls."""
        upstream, ca_path = self.tls_upstream("someone-else.test")
        self.start(
            service_api(self.port, upstream.address[1], "api.partner.test", scheme="https")
            + self.tls_binding(ca_path),
            forward_proxy(f"http://127.0.0.1:{self.proxy_port}"),
        )
        response = await self.get()
        self.assertEqual(response.status, 502)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_tls"])
        self.assertEqual(upstream.received, [])

    async def test_h2c_service_through_tunnel(self) -> None:
        """An h2c Service (HTTP/2 prior knowledge) goes through a CONNECT tunnel too."""
        upstream = RecordingUpstream(reactor=reactor, h2c=True)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        self.proxy.names["grpc.partner.test"] = "127.0.0.1"
        self.start(
            service_api(self.port, upstream.address[1], "grpc.partner.test", scheme="h2c"),
            forward_proxy(f"http://127.0.0.1:{self.proxy_port}"),
        )
        self.assertEqual((await self.get()).status, 200)
        self.assertEqual(
            (self.proxy.requests[0]["method"], self.proxy.requests[0]["target"]),
            (b"CONNECT", f"grpc.partner.test:{upstream.address[1]}".encode()),
        )
        self.assertEqual(len(upstream.received), 1)

    async def test_no_proxy_connects_directly(self) -> None:
        """A Service whose host is in noProxy is reached directly."""
        self.start(
            service_api(self.port, self.upstream.address[1]),
            forward_proxy(f"http://127.0.0.1:{self.proxy_port}", 'noProxy: ["127.0.0.0/8"]'),
        )
        self.assertEqual((await self.get()).status, 200)
        self.assertEqual(self.upstream.received[0].target, b"/x?q=1")
        self.assertEqual(self.proxy.requests, [])

    async def test_refused_tunnel_is_503(self) -> None:
        """The proxy answers 407 to CONNECT: 503 upstream_connect_failure, nothing upstream."""
        self.proxy.refuse = 407
        self.start(
            service_api(self.port, self.upstream.address[1], scheme="https"),
            forward_proxy(f"http://127.0.0.1:{self.proxy_port}"),
        )
        response = await self.get()
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_connect_failure"])
        self.assertEqual(self.upstream.received, [])

    async def test_config_errors(self) -> None:
        """An https:// proxy or one without address is an error located in the file; direct."""
        gateway = self.start(
            service_api(self.port, self.upstream.address[1]),
            forward_proxy("https://127.0.0.1:3128"),
        )
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("https:// proxy", errors[0].message)
        self.assertIsNotNone(errors[0].line)
        self.assertEqual((await self.get()).status, 200)  # served, directly
        self.assertEqual(self.proxy.requests, [])


class SideCallTests(TestCase):
    """Policies' side calls through the proxy (flexgw.sidecalls.proxy)."""

    def setUp(self) -> None:
        """The recording proxy."""
        self.proxy = RecordingProxy(reactor)
        self.proxy_port = self.proxy.listen()
        self.addCleanup(self.proxy.stop)

    async def test_oauth_token_fetched_through_proxy(self) -> None:
        """credential-injection-oauth2-flex's token request goes to the proxy in absolute form
        with the proxy's credentials; the token reaches the upstream."""
        self.proxy.answer = lambda target: (200, b'{"access_token": "px-1", "expires_in": 60}')
        upstream = RecordingUpstream(reactor=reactor)
        upstream.listen(reactor)
        self.addCleanup(upstream.stop)
        port = free_port()
        bindings = outbound_binding(
            "oauth", "credential-injection-oauth2-flex",
            "oauthService: http://idp.example/token\nclientId: id\nclientSecret: sec\n",
        )
        gateway = Gateway(self, {"api.yaml": service_api(port, upstream.address[1]) + bindings
                                 + forward_proxy(f"http://gw:pw@127.0.0.1:{self.proxy_port}",
                                                 'noProxy: ["127.0.0.1"]')})
        gateway.start()
        response = await client.request(
            reactor, "127.0.0.1", port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(upstream.received[0].header("authorization"), [b"Bearer px-1"])
        token_call = self.proxy.requests[0]
        self.assertEqual((token_call["method"], token_call["target"]),
                         (b"POST", b"http://idp.example/token"))
        self.assertEqual(self.proxy.header(0, b"proxy-authorization"),
                         [b"Basic " + base64.b64encode(b"gw:pw")])
        self.assertIn(b"grant_type=client_credentials", token_call["body"])

    async def test_tunnel_endpoint_for_side_calls(self) -> None:
        """The tunnel endpoints (used for https side calls) carry a request to the target
        through CONNECT; noProxy hosts go direct."""
        server = JsonServer(lambda request: (200, {"ok": True}))
        server.listen(reactor)
        self.addCleanup(server.stop)
        target_port = server.port.getHost().port
        proxy = ForwardProxy("127.0.0.1", self.proxy_port, authorization=b"Basic eDp5")
        agent = Agent.usingEndpointFactory(reactor, _TunnelEndpoints(reactor, proxy, None))
        response = await agent.request(b"GET", f"http://127.0.0.1:{target_port}/k".encode())
        self.assertEqual(json.loads(await readBody(response)), {"ok": True})
        self.assertEqual(self.proxy.requests[0]["method"], b"CONNECT")
        self.assertEqual(self.proxy.requests[0]["target"], f"127.0.0.1:{target_port}".encode())
        self.assertEqual(self.proxy.header(0, b"proxy-authorization"), [b"Basic eDp5"])
        self.assertEqual(server.requests[0]["path"], b"/k")
        direct = ForwardProxyAgent(
            reactor, ForwardProxy("127.0.0.1", self.proxy_port, no_proxy=("localhost",)),
        )
        response = await direct.request(b"GET", f"http://localhost:{target_port}/d".encode())
        await readBody(response)
        self.assertEqual(len(self.proxy.requests), 1)  # not through the proxy
        self.assertEqual(server.requests[1]["path"], b"/d")


class DumpTests(TestCase):
    """`flexgw dump` shows the proxy route, the idle timeout and PROXY protocol, no secrets."""

    def test_dump(self) -> None:
        """viaProxy names the proxy (not its credentials); noProxy hosts show none."""
        conf = self.mktemp()
        os.makedirs(conf)
        text = (
            service_api(8081, 443, "api.partner.example", scheme="https")
            + outbound_binding("idle", "idle-timeout-flex", "timeout: 3\n")
            + forward_proxy("http://proxy.corp:3128", auth="{username: u, password: s3cret}")
            + "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
            "metadata: {name: lb}\nspec:\n  proxyProtocol: {enabled: true}\n"
        )
        with open(os.path.join(conf, "api.yaml"), "w", encoding="utf-8") as handle:
            handle.write(text)
        out = io.StringIO()
        self.assertEqual(cli.main(["dump", conf], stdout=out, environ={}), 0)
        data = json.loads(out.getvalue())
        upstream = data["upstreams"]["default/partner"]
        self.assertEqual((upstream["viaProxy"], upstream["idleTimeoutSeconds"]), ("proxy.corp:3128", 3.0))
        self.assertTrue(data["proxyProtocol"])
        self.assertNotIn("s3cret", out.getvalue())
