"""`client-id-enforcement-flex`: only registered client applications (id and secret) get through.

Flex has this policy in Connected Mode only (its client registry is Anypoint's contracts; the
Local Mode page lists no parameters). flexgw takes the registry from the config instead:
`credentials` (a list of `{clientId, clientSecret, name}`) and/or `credentialsFile` (an absolute
path to a YAML or JSON file holding such a list, or a mapping with a `credentials` list), read
when the configuration is compiled (so a reload re-reads it; a change to the file alone does not
trigger one). A missing, unreadable or invalid file is a config error.

Flex's Connected Mode keys (API Manager's `configurationData`, docs
`policies-included-client-id-enforcement.adoc`):
- `credentialsOriginHasHttpBasicAuthenticationHeader`: `customExpression` (default) or
  `httpBasicAuthenticationHeader` (credentials from `Authorization: Basic id:secret`).
- `clientIdExpression`, default `#[attributes.headers['client_id']]`.
- `clientSecretExpression`, default `#[attributes.headers['client_secret']]`; `null` or `""`
  makes the secret optional (the docs: "leave the field blank to configure the client secret
  requirement as optional"): only the client id is checked.

Rejections are 401 with the bodies observed on Flex (Omni) Gateway in Connected Mode:
`{"error":"Client ID is not present"}` when no client id was sent and
`{"error":"Authentication Attempt Failed"}` for an unknown id or a wrong or missing secret, with
`WWW-Authenticate: Client-ID-Enforcement` (custom expressions) or `Basic realm="mule-realm"`
(HTTP Basic origin), as the policy docs' "Policy Output" table says. On success
`authentication.clientId` and `authentication.clientName` are set for later policies.

Deliberate differences from Flex: the registry is local (above); secrets are compared in
constant time (SHA-256 digests through `hmac.compare_digest`, and an unknown id is compared
against a dummy digest so its timing matches a wrong secret); duplicate client ids in the
registry are a config error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any

import attrs
import yaml
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.basic_auth import CHALLENGE as BASIC_CHALLENGE
from flexgw.policies.basic_auth import basic_credentials
from flexgw.policies.expressions import Expression, ExpressionError, compile_value, to_text
from flexgw.policies.registry import register

NAME = "client-id-enforcement-flex"

CUSTOM_EXPRESSION = "customExpression"
HTTP_BASIC = "httpBasicAuthenticationHeader"
DEFAULT_ID_EXPRESSION = "#[attributes.headers['client_id']]"
DEFAULT_SECRET_EXPRESSION = "#[attributes.headers['client_secret']]"

NOT_PRESENT = b'{"error":"Client ID is not present"}'
FAILED = b'{"error":"Authentication Attempt Failed"}'
_JSON = (b"content-type", b"application/json")
_CUSTOM_CHALLENGE = (b"www-authenticate", b"Client-ID-Enforcement")

_CREDENTIAL: dict[str, Any] = {
    "type": "object",
    "properties": {
        "clientId": {"type": "string", "minLength": 1},
        "clientSecret": {"type": "string"},
        "name": {"type": "string"},
    },
    "required": ["clientId"],
    "additionalProperties": False,
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "credentialsOriginHasHttpBasicAuthenticationHeader": {
            "enum": [CUSTOM_EXPRESSION, HTTP_BASIC]
        },
        "clientIdExpression": {"type": "string"},
        "clientSecretExpression": {"type": ["string", "null"]},
        "credentials": {"type": "array", "items": _CREDENTIAL},
        "credentialsFile": {"type": "string", "minLength": 1},
    },
    "additionalProperties": False,
}


def _digest(value: bytes) -> bytes:
    """A fixed-length digest, so comparisons reveal nothing about lengths."""
    return hashlib.sha256(value).digest()


_DUMMY = _digest(b"\x00flexgw: no such client\x00")


@attrs.frozen
class Client:
    """One registered client application."""

    client_id: str
    name: str | None
    secret_digest: bytes | None = attrs.field(repr=False)  # None: registered without a secret


@implementer(IPolicy)
@attrs.frozen
class ClientIdPolicy:
    """One binding: the registry and where the credentials come from."""

    clients: Mapping[str, Client]
    basic: bool  # credentials from `Authorization: Basic`
    id_expression: Expression | str | None
    secret_expression: Expression | str | None  # None: the secret is not checked

    def _reject(self, body: bytes) -> LocalResponse:
        """A 401 with this origin's challenge."""
        challenge = BASIC_CHALLENGE if self.basic else _CUSTOM_CHALLENGE
        return LocalResponse(401, (challenge, _JSON), body)

    def _credentials(self, ctx: PolicyContext) -> tuple[str | None, bytes | None]:
        """(client id, secret bytes or None) from the request."""
        if self.basic:
            pair = basic_credentials(ctx)
            if pair is None:
                return None, None
            try:
                return pair[0].decode("utf-8"), pair[1]
            except UnicodeDecodeError:
                return None, None
        return _text(self.id_expression, ctx), _secret(self.secret_expression, ctx)

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Let registered clients on; a 401 otherwise."""
        client_id, secret = self._credentials(ctx)
        if not client_id:
            return self._reject(NOT_PRESENT)
        client = self.clients.get(client_id)
        checks_secret = self.basic or self.secret_expression is not None
        if checks_secret:
            # Always one digest comparison, against a dummy for an unknown id; registered
            # secrets are never empty, so a missing secret (digest of b"") cannot match.
            stored = client.secret_digest if client is not None else None
            known = stored is not None
            expected = stored if stored is not None else _DUMMY
            ok = hmac.compare_digest(_digest(secret or b""), expected) & known
        else:
            ok = client is not None
        if not ok or client is None:
            return self._reject(FAILED)
        ctx.authentication = {
            "principal": None,
            "clientId": client.client_id,
            "clientName": client.name,
            "properties": {},
        }
        return None

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


def _text(expression: Expression | str | None, ctx: PolicyContext) -> str | None:
    """An expression's value as text, None for null or empty."""
    if expression is None:
        return None
    if isinstance(expression, str):
        return expression or None
    value = expression.evaluate(ctx.expression_context())
    if value is None:
        return None
    return to_text(value) or None


