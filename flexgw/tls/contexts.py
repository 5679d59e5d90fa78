"""OpenSSL contexts from TLSSettings: per-port server contexts (SNI among certificates), per-Service
client connection creators (verification with service-identity, SNI = the Service host), and the
IPolicyForHTTPS the gateway's own treq calls use.

Built with Twisted's CertificateOptions / optionsForClientTLS, so session ids, ECDH curves,
compression-off and ALPN are set the way Twisted sets them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from flexgw.compat.tlswrite import SendNowTLSProtocol
from flexgw.tls.settings import CertificateKey, TLSSettings

_log = Logger(namespace="flexgw.tls")

_VERSIONS = {
    (1, 1): ssl.TLSVersion.TLSv1_1,
    (1, 2): ssl.TLSVersion.TLSv1_2,
    (1, 3): ssl.TLSVersion.TLSv1_3,
}


def _common_options(settings: TLSSettings, alpn: Sequence[bytes]) -> dict[str, Any]:
    """CertificateOptions keywords shared by both sides: versions, ciphers, ALPN."""
    options: dict[str, Any] = {
        "insecurelyLowerMinimumTo": _VERSIONS[settings.min_version],
        "lowerMaximumSecurityTo": _VERSIONS[settings.max_version],
    }
    cipher_string = settings.openssl_ciphers
    if cipher_string:
        options["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(cipher_string)
    if alpn:
        options["acceptableProtocols"] = list(alpn)
    return options


def _certificate_options(certificate: CertificateKey | None) -> dict[str, Any]:
    if certificate is None:
        return {}
    chain = [x509.load_pem_x509_certificate(pem) for pem in certificate.chain_pem]
    key = serialization.load_pem_private_key(certificate.key_pem, password=None)
    return {"privateKey": key, "certificate": chain[0], "extraCertChain": chain[1:]}


def _x509s(pems: Iterable[bytes]) -> list[crypto.X509]:
    return [crypto.X509.from_cryptography(x509.load_pem_x509_certificate(pem)) for pem in pems]


# -- server ---------------------------------------------------------------------------------------


def _server_options(
    settings: TLSSettings, certificate: CertificateKey, alpn: Sequence[bytes], sni: Any = None
) -> ssl.CertificateOptions:
    kwargs = _common_options(settings, alpn)
    kwargs.update(_certificate_options(certificate))
    if settings.trusted_ca:
        kwargs["verify"] = True
        kwargs["caCerts"] = _x509s(settings.trusted_ca)
        kwargs["requireCertificate"] = settings.require_client_certificate
    if sni is not None:
        kwargs["contextForServerName"] = sni
    options = ssl.CertificateOptions(**kwargs)
    context = options.getContext()  # built now: a bad key or cipher list is a config error
    if settings.min_version < (1, 2):
        # `minversion: "1.1"` (Flex allows it, with its ciphers listed): OpenSSL 3+ refuses
        # TLS 1.1 above security level 0, so the port's configured list gets that level.
        context.set_cipher_list(settings.openssl_ciphers.encode("ascii") + b":@SECLEVEL=0")
    if settings.trusted_ca:
        context.set_client_ca_list([ca.get_subject() for ca in kwargs["caCerts"]])
    return options


@attrs.frozen(eq=False)
class ServerTLS:
    """A listening port's compiled TLS: the default certificate's options (used for every
    connection), and the contexts SNI switches to (same settings, another certificate)."""

    settings: TLSSettings
    certificates: tuple[CertificateKey, ...]  # default first
    alpn: tuple[bytes, ...]
    options: ssl.CertificateOptions
    exact: dict[str, SSL.Context]
    wildcard: dict[str, SSL.Context]  # "example.com" for "*.example.com"

    def context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """The context whose certificate has a SAN matching `server_name`; None: the default."""
        if not server_name:
            return None
        name = server_name.decode("ascii", "replace").lower().rstrip(".")
        context = self.exact.get(name)
        if context is None and "." in name:
            context = self.wildcard.get(name.split(".", 1)[1])
        return context

    @property
    def files(self) -> tuple[str, ...]:
        """The files this TLS configuration was read from."""
        return self.settings.files

    def describe(self) -> dict[str, object]:
        """JSON-ready summary: the port's settings, the ALPN offered, every certificate's names."""
        out = self.settings.describe()
        out["alpnOffered"] = [name.decode("ascii") for name in self.alpn]
        out["certificateNames"] = [list(c.names) for c in self.certificates]
        return out


def build_server_tls(
    settings: TLSSettings, others: Sequence[CertificateKey], served_alpn: Sequence[bytes]
) -> ServerTLS:
    """Compile a port's TLS: `settings` (the default binding) plus the other bindings' certificates."""
    assert settings.certificate is not None
    alpn = tuple(
        name for name in (n.encode("ascii") for n in settings.alpn) if name in served_alpn
    )
    certificates = [settings.certificate]
    for certificate in others:
        if certificate not in certificates:
            certificates.append(certificate)
    exact: dict[str, SSL.Context] = {}
    wildcard: dict[str, SSL.Context] = {}
    holder: list[ServerTLS] = []

    def sni(server_name: bytes | None) -> SSL.Context | None:
        return holder[0].context_for(server_name)

    default = _server_options(settings, settings.certificate, alpn, sni)
    for certificate in certificates:
        context = (
            default.getContext()
            if certificate is settings.certificate
            else _server_options(settings, certificate, alpn).getContext()
        )
        for name in certificate.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)
    server = ServerTLS(
        settings=settings,
        certificates=tuple(certificates),
        alpn=alpn,
        options=default,
        exact=exact,
        wildcard=wildcard,
    )
    holder.append(server)
    return server


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """Makes each accepted connection's TLS state from the listener's current ServerTLS; a reload
    swaps `current` (new connections get the new certificates, established ones keep theirs)."""

    def __init__(self, current: ServerTLS) -> None:
        self.current = current

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A server-side OpenSSL connection from the current default context."""
        return self.current.options.serverConnectionForTLS(tlsProtocol)


