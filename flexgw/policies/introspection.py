"""`oauth2-token-introspection-flex`: RFC 7662 token introspection with treq, a bounded TTL cache and scope checks, as Flex Gateway.

Flex behaviour relied on:
- Keys and defaults: docs `policies-included-oauth-token-introspection` (Local Mode block:
  `introspectionURL`, `authorizationValue`, `validatedTokenTTL` 600 s, `authenticationTimeout`
  10000 ms, `skipClientIdValidation`, `consumerBy`, `exposeHeaders` false, `scopes`,
  `scopeValidationCriteria` AND, `maxCacheEntries`); the 1.4 docs spell the same keys in
  snake_case (`introspection_url`, ...), which are accepted too.
- Statuses and bodies: MuleSoft's PDK re-implementation of this policy
  (`pdk-custom-policy-examples/oauth-2-token-introspection`) and the `pdk-token-introspection-lib`
  error texts it shares: the token comes from `Authorization: Bearer <token>` or, when there is no
  Authorization header, the `access_token` query parameter; none: 400
  `{"error":"Access token was not provided"}`; an Authorization header that is not
  `Bearer <token>`: 400 `{"error":"Authorization header is invalid"}`; `active: false`: 401
  `{"error":"Token has been revoked."}`; `exp` in the past: 401 `{"error":"Token has expired."}`;
  scopes missing: 403 `{"error":"The required scopes are not authorized"}`; the server
  unreachable or too slow: 401 `{"error":"Unauthorized"}`; the server answering 400: 500 with its
  body as the error, 403: 403 likewise, another non-200: 401 likewise; a response that is not a
  JSON object with a boolean `active`: 500 `{"error":"Unexpected error processing Authentication
  Server response"}`. Every 401 carries `WWW-Authenticate: Bearer realm="OAuth2 Introspection
  Client Realm"`; bodies are `application/json; charset=UTF-8`.
- The introspection call: `POST introspectionURL` with `Authorization: <authorizationValue>` and
  the form body `token=<token>`.
- `exposeHeaders: true` sends every string/boolean/number field of the introspection response
  upstream as `x-agw-<field>` (spaces in the name become '-').
- Cache: an active token is kept `validatedTokenTTL` seconds, never past its `exp`, at most
  `maxCacheEntries` tokens (least recently used evicted first).

Deliberate differences from Flex:
- Tokens are cached by their SHA-256, so the cache never holds raw tokens; inactive tokens are
  not cached; concurrent requests with the same uncached token share one introspection call.
- With `exposeHeaders: true`, `x-agw-*` headers sent by the client are removed first, so the
  upstream can trust them.
- `skipClientIdValidation: false` cannot check API contracts in Local Mode: the introspection
  response must then name a `client_id`, else 403 `{"error":"Invalid client credentials"}`
  (message not documented by Flex).
- TLS for the call uses Twisted's default verification (system trust store), not yet
  `Configuration.defaultTLS.outboundPolicyCalls`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.http.tracecontext import side_call
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.registry import register
from flexgw.sidecalls.bounded import post_bounded

_log = Logger(namespace="flexgw.policies.introspection")

NAME = "oauth2-token-introspection-flex"

NOT_PROVIDED = "Access token was not provided"
BAD_HEADER = "Authorization header is invalid"
REVOKED = "Token has been revoked."
EXPIRED = "Token has expired."
SCOPES = "The required scopes are not authorized"
UNREACHABLE = "Unauthorized"
BAD_RESPONSE = "Unexpected error processing Authentication Server response"
NO_CLIENT = "Invalid client credentials"

CONTENT_TYPE = b"application/json; charset=UTF-8"
WWW_AUTHENTICATE = b'Bearer realm="OAuth2 Introspection Client Realm"'
EXPOSE_PREFIX = "x-agw-"
#: An introspection response larger than this is refused (they are a few hundred bytes).
MAX_RESPONSE_BYTES = 1 << 20
#: How much of an error body from the server is echoed in the error message.
MAX_ECHO = 4096

_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

#: camelCase key -> the snake_case spelling of the Flex 1.4 docs.
SPELLINGS = {
    "introspectionURL": "introspection_url",
    "authorizationValue": "authorization_value",
    "validatedTokenTTL": "validated_token_ttl",
    "authenticationTimeout": "authentication_timeout",
    "skipClientIdValidation": "skip_client_id_validation",
    "consumerBy": "consumer_by",
    "exposeHeaders": "expose_headers",
    "scopes": "scopes",
    "scopeValidationCriteria": "scope_validation_criteria",
    "maxCacheEntries": "max_cache_entries",
}

_TYPES: dict[str, dict[str, Any]] = {
    "introspectionURL": {"type": "string", "minLength": 1},
    "authorizationValue": {"type": "string"},
    "validatedTokenTTL": {"type": "number", "minimum": 0},
    "authenticationTimeout": {"type": "integer", "minimum": 1},
    "skipClientIdValidation": {"type": "boolean"},
    "consumerBy": {"enum": ["client_id", "username"]},
    "exposeHeaders": {"type": "boolean"},
    "scopes": {"type": "string"},
    "scopeValidationCriteria": {"enum": ["AND", "OR", "and", "or", "And", "Or"]},
    "maxCacheEntries": {"type": "integer", "minimum": 0},
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        **_TYPES,
        **{SPELLINGS[k]: v for k, v in _TYPES.items() if SPELLINGS[k] != k},
    },
    "additionalProperties": False,
}


def _json_error(status: int, message: str) -> LocalResponse:
    """Flex's JSON error answer (401s with the OAuth2 realm challenge)."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
    headers: tuple[tuple[bytes, bytes], ...] = ((b"Content-Type", CONTENT_TYPE),)
    if status == 401:
        headers = ((b"WWW-Authenticate", WWW_AUTHENTICATE), *headers)
    return LocalResponse(status, headers, body)


