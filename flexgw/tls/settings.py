"""Parse Flex's TLS config blocks (`tls`, `tls-outbound`, `defaultTLS.outboundPolicyCalls`) into values.

Certificates and keys are PEM, inline or a `file://` reference (read at compile time, so a reload
picks up a changed file). Versions accept "1.1" / "1.2" / "1.3" (also "TLSv1.2", or a YAML number)
under `minversion`/`maxversion` or `minVersion`/`maxVersion`. Ciphers are IANA names, mapped to
OpenSSL names; listing them replaces the TLS 1.2 defaults (TLS 1.3 suites are fixed, as Flex).
Every problem raises PolicyConfigError naming the field, so it is reported at file:line:column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flexgw.plan import PolicyConfigError

#: IANA cipher suite names Flex documents, with their OpenSSL names. TLS 1.3 suites map to None:
#: OpenSSL always enables them when TLS 1.3 is allowed (Flex: "fixed and always on").
IANA_TO_OPENSSL: Mapping[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-PSK-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_PSK_WITH_AES_128_CBC_SHA": "PSK-AES128-CBC-SHA",
    "TLS_PSK_WITH_AES_256_CBC_SHA": "PSK-AES256-CBC-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA": "ECDHE-PSK-AES128-CBC-SHA",
    "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA": "ECDHE-PSK-AES256-CBC-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
}

#: Flex's default TLS 1.2 cipher list (IANA names), in preference order.
DEFAULT_TLS12_CIPHERS: tuple[str, ...] = (
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
)

#: TLS versions by the spellings Flex accepts, as (major, minor) tuples that order correctly.
VERSIONS: Mapping[str, tuple[int, int]] = {"1.1": (1, 1), "1.2": (1, 2), "1.3": (1, 3)}

DEFAULT_ALPN: tuple[str, ...] = ("h2", "http/1.1")


@attrs.frozen
class CertificateKey:
    """A certificate chain (leaf first) and its private key, as PEM; `names` are the leaf's
    dNSName SANs (lower-case, wildcards kept) used for SNI selection."""

    chain_pem: tuple[bytes, ...]
    key_pem: bytes = attrs.field(repr=False)
    names: tuple[str, ...] = ()


@attrs.frozen
class TLSSettings:
    """One TLS config block, parsed. Compares by value (PEM bytes included): a reload that reads
    the same files yields an equal value, so pooled upstream connections are kept."""

    certificate: CertificateKey | None = None
    trusted_ca: tuple[bytes, ...] | None = None  # PEM certificates; None: the system trust store
    require_client_certificate: bool = False
    skip_validation: bool = False
    alpn: tuple[str, ...] = DEFAULT_ALPN
    # `alpn` was written in the binding (an https:// Service offers h2 only when it was: the
    # default list would make every TLS upstream pay a second handshake to fall back)
    alpn_configured: bool = False
    min_version: tuple[int, int] = (1, 2)
    max_version: tuple[int, int] = (1, 3)
    ciphers: tuple[str, ...] = DEFAULT_TLS12_CIPHERS  # IANA names
    files: tuple[str, ...] = ()  # certificate/key/CA files read (watched for reloads)

    def describe(self) -> dict[str, object]:
        """JSON-ready summary (no key material): for `flexgw dump` and /status."""
        out: dict[str, object] = {
            "minVersion": "{}.{}".format(*self.min_version),
            "maxVersion": "{}.{}".format(*self.max_version),
            "alpn": list(self.alpn),
            "ciphers": list(self.ciphers),
            "trustedCA": "custom" if self.trusted_ca else "system",
        }
        if self.certificate is not None:
            out["certificateNames"] = list(self.certificate.names)
        if self.require_client_certificate:
            out["requireClientCertificate"] = True
        if self.skip_validation:
            out["skipValidation"] = True
        return out

    @property
    def openssl_ciphers(self) -> str:
        """The TLS 1.2-and-lower cipher list in OpenSSL syntax ("" when only TLS 1.3 suites)."""
        names = [IANA_TO_OPENSSL[name] for name in self.ciphers]
        return ":".join(name for name in names if name)


def _read_pem(value: Any, field: str, files: list[str]) -> bytes:
    """Inline PEM text, or the contents of a `file://` reference."""
    if not isinstance(value, str) or not value.strip():
        raise PolicyConfigError("must be PEM text or a file:// reference", field)
    text = value.strip()
    if text.startswith("file:"):
        parts = urlsplit(text)
        path = unquote(parts.path)
        if parts.netloc and parts.netloc != "localhost":
            path = parts.netloc + path  # file://relative/path: taken as written
        files.append(os.path.abspath(path))
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise PolicyConfigError(f"cannot read {path}: {exc.strerror}", field) from None
    return text.encode("utf-8")


def _load_certificates(pem: bytes, field: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise PolicyConfigError("no valid PEM certificate found", field) from None
    return certificates


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower() for name in san.value.get_values_for_type(x509.DNSName))


def parse_certificate(value: Any, field: str, files: list[str]) -> CertificateKey:
    """`certificate: {key, crt, chain?, keyPassphrase?}`: the key must match the leaf."""
    if not isinstance(value, Mapping):
        raise PolicyConfigError("must be a mapping with key and crt", field)
    crt = _load_certificates(_read_pem(value.get("crt"), f"{field}.crt", files), f"{field}.crt")
    chain = list(crt)
    if value.get("chain") is not None:
        chain += _load_certificates(
            _read_pem(value.get("chain"), f"{field}.chain", files), f"{field}.chain"
        )
    key_pem = _read_pem(value.get("key"), f"{field}.key", files)
    passphrase = value.get("keyPassphrase")
    try:
        key = serialization.load_pem_private_key(
            key_pem, password=passphrase.encode("utf-8") if passphrase else None
        )
    except (ValueError, TypeError) as exc:
        raise PolicyConfigError(f"not a usable PEM private key ({exc})", f"{field}.key") from None
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf = chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != leaf:
        raise PolicyConfigError("the key does not match the certificate", f"{field}.key")
    unencrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return CertificateKey(
        chain_pem=tuple(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=unencrypted,
        names=_dns_names(chain[0]),
    )


def _version(config: Mapping[str, Any], lower: str, camel: str, default: tuple[int, int]) -> Any:
    key = lower if lower in config else camel
    raw = config.get(key)
    if raw is None:
        return default
    text = str(raw).strip()
    text = text.removeprefix("TLSv").removeprefix("TLS").replace("_", ".")
    version = VERSIONS.get(text)
    if version is None:
        raise PolicyConfigError(f"unsupported TLS version {raw!r} (expected 1.1, 1.2 or 1.3)", key)
    return version


def parse_tls(config: Mapping[str, Any], outbound: bool) -> TLSSettings:
    """A `tls` (inbound) or `tls-outbound` / `defaultTLS` (outbound) config block, parsed."""
    files: list[str] = []
    certificate = None
    if config.get("certificate") is not None:
        certificate = parse_certificate(config["certificate"], "certificate", files)
    elif not outbound:
        raise PolicyConfigError("a certificate (key and crt) is required", "certificate")
    trusted = None
    if config.get("trustedCA") is not None:
        pem = _read_pem(config["trustedCA"], "trustedCA", files)
        trusted = tuple(
            c.public_bytes(serialization.Encoding.PEM)
            for c in _load_certificates(pem, "trustedCA")
        )
    require = bool(config.get("requireClientCertificate", False)) and not outbound
    if require and trusted is None:
        raise PolicyConfigError(
            "trustedCA is required when requireClientCertificate is true", "trustedCA"
        )
    alpn = tuple(str(name) for name in config.get("alpn") or DEFAULT_ALPN)
    minimum = _version(config, "minversion", "minVersion", (1, 2))
    maximum = _version(config, "maxversion", "maxVersion", (1, 3))
    if minimum > maximum:
        raise PolicyConfigError(
            "minversion is above maxversion", "minversion" if "minversion" in config else "minVersion"
        )
    ciphers = DEFAULT_TLS12_CIPHERS
    if config.get("ciphers") is not None:
        listed = []
        for n, name in enumerate(config["ciphers"]):
            text = str(name).strip().upper()
            if text not in IANA_TO_OPENSSL:
                raise PolicyConfigError(f"unknown cipher {name!r} (expected an IANA name)", f"ciphers.{n}")
            listed.append(text)
        ciphers = tuple(listed)
        if minimum <= (1, 2) and not any(IANA_TO_OPENSSL[name] for name in ciphers):
            raise PolicyConfigError(
                "no TLS 1.2 cipher listed while TLS 1.2 is allowed (listing ciphers replaces the defaults)",
                "ciphers",
            )
    elif minimum < (1, 2):
        raise PolicyConfigError(
            "TLS 1.1 has no default ciphers: list them in ciphers", "minversion" if "minversion" in config else "minVersion"
        )
    return TLSSettings(
        certificate=certificate,
        trusted_ca=trusted,
        require_client_certificate=require,
        skip_validation=bool(config.get("skipValidation", False)) and outbound,
        alpn=alpn,
        alpn_configured=bool(config.get("alpn")),
        min_version=minimum,
        max_version=maximum,
        ciphers=ciphers,
        files=tuple(files),
    )
