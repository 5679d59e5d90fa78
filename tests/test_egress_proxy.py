"""The forward-proxy listener on real loopback sockets: absolute-form, CONNECT, SSRF, proxy auth.

Names resolve only through a StaticResolver; every destination is on 127.0.0.1, which the
default blocked ranges refuse: tests that must reach it name it in blockedAddressExceptions,
and the SSRF tests prove that without the exception it is refused in every spelling.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import urllib.request
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, ssl, threads, utils
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase

from flexgw.egress.front import CONNECT_ESTABLISHED
from flexgw.http.gate import BACKPRESSURE
from flexgw.testing.certs import CertificateAuthority, server_options
from flexgw.testing.client import RawConnection, connect
from flexgw.testing.resolver import StaticResolver
from flexgw.testing.upstream import RecordingUpstream, echo, fixed, pattern_slice
from tests.harness import Gateway, free_port

PARTNER = "api.partner.test"


def proxy_conf(port: int, allowed: list[str], extra_config: str = "", documents: str = "",
               exceptions: list[str] | None = ("127.0.0.1/32",), connect_ports: list[int] | None = None) -> str:
    """A forward-proxy ApiInstance on 127.0.0.1:port with its `forward-proxy` binding."""
    config = f"    allowedDestinations: {json.dumps(allowed)}\n"
    if exceptions:
        config += f"    blockedAddressExceptions: {json.dumps(list(exceptions))}\n"
    if connect_ports:
        config += f"    connectPorts: {json.dumps(connect_ports)}\n"
    return (
        "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
        f"metadata: {{name: egress}}\nspec:\n  address: http://127.0.0.1:{port}\n"
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: egress-proxy}\nspec:\n  targetRef: {kind: ApiInstance, name: egress}\n"
        "  policyRef: {name: forward-proxy}\n  config:\n" + config + extra_config + documents
    )


PROXY_AUTH = """---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: proxy-auth}
spec:
  targetRef: {kind: ApiInstance, name: egress}
  policyRef: {name: http-basic-authentication-flex}
  config: {username: app, password: s3cret}
"""


def self_signed(name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for `name` and its key, PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class ProxyTestCase(TestCase):
    """An upstream on 127.0.0.1, names resolved by a StaticResolver, a forward-proxy gateway."""

    timeout = 60

    def setUp(self) -> None:
        """The upstream (echoing what it got) and the resolver."""
        self.upstream = RecordingUpstream(echo(), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.up_port = self.upstream.address[1]
        self.resolver = StaticResolver(
            {
                PARTNER: ["127.0.0.1"],
                "localhost": ["127.0.0.1"],
                "internal.test": ["10.0.0.5"],
                "metadata.test": ["169.254.169.254"],
                "mixed.test": ["127.0.0.1", "10.1.1.1"],
                "v6.test": ["::1"],
            }
        )

    def start_proxy(self, allowed: list[str] | None = None, **options: Any) -> Gateway:
        """A started forward-proxy gateway; its port is `self.port`."""
        self.port = free_port()
        if allowed is None:
            allowed = [f"{PARTNER}:{self.up_port}"]
        gateway = Gateway(
            self, {"proxy.yaml": proxy_conf(self.port, allowed, **options)}, resolver=self.resolver
        )
        gateway.start()
        self.assertEqual([p for p in gateway.service.state.plan.problems if p.severity == "error"], [])
        # free_port() can race with another test process: fail here, not on someone else's port.
        self.assertEqual(gateway.service.unbound, set())
        self.gateway = gateway
        return gateway

    async def send(self, raw: bytes) -> Any:
        """One request to the proxy on a new connection; the final response."""
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(raw)
        return await conn.read_final_response()

    async def get(self, url: str, extra: bytes = b"") -> Any:
        """An absolute-form GET for `url` through the proxy."""
        authority = url.split("/")[2].encode()
        return await self.send(
            b"GET " + url.encode() + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + extra + b"\r\n"
        )

    def tls_upstream(self) -> tuple[RecordingUpstream, bytes]:
        """A TLS server for api.partner.test on 127.0.0.1 (recording, answering 200)."""
        cert, key = self_signed(PARTNER)
        private = ssl.PrivateCertificate.loadPEM(cert + key)
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            acceptableProtocols=[b"http/1.1"],  # curl offers ALPN; a server without it aborts
        )
        upstream = RecordingUpstream(fixed(200, body=b"secure\n"), reactor=reactor)
        upstream.port = reactor.listenSSL(0, upstream, options, interface="127.0.0.1")
        self.addCleanup(upstream.stop)
        return upstream, cert

    async def open_connect(self, target: bytes, extra: bytes = b"") -> tuple[RawConnection, bytes]:
        """Send a CONNECT; return the connection (in tunnel mode) and the proxy's answer head."""
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.upgraded = True  # every byte back is tunnel data: the answer head, then the tunnel
        conn.send(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + extra + b"\r\n")
        answer = await conn.wait_tunnel_bytes(len(CONNECT_ESTABLISHED))
        return conn, answer