def _secret(expression: Expression | str | None, ctx: PolicyContext) -> bytes | None:
    """The secret the request sent (UTF-8), or None."""
    text = _text(expression, ctx)
    return None if text is None else text.encode("utf-8")


def _compile(config: dict[str, Any], field: str, default: str | None) -> Expression | str | None:
    """Compile an expression field; None when it is null or empty."""
    source = config.get(field, default)
    if source is None or (isinstance(source, str) and not source.strip()):
        return None
    if not isinstance(source, str):
        raise PolicyConfigError(f"{field} must be a string", field)
    try:
        return compile_value(source)
    except ExpressionError as exc:
        raise PolicyConfigError(f"{field}: {exc.message} (at offset {exc.offset})", field) from None


def _read_file(path: str) -> list[Any]:
    """The credential list in a YAML or JSON file (a list, or a mapping with `credentials`)."""
    field = "credentialsFile"
    if not os.path.isabs(path):
        raise PolicyConfigError(f"credentialsFile must be an absolute path, not {path!r}", field)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise PolicyConfigError(f"credentialsFile {path!r}: {exc.strerror}", field) from None
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            data = yaml.safe_load(raw)  # YAML 1.1 reads JSON too
    except (ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PolicyConfigError(f"credentialsFile {path!r} is not valid: {reason}", field) from None
    if isinstance(data, dict) and set(data) == {"credentials"}:
        data = data["credentials"]
    if not isinstance(data, list):
        raise PolicyConfigError(
            f"credentialsFile {path!r} must hold a list of {{clientId, clientSecret, name}}", field
        )
    return data


def _client(item: Any, where: str, field: str, need_secret: bool) -> Client:
    """One registry entry, checked (`where` names it in messages, `field` is its config path)."""
    if not isinstance(item, dict):
        raise PolicyConfigError(f"{where} must be a mapping with clientId and clientSecret", field)
    unknown = sorted(set(item) - {"clientId", "clientSecret", "name"})
    if unknown:
        raise PolicyConfigError(f"{where}: unknown key {unknown[0]!r}", field)
    client_id = item.get("clientId")
    if isinstance(client_id, int) and not isinstance(client_id, bool):
        client_id = str(client_id)  # YAML reads `clientId: 1234` as a number
    if not isinstance(client_id, str) or not client_id:
        raise PolicyConfigError(f"{where}: clientId must be a non-empty string", field)
    secret = item.get("clientSecret")
    if isinstance(secret, int) and not isinstance(secret, bool):
        secret = str(secret)
    if secret is not None and not isinstance(secret, str):
        raise PolicyConfigError(f"{where}: clientSecret must be a string", field)
    if need_secret and not secret:
        raise PolicyConfigError(
            f"{where}: clientSecret is required (the policy checks secrets; set "
            "clientSecretExpression to null to check client ids only)",
            field,
        )
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        name = str(name)
    digest = _digest(secret.encode("utf-8")) if secret else None
    return Client(client_id, name, digest)


@implementer(IPolicyKind)
class ClientIdKind:
    """The `client-id-enforcement-flex` policy kind (with a local client registry)."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> ClientIdPolicy:
        """Read the registry (inline and file) and compile the credential expressions."""
        origin = config.get("credentialsOriginHasHttpBasicAuthenticationHeader", CUSTOM_EXPRESSION)
        if origin not in (CUSTOM_EXPRESSION, HTTP_BASIC):
            raise PolicyConfigError(
                f"credentialsOriginHasHttpBasicAuthenticationHeader must be {CUSTOM_EXPRESSION!r} "
                f"or {HTTP_BASIC!r}",
                "credentialsOriginHasHttpBasicAuthenticationHeader",
            )
        basic = origin == HTTP_BASIC
        id_expression = secret_expression = None
        if not basic:
            id_expression = _compile(config, "clientIdExpression", DEFAULT_ID_EXPRESSION)
            if id_expression is None:
                raise PolicyConfigError(
                    "clientIdExpression must not be empty", "clientIdExpression"
                )
            secret_expression = _compile(
                config, "clientSecretExpression", DEFAULT_SECRET_EXPRESSION
            )
        need_secret = basic or secret_expression is not None

        entries: list[tuple[Any, str, str]] = []
        inline = config.get("credentials")
        if inline is not None:
            if not isinstance(inline, list):
                raise PolicyConfigError("credentials must be a list", "credentials")
            entries += [
                (item, f"credentials[{i}]", f"credentials.{i}") for i, item in enumerate(inline)
            ]
        path = config.get("credentialsFile")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise PolicyConfigError("credentialsFile must be a path", "credentialsFile")
            entries += [
                (item, f"{path}[{i}]", "credentialsFile") for i, item in enumerate(_read_file(path))
            ]
        if inline is None and path is None:
            raise PolicyConfigError(
                "credentials or credentialsFile is required (the registered client applications)"
            )
        clients: dict[str, Client] = {}
        for item, where, field in entries:
            client = _client(item, where, field, need_secret)
            if client.client_id in clients:
                raise PolicyConfigError(
                    f"{where}: clientId {client.client_id!r} is registered twice", field
                )
            clients[client.client_id] = client
        return ClientIdPolicy(clients, basic, id_expression, secret_expression)


KIND = register(ClientIdKind())
