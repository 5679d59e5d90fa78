"""Kubernetes documents flexgw reads (Ingress, IngressClass, v1 Service, Endpoints, EndpointSlice,
Secret): which (apiVersion, kind) pairs they are, and the checks JSON Schema cannot express.

Nothing here knows about files: a document is a plain mapping, and problems are reported through
a callback with a field path, so a Kubernetes API watcher can feed the same checks later.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flexgw.config.regex import RegexError, compile_rule_regex

FieldPath = tuple[str | int, ...]
# (severity, message, field path, offset into a plain scalar or None)
Report = Callable[[str, str, FieldPath, "int | None"], None]

# (apiVersion, kind as written) -> the kind flexgw files the resource under. A v1 Service is
# "KubernetesService" so that it never collides with a flexgw Service of the same name.
KUBERNETES_KINDS: Mapping[tuple[str, str], str] = {
    ("networking.k8s.io/v1", "Ingress"): "Ingress",
    ("networking.k8s.io/v1", "IngressClass"): "IngressClass",
    ("v1", "Service"): "KubernetesService",
    ("v1", "Secret"): "Secret",
    ("v1", "Endpoints"): "Endpoints",
    ("discovery.k8s.io/v1", "EndpointSlice"): "EndpointSlice",
}
# kinds written the Kubernetes way whose apiVersion flexgw does not read
KUBERNETES_API_VERSIONS = {
    "Ingress": "networking.k8s.io/v1",
    "IngressClass": "networking.k8s.io/v1",
    "Secret": "v1",
    "Endpoints": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
}

ANNOTATION_PREFIX = "flex-gateway.ingress.kubernetes.io/"
API_INSTANCE_ANNOTATION = ANNOTATION_PREFIX + "api-instance"
KNOWN_ANNOTATIONS = frozenset({API_INSTANCE_ANNOTATION})
LEGACY_CLASS_ANNOTATION = "kubernetes.io/ingress.class"
DEFAULT_CLASS_ANNOTATION = "ingressclass.kubernetes.io/is-default-class"
TLS_SECRET_TYPE = "kubernetes.io/tls"

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def is_kubernetes(api_version: Any, kind: Any) -> bool:
    """Whether (apiVersion, kind) names a Kubernetes kind flexgw reads (or should say it cannot)."""
    if (api_version, kind) in KUBERNETES_KINDS:
        return True
    if isinstance(api_version, str) and api_version.startswith("gateway.mulesoft.com/"):
        return False
    return kind in KUBERNETES_API_VERSIONS


def check_host(host: str) -> str | None:
    """Why `host` is not a valid Ingress host (a lower-case DNS name, maybe `*.`-prefixed)."""
    if len(host) > 253 or _HOST.fullmatch(host) is None:
        return f"{host!r} is not a lower-case DNS name (optionally starting with '*.'); no IPs, ports or upper case"
    return None


def host_regex(host: str | None) -> str | None:
    """The rule regex for an Ingress host: exact, or `*.` matching exactly one label."""
    if not host:
        return None
    if host.startswith("*."):
        return r"[^.]+\." + re.escape(host[2:])
    return re.escape(host)


def normalise_prefix(path: str) -> str:
    """A Prefix path without its trailing slashes ("" for "/"): Kubernetes ignores them."""
    return path.rstrip("/")


def path_regex(path_type: str, path: str | None) -> str | None:
    """The rule regex for an Ingress path; None matches every path.

    Exact is the path itself; Prefix matches element-wise (/foo matches /foo and /foo/bar, not
    /foobar); ImplementationSpecific is a Flex rule regex, whose capture groups rewrite the path.
    """
    if path_type == "Exact":
        return re.escape(path or "/")
    if path_type == "Prefix":
        prefix = normalise_prefix(path or "/")
        return re.escape(prefix) + "(?:/.*)?" if prefix else None
    return path if path else None


def parse_timestamp(text: str) -> datetime.datetime:
    """An RFC 3339 `creationTimestamp` (UTC when no offset is given); raises ValueError."""
    value = datetime.datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value


@attrs.frozen
class TlsPair:
    """A decoded `kubernetes.io/tls` Secret: the certificate chain and private key, in PEM."""

    chain_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)
    subjects: tuple[str, ...] = ()  # DNS names of the leaf certificate (subjectAltName)


def _secret_field(
    secret: Mapping[str, Any], name: str
) -> tuple[bytes | None, FieldPath, str | None]:
    """(bytes, where it is written, why it is unusable) of `tls.crt`/`tls.key`; stringData wins."""
    string_data = secret.get("stringData")
    if isinstance(string_data, dict) and isinstance(string_data.get(name), str):
        return string_data[name].encode("utf-8"), ("stringData", name), None
    data = secret.get("data")
    if isinstance(data, dict) and isinstance(data.get(name), str):
        try:
            return (
                base64.b64decode("".join(data[name].split()), validate=True),
                ("data", name),
                None,
            )
        except (binascii.Error, ValueError):
            return None, ("data", name), f"{name} is not valid base64"
    return None, ("data",), f"{name} is missing (in data, base64, or stringData)"


def decode_tls_secret(
    secret: Mapping[str, Any],
) -> tuple[TlsPair | None, list[tuple[FieldPath, str]]]:
    """The certificate and key of a `kubernetes.io/tls` Secret, or where and why they are unusable.

    The messages never contain the secret material.
    """
    errors: list[tuple[FieldPath, str]] = []
    cert, cert_path, why = _secret_field(secret, "tls.crt")
    if why:
        errors.append((cert_path, why))
    key, key_path, why = _secret_field(secret, "tls.key")
    if why:
        errors.append((key_path, why))
    if cert is None or key is None:
        return None, errors
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        return None, [(cert_path, "tls.crt holds no PEM certificate")]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        return None, [(key_path, "tls.key holds no unencrypted PEM private key")]
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        return None, [(key_path, "tls.key does not match the certificate in tls.crt")]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        subjects = tuple(names.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        subjects = ()
    return TlsPair(chain_pem=cert, key_pem=key, subjects=subjects), []


def _check_backend(backend: Any, path: FieldPath, report: Report) -> None:
    if not isinstance(backend, dict):
        return
    if "resource" in backend:
        report(
            "error",
            "resource backends are not supported; use backend.service",
            path + ("resource",),
            None,
        )
    service = backend.get("service")
    port = service.get("port") if isinstance(service, dict) else None
    if isinstance(port, dict) and "number" in port and "name" in port:
        report("error", "give port.number or port.name, not both", path + ("service", "port"), None)


def check_kubernetes(kind: str, value: Mapping[str, Any], report: Report) -> None:
    """Checks of one (schema-valid so far) Kubernetes document that JSON Schema cannot express."""
    metadata = value.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    stamp = metadata.get("creationTimestamp")
    if isinstance(stamp, str):
        try:
            parse_timestamp(stamp)
        except ValueError:
            report(
                "error",
                f"{stamp!r} is not an RFC 3339 time",
                ("metadata", "creationTimestamp"),
                None,
            )
    annotations = metadata.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    if kind == "Ingress":
        for key in annotations:
            if key.startswith(ANNOTATION_PREFIX) and key not in KNOWN_ANNOTATIONS:
                report(
                    "error",
                    f"unknown flexgw annotation {key!r} (known: {', '.join(sorted(KNOWN_ANNOTATIONS))})",
                    ("metadata", "annotations", key),
                    None,
                )
        binding = annotations.get(API_INSTANCE_ANNOTATION)
        if isinstance(binding, str) and not binding.strip().strip("."):
            report(
                "error",
                "expected <api-instance-name>.<namespace>",
                ("metadata", "annotations", API_INSTANCE_ANNOTATION),
                None,
            )
        spec = value.get("spec")
        if not isinstance(spec, dict):
            return
        _check_backend(spec.get("defaultBackend"), ("spec", "defaultBackend"), report)
        rules = spec.get("rules")
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, dict):
                continue
            host = rule.get("host")
            if isinstance(host, str) and (why := check_host(host)):
                report("error", why, ("spec", "rules", i, "host"), None)
            http = rule.get("http")
            paths = http.get("paths") if isinstance(http, dict) else None
            for j, item in enumerate(paths if isinstance(paths, list) else []):
                if not isinstance(item, dict):
                    continue
                where: FieldPath = ("spec", "rules", i, "http", "paths", j)
                _check_backend(item.get("backend"), where + ("backend",), report)
                _check_path(item.get("pathType"), item.get("path"), where, report)
        tls = spec.get("tls")
        for i, item in enumerate(tls if isinstance(tls, list) else []):
            hosts = item.get("hosts") if isinstance(item, dict) else None
            for j, host in enumerate(hosts if isinstance(hosts, list) else []):
                if isinstance(host, str) and (why := check_host(host)):
                    report("error", why, ("spec", "tls", i, "hosts", j), None)
    elif kind == "Secret" and value.get("type") == TLS_SECRET_TYPE:
        _, errors = decode_tls_secret(value)
        for path, message in errors:
            report("error", message, path, None)
    elif kind == "KubernetesService":
        spec = value.get("spec")
        if (
            isinstance(spec, dict)
            and spec.get("type") == "ExternalName"
            and not isinstance(spec.get("externalName"), str)
        ):
            report("error", "an ExternalName Service needs spec.externalName", ("spec",), None)


def _check_path(path_type: Any, path: Any, where: FieldPath, report: Report) -> None:
    if path_type in ("Exact", "Prefix"):
        if not isinstance(path, str):
            report("error", f"a {path_type} path needs 'path'", where, None)
        elif not path.startswith("/"):
            report("error", f"a {path_type} path must start with '/'", where + ("path",), None)
        elif any(part in (".", "..") for part in path.split("/")) or "//" in path:
            report(
                "error",
                f"a {path_type} path must not contain '//', '.' or '..' segments",
                where + ("path",),
                None,
            )
    elif path_type == "ImplementationSpecific" and isinstance(path, str):
        try:
            compile_rule_regex(path)
        except RegexError as exc:
            position = "" if exc.position is None else f" at position {exc.position + 1}"
            report(
                "error",
                f"invalid regex{position}: {exc.message} (ImplementationSpecific paths are Flex rule regexes)",
                where + ("path",),
                exc.position,
            )