class AbsoluteFormTests(ProxyTestCase):
    """Plain-HTTP requests in absolute form."""

    async def test_allowed_destination_is_forwarded(self) -> None:
        """The upstream gets an origin-form request for the name, without proxy headers; the
        name was looked up once; the access log names the destination."""
        self.start_proxy()
        response = await self.get(
            f"http://{PARTNER}:{self.up_port}/v1/items?x=1",
            b"Proxy-Connection: keep-alive\r\nAuthorization: Bearer t\r\n"
            b"X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\n",
        )
        self.assertEqual(response.status, 200)
        [seen] = self.upstream.received
        self.assertEqual(seen.target, b"/v1/items?x=1")
        self.assertEqual(seen.header("host"), [f"{PARTNER}:{self.up_port}".encode()])
        self.assertEqual(seen.header("proxy-connection"), [])
        self.assertEqual(seen.header("authorization"), [b"Bearer t"])
        for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"):
            self.assertEqual(seen.header(name), [], name)
        self.assertEqual(self.resolver.lookups, [PARTNER])
        [record] = self.gateway.records()
        self.assertEqual(record["upstream"], f"egress/{PARTNER}:{self.up_port}")
        self.assertEqual(record["status"], 200)

    async def test_keep_alive_reuses_the_destination_pool(self) -> None:
        """Two requests on one client connection reuse one upstream connection."""
        self.start_proxy()
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        for path in (b"/a", b"/b"):
            conn.send(b"GET http://" + PARTNER.encode() + b":%d" % self.up_port + path
                      + b" HTTP/1.1\r\nHost: " + PARTNER.encode() + b":%d\r\n\r\n" % self.up_port)
            response = await conn.read_final_response()
            self.assertEqual(response.status, 200)
        self.assertEqual(len(self.upstream.connections), 1)

    async def test_denied_destination(self) -> None:
        """Not in the allowlist: 403 egress_denied (JSON), no lookup, nothing sent."""
        self.start_proxy()
        response = await self.get("http://other.test/")
        self.assertEqual(response.status, 403)
        self.assertEqual(response.header("x-flexgw-error"), [b"egress_denied"])
        self.assertEqual(json.loads(response.body), {"error": "The destination is not allowed"})
        response = await self.get(f"http://{PARTNER}:{self.up_port + 1}/")
        self.assertEqual(response.status, 403)
        self.assertEqual(self.resolver.lookups, [])
        self.assertEqual(self.upstream.received, [])

    async def test_reload_changes_the_allowlist(self) -> None:
        """A reload with a new allowlist applies to the next request on the same listener."""
        gateway = self.start_proxy(allowed=["other.test:80"])
        url = f"http://{PARTNER}:{self.up_port}/r"
        self.assertEqual((await self.get(url)).status, 403)
        gateway.write({"proxy.yaml": proxy_conf(self.port, [f"{PARTNER}:{self.up_port}"])})
        self.assertTrue(gateway.service.reload())
        self.assertEqual((await self.get(url)).status, 200)

    async def test_origin_form_is_not_a_proxy_request(self) -> None:
        """An origin-form request to the proxy port is a 400, never routed anywhere."""
        self.start_proxy()
        response = await self.send(b"GET /x HTTP/1.1\r\nHost: " + PARTNER.encode() + b"\r\n\r\n")
        self.assertEqual(response.status, 400)
        self.assertEqual(self.upstream.received, [])

    async def test_plain_http_can_be_switched_off(self) -> None:
        """allowPlainHttp: false refuses absolute-form requests."""
        self.start_proxy(extra_config="    allowPlainHttp: false\n")
        response = await self.get(f"http://{PARTNER}:{self.up_port}/")
        self.assertEqual(response.status, 403)

    async def test_unresolvable_is_502(self) -> None:
        """A name with no address: 502 dns_failure, in the access log and the metrics; one
        warning per name naming it (a second request within the window is not logged)."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start_proxy(allowed=["*:*"])
        for _ in range(2):
            response = await self.get("http://nowhere.test/")
            self.assertEqual(response.status, 502)
            self.assertEqual(response.header("x-flexgw-error"), [b"dns_failure"])
        self.assertEqual([r["error"] for r in self.gateway.records()], ["dns_failure"] * 2)
        self.assertEqual(
            {key[2:]: n for key, n in self.gateway.service.metrics.requests.items()},
            {(502, "dns_failure"): 2},
        )
        logged = [formatEvent(e) for e in events if "Name lookup" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("nowhere.test", logged[0])

    async def test_refused_is_503(self) -> None:
        """An allowed destination that refuses the connection: 503."""
        self.start_proxy(allowed=["*:*"])
        closed = free_port()
        response = await self.get(f"http://{PARTNER}:{closed}/")
        self.assertEqual(response.status, 503)
        self.assertEqual(response.header("x-flexgw-error"), [b"upstream_connect_failure"])

    async def test_service_destination_uses_the_service(self) -> None:
        """A destination matching the address of a Service the binding names goes to that
        Service's upstream pool."""
        service = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\n"
            f"metadata: {{name: partner}}\nspec:\n  address: http://127.0.0.1:{self.up_port}\n"
        )
        self.start_proxy(
            allowed=[f"127.0.0.1:{self.up_port}"], exceptions=None, documents=service,
            extra_config="    services: [partner]\n",
        )
        response = await self.get(f"http://127.0.0.1:{self.up_port}/svc")
        self.assertEqual(response.status, 200)
        [record] = self.gateway.records()
        self.assertEqual(record["upstream"], "default/partner")
        self.assertEqual([r.target for r in self.upstream.received], [b"/svc"])


    async def test_service_outbound_chain_runs(self) -> None:
        """A destination matching a Service runs its outbound policies after the proxy's own:
        credential-injection-basic-auth-flex replaces the client's Authorization; another
        destination (no Service) gets no injection."""
        service = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\n"
            f"metadata: {{name: partner}}\nspec:\n  address: http://127.0.0.1:{self.up_port}\n"
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: partner-creds}\nspec:\n  targetRef: {kind: Service, name: partner}\n"
            "  policyRef: {name: credential-injection-basic-auth-flex}\n"
            "  config: {username: svc, password: pw}\n"
        )
        self.start_proxy(
            allowed=[f"127.0.0.1:{self.up_port}", f"{PARTNER}:{self.up_port}"], documents=service,
            extra_config="    services: [partner]\n",
        )
        response = await self.get(
            f"http://127.0.0.1:{self.up_port}/svc", b"Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n"
        )
        self.assertEqual(response.status, 200)
        response = await self.get(f"http://{PARTNER}:{self.up_port}/other")
        self.assertEqual(response.status, 200)
        injected, other = self.upstream.received
        self.assertEqual(injected.header("authorization"), [b"Basic " + base64.b64encode(b"svc:pw")])
        self.assertEqual(other.header("authorization"), [])
        self.assertEqual(
            [r["upstream"] for r in self.gateway.records()],
            ["default/partner", f"egress/{PARTNER}:{self.up_port}"],
        )

    async def test_https_service_is_tls_originated(self) -> None:
        """A plain-HTTP request for an `https://` Service's address is sent to it over TLS,
        verified with the Service's tls-outbound trustedCA (the application speaks plain HTTP)."""
        directory = os.path.abspath(self.mktemp())
        authority = CertificateAuthority("partner CA")
        ca_path = authority.write(directory, "ca")
        tls = RecordingUpstream(echo(), reactor=reactor)
        tls.listen(reactor, tls=server_options(authority.issue("partner", ips=["127.0.0.1"])))
        self.addCleanup(tls.stop)
        tls_port = tls.address[1]
        service = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\n"
            f"metadata: {{name: partner}}\nspec:\n  address: https://127.0.0.1:{tls_port}\n"
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: partner-tls}\nspec:\n  targetRef: {kind: Service, name: partner}\n"
            f"  policyRef: {{name: tls-outbound}}\n  config:\n    trustedCA: \"file://{ca_path}\"\n"
        )
        self.start_proxy(
            allowed=[f"127.0.0.1:{tls_port}"], exceptions=None, documents=service,
            extra_config="    services: [default/partner]\n",
        )
        response = await self.get(f"http://127.0.0.1:{tls_port}/over-tls")
        self.assertEqual(response.status, 200)
        self.assertEqual([r.target for r in tls.received], [b"/over-tls"])
        [record] = self.gateway.records()
        self.assertEqual(record["upstream"], "default/partner")


