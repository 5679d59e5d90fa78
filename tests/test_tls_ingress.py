"""Inbound TLS on real loopback sockets: handshakes, mTLS, versions, SNI, ALPN, XFCC, reload, curl."""

from __future__ import annotations

import hashlib
import os
import shutil
import textwrap
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from flexgw.http.alpn import SERVED_ALPN
from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority, client_options
from flexgw.testing.upstream import RecordingUpstream, echo
from tests.harness import Gateway, free_port

GET = b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n"


def api(name: str, port: int, upstream_port: int, base: str = "") -> str:
    """An https ApiInstance document on 127.0.0.1:port[base] in front of the upstream."""
    return textwrap.dedent(
        f"""\
        apiVersion: gateway.mulesoft.com/v1alpha1
        kind: ApiInstance
        metadata: {{name: {name}}}
        spec:
          address: https://127.0.0.1:{port}{base}
          services:
            b: {{address: "http://127.0.0.1:{upstream_port}"}}
        """
    )


def tls_binding(name: str, target: str, crt: str, key: str, extra: str = "") -> str:
    """A `tls` PolicyBinding with certificate file references, plus `extra` config lines."""
    text = textwrap.dedent(
        f"""\
        apiVersion: gateway.mulesoft.com/v1alpha1
        kind: PolicyBinding
        metadata: {{name: {name}}}
        spec:
          targetRef: {{kind: ApiInstance, name: {target}}}
          policyRef: {{name: tls}}
          config:
            certificate: {{crt: "file://{crt}", key: "file://{key}"}}
        """
    )
    return text + textwrap.indent(textwrap.dedent(extra), "    ")


def peer_common_name(conn: client.RawConnection) -> str:
    """The CN of the certificate the gateway presented on `conn`."""
    certificate = conn.transport.getPeerCertificate().to_cryptography()
    return str(certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)


