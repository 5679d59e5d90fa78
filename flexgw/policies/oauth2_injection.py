"""`credential-injection-oauth2-flex`: an OAuth 2.0 access token, fetched from a token endpoint and cached, added to every upstream request (bound to a Service).

Flex behaviour reproduced (docs `policies-outbound-oauth.adoc`, reference §2.2):
- `oauthService` (the token URL, required), `grantType: clientCredentials | password`
  (default clientCredentials), `clientId` / `clientSecret` (required for client credentials),
  `username` / `password` (for the password grant), `scope` (a list, sent space-separated),
  `credentialLocation: header | body` (default header: HTTP Basic with the url-encoded id and
  secret, RFC 6749 §2.3.1; body: `client_id` / `client_secret` form fields),
  `tokenRequestBodyFormat: urlEncoded | json` (default urlEncoded), `customRequestHeaders`
  (`[{name, value}]`, added to the token request), `tokenFetchTimeout` (seconds, default 10).
- The token goes to the upstream in `upstreamTokenHeaderName` (default `Authorization`) as
  `upstreamTokenPrefixName` (default `Bearer`) + space + token (no prefix: the bare token).
- `overwrite` (default true): the client's own value of that header is removed and replaced;
  with false, a request that already carries the header keeps it and no token is fetched.
- Caching: `cachingTtl: 0` (the default) keeps a token for its `expires_in`; otherwise for
  `min(cachingTtl, expires_in / 2)`. Concurrent requests share one fetch; an expired token is
  fetched again by the next request. The cached token survives reloads that leave the
  binding's token request unchanged (per process: each `--workers` worker fetches its own).
- `allowRequestWithoutCredential` (default false): when no token can be had, the request
  goes on without one instead of failing.

What Flex does not document, and flexgw does:
- No token (endpoint unreachable, timeout, a non-2xx answer, no `access_token`): **502** JSON
  with `x-flexgw-error: oauth_token_failure` (never the endpoint's body), and a warning in
  the log naming the endpoint and status, never a credential. For 1 second after a failure
  further requests fail at once instead of hammering the endpoint.
- A token answer without `expires_in` is kept for `cachingTtl` seconds, or 60 if that is 0.
  Tokens are refreshed 5 seconds (or a tenth of their life, if less) before they expire.
- With `overwrite: true` and `allowRequestWithoutCredential: true`, a request that gets no
  token still loses the client's own value of the header (it is never sent upstream).
- Custom body parameters (Flex 1.14, e.g. `audience`) are not supported yet.
"""

from __future__ import annotations

import json
from base64 import b64encode
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
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
from flexgw.policies.credential_injection import checked_header
from flexgw.policies.headers import header_name_problem, header_value_problem
from flexgw.policies.registry import register
from flexgw.sidecalls.bounded import post_bounded

NAME = "credential-injection-oauth2-flex"
_log = Logger(namespace="flexgw.policies")

#: The most of a token endpoint's answer that is read.
MAX_RESPONSE_BYTES = 64 * 1024
#: How long a failed fetch makes later requests fail at once.
FAILURE_HOLD_SECONDS = 1.0
#: Lifetime assumed for a token answered without `expires_in` (and no cachingTtl).
DEFAULT_TOKEN_SECONDS = 60.0
#: Refresh this long before expiry (at most a tenth of the token's life).
REFRESH_SKEW_SECONDS = 5.0

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "oauthService": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"},
        "grantType": {"enum": ["clientCredentials", "password"], "default": "clientCredentials"},
        "credentialLocation": {"enum": ["header", "body"], "default": "header"},
        "clientId": {"type": "string", "minLength": 1},
        "clientSecret": {"type": "string", "minLength": 1},
        "username": {"type": "string", "minLength": 1},
        "password": {"type": "string"},
        "scope": {
            "oneOf": [
                {"type": "array", "items": {"type": "string", "minLength": 1}},
                {"type": "string"},
            ]
        },
        "overwrite": {"type": "boolean", "default": True},
        "tokenFetchTimeout": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        "allowRequestWithoutCredential": {"type": "boolean", "default": False},
        "tokenRequestBodyFormat": {"enum": ["urlEncoded", "json"], "default": "urlEncoded"},
        "upstreamTokenHeaderName": {"type": "string", "minLength": 1},
        "upstreamTokenPrefixName": {"type": "string"},
        "cachingTtl": {"type": "number", "minimum": 0, "default": 0},
        "customRequestHeaders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1}, "value": {"type": "string"}},
                "required": ["name", "value"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["oauthService"],
    "allOf": [
        {
            "if": {
                "properties": {"grantType": {"const": "password"}},
                "required": ["grantType"],
            },
            "then": {"required": ["username", "password"]},
            "else": {"required": ["clientId", "clientSecret"]},
        }
    ],
    "additionalProperties": False,
}

FAILURE = LocalResponse.gateway_error(
    502, "oauth_token_failure", "Could not obtain an access token for the upstream service"
)


class TokenError(Exception):
    """The token endpoint gave no usable token (the message names no credential)."""


