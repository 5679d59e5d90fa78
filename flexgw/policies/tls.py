"""The `tls` (inbound, per port) and `tls-outbound` (per Service) policy kinds: schemas and parsing.

They are not chain members: resolve/compile take their bindings aside and compile them into the
listener's server contexts and the Service's client context. `build` returns the parsed
TLSSettings (PolicyConfigError, located at file:line:column, for a bad value).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicyKind
from flexgw.policies.registry import register
from flexgw.tls.settings import IANA_TO_OPENSSL, TLSSettings, parse_tls

_PEM = {"type": "string", "minLength": 1}
_VERSION = {"type": ["string", "number"]}


def tls_schema(outbound: bool) -> dict[str, Any]:
    """The JSON Schema of a `tls` (inbound) or `tls-outbound` / `defaultTLS` (outbound) config."""
    properties: dict[str, Any] = {
        "certificate": {
            "type": "object",
            "required": ["key", "crt"],
            "additionalProperties": False,
            "properties": {
                "key": _PEM,
                "crt": _PEM,
                "chain": _PEM,
                "keyPassphrase": {"type": "string"},
            },
        },
        "trustedCA": _PEM,
        "alpn": {
            "type": "array",
            "items": {"enum": ["h2", "http/1.1", "http/1.0"]},
            "minItems": 1,
        },
        "minversion": _VERSION,
        "maxversion": _VERSION,
        "minVersion": _VERSION,
        "maxVersion": _VERSION,
        "ciphers": {
            "type": "array",
            "items": {"type": "string", "examples": sorted(IANA_TO_OPENSSL)},
            "minItems": 1,
        },
    }
    if outbound:
        properties["skipValidation"] = {"type": "boolean"}
    else:
        properties["requireClientCertificate"] = {"type": "boolean"}
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "config of the tls-outbound policy" if outbound else "config of the tls policy",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if not outbound:
        schema["required"] = ["certificate"]
    return schema


@implementer(IPolicyKind)
class TLSKind:
    """`tls`: inbound TLS of the ApiInstance's port (bound to an ApiInstance or a Selector)."""

    name = "tls"
    phase = "tls"
    schema = tls_schema(outbound=False)

    def build(self, config: dict[str, Any], context: BuildContext) -> TLSSettings:
        """The parsed server settings."""
        return parse_tls(config, outbound=False)


@implementer(IPolicyKind)
class TLSOutboundKind:
    """`tls-outbound`: TLS to the upstream of a Service."""

    name = "tls-outbound"
    phase = "tls-outbound"
    schema = tls_schema(outbound=True)

    def build(self, config: dict[str, Any], context: BuildContext) -> TLSSettings:
        """The parsed client settings."""
        return parse_tls(config, outbound=True)


TLS = register(TLSKind())
TLS_OUTBOUND = register(TLSOutboundKind())