@attrs.frozen
class Settings:
    """The binding's config, normalised."""

    url: str
    authorization: str
    ttl: float
    timeout: float
    skip_client_id: bool
    consumer_by: str
    expose_headers: bool
    scopes: tuple[str, ...]
    require_all: bool
    max_entries: int


@attrs.frozen
class _Entry:
    """A cached introspection result: the response object and when the entry expires."""

    result: dict[str, Any]
    expires_at: float


class _Refused(Exception):
    """The introspection ended in a refusal: the LocalResponse to send."""

    def __init__(self, response: LocalResponse) -> None:
        super().__init__(response.status)
        self.response = response


def treq_introspector(reactor: Any, agent: Any = None) -> Any:
    """`call(url, authorization, token, timeout)` -> Deferred[(status, body bytes)], with treq."""

    def call(url: str, authorization: str, token: str, timeout: float,
             traceparent: bytes | None = None) -> Deferred[Any]:
        headers: dict[bytes | str, list[bytes | str]] = {
            b"Authorization": [authorization.encode("latin-1")],
            b"Accept": [b"application/json"],
        }
        if traceparent is not None:  # made for a traced request: the call is its child span
            headers[b"traceparent"] = [traceparent]
        return post_bounded(
            reactor, agent, url, {"token": token}, headers, timeout, MAX_RESPONSE_BYTES,
            lambda: ValueError("introspection response too large"),
        )

    return call