def treq_token_fetcher(reactor: Any, agent: Any = None) -> Any:
    """`fetch(url, headers, body, timeout)` -> Deferred[(status, body bytes)], with treq."""

    def fetch(url: str, headers: dict[bytes, list[bytes]], body: bytes, timeout: float) -> Any:
        """POST the token request; fires with (status, body)."""
        return post_bounded(
            reactor, agent, url, body, Headers(headers), timeout, MAX_RESPONSE_BYTES,
            lambda: TokenError("token response too large"),
        )

    return fetch


class TokenState:
    """The cached token of one binding, kept across reloads while its token request is the
    same (a reload does not cost a token fetch)."""

    __slots__ = ("failed_until", "fetches", "fingerprint", "inflight", "refresh_at", "value", "waiters")

    def __init__(self, fingerprint: Any = None) -> None:
        self.fingerprint = fingerprint
        self.value: bytes | None = None  # the header value to inject
        self.refresh_at = 0.0
        self.failed_until = 0.0
        self.inflight: Deferred[bytes | None] | None = None
        self.waiters: list[Deferred[Any]] = []
        self.fetches = 0


@implementer(IPolicy)
class OAuth2InjectionPolicy(UsesRuntime):
    """One binding: the token request, and the cached token shared by every request."""

    def __init__(
        self,
        url: str,
        request_headers: dict[bytes, list[bytes]],
        request_body: bytes,
        header: bytes,
        prefix: bytes,
        overwrite: bool,
        allow_without: bool,
        caching_ttl: float,
        timeout: float,
        clock: Any = None,
        reactor: Any = None,
        fetch: Any = None,
        agent: Any = None,
        state: TokenState | None = None,
    ) -> None:
        self.url = url
        self._agent = agent  # the runtime's side-call Agent (forward proxy, TLS), or None
        self._request_headers = request_headers
        self._request_body = request_body
        self.header = header
        self.prefix = prefix
        self.overwrite = overwrite
        self.allow_without = allow_without
        self.caching_ttl = caching_ttl
        self.timeout = timeout
        self._clock = clock
        self._reactor = reactor
        self._fetch = fetch
        self.state = state if state is not None else TokenState()

    def __repr__(self) -> str:
        return f"<OAuth2InjectionPolicy {urlsplit(self.url).netloc}>"

    @property
    def fetches(self) -> int:
        """Token requests made (for tests)."""
        return self.state.fetches

    def on_request(self, ctx: PolicyContext) -> Any:
        """Inject the cached token at once, or wait for the (shared) fetch of a new one."""
        if not self.overwrite and ctx.request_header(self.header) is not None:
            return None  # the client's own credential is kept; no token needed
        value = self.state.value
        now = self.clock.seconds()
        if value is not None and now < self.state.refresh_at:
            ctx.set_request_header(self.header, value)
            return None
        if now < self.state.failed_until:
            return self._without(ctx)
        waiter: Deferred[Any] = Deferred(lambda d: self._forget(d))
        self.state.waiters.append(waiter)
        if self.state.inflight is None:
            self._start_fetch(ctx.trace)
        return waiter.addCallback(self._got, ctx)

    def _forget(self, waiter: Deferred[Any]) -> None:
        """A waiting request was cancelled (its client went away)."""
        if waiter in self.state.waiters:
            self.state.waiters.remove(waiter)

    def _got(self, value: bytes | None, ctx: PolicyContext) -> LocalResponse | None:
        if value is None:
            return self._without(ctx)
        ctx.set_request_header(self.header, value)
        return None

    def _without(self, ctx: PolicyContext) -> LocalResponse | None:
        """No token: go on without (the client's value removed when overwriting), or 502."""
        if not self.allow_without:
            return FAILURE
        if self.overwrite:
            ctx.remove_request_header(self.header)
        return None

    def _start_fetch(self, trace: Any = None) -> None:
        """Ask the token endpoint (a child span of `trace`, the request that made the fetch
        start, when it is traced: the request carries its `traceparent`)."""
        fetch = self._fetch or treq_token_fetcher(self._runtime_reactor(), self._agent)
        self.state.fetches += 1

        def start(traceparent: bytes | None) -> Deferred[Any]:
            headers = self._request_headers
            if traceparent is not None:
                headers = {**headers, b"traceparent": [traceparent]}
            return fetch(self.url, headers, self._request_body, self.timeout)  # type: ignore[no-any-return]

        try:
            d = side_call(trace, "oauth token", start, "token_unreachable", (("url.full", _safe_url(self.url)),))
        except Exception:  # noqa: BLE001 (a bad URL at request time: fail the requests)
            d = Deferred()
            d.errback(Failure())
        self.state.inflight = d
        d.addCallback(self._answered)
        d.addErrback(self._unreachable)
        d.addCallback(self._deliver)

    def _answered(self, answer: tuple[int, bytes]) -> bytes | None:
        status, body = answer
        if not 200 <= status < 300:
            raise TokenError(f"the token endpoint answered {status}")
        try:
            data = json.loads(body)
        except ValueError:
            raise TokenError("the token endpoint's answer is not JSON") from None
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenError("the token endpoint's answer has no access_token")
        value = (self.prefix + b" " if self.prefix else b"") + token.encode("utf-8")
        if header_value_problem(value) is not None:
            raise TokenError("the access token contains characters a header cannot carry")
        self.state.value = value
        self.state.refresh_at = self.clock.seconds() + self._lifetime(data.get("expires_in"))
        self.state.failed_until = 0.0
        return value

    def _lifetime(self, expires_in: Any) -> float:
        """How long to use the token (cachingTtl and expires_in as Flex), minus the skew."""
        known = isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool)
        if known and expires_in > 0:
            life = float(expires_in)
            if self.caching_ttl:
                life = min(self.caching_ttl, life / 2)
        else:
            life = self.caching_ttl or DEFAULT_TOKEN_SECONDS
        return life - min(REFRESH_SKEW_SECONDS, life / 10)

    def _unreachable(self, failure: Failure) -> None:
        reason = failure.value if failure.check(TokenError) else type(failure.value).__name__
        _log.warn(
            "credential-injection-oauth2-flex: no token from {endpoint}: {reason}",
            endpoint=_safe_url(self.url),
            reason=str(reason),
        )
        self.state.value = None
        self.state.failed_until = self.clock.seconds() + FAILURE_HOLD_SECONDS

    def _deliver(self, value: bytes | None) -> None:
        self.state.inflight = None
        waiters, self.state.waiters = self.state.waiters, []
        for waiter in waiters:
            waiter.callback(value)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""


