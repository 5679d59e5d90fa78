"""`cors-flex`: answers CORS preflights at the gateway and adds CORS headers to actual cross-origin responses.

Flex behaviour relied on (docs `policies-included-cors.adoc`, reference §2.2, Mule's "No OPTIONS
request can reach the backend if CORS is configured", and MuleSoft's PDK `cors-validation`
example, "a simplified variation of the Flex CORS Included Policy" built on the same
`pdk-cors-lib`, with its `gcl.yaml` defaults):

- Config: `publicResource` (default true), `supportCredentials` (default false), `originGroups`
  (default []) of `{name, origins, accessControlMaxAge (default 30), allowedMethods (default: all
  of CONNECT DELETE GET OPTIONS PATCH POST PUT TRACE), headers, exposedHeaders}`;
  `allowedMethods` items are `{methodName, isAllowed}` (the PDK example spells it `allowed`; both
  are accepted). Origins may hold `*` wildcards (`https://*.example.com`, or `*` alone); when
  several groups match, a group matching the origin exactly wins over a wildcard match, else the
  first group in order.
- CORS always runs first (the compiler ranks `cors-flex` first) and is never ordered.
- Requests without `Origin` are untouched.
- A preflight is answered by the gateway with **200** and an empty body, and never forwarded. The
  answer carries the allow headers only when the preflight is allowed; a preflight from an origin
  no group matches, for a method the group does not allow, or asking for headers the group does
  not list, gets a bare 200 (the PDK example answers `Response::new(200)` on every check error).
- Public resource: `Access-Control-Allow-Origin: *` (the request's origin, plus
  `Access-Control-Allow-Credentials: true`, with `supportCredentials`); a preflight mirrors the
  requested method and headers (`Access-Control-Allow-Methods`, `Access-Control-Allow-Headers`).
  Origin groups are not consulted.
- Protected resource (`publicResource: false`): the matching group decides; allowed responses
  carry the origin in `Access-Control-Allow-Origin`, `Vary: Origin`, the credentials header when
  supported; a preflight also gets the requested method (the PDK test expects exactly the
  requested method back), the requested headers and `Access-Control-Max-Age`; an actual request
  gets `Access-Control-Expose-Headers` when the group lists any.
- The CORS headers replace any the upstream sent under the same names (the PDK example uses
  `set_header`), and are added to local answers of later policies too (a 401 a browser can read).

Deliberate choices where Flex is silent or where flexgw differs:
- Only OPTIONS requests that carry `Origin` are treated as preflights. An OPTIONS without
  `Origin` is not a CORS request and is forwarded (Mule/Flex stop every OPTIONS); an OPTIONS with
  `Origin` but no `Access-Control-Request-Method` is answered with a bare 200, as Flex's library
  reports a missing method as a check error.
- An actual request from a disallowed origin is forwarded without CORS headers (the browser then
  withholds the response). The PDK example instead answers such a request with an empty 200; the
  included policy documents no status code of its own, and answering 200 without calling the API
  would hide real errors, so flexgw forwards it.
- An actual request whose method is not a CORS-safelisted one (GET, HEAD, POST) must be allowed by
  the group to get CORS headers.
- A `*` in an origin matches any run of characters; nothing else is special. Origins are compared
  case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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

#: Flex's default `allowedMethods` (every one allowed).
DEFAULT_METHODS = ("CONNECT", "DELETE", "GET", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
DEFAULT_MAX_AGE = 30
#: Methods a browser sends cross-origin without a preflight (Fetch "CORS-safelisted method").
SAFELISTED_METHODS = frozenset({b"GET", b"HEAD", b"POST"})

ALLOW_ORIGIN = b"Access-Control-Allow-Origin"
ALLOW_CREDENTIALS = b"Access-Control-Allow-Credentials"
ALLOW_METHODS = b"Access-Control-Allow-Methods"
ALLOW_HEADERS = b"Access-Control-Allow-Headers"
EXPOSE_HEADERS = b"Access-Control-Expose-Headers"
MAX_AGE = b"Access-Control-Max-Age"
VARY = b"Vary"

#: Response headers this policy owns on actual requests (the upstream's are replaced).
_OWNED = frozenset({ALLOW_ORIGIN.lower(), ALLOW_CREDENTIALS.lower(), EXPOSE_HEADERS.lower()})
#: What a request header list element may be (RFC 9110 token).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: What the origin, method and header lists echoed into responses may contain.
_ECHO_SAFE = re.compile(rb"[\x21-\x7e]*\Z")

_BOOL: dict[str, Any] = {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false"]}]}
_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string"}, "default": []}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "publicResource": {**_BOOL, "default": True},
        "supportCredentials": {**_BOOL, "default": False},
        "originGroups": {
            "type": "array",
            "default": [],
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "origins": _STRINGS,
                    "accessControlMaxAge": {
                        "type": "number",
                        "minimum": 0,
                        "default": DEFAULT_MAX_AGE,
                    },
                    "allowedMethods": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "methodName": {"type": "string", "minLength": 1},
                                "isAllowed": _BOOL,
                                "allowed": _BOOL,
                            },
                            "required": ["methodName"],
                            "additionalProperties": False,
                        },
                    },
                    "headers": _STRINGS,
                    "exposedHeaders": _STRINGS,
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


def _flag(value: Any, default: bool) -> bool:
    """A config boolean (a real one, or "true"/"false" from $ENV substitution)."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