@implementer(IPolicy)
class IntrospectionPolicy(UsesRuntime):
    """One binding: the settings, plus the shared token cache."""

    def __init__(
        self,
        settings: Settings,
        clock: Any = None,
        reactor: Any = None,
        introspect: Any = None,
        agent: Any = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._reactor = reactor
        self._introspect = introspect
        self._agent = agent  # treq Agent with defaultTLS.outboundPolicyCalls, or None
        self.cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, list[Deferred[Any]]] = {}
        self.calls = 0  # introspection calls made (for tests and /status)

    # -- the request -----------------------------------------------------------------------------

    def on_request(self, ctx: PolicyContext) -> Any:
        """Check the token: from the cache synchronously, else after an introspection call."""
        token = _extract(ctx)
        if isinstance(token, LocalResponse):
            return token
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        entry = self.cache.get(key)
        if entry is not None:
            if self.clock.seconds() < entry.expires_at:
                self.cache.move_to_end(key)
                return self._accept(ctx, entry.result)
            del self.cache[key]
        return self._call(key, token, ctx.trace).addCallback(self._called, ctx)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""

    def _called(self, outcome: dict[str, Any] | LocalResponse, ctx: PolicyContext) -> Any:
        """The shared call's outcome, applied to one request."""
        if isinstance(outcome, LocalResponse):
            return outcome
        return self._accept(ctx, outcome)

    def _call(self, key: bytes, token: str, trace: Any = None) -> Deferred[Any]:
        """A Deferred for this token's introspection outcome (an active result or a refusal),
        sharing a call already in flight for the same token. A call made for a traced request
        (`trace`) sends a `traceparent` and is recorded as a child span of it."""
        waiter: Deferred[Any] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        self.calls += 1
        s = self.settings
        introspect = self._introspect or treq_introspector(self._runtime_reactor(), self._agent)
        try:
            d = side_call(
                trace, "introspection",
                lambda parent: introspect(s.url, s.authorization, token, s.timeout, traceparent=parent),
                "introspection_unreachable", (("url.full", s.url),),
            )
        except Exception:  # noqa: BLE001 (a call that cannot start is an unreachable server)
            d = Deferred()
            d.errback(Failure())
        d.addCallbacks(self._answered, self._unreachable, callbackArgs=(key,))
        d.addBoth(self._release, key)
        return waiter

    def _release(self, outcome: Any, key: bytes) -> None:
        """Give the outcome to every request waiting for this token."""
        for waiter in self._inflight.pop(key, []):
            waiter.callback(outcome)

    def _unreachable(self, failure: Failure) -> LocalResponse:
        """The call failed (connection, timeout, TLS): 401 Unauthorized."""
        if failure.check(TimeoutError, CancelledError):
            _log.warn("Introspection at {url} timed out", url=self.settings.url)
        else:
            _log.warn(
                "Introspection at {url} failed: {error}",
                url=self.settings.url,
                error=failure.getErrorMessage(),
            )
        return _json_error(401, UNREACHABLE)

    def _answered(self, answer: tuple[int, bytes], key: bytes) -> dict[str, Any] | LocalResponse:
        """Interpret the server's answer; cache an active token."""
        status, body = answer
        if len(body) > MAX_RESPONSE_BYTES:
            return _json_error(500, BAD_RESPONSE)
        if status != 200:
            text = body[:MAX_ECHO].decode("utf-8", "replace")
            _log.warn("Introspection answered {status}: {body}", status=status, body=text)
            if status == 400:
                return _json_error(500, text)
            if status == 403:
                return _json_error(403, text)
            return _json_error(401, text)
        try:
            result = json.loads(body)
        except ValueError:
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("active"), bool):
            return _json_error(500, BAD_RESPONSE)
        if not result["active"]:
            return _json_error(401, REVOKED)
        now = self.clock.seconds()
        expires_at = now + self.settings.ttl
        exp: Any = result.get("exp")
        if _is_number(exp):
            expires_at = min(expires_at, float(exp))
        if self.settings.max_entries > 0 and expires_at > now:
            self.cache[key] = _Entry(result, expires_at)
            self.cache.move_to_end(key)
            while len(self.cache) > self.settings.max_entries:
                self.cache.popitem(last=False)
        return result

    def _accept(self, ctx: PolicyContext, result: dict[str, Any]) -> LocalResponse | None:
        """Validate an active result for this request (exp, scopes, client) and expose it."""
        s = self.settings
        exp = result.get("exp")
        if _is_number(exp) and self.clock.seconds() >= exp:
            return _json_error(401, EXPIRED)
        if s.scopes:
            granted = result.get("scope")
            have = set(granted.split()) if isinstance(granted, str) else set()
            ok = (
                all(scope in have for scope in s.scopes)
                if s.require_all
                else any(scope in have for scope in s.scopes)
            )
            if not ok:
                return _json_error(403, SCOPES)
        client_id = result.get("client_id")
        if not s.skip_client_id and not (isinstance(client_id, str) and client_id):
            return _json_error(403, NO_CLIENT)
        principal = result.get(s.consumer_by)
        client_name = result.get("client_name")
        ctx.authentication = {
            "principal": principal if isinstance(principal, str) else None,
            "clientId": client_id if isinstance(client_id, str) else None,
            "clientName": client_name if isinstance(client_name, str) else None,
            "properties": result,
        }
        if s.expose_headers:
            _expose(ctx, result)
        return None


