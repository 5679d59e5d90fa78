"""`http-basic-authentication-flex`: one configured username and password, checked per request.

Flex behaviour reproduced (docs `policies-included-basic-auth-simple.adoc`, reference §2.2):
config `username` and `password`, both required and plain text (the docs' table says
"base-64 encoded", every example and field report uses plain text; `$ENV` references are
expanded by the loader). The client sends `Authorization: Basic base64(user:password)`
(RFC 7617). Any failure is a 401 with the headers and body observed on Flex:
`www-authenticate: Basic realm="mule-realm"`, `content-type: application/json; charset=UTF-8`,
`{"error":"Registered authentication is set to HTTP basic authentication but there was no
security context on the session."}` (compact JSON, as observed). On success the request goes on
with `authentication.principal` set to the username for later policies and expressions.

The `Authorization` header is forwarded upstream unchanged: nothing in Flex's docs says the
policy removes it, and Envoy-based Flex does not strip request headers unless a policy does
(bind `header-removal-flex` to drop it).

Deliberate differences from Flex:
- Malformed credentials (another scheme, bad base64, no colon, non-UTF-8 bytes, several
  `Authorization` headers) are the same 401, never a 500.
- Comparison is constant-time: both the username and the password are compared (SHA-256
  digests through `hmac.compare_digest`, so neither the position of the first difference nor
  the length is revealed) and the results combined without short-circuit, so the time does not
  tell which of the two was wrong.
- An empty `username` or `password` (typically an unset `$ENV` variable) and a username with a
  `:` (which RFC 7617 forbids, so it could never match) are config errors.

Cost per request: a header value that has passed the full check is remembered (its exact
bytes, at most `ACCEPTED_LIMIT` values per binding, forgotten all at once when full, and with
the policy object at a reload), so a client that keeps sending it costs one dict lookup
instead of a SHA-256 digest and a comparison. Only values that passed are kept: any other
value, however close, takes the full check. The lookup hashes the value (SipHash, the same
work for every value of a length) and compares bytes only on a full hash match, so its time
tells a client nothing about the configured credentials.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from base64 import b64decode, b64encode
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.registry import register

NAME = "http-basic-authentication-flex"

#: The 401 Flex sends (reference §2.2, observed): header names as Envoy writes them.
CHALLENGE = (b"www-authenticate", b'Basic realm="mule-realm"')
JSON_UTF8 = (b"content-type", b"application/json; charset=UTF-8")
UNAUTHORIZED_BODY = (
    b'{"error":"Registered authentication is set to HTTP basic authentication but there was no '
    b'security context on the session."}'
)
UNAUTHORIZED = LocalResponse(401, (CHALLENGE, JSON_UTF8), UNAUTHORIZED_BODY)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "minLength": 1},
        "password": {"type": "string", "minLength": 1},
    },
    "required": ["username", "password"],
    "additionalProperties": False,
}


def _only_authorization(ctx: PolicyContext, header: bytes = b"authorization") -> bytes | None:
    """The value of the request's only Authorization header (None: none, or several)."""
    found = None
    size = len(header)
    headers = ctx.changed_headers
    for name, value in ctx.head.headers if headers is None else headers:
        if len(name) == size and name.lower() == header:
            if found is not None:
                return None  # several Authorization headers: ambiguous, refuse
            found = value
    return found


def basic_credentials(ctx: PolicyContext) -> tuple[bytes, bytes] | None:
    """The (user-id, password) bytes of the request's only `Authorization: Basic` header, or None
    when there is none, several, another scheme, bad base64 or no colon."""
    found = _only_authorization(ctx)
    if found is None:
        return None
    return parse_basic(found)


def parse_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """Decode an RFC 7617 `Basic <token68>` credential into (user-id, password), or None."""
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"basic":
        return None
    token = parts[1].strip()
    if not token or len(token) > 16384:
        return None
    token += b"=" * (-len(token) % 4)  # tolerate missing padding
    try:
        decoded = b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


#: Most header values one binding remembers as accepted (see the module docstring).
ACCEPTED_LIMIT = 64


def _digest(value: bytes) -> bytes:
    """A fixed-length digest, so comparisons reveal nothing about lengths."""
    return hashlib.sha256(value).digest()