def protected_api(port: int, upstream_port: int) -> str:
    """An ingress API on 127.0.0.1:port behind basic auth, whose Service `internal` is the
    upstream on 127.0.0.1:upstream_port (with an outbound header policy), as YAML documents."""
    return f"""---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: Service
metadata: {{name: internal}}
spec: {{address: "http://127.0.0.1:{upstream_port}"}}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {{name: internal-creds}}
spec:
  targetRef: {{kind: Service, name: internal}}
  policyRef: {{name: credential-injection-basic-auth-flex}}
  config: {{username: svc, password: pw}}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: ApiInstance
metadata: {{name: protected}}
spec: {{address: "http://127.0.0.1:{port}"}}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {{name: protected-route}}
spec:
  targetRef: {{kind: ApiInstance, name: protected}}
  policyRef: {{name: route}}
  config: {{destinationRef: {{name: internal}}}}
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {{name: protected-auth}}
spec:
  targetRef: {{kind: ApiInstance, name: protected}}
  policyRef: {{name: http-basic-authentication-flex}}
  config: {{username: admin, password: s3cret}}
"""


class ServiceMappingTests(ProxyTestCase):
    """A destination is mapped to a Service only when the forward-proxy binding names it in
    `services`: never through the back door to a protected API's Service (issue 19, item 2)."""

    def spellings(self) -> list[str]:
        """The upstream's address 127.0.0.1 in several IPv4 spellings, with its port."""
        port = self.up_port
        return [f"http://{host}:{port}/admin" for host in (
            "127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.0.1",
            "[::ffff:127.0.0.1]",
        )]

    async def test_unnamed_service_address_is_an_ordinary_destination(self) -> None:
        """The protected API answers 401 without credentials; through the proxy (allowing any
        host on the upstream's port, no exception for loopback) its Service's address in every
        spelling is refused 403 egress_denied, and nothing reaches the upstream."""
        ingress_port = free_port()
        self.start_proxy(
            allowed=[f"*:{self.up_port}"], exceptions=None,
            documents=protected_api(ingress_port, self.up_port),
        )
        direct = await connect(reactor, "127.0.0.1", ingress_port)
        self.addCleanup(direct.abort)
        direct.send(b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n")
        self.assertEqual((await direct.read_final_response()).status, 401)
        for url in self.spellings():
            response = await self.get(url)
            self.assertEqual(
                (response.status, response.header("x-flexgw-error")), (403, [b"egress_denied"]), url
            )
        self.assertEqual(self.upstream.received, [])
        proxied = [r for r in self.gateway.records() if r["api"] == "default/egress"]
        self.assertEqual([(r["status"], r["error"]) for r in proxied], [(403, "egress_denied")] * 7)

    async def test_named_service_runs_its_outbound_policies(self) -> None:
        """With `services: [internal]` every spelling of its address goes to that Service (not
        checked against the blocked ranges: the operator named it) and its outbound policy
        injects its credentials over the client's."""
        ingress_port = free_port()
        gateway = self.start_proxy(
            allowed=[f"*:{self.up_port}"], exceptions=None, extra_config="    services: [internal]\n",
            documents=protected_api(ingress_port, self.up_port),
        )
        self.assertEqual(gateway.service.state.plan.problems, ())  # `services` is a known key
        for url in self.spellings():
            response = await self.get(url, b"Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n")
            self.assertEqual(response.status, 200, url)
        injected = b"Basic " + base64.b64encode(b"svc:pw")
        self.assertEqual([r.header("authorization") for r in self.upstream.received],
                         [[injected]] * len(self.spellings()))
        self.assertEqual({r["upstream"] for r in self.gateway.records()}, {"default/internal"})
        self.assertEqual(self.resolver.lookups, [])


class SsrfTests(ProxyTestCase):
    """Without an exception, loopback and private addresses are refused in every spelling."""

    async def test_blocked_spellings_and_names(self) -> None:
        """127.0.0.1, 0x7f.1, 2130706433, 0177.0.0.1, [::ffff:127.0.0.1], [::1], localhost,
        names resolving to private, metadata, IPv6 loopback, or a mix: all 403, nothing sent."""
        self.start_proxy(allowed=["*:*"], exceptions=None)
        for host in (
            "127.0.0.1", "0x7f.1", "2130706433", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]",
            "[::1]", "localhost", "internal.test", "metadata.test", "mixed.test", "v6.test",
            "169.254.169.254", "[::ffff:a9fe:a9fe]",
        ):
            response = await self.get(f"http://{host}:{self.up_port}/")
            self.assertEqual((host, response.status), (host, 403))
            self.assertEqual(response.header("x-flexgw-error"), [b"egress_denied"])
            _conn, answer = await self.open_connect(f"{host}:443".encode())
            self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), (host, answer))
        self.assertEqual(self.upstream.received, [])
        self.assertEqual(self.upstream.connections, [])

    async def test_rebinding_name_is_looked_up_once(self) -> None:
        """A name answering a public then a private address is looked up once per request, and
        the connection goes to the address that was checked."""
        self.resolver.names["rebind.test"] = [["127.0.0.1"], ["10.0.0.1"]]
        self.start_proxy(allowed=["*:*"])
        response = await self.get(f"http://rebind.test:{self.up_port}/")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.resolver.lookups, ["rebind.test"])
        response = await self.get(f"http://rebind.test:{self.up_port}/")
        self.assertEqual(response.status, 403)


