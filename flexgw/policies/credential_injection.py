"""`credential-injection-basic-auth-flex` and `credential-injection-api-key-flex`: outbound policies (bound to a Service) that add the upstream's credentials to every request.

Flex behaviour reproduced (docs `policies-outbound-basic-auth.adoc`, `policies-outbound-api-key.adoc`,
reference §2.2 "Credential Injection"):

- basic auth: `username`, `password` (documented optional; flexgw requires `username`, an empty
  password is allowed), `overwrite` (default true), `customHeader` (default
  `Authorization`). The value is `Basic base64(username:password)` (RFC 7617).
- API key: `authType: apiKey | clientCredentials`, `overwrite` (default true).
  - `apiKey`: the key is the header value, in `customHeader` (default `Authorization`).
  - `clientCredentials`: `clientId` and `clientSecret` in the `client_id` and `client_secret`
    headers, or `customClientIdHeader` / `customClientSecretHeader`.
  - `apiKeyType: static` (the default, and the only type in Local Mode docs' examples).
- `overwrite: true`: every value the client sent for that header is removed and the injected
  one is the only one the upstream gets (the client's own credential never leaks upstream).
  `overwrite: false`: a request that already carries the header keeps the client's value and
  nothing is injected; a request without it gets the injected value.
- These policies never answer themselves ("error codes are returned from the upstream").

Deliberate differences from Flex:
- `apiKeyType: expression` (a DataWeave `apiKeySelector`, 1.14) is not supported: such a
  binding fails its schema, so the Service's APIs are not served (fail closed), rather than
  sending a wrong key.
- Header names that would change framing or routing (`Host`, `Content-Length`,
  `Transfer-Encoding`, `Connection`, ...) and values with CR/LF/NUL are config errors.
- Credentials are kept out of `repr()` and logs; `/status` masks policy config values.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.headers import header_name_problem, header_value_problem
from flexgw.policies.registry import register

BASIC_NAME = "credential-injection-basic-auth-flex"
API_KEY_NAME = "credential-injection-api-key-flex"

_HEADER = {"type": "string", "minLength": 1}

BASIC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string"},
        "password": {"type": "string"},
        "overwrite": {"type": "boolean", "default": True},
        "customHeader": _HEADER,
    },
    "required": ["username"],
    "additionalProperties": False,
}

API_KEY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "authType": {"enum": ["apiKey", "clientCredentials"]},
        "overwrite": {"type": "boolean", "default": True},
        "apiKeyType": {"enum": ["static"], "default": "static"},
        "apiKey": {"type": "string", "minLength": 1},
        "customHeader": _HEADER,
        "clientId": {"type": "string", "minLength": 1},
        "clientSecret": {"type": "string", "minLength": 1},
        "customClientIdHeader": _HEADER,
        "customClientSecretHeader": _HEADER,
    },
    "required": ["authType"],
    "allOf": [
        {
            "if": {"properties": {"authType": {"const": "apiKey"}}},
            "then": {"required": ["apiKey"]},
        },
        {
            "if": {"properties": {"authType": {"const": "clientCredentials"}}},
            "then": {"required": ["clientId", "clientSecret"]},
        },
    ],
    "additionalProperties": False,
}


def inject(ctx: PolicyContext, name: bytes, value: bytes, overwrite: bool) -> None:
    """Put `name: value` on the upstream request, replacing the client's (overwrite) or only
    where the client sent none."""
    if overwrite:
        ctx.set_request_header(name, value)
    elif ctx.request_header(name) is None:
        ctx.add_request_header(name, value)


def checked_header(
    config: dict[str, Any], key: str, default: bytes
) -> bytes:
    """The header name configured at `key` (or `default`), checked as injectable."""
    name = config.get(key)
    if name is None:
        return default
    raw = str(name).strip().encode("latin-1", "replace")
    problem = header_name_problem(raw)
    if problem is not None:
        raise PolicyConfigError(problem, key)
    return raw


def checked_value(value: str, field: str) -> bytes:
    """A credential as header-value bytes (UTF-8), refusing control characters."""
    raw = value.encode("utf-8")
    problem = header_value_problem(raw)
    if problem is not None:
        raise PolicyConfigError(problem, field)
    return raw


@implementer(IPolicy)
@attrs.frozen
class InjectHeadersPolicy:
    """Adds fixed credential headers to the upstream request."""

    headers: tuple[tuple[bytes, bytes], ...] = attrs.field(repr=False)
    overwrite: bool = True

    def on_request(self, ctx: PolicyContext) -> None:
        """Inject every configured header."""
        for name, value in self.headers:
            inject(ctx, name, value, self.overwrite)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


@implementer(IPolicyKind)
class BasicAuthInjectionKind:
    """The `credential-injection-basic-auth-flex` kind."""

    name = BASIC_NAME
    schema = BASIC_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> InjectHeadersPolicy:
        """Precompute the header: `Basic base64(username:password)`."""
        username = str(config.get("username", ""))
        password = str(config.get("password", ""))
        if ":" in username:
            raise PolicyConfigError(
                "username must not contain ':' (RFC 7617): the upstream could not split it",
                "username",
            )
        header = checked_header(config, "customHeader", b"Authorization")
        token = b64encode(f"{username}:{password}".encode())
        return InjectHeadersPolicy(
            headers=((header, b"Basic " + token),), overwrite=bool(config.get("overwrite", True))
        )


@implementer(IPolicyKind)
class ApiKeyInjectionKind:
    """The `credential-injection-api-key-flex` kind."""

    name = API_KEY_NAME
    schema = API_KEY_SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> InjectHeadersPolicy:
        """The key in one header, or the client id and secret in two."""
        overwrite = bool(config.get("overwrite", True))
        headers: tuple[tuple[bytes, bytes], ...]
        if config.get("authType") == "clientCredentials":
            id_header = checked_header(config, "customClientIdHeader", b"client_id")
            secret_header = checked_header(config, "customClientSecretHeader", b"client_secret")
            if id_header.lower() == secret_header.lower():
                raise PolicyConfigError(
                    "the client id and secret headers must differ", "customClientSecretHeader"
                )
            headers = (
                (id_header, checked_value(str(config["clientId"]), "clientId")),
                (secret_header, checked_value(str(config["clientSecret"]), "clientSecret")),
            )
        else:
            header = checked_header(config, "customHeader", b"Authorization")
            headers = ((header, checked_value(str(config["apiKey"]), "apiKey")),)
        return InjectHeadersPolicy(headers=headers, overwrite=overwrite)


BASIC_KIND = register(BasicAuthInjectionKind())
API_KEY_KIND = register(ApiKeyInjectionKind())
