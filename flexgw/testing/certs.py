"""Test certificates made with `cryptography`: a CA that issues server and client certificates.

    ca = CertificateAuthority("Test CA")
    server = ca.issue("api.example.test", dns=["api.example.test"], ips=["127.0.0.1"])
    server.write(directory, "server")      # server.crt, server.key; ca.write(directory) -> ca.crt

Keys are ECDSA P-256 (fast to make) unless `rsa=True`. Also: Twisted server/client options for
test peers (`server_options`, `client_options`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_PEM = serialization.Encoding.PEM


def _key(use_rsa: bool) -> Any:
    if use_rsa:
        return rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: str, data: bytes) -> None:
    """Write `data` (a private key) to `path` readable by its owner only (mode 0600), also
    when the file already existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as handle:
        os.fchmod(fd, 0o600)
        handle.write(data)


@attrs.frozen
class Issued:
    """A certificate and its key, as PEM (and the cryptography objects)."""

    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)
    certificate: x509.Certificate = attrs.field(repr=False)

    def write(self, directory: str, name: str) -> tuple[str, str]:
        """Write `name.crt` and `name.key` into `directory`; return their paths."""
        os.makedirs(directory, exist_ok=True)
        crt, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
        with open(crt, "wb") as handle:
            handle.write(self.cert_pem)
        write_private(key, self.key_pem)
        return crt, key


class CertificateAuthority:
    """A self-signed CA for tests; `issue` makes leaf certificates signed by it."""

    def __init__(self, name: str = "flexgw test CA", rsa: bool = False) -> None:
        self.key = _key(rsa)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(_PEM)

    def write(self, directory: str, name: str = "ca") -> str:
        """Write the CA certificate as `name.crt`; return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.crt")
        with open(path, "wb") as handle:
            handle.write(self.pem)
        return path

    def issue(
        self,
        common_name: str,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        uris: Sequence[str] = (),
        client: bool = False,
        rsa: bool = False,
        days: int = 30,
        server_and_client: bool = False,
    ) -> Issued:
        """A leaf certificate (server, or client with `client=True`, or both with
        `server_and_client=True`: etcd's server certificate, which its gateway also presents
        to etcd itself) with the given SANs."""
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
        if server_and_client:
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        key = _key(rsa)
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        # an empty common name: a subject with no attribute (etcd's gateway refuses a client
        # certificate with a CN once authentication is on)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Issued(certificate.public_bytes(_PEM), _key_pem(key), certificate)


def server_options(issued: Issued, **extra: Any) -> Any:
    """Twisted CertificateOptions serving `issued` (for a TLS test upstream), with ALPN
    http/1.1 (Twisted's servers otherwise refuse any client that offers ALPN)."""
    from twisted.internet import ssl

    key = serialization.load_pem_private_key(issued.key_pem, None)
    extra.setdefault("acceptableProtocols", [b"http/1.1"])
    return ssl.CertificateOptions(privateKey=key, certificate=issued.certificate, **extra)


def client_options(
    hostname: str,
    ca: CertificateAuthority | None = None,
    client: Issued | None = None,
    alpn: Sequence[bytes] | None = None,
) -> Any:
    """A client connection creator trusting `ca`, presenting `client` when given."""
    from twisted.internet import ssl

    trust = ssl.Certificate.loadPEM(ca.pem) if ca is not None else None
    certificate = None
    if client is not None:
        certificate = ssl.PrivateCertificate.loadPEM(client.key_pem + client.cert_pem)
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=certificate, acceptableProtocols=alpn
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Write a demo CA, a server certificate (localhost, 127.0.0.1, ::1) and a client certificate:
    ``python -m flexgw.testing.certs --out DIR`` (for conf/tls; never for production)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to write ca.crt, server.*, client.*")
    args = parser.parse_args(argv)
    ca = CertificateAuthority("flexgw demo CA")
    ca.write(args.out)
    ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1", "::1"]).write(args.out, "server")
    ca.issue("demo-client", dns=["demo-client.local"], client=True).write(args.out, "client")
    print(f"wrote ca.crt, server.crt, server.key, client.crt, client.key to {args.out}")


if __name__ == "__main__":
    main()