@implementer(IPolicy)
@attrs.frozen
class BasicAuthPolicy:
    """One binding: the expected username and the digests compared in constant time."""

    username: str
    user_digest: bytes = attrs.field(repr=False)
    password_digest: bytes = attrs.field(repr=False)
    canonical_digest: bytes = attrs.field(repr=False, default=b"")  # of b"Basic " + base64(u:p)

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Let the request on when its Basic credentials match; a 401 otherwise."""
        raw = _only_authorization(ctx)
        if raw not in self.accepted and not self.matches(raw):  # (a value seen before: no call)
            return UNAUTHORIZED
        ctx.authentication = self.authenticated_as
        return None

    #: Header values that passed `_check`, exactly as sent (see the module docstring).
    accepted: dict[bytes, None] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def matches(self, raw: bytes | None) -> bool:
        """True when `raw` (a credentials header value) carries the configured credentials."""
        if raw is None:
            return False
        accepted = self.accepted
        if raw in accepted:
            return True
        if not self._check(raw):
            return False
        if len(accepted) >= ACCEPTED_LIMIT:
            accepted.clear()
        accepted[bytes(raw)] = None
        return True

    def _check(self, raw: bytes) -> bool:
        """The full check of a credentials header value (constant-time comparisons)."""
        if hmac.compare_digest(_digest(raw), self.canonical_digest):
            # The usual spelling (`Basic <padded base64 of user:password>`): one comparison of
            # fixed-length digests (comparing the raw values would reveal the length).
            return True
        credentials = parse_basic(raw)
        if credentials is None:
            return False
        user, password = credentials
        # `&` on bools evaluates both comparisons: no early exit on a wrong username.
        return hmac.compare_digest(_digest(user), self.user_digest) & hmac.compare_digest(
            _digest(password), self.password_digest
        )

    def for_proxy(self) -> ProxyBasicAuthPolicy:
        """The form used on a forward-proxy ApiInstance (Proxy-Authorization, 407)."""
        return ProxyBasicAuthPolicy(self)

    #: Who a request that passes authenticated as: the same read-only record for every request.
    authenticated_as: Mapping[str, Any] = attrs.field(init=False, repr=False)

    @authenticated_as.default
    def _record(self) -> Mapping[str, Any]:
        return MappingProxyType(
            {
                "principal": self.username,
                "clientId": None,
                "clientName": None,
                "properties": MappingProxyType({}),
            }
        )

    def _authenticated(self, ctx: PolicyContext) -> None:
        """Record who the request authenticated as."""
        ctx.authentication = self.authenticated_as

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


#: The 407 a forward proxy sends (RFC 9110 §11.7.1 and §15.5.8).
PROXY_CHALLENGE = (b"Proxy-Authenticate", b'Basic realm="flexgw"')
PROXY_AUTH_REQUIRED = LocalResponse(
    407,
    (PROXY_CHALLENGE, JSON_UTF8),
    b'{"error":"Proxy authentication required"}',
)


@implementer(IPolicy)
@attrs.frozen
class ProxyBasicAuthPolicy:
    """The binding on a forward-proxy ApiInstance: the client authenticates to the proxy with
    `Proxy-Authorization` (never forwarded: it is hop-by-hop) and is challenged with a 407.
    The `Authorization` header belongs to the destination and is left alone."""

    basic: BasicAuthPolicy

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Let the request on when its Proxy-Authorization matches; a 407 otherwise."""
        if not self.basic.matches(_only_authorization(ctx, b"proxy-authorization")):
            return PROXY_AUTH_REQUIRED
        return self.basic._authenticated(ctx)

    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


@implementer(IPolicyKind)
class BasicAuthKind:
    """The `http-basic-authentication-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> BasicAuthPolicy:
        """Check the credentials and keep their digests."""
        username = config.get("username")
        password = config.get("password")
        for field, value in (("username", username), ("password", password)):
            if not isinstance(value, str) or not value:
                raise PolicyConfigError(f"{field} must be a non-empty string", field)
        assert isinstance(username, str) and isinstance(password, str)
        if ":" in username:
            raise PolicyConfigError(
                "username must not contain ':' (RFC 7617), it could never match", "username"
            )
        return BasicAuthPolicy(
            username=username,
            user_digest=_digest(username.encode("utf-8")),
            password_digest=_digest(password.encode("utf-8")),
            canonical_digest=_digest(b"Basic " + b64encode(f"{username}:{password}".encode())),
        )


KIND = register(BasicAuthKind())