def _extract(ctx: PolicyContext) -> str | LocalResponse:
    """The access token from `Authorization: Bearer` or the `access_token` query parameter."""
    header = ctx.request_header(b"authorization")
    if header is not None and header.strip():
        parts = header.split()
        if len(parts) == 2 and parts[0].lower() == b"bearer":
            return parts[1].decode("latin-1")
        return _json_error(400, BAD_HEADER)
    query = ctx.head.query
    if query:
        text = query.decode("latin-1")
        text = text.removeprefix("?")
        for name, value in parse_qsl(text, keep_blank_values=True):
            if name == "access_token":
                if value.strip():
                    return value
                break
    return _json_error(400, NOT_PROVIDED)


def _expose(ctx: PolicyContext, result: dict[str, Any]) -> None:
    """Send the result's scalar fields upstream as `x-agw-*`, replacing any the client sent."""
    prefix = EXPOSE_PREFIX.encode("ascii")
    headers = ctx.request_headers
    headers[:] = [(k, v) for k, v in headers if not k.lower().startswith(prefix)]
    for field, value in result.items():
        name = EXPOSE_PREFIX + str(field).replace(" ", "-")
        if not _TOKEN_CHARS.match(name):
            continue
        if isinstance(value, str):
            text = value
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif _is_number(value):
            text = _number(value)
        else:
            continue
        if "\r" in text or "\n" in text or "\0" in text:
            continue
        ctx.set_request_header(name.encode("ascii"), text.encode("utf-8"))


def _number(value: float) -> str:
    """A JSON number as Flex writes it in a header (integral values without a fraction)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def _is_number(value: Any) -> bool:
    """A JSON number (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def settings_from(config: dict[str, Any]) -> Settings:
    """The normalised settings, with either spelling of each key; config errors name the field."""

    def get(key: str, default: Any = None) -> Any:
        if key in config:
            if SPELLINGS[key] != key and SPELLINGS[key] in config:
                raise PolicyConfigError(
                    f"{key} and {SPELLINGS[key]} are the same setting: give one", SPELLINGS[key]
                )
            return config[key]
        return config.get(SPELLINGS[key], default)

    url = get("introspectionURL")
    if url is None:
        raise PolicyConfigError("introspectionURL is required", "introspectionURL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PolicyConfigError(f"not an http(s) URL: {url!r}", "introspectionURL")
    authorization = get("authorizationValue")
    if authorization is None:
        raise PolicyConfigError("authorizationValue is required", "authorizationValue")
    if any(c in authorization for c in "\r\n\0"):
        raise PolicyConfigError("authorizationValue cannot hold line breaks", "authorizationValue")
    try:
        authorization.encode("latin-1")
    except UnicodeEncodeError:
        raise PolicyConfigError(
            "authorizationValue must be Latin-1 text (a header value)", "authorizationValue"
        ) from None
    criteria = str(get("scopeValidationCriteria", "AND")).upper()
    return Settings(
        url=url,
        authorization=authorization,
        ttl=float(get("validatedTokenTTL", 600)),
        timeout=get("authenticationTimeout", 10000) / 1000.0,
        skip_client_id=get("skipClientIdValidation", True),
        consumer_by=get("consumerBy", "client_id"),
        expose_headers=get("exposeHeaders", False),
        scopes=tuple(get("scopes", "").split()),
        require_all=criteria == "AND",
        max_entries=get("maxCacheEntries", 1000),
    )


@implementer(IPolicyKind)
class IntrospectionKind:
    """The `oauth2-token-introspection-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> IntrospectionPolicy:
        """Check the config; the reactor is only needed at the first introspection."""
        return IntrospectionPolicy(
            settings_from(config),
            context.clock,
            context.reactor,
            agent=context.services.side_agent,
        )


KIND = register(IntrospectionKind())