class OtherPoliciesTests(ProxyTestCase):
    """The ApiInstance's other policies and the gateway's timeouts apply to proxied traffic."""

    async def test_rate_limiting_applies(self) -> None:
        """rate-limiting-flex on the proxy: the second request in the window is a 429, and
        never reaches the destination."""
        quota = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: quota}\nspec:\n  targetRef: {kind: ApiInstance, name: egress}\n"
            "  policyRef: {name: rate-limiting-flex}\n  config:\n    rateLimits:\n"
            "      - {maximumRequests: 1, timePeriodInMilliseconds: 600000}\n"
        )
        self.start_proxy(documents=quota)
        url = f"http://{PARTNER}:{self.up_port}/q"
        self.assertEqual((await self.get(url)).status, 200)
        self.assertEqual((await self.get(url)).status, 429)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_ip_blocklist_on_the_client(self) -> None:
        """ip-blocklist-flex blocking the client's address: 403 before any destination work."""
        blocklist = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: ips}\nspec:\n  targetRef: {kind: ApiInstance, name: egress}\n"
            "  policyRef: {name: ip-blocklist-flex}\n  config:\n    ips: [127.0.0.1]\n"
        )
        self.start_proxy(documents=blocklist)
        response = await self.get(f"http://{PARTNER}:{self.up_port}/")
        self.assertEqual(response.status, 403)
        self.assertEqual(self.resolver.lookups, [])
        self.assertEqual(self.upstream.received, [])

    async def test_idle_connect_tunnel_is_closed(self) -> None:
        """A CONNECT tunnel with no byte either way for streamIdleSeconds is closed, both
        sides, and logged as such."""
        timeouts = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
            "metadata: {name: t}\nspec:\n  timeouts:\n    streamIdleSeconds: 0.3\n"
        )
        self.start_proxy(connect_ports=[self.up_port], documents=timeouts)
        conn, answer = await self.open_connect(f"{PARTNER}:{self.up_port}".encode())
        self.assertEqual(answer, CONNECT_ESTABLISHED)
        await conn.wait_closed()
        await self.upstream.wait_for_disconnections(1)
        [record] = self.gateway.records()
        self.assertEqual((record["status"], record["error"]), (200, "stream_idle_timeout"))