@attrs.frozen
class OriginGroup:
    """One compiled `originGroups` item."""

    name: str
    exact: frozenset[bytes]  # lower-cased origins without wildcards
    wildcard: re.Pattern[bytes] | None  # every wildcard origin as one anchored pattern
    methods: frozenset[bytes]
    headers: frozenset[bytes]  # lower-cased
    exposed: bytes  # comma-joined exposedHeaders, b"" when none
    max_age: bytes


def _build_group(index: int, item: dict[str, Any]) -> OriginGroup:
    """Compile one origin group, checking what a schema cannot."""
    where = f"originGroups.{index}"
    exact = set()
    patterns = []
    for position, origin in enumerate(item.get("origins") or []):
        text = origin.strip().lower().encode("utf-8")
        if not text or not _ECHO_SAFE.match(text):
            raise PolicyConfigError(f"invalid origin {origin!r}", f"{where}.origins.{position}")
        if b"*" in text:
            patterns.append(b".*".join(re.escape(part) for part in text.split(b"*")))
        else:
            exact.add(text)
    wildcard = re.compile(b"(?:" + b"|".join(patterns) + b")\\Z") if patterns else None

    raw_methods = item.get("allowedMethods")
    if raw_methods is None:
        methods = {m.encode("ascii") for m in DEFAULT_METHODS}
    else:
        methods = set()
        for position, method in enumerate(raw_methods):
            name = method["methodName"].strip().upper().encode("utf-8")
            if not _TOKEN.match(name):
                raise PolicyConfigError(
                    f"invalid method {method['methodName']!r}",
                    f"{where}.allowedMethods.{position}.methodName",
                )
            allowed = method.get("isAllowed", method.get("allowed"))
            if _flag(allowed, True):
                methods.add(name)

    def names(key: str) -> list[bytes]:
        result = []
        for position, header in enumerate(item.get(key) or []):
            encoded = header.strip().encode("utf-8")
            if not _TOKEN.match(encoded):
                raise PolicyConfigError(
                    f"invalid header name {header!r}", f"{where}.{key}.{position}"
                )
            result.append(encoded)
        return result

    headers = frozenset(h.lower() for h in names("headers"))
    exposed = b", ".join(names("exposedHeaders"))
    max_age = item.get("accessControlMaxAge", DEFAULT_MAX_AGE)
    return OriginGroup(
        name=str(item.get("name", "Default group")),
        exact=frozenset(exact),
        wildcard=wildcard,
        methods=frozenset(methods),
        headers=headers,
        exposed=exposed,
        max_age=b"%d" % int(max_age),
    )


def _requested_headers(ctx: PolicyContext) -> list[bytes] | None:
    """The lower-cased `Access-Control-Request-Headers` names; None if one is not a token."""
    requested: list[bytes] = []
    for name, value in ctx.head.headers:
        if name.lower() == b"access-control-request-headers":
            for part in value.split(b","):
                part = part.strip().lower()
                if not part:
                    continue
                if not _TOKEN.match(part):
                    return None
                requested.append(part)
    return requested


