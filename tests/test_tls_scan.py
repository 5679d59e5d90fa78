"""Scan a default TLS listener: no protocol below TLS 1.2 (checked with `openssl s_client`, a real
external client) and no TLS 1.2 cipher outside Flex's defaults (every cipher this OpenSSL knows,
offered one at a time), for an ECDSA and an RSA certificate.

sslyze is not used: its PyPI release pins cryptography below the version this project needs.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from flexgw.testing import client
from flexgw.testing.certs import CertificateAuthority
from flexgw.tls.settings import DEFAULT_TLS12_CIPHERS, IANA_TO_OPENSSL
from tests.harness import Gateway, free_port


@implementer(IOpenSSLClientConnectionCreator)
class _OneCipher:
    """A client offering exactly one TLS 1.2 cipher (or one protocol range), verifying nothing."""

    def __init__(self, cipher: str | None, minimum: int, maximum: int) -> None:
        self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self.context.set_min_proto_version(minimum)
        self.context.set_max_proto_version(maximum)
        if cipher is not None:
            self.context.set_cipher_list(cipher.encode("ascii") + b":@SECLEVEL=0")

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        """The OpenSSL connection."""
        return SSL.Connection(self.context, None)


def every_tls12_cipher() -> list[str]:
    """Every TLS <= 1.2 cipher suite this OpenSSL build can offer, by OpenSSL name."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    names = SSL.Connection(context, None).get_cipher_list()
    return [name for name in names if not name.startswith("TLS_")]


class DefaultListenerScanTests(TestCase):
    """A `tls` binding with nothing but a certificate: what does the port accept?"""

    def setUp(self) -> None:
        """One gateway, two https APIs with default TLS: ECDSA (port a) and RSA (port b)."""
        self.dir = os.path.abspath(self.mktemp())
        ca = CertificateAuthority("scan CA")
        self.ports = {"ecdsa": free_port(), "rsa": free_port()}
        documents = []
        for kind, port in self.ports.items():
            crt, key = ca.issue("scan.test", dns=["scan.test"], rsa=kind == "rsa").write(self.dir, kind)
            documents.append(
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: ApiInstance\n"
                f"metadata: {{name: {kind}}}\nspec:\n  address: https://127.0.0.1:{port}\n"
                "  services: {b: {address: 'http://127.0.0.1:9'}}\n---\n"
                "apiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
                f"metadata: {{name: {kind}-tls}}\nspec:\n  targetRef: {{name: {kind}}}\n"
                f"  policyRef: {{name: tls}}\n  config:\n"
                f"    certificate: {{crt: 'file://{crt}', key: 'file://{key}'}}\n"
            )
        gateway = Gateway(self, {"api.yaml": "---\n".join(documents)})
        gateway.start()

    async def handshake(self, port: int, creator: Any) -> str | None:
        """The cipher negotiated, or None when the handshake fails."""
        conn = await client.connect(reactor, "127.0.0.1", port, tls=creator)
        try:
            await conn.wait_handshake()
        except Exception:  # noqa: BLE001 (any failure is a refusal)
            return None
        finally:
            await conn.abort()
        return str(conn.transport.getHandle().get_cipher_name())

    async def test_no_cipher_outside_defaults(self) -> None:
        """Each TLS 1.2 cipher offered alone: only Flex's defaults are accepted (and the ones
        matching the certificate's key type all are)."""
        defaults = {IANA_TO_OPENSSL[name] for name in DEFAULT_TLS12_CIPHERS}
        candidates = every_tls12_cipher()
        self.assertGreater(len(candidates), 20)  # the scan offers a real range
        for kind, port in self.ports.items():
            accepted = set()
            for cipher in candidates:
                negotiated = await self.handshake(
                    port, _OneCipher(cipher, SSL.TLS1_VERSION, SSL.TLS1_2_VERSION)
                )
                if negotiated is not None:
                    accepted.add(negotiated)
            expected = {c for c in defaults if ("ECDSA" in c) == (kind == "ecdsa")}
            self.assertEqual(accepted, expected, kind)

    async def test_protocols_with_openssl_s_client(self) -> None:
        """`openssl s_client`: TLS 1.0 and 1.1 refused, TLS 1.2 and 1.3 accepted."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise SkipTest("openssl is not installed")
        port = self.ports["ecdsa"]
        outcome = {}
        for flag in ("-tls1", "-tls1_1", "-tls1_2", "-tls1_3"):
            args = ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "scan.test", flag,
                    "-cipher", "ALL:@SECLEVEL=0"]
            out, _, code = await getProcessOutputAndValue(
                openssl, args, env={}, reactor=reactor, stdinBytes=b""
            )
            outcome[flag] = code == 0 and b"Cipher is (NONE)" not in out
        self.assertEqual(
            outcome, {"-tls1": False, "-tls1_1": False, "-tls1_2": True, "-tls1_3": True}
        )