class ProxyAuthTests(ProxyTestCase):
    """http-basic-authentication-flex on a forward proxy is proxy authentication."""

    async def test_407_then_authenticated(self) -> None:
        """No Proxy-Authorization: 407 with Proxy-Authenticate, before any destination check;
        with it: forwarded, without Proxy-Authorization; Authorization is the destination's."""
        self.start_proxy(documents=PROXY_AUTH)
        response = await self.get("http://denied.test/")
        self.assertEqual(response.status, 407)
        self.assertEqual(response.header("proxy-authenticate"), [b'Basic realm="flexgw"'])
        response = await self.get(
            f"http://{PARTNER}:{self.up_port}/", b"Authorization: Basic " + base64.b64encode(b"app:s3cret") + b"\r\n"
        )
        self.assertEqual(response.status, 407)
        _conn, answer = await self.open_connect(b"x.test:443")
        self.assertTrue(answer.startswith(b"HTTP/1.1 407 "))
        token = b"Basic " + base64.b64encode(b"app:s3cret")
        response = await self.get(
            f"http://{PARTNER}:{self.up_port}/ok",
            b"Proxy-Authorization: " + token + b"\r\nAuthorization: Bearer dest\r\n",
        )
        self.assertEqual(response.status, 200)
        [seen] = self.upstream.received
        self.assertEqual(seen.header("proxy-authorization"), [])
        self.assertEqual(seen.header("authorization"), [b"Bearer dest"])
        self.assertEqual(self.resolver.lookups, [PARTNER])