class QuietTLSFactory(TLSMemoryBIOFactory):
    """TLSMemoryBIOFactory without the start/stop log lines (one per upstream connect attempt),
    building SendNowTLSProtocols."""

    noisy = False
    protocol = SendNowTLSProtocol


class ListenerFactory(Factory):
    """What a listening socket serves: the ingress factory, wrapped in TLS while the listener's
    plan has TLS. A reload switches TLS on, off or to new certificates without rebinding."""

    noisy = False

    def __init__(self, wrapped: Factory, tls: ServerTLS | None = None) -> None:
        self.wrapped = wrapped
        self.creator: ServerConnectionCreator | None = None
        self.tls_factory: QuietTLSFactory | None = None
        self.set_tls(tls)

    def set_tls(self, tls: ServerTLS | None) -> None:
        """Serve new connections with `tls` (None: plain); established ones keep what they have."""
        if tls is None:
            self.creator = self.tls_factory = None
        elif self.creator is None:
            self.creator = ServerConnectionCreator(tls)
            self.tls_factory = QuietTLSFactory(self.creator, False, self.wrapped)
        else:
            self.creator.current = tls

    def buildProtocol(self, addr: Any) -> Any:
        """A TLS-wrapped ingress protocol, or the plain one."""
        tls_factory = self.tls_factory
        if tls_factory is None:
            return self.wrapped.buildProtocol(addr)
        return tls_factory.buildProtocol(addr)