def _safe_url(url: str) -> str:
    """The URL without userinfo or query (either may carry a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@implementer(IPolicyKind)
class OAuth2InjectionKind:
    """The `credential-injection-oauth2-flex` kind."""

    name = NAME
    schema = SCHEMA
    phase = "outbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> OAuth2InjectionPolicy:
        """Precompute the token request; the token itself is fetched on first use."""
        url = str(config["oauthService"])
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise PolicyConfigError("oauthService must be an http(s) URL with a host", "oauthService")
        grant = config.get("grantType", "clientCredentials")
        form: dict[str, str] = {}
        headers: dict[bytes, list[bytes]] = {b"Accept": [b"application/json"]}
        client_id, client_secret = config.get("clientId"), config.get("clientSecret")
        if grant == "password":
            form["grant_type"] = "password"
            form["username"] = str(config["username"])
            form["password"] = str(config.get("password", ""))
        else:
            form["grant_type"] = "client_credentials"
        scope = config.get("scope")
        if scope:
            form["scope"] = " ".join(scope) if isinstance(scope, list) else str(scope)
        if client_id is not None:
            if config.get("credentialLocation", "header") == "body":
                form["client_id"] = str(client_id)
                form["client_secret"] = str(client_secret or "")
            else:
                pair = f"{quote(str(client_id), safe='')}:{quote(str(client_secret or ''), safe='')}"
                headers[b"Authorization"] = [b"Basic " + b64encode(pair.encode())]
        for n, item in enumerate(config.get("customRequestHeaders") or ()):
            name = str(item["name"]).encode("latin-1", "replace")
            value = str(item["value"]).encode("utf-8")
            problem = header_name_problem(name) or header_value_problem(value)
            if problem is not None:
                raise PolicyConfigError(problem, f"customRequestHeaders.{n}")
            headers.setdefault(name, []).append(value)
        if config.get("tokenRequestBodyFormat", "urlEncoded") == "json":
            body = json.dumps(form).encode()
            headers[b"Content-Type"] = [b"application/json"]
        else:
            body = urlencode(form).encode()
            headers[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
        prefix = str(config.get("upstreamTokenPrefixName", "Bearer")).strip()
        if prefix and header_value_problem(prefix.encode()) is not None:
            raise PolicyConfigError("must not contain control characters", "upstreamTokenPrefixName")
        header = checked_header(config, "upstreamTokenHeaderName", b"Authorization")
        state = None
        shared = context.services.shared
        if shared is not None:
            fingerprint = (url, body, sorted(headers.items()), prefix, header)
            key = f"{NAME}:{context.binding}"
            state = shared.get(key)
            if not isinstance(state, TokenState) or state.fingerprint != fingerprint:
                state = shared[key] = TokenState(fingerprint)
        return OAuth2InjectionPolicy(
            url=url,
            request_headers=headers,
            request_body=body,
            header=header,
            prefix=prefix.encode("utf-8"),
            overwrite=bool(config.get("overwrite", True)),
            allow_without=bool(config.get("allowRequestWithoutCredential", False)),
            caching_ttl=float(config.get("cachingTtl", 0)),
            timeout=float(config.get("tokenFetchTimeout", 10)),
            clock=context.clock,
            reactor=context.reactor,
            fetch=context.services.token_fetcher,
            agent=context.services.side_agent,
            state=state,
        )


KIND = register(OAuth2InjectionKind())