class ConnectTests(ProxyTestCase):
    """CONNECT tunnels."""

    async def test_connect_to_tls_server(self) -> None:
        """CONNECT, 200 Connection established, TLS through the tunnel (verified against the
        test's certificate), an HTTPS request answered; the access log counts the bytes."""
        tls, cert = self.tls_upstream()
        tls_port = tls.address[1]
        self.start_proxy(allowed=[f"{PARTNER}:{tls_port}"], connect_ports=[tls_port])
        conn, answer = await self.open_connect(f"{PARTNER}:{tls_port}".encode())
        self.assertEqual(answer, CONNECT_ESTABLISHED)
        conn.upgraded = False
        conn.transport.startTLS(
            ssl.optionsForClientTLS(PARTNER, trustRoot=ssl.Certificate.loadPEM(cert))
        )
        conn.send(b"GET /secure HTTP/1.1\r\nHost: " + PARTNER.encode() + b"\r\n\r\n")
        response = await conn.read_final_response()
        self.assertEqual((response.status, response.body), (200, b"secure\n"))
        self.assertEqual([r.target for r in tls.received], [b"/secure"])
        await conn.close()
        await tls.wait_for_disconnections(1)
        [record] = [r for r in self.gateway.records() if r["method"] == "CONNECT"]
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["path"], f"{PARTNER}:{tls_port}")
        self.assertGreater(record["bytes_in"], 200)  # a TLS handshake and a request
        self.assertGreater(record["bytes_out"], 200)

    async def test_bytes_sent_with_the_connect_go_through_after_it(self) -> None:
        """A client that sends its first tunnel bytes right behind the CONNECT head: they wait
        for the tunnel and reach the destination first; they are never parsed by the proxy."""
        self.start_proxy(connect_ports=[self.up_port])
        conn = await connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.upgraded = True
        target = f"{PARTNER}:{self.up_port}".encode()
        conn.send(
            b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
            b"GET /early HTTP/1.1\r\nHost: inner.test\r\n\r\n"
        )
        answer = await conn.wait_tunnel_bytes(len(CONNECT_ESTABLISHED))
        self.assertEqual(answer, CONNECT_ESTABLISHED)
        conn.upgraded = False
        conn._buf += conn.tunnel_data  # what came after the answer head is a response
        del conn.tunnel_data[:]
        response = await conn.read_final_response()
        self.assertEqual(response.status, 200)
        [seen] = self.upstream.received
        self.assertEqual((seen.target, seen.header("host")), (b"/early", [b"inner.test"]))
        self.assertEqual(len(self.gateway.records()), 0)  # the tunnel is still open

    async def test_connect_port_not_allowed(self) -> None:
        """CONNECT to a port outside connectPorts (default 443) is refused and closed."""
        self.start_proxy(allowed=["*:*"])
        conn, answer = await self.open_connect(f"{PARTNER}:{self.up_port}".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "))
        await conn.wait_closed()
        self.assertEqual(self.upstream.connections, [])

    async def test_connect_refused_is_503(self) -> None:
        """CONNECT to a closed port: 503."""
        closed = free_port()
        self.start_proxy(allowed=[f"{PARTNER}:{closed}"], connect_ports=[closed])
        _conn, answer = await self.open_connect(f"{PARTNER}:{closed}".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)

    async def test_chaining_through_a_second_gateway(self) -> None:
        """A CONNECT through this gateway to a second flexgw forward proxy, then an absolute-
        form request to that one through the tunnel: the upstream answers."""
        second_port = free_port()
        second = Gateway(
            self,
            {"proxy.yaml": proxy_conf(second_port, [f"{PARTNER}:{self.up_port}"])},
            resolver=self.resolver,
        )
        second.start()
        self.start_proxy(allowed=[f"127.0.0.1:{second_port}"], connect_ports=[second_port])
        conn, answer = await self.open_connect(f"127.0.0.1:{second_port}".encode())
        self.assertEqual(answer, CONNECT_ESTABLISHED)
        conn.upgraded = False
        conn.send(
            b"GET http://" + PARTNER.encode() + b":%d/chained HTTP/1.1\r\nHost: " % self.up_port
            + PARTNER.encode() + b":%d\r\n\r\n" % self.up_port
        )
        response = await conn.read_final_response()
        self.assertEqual(response.status, 200)
        self.assertEqual([r.target for r in self.upstream.received], [b"/chained"])
        [record] = second.records()
        self.assertEqual(record["client"], "127.0.0.1")

    async def test_100_mib_tunnel_with_bounded_buffers(self) -> None:
        """100 MiB from a destination through a CONNECT tunnel to a client that stops reading
        for a while: the gateway pauses the destination (backpressure) and never buffers more
        than a few socket buffers; every byte arrives intact."""
        size = 100 * 1024 * 1024
        source = _SourceFactory(size)
        port = reactor.listenTCP(0, source, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        src_port = port.getHost().port
        self.start_proxy(allowed=[f"{PARTNER}:{src_port}"], connect_ports=[src_port])
        sink = _Sink(self.gateway, f"{PARTNER}:{src_port}".encode())
        client = protocol.ClientCreator(reactor, lambda: sink)
        await client.connectTCP("127.0.0.1", self.port)
        await sink.finished
        self.assertEqual(sink.received, size)
        self.assertEqual(sink.digest.hexdigest(), source.digest)
        self.assertTrue(sink.saw_backpressure)
        self.assertLess(sink.max_buffered, 2 * 1024 * 1024)
        [record] = [r for r in self.gateway.records() if r["method"] == "CONNECT"]
        self.assertEqual(record["bytes_out"], size)


class UploadBackpressureTests(ProxyTestCase):
    """The client-to-destination direction of a CONNECT tunnel under backpressure."""

    async def test_32_mib_upload_to_a_stalled_destination(self) -> None:
        """A destination that stops reading makes the gateway stop reading the client; the
        gateway's buffer toward the destination stays bounded; every byte arrives."""
        size = 32 * 1024 * 1024
        sink = _UploadSink()
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        dest_port = port.getHost().port
        self.start_proxy(allowed=[f"{PARTNER}:{dest_port}"], connect_ports=[dest_port])
        conn, answer = await self.open_connect(f"{PARTNER}:{dest_port}".encode())
        self.assertEqual(answer, CONNECT_ESTABLISHED)
        [front] = [c for f in self.gateway.service.factories.values() for c in f.connections]
        sink.watch(front.tunnel)
        sent = await conn.send_body(size)
        self.assertEqual(sent, size)
        await sink.wait_for(size)
        self.assertTrue(sink.saw_backpressure)
        self.assertLess(sink.max_buffered, 2 * 1024 * 1024)
        self.assertEqual(sink.digest.hexdigest(), hashlib.sha256(pattern_slice(0, size)).hexdigest())


class _UploadSink(protocol.Protocol):
    """A destination that stops reading after 4 MiB until the gateway has paused the client."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.held = False
        self.saw_backpressure = False
        self.max_buffered = 0
        self.waiters: list[tuple[int, defer.Deferred[None]]] = []

    def watch(self, tunnel: Any) -> None:
        """Instrument the gateway's relay toward this destination."""
        relay = tunnel.from_downstream
        up = tunnel.upstream
        gate = tunnel.downstream_gate

        def from_downstream(data: bytes) -> None:
            relay(data)
            buffered = len(up.dataBuffer) - up.offset + up._tempDataLen
            self.max_buffered = max(self.max_buffered, buffered)
            if self.held and gate.reasons & BACKPRESSURE:
                self.saw_backpressure = True
                self.held = False
                reactor.callLater(0, self.transport.resumeProducing)

        tunnel.from_downstream = from_downstream

    def dataReceived(self, data: bytes) -> None:
        """Count and hash; stall once."""
        self.received += len(data)
        self.digest.update(data)
        if not self.held and not self.saw_backpressure and self.received > 4 * 1024 * 1024:
            self.held = True
            self.transport.pauseProducing()
        for size, d in list(self.waiters):
            if self.received >= size:
                self.waiters.remove((size, d))
                d.callback(None)

    def wait_for(self, size: int) -> defer.Deferred[None]:
        """Fires once `size` bytes arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.received >= size:
            d.callback(None)
        else:
            self.waiters.append((size, d))
        return d


class RealClientTests(ProxyTestCase):
    """curl and Python's urllib with their usual proxy settings."""

    def curl(self, *args: str) -> Any:
        """Run curl (no proxy from the environment), skipping when it is not installed."""
        if not os.path.exists("/usr/bin/curl"):
            raise SkipTest("curl is not installed")
        return utils.getProcessOutputAndValue(
            "/usr/bin/curl",
            ("-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *args),
            env={"PATH": os.environ.get("PATH", "")},
        )

    async def test_curl_plain_http(self) -> None:
        """curl -x: an http:// URL through the proxy."""
        self.start_proxy()
        out, err, code = await self.curl(
            "-x", f"http://127.0.0.1:{self.port}", f"http://{PARTNER}:{self.up_port}/curl"
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(b"\n200"), out)
        self.assertEqual([r.target for r in self.upstream.received], [b"/curl"])

    async def test_curl_proxytunnel_https(self) -> None:
        """curl -x --proxytunnel with an https:// URL: CONNECT, TLS verified end to end; and
        with proxy credentials against an authenticating proxy."""
        tls, cert = self.tls_upstream()
        tls_port = tls.address[1]
        self.start_proxy(
            allowed=[f"{PARTNER}:{tls_port}"], connect_ports=[tls_port], documents=PROXY_AUTH
        )
        ca = self.mktemp()
        FilePath(ca).setContent(cert)
        url = f"https://{PARTNER}:{tls_port}/curl-tls"
        proxy = f"http://127.0.0.1:{self.port}"
        out, err, code = await self.curl("--proxytunnel", "-x", proxy, "--cacert", ca, url)
        self.assertNotEqual(code, 0)  # 407 on CONNECT: curl gives up
        self.assertIn(b"407", err + out)
        out, err, code = await self.curl(
            "--proxytunnel", "-x", proxy, "--proxy-user", "app:s3cret", "--cacert", ca, url
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(b"secure\n\n200"), out)
        self.assertEqual([r.target for r in tls.received], [b"/curl-tls"])

    async def test_python_urllib_proxy_handler(self) -> None:
        """urllib with ProxyHandler (what HTTP_PROXY configures) gets through; a denied URL is 403."""
        self.start_proxy()
        proxy = f"http://127.0.0.1:{self.port}"

        def fetch(url: str) -> tuple[int, bytes]:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
            try:
                with opener.open(url, timeout=20) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        status, _ = await threads.deferToThread(fetch, f"http://{PARTNER}:{self.up_port}/py")
        self.assertEqual(status, 200)
        self.assertEqual([r.target for r in self.upstream.received], [b"/py"])
        status, body = await threads.deferToThread(fetch, "http://denied.test/")
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body), {"error": "The destination is not allowed"})


class _SourceFactory(protocol.Factory):
    """Serves `size` bytes of a fixed pattern to each connection, honouring backpressure."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.block = hashlib.sha256(b"flexgw").digest() * 2048  # 64 KiB
        digest = hashlib.sha256()
        whole, rest = divmod(size, len(self.block))
        for _ in range(whole):
            digest.update(self.block)
        digest.update(self.block[:rest])
        self.digest = digest.hexdigest()

    def buildProtocol(self, addr: Any) -> _Source:
        """One sending connection."""
        return _Source(self)


class _Source(protocol.Protocol):
    """Writes while the transport accepts; pauses when told."""

    def __init__(self, factory: _SourceFactory) -> None:
        self.factory = factory
        self.sent = 0
        self.paused = False

    def connectionMade(self) -> None:
        """Start sending."""
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        """The gateway stopped reading."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Send until paused or done."""
        self.paused = False
        block = self.factory.block
        while not self.paused and self.sent < self.factory.size:
            piece = block[: self.factory.size - self.sent]
            self.sent += len(piece)
            self.transport.write(piece)
        if self.sent >= self.factory.size and self.transport.connected:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        """Connection gone."""
        self.paused = True


class _Sink(protocol.Protocol):
    """A CONNECT client that hashes what comes through the tunnel; it stops reading after
    8 MiB until the gateway has paused the destination, and records the gateway's buffering."""

    def __init__(self, gateway: Gateway, target: bytes) -> None:
        self.gateway = gateway
        self.target = target
        self.head = b""
        self.in_tunnel = False
        self.received = 0
        self.digest = hashlib.sha256()
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.saw_backpressure = False
        self.max_buffered = 0
        self.held = False

    def connectionMade(self) -> None:
        """Ask for the tunnel."""
        self.transport.write(b"CONNECT " + self.target + b" HTTP/1.1\r\nHost: " + self.target + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        """The answer head, then tunnel bytes."""
        if not self.in_tunnel:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            self.in_tunnel = True
            self._instrument()
        self.received += len(data)
        self.digest.update(data)
        if not self.held and not self.saw_backpressure and self.received > 8 * 1024 * 1024:
            self.held = True
            self.transport.pauseProducing()

    def _instrument(self) -> None:
        """Watch the gateway's side of the tunnel: buffered bytes and the pause it makes."""
        [front] = [c for f in self.gateway.service.factories.values() for c in f.connections]
        tunnel = front.tunnel
        down = front.transport
        relay = tunnel.from_upstream
        gate = tunnel.upstream_gate

        def from_upstream(data: bytes) -> None:
            relay(data)
            buffered = len(down.dataBuffer) - down.offset + down._tempDataLen
            self.max_buffered = max(self.max_buffered, buffered)
            if gate.reasons & BACKPRESSURE and self.held:
                self.saw_backpressure = True
                self.held = False
                reactor.callLater(0, self.transport.resumeProducing)

        tunnel.from_upstream = from_upstream

    def connectionLost(self, reason: Any = None) -> None:
        """The tunnel closed after the last byte."""
        self.finished.callback(None)


class ConfigTests(TestCase):
    """The forward-proxy binding in the configuration pipeline."""

    def test_bad_pattern_is_located(self) -> None:
        """A malformed destination pattern is an error at its file:line:column and field; the
        proxy is not served (fail closed)."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf

        root = write_conf(self, {"proxy.yaml": proxy_conf(3128, ["ok.test:443", "bad..test"])})
        state = load_config([root], {})
        [problem] = [p for p in state.problems if "bad..test" in p.message]
        self.assertEqual(problem.severity, "error")
        self.assertTrue(problem.file.endswith("proxy.yaml"))
        self.assertEqual(problem.field, "spec.config.allowedDestinations[1]")
        self.assertIsNotNone(problem.line)
        self.assertEqual(state.plan.listeners, ())

    def test_unknown_service_is_located(self) -> None:
        """`services` naming a Service that does not exist (or `namespace/name` in another
        namespace) is an error at that entry; the proxy keeps serving without the mapping."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf

        service = (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Service\n"
            "metadata: {name: partner}\nspec:\n  address: http://10.1.2.3:80\n"
        )
        conf = proxy_conf(
            3128, ["*:80"], documents=service,
            extra_config="    services: [partner, missing, other/partner, default/partner2]\n",
        )
        state = load_config([write_conf(self, {"proxy.yaml": conf})], {})
        errors = [p for p in state.problems if p.severity == "error"]
        self.assertEqual(
            [(p.field, p.message) for p in errors],
            [
                ("spec.config.services[1]", "Service default/missing does not exist; not mapped"),
                ("spec.config.services[2]", "Service other/partner does not exist; not mapped"),
                ("spec.config.services[3]", "Service default/partner2 does not exist; not mapped"),
            ],
        )
        self.assertTrue(all(p.file.endswith("proxy.yaml") and p.line for p in errors))
        (listener,) = state.plan.listeners
        api = listener.forward_proxy
        self.assertEqual([d.upstream.key for d in api.proxy_services], ["default/partner"])

    def test_services_schema(self) -> None:
        """A `services` entry that is not `name` or `namespace/name` fails the schema."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf

        conf = proxy_conf(3128, ["*:80"], extra_config="    services: [a/b/c]\n")
        state = load_config([write_conf(self, {"proxy.yaml": conf})], {})
        self.assertTrue(any(p.severity == "error" and "services" in (p.field or "") for p in state.problems))
        self.assertEqual(state.plan.listeners, ())

    def test_schema_errors_are_reported(self) -> None:
        """A wrong type (connectPorts as a string) fails the policy's JSON Schema."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf

        root = write_conf(self, {"proxy.yaml": proxy_conf(3128, ["ok.test"], extra_config="    connectPorts: '443'\n")})
        state = load_config([root], {})
        self.assertTrue(any(p.severity == "error" and "connectPorts" in (p.field or "") for p in state.problems))
        self.assertEqual(state.plan.listeners, ())

    def test_proxy_owns_its_port(self) -> None:
        """Another ApiInstance on the forward proxy's port is refused."""
        from flexgw.config.pipeline import load_config
        from tests.conftools import write_conf
        from tests.harness import api_document

        root = write_conf(
            self,
            {"proxy.yaml": proxy_conf(3128, ["ok.test"]), "api.yaml": api_document(3128, 9000, "zz-api")},
        )
        state = load_config([root], {})
        (listener,) = state.plan.listeners
        self.assertEqual([api.key for api in listener.apis], ["default/egress"])
        self.assertIsNotNone(listener.forward_proxy)
        self.assertTrue(any("overlaps" in p.message for p in state.problems))