def xfcc_value(certificate: x509.Certificate) -> bytes:
    """Envoy's `x-forwarded-client-cert` element for a client certificate:
    `Hash=<sha256 of DER, hex>;Subject="<RFC 4514>";URI=<uri SAN>...;DNS=<dns SAN>...`."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    # RFC 4514 already escapes '"' and '\\' with a backslash: safe inside Envoy's quotes.
    subject = certificate.subject.rfc4514_string()
    parts = [f"Hash={hashlib.sha256(der).hexdigest()}", f'Subject="{subject}"']
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        parts.extend(f"URI={uri}" for uri in san.get_values_for_type(x509.UniformResourceIdentifier))
        parts.extend(f"DNS={dns}" for dns in san.get_values_for_type(x509.DNSName))
    text = ";".join(parts)
    # Header-safe: no control characters can reach the upstream from a certificate field.
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")


def url_encoded_pem(certificate: Any) -> str:
    """A client certificate (pyOpenSSL X509 or cryptography) as Envoy sends it to ext_authz
    (`attributes.source.certificate`) and in XFCC's `Cert=`: its PEM with newline, space, `+`,
    `/` and `=` percent-encoded (Envoy's urlEncodedPemEncodedPeerCertificate)."""
    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    for char, code in (("%", "%25"), ("\n", "%0A"), (" ", "%20"), ("+", "%2B"), ("/", "%2F"),
                       ("=", "%3D")):
        pem = pem.replace(char, code)
    return pem


# -- client ---------------------------------------------------------------------------------------

#: The application protocols the gateway's clients (the upstream pool, treq side calls) speak.
#: A configured `alpn` is filtered by it: offering h2 to an upstream that picks it, then
#: speaking HTTP/1.1, would break every request.
CLIENT_ALPN: tuple[bytes, ...] = (b"http/1.1",)
#: What the upstream pools speak: an https:// Service whose `alpn` lists h2 offers
#: `h2,http/1.1` and uses what the upstream picks (ClientTLS.h2_creator).
UPSTREAM_ALPN: tuple[bytes, ...] = (b"h2", b"http/1.1")


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """skipValidation: no certificate or hostname check, SNI still sent for DNS names."""

    def __init__(self, options: ssl.CertificateOptions, hostname: str) -> None:
        self.options = options
        self.server_name = (
            None if isIPAddress(hostname) or isIPv6Address(hostname)
            else hostname.encode("idna")
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A client-side OpenSSL connection that accepts any server certificate."""
        connection = self.options.clientConnectionForTLS(tlsProtocol)
        if self.server_name:
            connection.set_tlsext_host_name(self.server_name)
        return connection


def client_creator(
    settings: TLSSettings, hostname: str, http2: bool = False, offer: tuple[bytes, ...] = ()
) -> Any:
    """An IOpenSSLClientConnectionCreator for `hostname` (SNI and service-identity check).

    With `http2` (an `h2://` Service, spoken to with flexgw.upstream.h2) ALPN offers `h2` only;
    with `offer`, those protocols (in that order).
    """
    if http2:
        alpn: tuple[bytes, ...] = (b"h2",)
    elif offer:
        alpn = offer
    else:
        alpn = tuple(n.encode("ascii") for n in settings.alpn if n.encode("ascii") in CLIENT_ALPN)
    kwargs = _common_options(settings, alpn)
    kwargs.update(_certificate_options(settings.certificate))
    if settings.skip_validation:
        options = ssl.CertificateOptions(**kwargs)
        options.getContext()
        return _UnverifiedCreator(options, hostname)
    if settings.trusted_ca:
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(pem) for pem in settings.trusted_ca]
        )
    else:
        trust = ssl.platformTrust()
    protocols = kwargs.pop("acceptableProtocols", None)
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, acceptableProtocols=protocols, extraCertificateOptions=kwargs
    )


@attrs.frozen
class ClientTLS:
    """A Service's compiled outbound TLS. Equal when the settings are (the creator is not compared),
    so an unchanged Service keeps its pool of connections across reloads."""

    settings: TLSSettings
    creator: Any = attrs.field(eq=False, hash=False, repr=False)
    # An https:// Service whose `alpn` lists h2: the creator offering h2 and HTTP/1.1 (None:
    # HTTP/1.1 only). Derived from the settings, so not compared either.
    h2_creator: Any = attrs.field(default=None, eq=False, hash=False, repr=False)

    def describe(self) -> dict[str, object]:
        """JSON-ready summary (no key material)."""
        out = self.settings.describe()
        out["clientCertificate"] = self.settings.certificate is not None
        out.pop("certificateNames", None)
        return out


def build_client_tls(settings: TLSSettings, hostname: str, http2: bool = False) -> ClientTLS:
    """Compile a Service's outbound TLS for `hostname` (the Service host, also the SNI name);
    `http2` for HTTP/2 Services (ALPN h2). An https:// Service whose binding's `alpn` lists h2
    gets an `h2_creator` offering h2 (and http/1.1 when listed too), as Flex does."""
    h2_creator = None
    alpn = [name.encode("ascii") for name in settings.alpn]
    if not http2 and settings.alpn_configured and b"h2" in alpn:
        offer = tuple(name for name in alpn if name in UPSTREAM_ALPN)
        h2_creator = client_creator(settings, hostname, offer=offer)
    return ClientTLS(
        settings=settings,
        creator=client_creator(settings, hostname, http2),
        h2_creator=h2_creator,
    )


@implementer(IPolicyForHTTPS)
class SideCallTLSPolicy:
    """The IPolicyForHTTPS of the gateway's own treq calls (`defaultTLS.outboundPolicyCalls`):
    one creator per host name, verified against `trustedCA` or the system store."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._creators: dict[str, Any] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """The client connection creator for `hostname`."""
        name = hostname.decode("idna") if isinstance(hostname, bytes) else str(hostname)
        creator = self._creators.get(name)
        if creator is None:
            if len(self._creators) > 256:
                self._creators.clear()
            creator = self._creators[name] = client_creator(self.settings, name)
        return creator