class InboundTLSTests(TestCase):
    """A gateway serving HTTPS with a `tls` binding, in front of a recording upstream."""

    def setUp(self) -> None:
        """A CA, a server certificate for api.test, a client CA and an upstream."""
        self.ca = CertificateAuthority("server CA")
        self.client_ca = CertificateAuthority("client CA")
        self.dir = os.path.abspath(self.mktemp())
        self.server = self.ca.issue("api.test", dns=["api.test"])
        self.crt, self.key = self.server.write(self.dir, "server")
        self.client_ca_path = self.client_ca.write(self.dir, "client-ca")
        self.upstream = RecordingUpstream(echo(), reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, extra: str = "", documents: str = "", base: str = "") -> Gateway:
        """A started gateway: one https API with a `tls` binding (plus `extra` config)."""
        text = (
            api("secure", self.port, self.upstream.address[1], base)
            + "---\n"
            + tls_binding("secure-tls", "secure", self.crt, self.key, extra)
            + documents
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        self.assertEqual([str(p) for p in gateway.service.state.errors], [])
        return gateway

    async def connect(self, options: Any) -> client.RawConnection:
        """A TLS client connection to the gateway (closed at cleanup)."""
        conn = await client.connect(reactor, "127.0.0.1", self.port, tls=options)
        self.addCleanup(conn.abort)
        return conn

    async def assert_refused(self, options: Any) -> None:
        """The handshake fails: no HTTP response ever comes back, nothing reaches the upstream."""
        before = len(self.upstream.received)
        conn = await client.connect(reactor, "127.0.0.1", self.port, tls=options)
        conn.send(GET)
        refused = False
        try:
            await conn.wait_handshake()
            await conn.read_response()
        except Exception:  # noqa: BLE001 (the TLS alert or the close: either is a refusal)
            refused = True
        self.assertTrue(refused, "the handshake was expected to fail")
        await conn.wait_closed()
        self.assertEqual(len(self.upstream.received), before)

    async def test_https_request_proxied(self) -> None:
        """A TLS client is served; the upstream sees X-Forwarded-Proto: https and no XFCC."""
        self.start()
        conn = await self.connect(client_options("api.test", self.ca))
        conn.send(GET)
        response = await conn.read_response()
        self.assertEqual(response.status, 200)
        self.assertEqual(peer_common_name(conn), "api.test")
        received = self.upstream.received[0]
        self.assertEqual(received.header("x-forwarded-proto"), [b"https"])
        self.assertEqual(received.header("x-forwarded-client-cert"), [])

    async def test_plain_http_to_tls_port_fails(self) -> None:
        """Plain HTTP on the TLS port gets no HTTP answer (the bytes are not a ClientHello)."""
        self.start()
        conn = await client.connect(reactor, "127.0.0.1", self.port)
        self.addCleanup(conn.abort)
        conn.send(GET)
        await conn.wait_closed()
        self.assertFalse(conn.received_raw.startswith(b"HTTP/"))
        self.assertEqual(self.upstream.received, [])

    async def test_default_alpn_offers_only_served_protocols(self) -> None:
        """ALPN: of the default [h2, http/1.1] only the protocols the gateway serves are chosen."""
        self.start()
        conn = await self.connect(client_options("api.test", self.ca, alpn=[b"h2", b"http/1.1"]))
        await conn.wait_handshake()
        expected = b"h2" if b"h2" in SERVED_ALPN else b"http/1.1"
        self.assertEqual(conn.transport.negotiatedProtocol, expected)

    async def test_configured_alpn(self) -> None:
        """`alpn: [http/1.1]`: a client offering h2 first still gets http/1.1, and is served."""
        self.start("alpn: [http/1.1]\n")
        conn = await self.connect(client_options("api.test", self.ca, alpn=[b"h2", b"http/1.1"]))
        conn.send(GET)
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(conn.transport.negotiatedProtocol, b"http/1.1")

    async def test_tls11_refused_by_default(self) -> None:
        """A client that speaks at most TLS 1.1 fails the handshake (default minimum 1.2)."""
        self.start()
        options = ssl.CertificateOptions(
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_1,
        )
        await self.assert_refused(options)

    async def test_minversion_11_when_configured(self) -> None:
        """`minversion: "1.1"` with its ciphers listed (Flex's rule) lets a TLS 1.1 client in,
        with a warning; a cipher not listed is still refused."""
        gateway = self.start(
            'minversion: "1.1"\n'
            "ciphers: [TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n"
        )
        warnings = [str(p) for p in gateway.service.state.problems if p.severity == "warning"]
        self.assertTrue(any("TLS 1.1 is allowed" in w for w in warnings), warnings)
        from OpenSSL import SSL

        conn = await self.connect(_Raw(SSL.TLS1_1_VERSION, "ALL"))
        conn.send(GET)
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(conn.transport.getHandle().get_protocol_version_name(), "TLSv1.1")
        await self.assert_refused(_Raw(SSL.TLS1_1_VERSION, "ECDHE-ECDSA-AES256-SHA"))

    async def test_maxversion_12(self) -> None:
        """`maxversion: "1.2"`: a TLS 1.3-only client is refused, a 1.2 client served."""
        self.start('maxversion: "1.2"\n')
        await self.assert_refused(
            ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_3)
        )
        conn = await self.connect(client_options("api.test", self.ca))
        conn.send(GET)
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(conn.transport.getHandle().get_protocol_version_name(), "TLSv1.2")

    async def test_mtls(self) -> None:
        """requireClientCertificate: no certificate or one from another CA fails the handshake;
        a valid one is served and its details reach the upstream as XFCC (a spoofed one never)."""
        self.start(
            f'requireClientCertificate: true\ntrustedCA: "file://{self.client_ca_path}"\n'
        )
        await self.assert_refused(client_options("api.test", self.ca))
        stranger = CertificateAuthority("other CA").issue("mallory", client=True)
        await self.assert_refused(client_options("api.test", self.ca, stranger))
        alice = self.client_ca.issue(
            "alice", dns=["alice.test"], uris=["spiffe://test/alice"], client=True
        )
        conn = await self.connect(client_options("api.test", self.ca, alice))
        conn.send(
            b"GET /x HTTP/1.1\r\nHost: api.test\r\n"
            b"X-Forwarded-Client-Cert: Hash=forged;Subject=\"CN=admin\"\r\n\r\n"
        )
        self.assertEqual((await conn.read_response()).status, 200)
        xfcc = self.upstream.received[0].header("x-forwarded-client-cert")
        self.assertEqual(len(xfcc), 1)
        digest = hashlib.sha256(alice.certificate.public_bytes(Encoding.DER)).hexdigest()
        self.assertEqual(
            xfcc[0],
            f'Hash={digest};Subject="CN=alice";URI=spiffe://test/alice;DNS=alice.test'.encode(),
        )

    async def test_sanitize_mode_forwards_no_xfcc(self) -> None:
        """FLEX_FORWARD_CLIENT_CERT_DETAILS=SANITIZE (Flex's own default): a verified client
        certificate is not described upstream, and a client-sent XFCC is still removed; /status
        shows the listener's TLS summary."""
        from flexgw.service.admin import status_json

        text = (
            api("secure", self.port, self.upstream.address[1])
            + "---\n"
            + tls_binding(
                "secure-tls", "secure", self.crt, self.key,
                f'requireClientCertificate: true\ntrustedCA: "file://{self.client_ca_path}"\n',
            )
        )
        gateway = Gateway(
            self, {"api.yaml": text}, environ={"FLEX_FORWARD_CLIENT_CERT_DETAILS": "SANITIZE"}
        )
        gateway.start()
        alice = self.client_ca.issue("alice", client=True)
        conn = await self.connect(client_options("api.test", self.ca, alice))
        conn.send(b"GET /x HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-Client-Cert: Hash=x\r\n\r\n")
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(self.upstream.received[0].header("x-forwarded-client-cert"), [])
        (listener,) = status_json(gateway.service)["listeners"]
        self.assertTrue(listener["tls"]["requireClientCertificate"])
        self.assertEqual(listener["tls"]["certificateNames"], [["api.test"]])

    async def test_spoofed_xfcc_removed_without_mtls(self) -> None:
        """Without a client certificate, a client-sent XFCC header never reaches the upstream,
        even from a trusted proxy."""
        self.start(
            documents="---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: Configuration\n"
            "metadata: {name: c}\nspec:\n  http: {trustedProxies: [127.0.0.1/32]}\n"
        )
        conn = await self.connect(client_options("api.test", self.ca))
        conn.send(
            b"GET /x HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-Proto: http\r\n"
            b"x-forwarded-client-cert: Hash=forged\r\n\r\n"
        )
        self.assertEqual((await conn.read_response()).status, 200)
        received = self.upstream.received[0]
        self.assertEqual(received.header("x-forwarded-client-cert"), [])
        self.assertEqual(received.header("x-forwarded-proto"), [b"http"])  # trusted proxy's

    async def test_sni_selects_certificate(self) -> None:
        """Two APIs on one port with their own certificates: SNI picks by SAN (exact, wildcard),
        an unknown name gets the default certificate: that of the first API by namespace/name
        (default/second before default/secure)."""
        other = self.ca.issue("other", dns=["*.other.test"])
        other_crt, other_key = other.write(self.dir, "other")
        documents = (
            "---\n"
            + api("second", self.port, self.upstream.address[1], base="/two")
            + "---\n"
            + tls_binding("second-tls", "second", other_crt, other_key)
        )
        self.start(documents=documents, base="/one")
        names = {}
        for server_name in ("api.test", "www.other.test", "unknown.test"):
            options = ssl.CertificateOptions()  # no verification: only the name sent matters
            conn = await self.connect(_SNIOnly(options, server_name))
            await conn.wait_handshake()
            names[server_name] = peer_common_name(conn)
        self.assertEqual(
            names, {"api.test": "api.test", "www.other.test": "other", "unknown.test": "other"}
        )
        conn = await self.connect(client_options("x.other.test", self.ca))
        conn.send(b"GET /two/y HTTP/1.1\r\nHost: x.other.test\r\n\r\n")
        self.assertEqual((await conn.read_response()).status, 200)

    async def test_reload_picks_up_changed_certificate(self) -> None:
        """A changed certificate file is used for new connections after a reload; a connection
        opened before keeps working on the same socket (the listener is not rebound)."""
        gateway = self.start()
        old = await self.connect(client_options("api.test", self.ca))
        old.send(GET)
        self.assertEqual((await old.read_response()).status, 200)
        port_before = gateway.service.ports[("127.0.0.1", self.port)]
        renewed = self.ca.issue("api.test renewed", dns=["api.test"])
        renewed.write(self.dir, "server")
        self.assertTrue(gateway.service.reload())
        self.assertIs(gateway.service.ports[("127.0.0.1", self.port)], port_before)
        new = await self.connect(client_options("api.test", self.ca))
        new.send(GET)
        self.assertEqual((await new.read_response()).status, 200)
        self.assertEqual(peer_common_name(new), "api.test renewed")
        old.send(GET)
        self.assertEqual((await old.read_response()).status, 200)
        self.assertEqual(peer_common_name(old), "api.test")
        self.assertIn(self.crt, gateway.service.plan.tls_files)

    async def test_reload_switches_tls_off_and_on(self) -> None:
        """Removing the tls binding (address now http://) rebinds the port for plain HTTP;
        adding it back serves TLS again."""
        gateway = self.start()
        socket_before = gateway.service.ports[("127.0.0.1", self.port)]
        plain = api("secure", self.port, self.upstream.address[1]).replace("https://", "http://")
        gateway.write({"api.yaml": plain})
        self.assertTrue(gateway.service.reload())
        response = await client.request(reactor, "127.0.0.1", self.port, GET)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.received[-1].header("x-forwarded-proto"), [b"http"])
        gateway.write(
            {"api.yaml": plain + "---\n" + tls_binding("secure-tls", "secure", self.crt, self.key)}
        )
        self.assertTrue(gateway.service.reload())  # a warning: http:// address, TLS port
        conn = await self.connect(client_options("api.test", self.ca))
        conn.send(GET)
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(self.upstream.received[-1].header("x-forwarded-proto"), [b"https"])
        self.assertIs(gateway.service.ports[("127.0.0.1", self.port)], socket_before)

    async def test_broken_certificate_on_reload_keeps_serving(self) -> None:
        """A certificate file replaced by garbage is a config error; the last good TLS serves on."""
        gateway = self.start()
        with open(self.crt, "w") as handle:  # noqa: ASYNC230 (a test fixture file)
            handle.write("not a certificate")
        self.assertFalse(gateway.service.reload())
        errors = [str(p) for p in gateway.service.state.errors]
        self.assertTrue(any("no valid PEM certificate" in e for e in errors), errors)
        self.assertTrue(any("last good TLS settings" in str(p) for p in gateway.service.state.problems))
        conn = await self.connect(client_options("api.test", self.ca))
        conn.send(GET)
        self.assertEqual((await conn.read_response()).status, 200)
        self.assertEqual(peer_common_name(conn), "api.test")

    async def test_curl_with_client_certificate(self) -> None:
        """curl (a real client): --cacert and --cert/--key over mTLS."""
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        self.start(f'requireClientCertificate: true\ntrustedCA: "file://{self.client_ca_path}"\n')
        ca_path = self.ca.write(self.dir, "server-ca")
        bob_crt, bob_key = self.client_ca.issue("bob", client=True).write(self.dir, "bob")
        args = [
            "-sS", "--max-time", "10", "--noproxy", "*",
            "--resolve", f"api.test:{self.port}:127.0.0.1",
            "--cacert", ca_path, "--cert", bob_crt, "--key", bob_key,
            "-o", "/dev/null", "-w", "%{http_code}",
            f"https://api.test:{self.port}/x",
        ]
        out, err, code = await getProcessOutputAndValue(curl, args, env={}, reactor=reactor)
        self.assertEqual((code, out), (0, b"200"), err)
        self.assertIn(b'Subject="CN=bob"', self.upstream.received[0].header("x-forwarded-client-cert")[0])
        out, err, code = await getProcessOutputAndValue(
            curl, [a for a in args if a not in (bob_crt, bob_key, "--cert", "--key")],
            env={}, reactor=reactor,
        )
        self.assertNotEqual(code, 0)
        self.assertEqual(len(self.upstream.received), 1)


@implementer(IOpenSSLClientConnectionCreator)
class _Raw:
    """A client of exactly one TLS version offering `ciphers` (security level 0), verifying nothing."""

    def __init__(self, version: int, ciphers: str) -> None:
        from OpenSSL import SSL

        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(version)
        self.context.set_max_proto_version(version)
        self.context.set_cipher_list(ciphers.encode("ascii") + b":@SECLEVEL=0")

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        """The OpenSSL connection."""
        from OpenSSL import SSL

        return SSL.Connection(self.context, None)


@implementer(IOpenSSLClientConnectionCreator)
class _SNIOnly:
    """A client connection creator sending `server_name` as SNI, verifying nothing."""

    def __init__(self, options: ssl.CertificateOptions, server_name: str) -> None:
        self.options = options
        self.server_name = server_name.encode("ascii")

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        """An OpenSSL client connection with SNI set."""
        connection = self.options.clientConnectionForTLS(tls_protocol)
        connection.set_tlsext_host_name(self.server_name)
        return connection