@implementer(IPolicy)
@attrs.frozen
class CorsPolicy:
    """Answers preflights locally and adds CORS headers to the responses of allowed requests."""

    public: bool
    credentials: bool
    groups: tuple[OriginGroup, ...]

    def _group(self, origin: bytes) -> OriginGroup | None:
        """The group allowing `origin`: an exact match first, else the first wildcard match."""
        lowered = origin.lower()
        for group in self.groups:
            if lowered in group.exact:
                return group
        for group in self.groups:
            if group.wildcard is not None and group.wildcard.match(lowered):
                return group
        return None

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """`Access-Control-Allow-Origin` (echoed, with `Vary`) and the credentials header."""
        if self.public and not self.credentials:
            return [(ALLOW_ORIGIN, b"*")]
        headers = [(ALLOW_ORIGIN, origin)]
        if self.credentials:
            headers.append((ALLOW_CREDENTIALS, b"true"))
        headers.append((VARY, b"Origin"))
        return headers

    def actual_headers(self, origin: bytes, method: bytes) -> list[tuple[bytes, bytes]] | None:
        """The CORS headers for an actual (non-preflight) request, None when it is not allowed."""
        if self.public:
            return self._origin_headers(origin)
        group = self._group(origin)
        if group is None:
            return None
        if method not in SAFELISTED_METHODS and method not in group.methods:
            return None
        headers = self._origin_headers(origin)
        if group.exposed:
            headers.append((EXPOSE_HEADERS, group.exposed))
        return headers

    def preflight(self, ctx: PolicyContext, origin: bytes) -> LocalResponse:
        """The gateway's answer to a preflight: 200, with allow headers only when allowed."""
        method = ctx.request_header(b"Access-Control-Request-Method")
        if method is not None:
            method = method.strip()
        requested = _requested_headers(ctx)
        if not method or not _TOKEN.match(method) or requested is None:
            return LocalResponse(200)
        if self.public:
            headers = self._origin_headers(origin)
            headers.append((ALLOW_METHODS, method))
            if requested:
                headers.append((ALLOW_HEADERS, b", ".join(requested)))
            return LocalResponse(200, tuple(headers))
        group = self._group(origin)
        if group is None or method not in group.methods:
            return LocalResponse(200)
        if any(name not in group.headers for name in requested):
            return LocalResponse(200)
        headers = self._origin_headers(origin)
        headers.append((ALLOW_METHODS, method))
        if requested:
            headers.append((ALLOW_HEADERS, b", ".join(requested)))
        headers.append((MAX_AGE, group.max_age))
        return LocalResponse(200, tuple(headers))

    def _origin(self, ctx: PolicyContext) -> bytes | None:
        """The request's `Origin`, None when absent or not something safe to echo."""
        origin = ctx.request_header(b"Origin")
        if origin is None:
            return None
        origin = origin.strip()
        if not origin or not _ECHO_SAFE.match(origin):
            return None
        return origin

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Answer a preflight; note the CORS headers an allowed actual request's response gets."""
        origin = self._origin(ctx)
        if origin is None:
            return None
        if ctx.head.method == b"OPTIONS":
            return self.preflight(ctx, origin)
        headers = self.actual_headers(origin, ctx.head.method)
        if headers:
            for name, value in headers:
                ctx.add_response_header(name, value)
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Drop the upstream's own CORS headers where this policy sets them."""
        response = ctx.response_headers
        if response is None:
            return
        origin = self._origin(ctx)
        if origin is None or self.actual_headers(origin, ctx.head.method) is None:
            return
        response[:] = [(k, v) for k, v in response if k.lower() not in _OWNED]


@implementer(IPolicyKind)
class CorsKind:
    """The `cors-flex` kind."""

    name = "cors-flex"
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> CorsPolicy:
        """Compile the origin groups (origins, wildcards, methods, headers) once."""
        groups: Sequence[dict[str, Any]] = config.get("originGroups") or []
        return CorsPolicy(
            public=_flag(config.get("publicResource"), True),
            credentials=_flag(config.get("supportCredentials"), False),
            groups=tuple(_build_group(index, item) for index, item in enumerate(groups)),
        )


register(CorsKind())
