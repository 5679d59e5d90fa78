"""`openidconnect-access-token-enforcement-flex`: bearer tokens checked against an OpenID
provider found by OpenID Connect Discovery: RFC 7662 introspection or the provider's JWKS.

Flex behaviour reproduced (docs `policies-included-openid-token-enforcement`, reference §2.2):
keys `authenticationTimeout` (10000 ms), `scopes` ("" , space separated),
`scopeValidationCriteria` (AND | OR), `exposeHeaders` (false: true sends the token's
properties upstream as `X-AGW-*`), `skipClientIdValidation` (true), `secureTrustStore`
(false), `maxFederationExpirationTime` (-1), `maxCacheSize` (1000). Statuses as Flex's: 400
invalid or missing token, 401 rejected token or the provider unreachable, 403 scopes (or client)
not authorized, 500 a bad answer from the provider. Bodies, headers and the introspection
itself are those of `oauth2-token-introspection-flex` (`flexgw/policies/introspection.py`,
reused: the same family of Flex policies on the same token library), whose cache of validated
tokens is bounded by `maxCacheSize`.

In Flex the provider comes from Anypoint's client-provider configuration, which Local Mode lacks
(the 1.13+ docs say the policy is not supported there). flexgw's own keys name it:
- `issuer` (required): the provider; `{issuer}/.well-known/openid-configuration` is fetched
  (OpenID Connect Discovery 1.0 §4; its `issuer` must equal this value) at the first request,
  and again `discoveryTTL` seconds later (default 3600).
- `clientId` / `clientSecret`: the gateway's client credentials at the provider, for
  introspection (HTTP Basic, RFC 7662 §2.1).
- `validation`: `auto` (default: introspection when the provider lists an
  `introspection_endpoint` and `clientId` is set, else its `jwks_uri`), `introspection`, `jwks`.

With JWKS validation the token must be a JWS signed by a key of the provider's set (RS*, PS*,
ES* algorithms, not HS* nor none), with `iss` equal to the issuer, an `exp` in the future and
an `nbf` in the past (60 s leeway); its claims are what introspection would answer (`scope`,
or `scp` as a list; `client_id` or `azp`), so scopes, client-id checks and `exposeHeaders` work
the same. Deliberate differences: `maxFederationExpirationTime` > 0 bounds how long an
introspected token stays cached (else 600 s, `oauth2-token-introspection-flex`'s default);
`secureTrustStore` is accepted and has no effect (TLS for the calls is
`Configuration.spec.defaultTLS.outboundPolicyCalls`, else the system trust store); a token that
is not a valid JWS in JWKS mode is a 401 `{"error":"Invalid token"}`.
"""

from __future__ import annotations

import json
from base64 import b64encode
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.introspection import (
    BAD_RESPONSE,
    EXPIRED,
    UNREACHABLE,
    IntrospectionPolicy,
    _extract,
    _json_error,
)
from flexgw.policies.introspection import Settings as IntrospectionSettings
from flexgw.policies.registry import register

_log = Logger(namespace="flexgw.policies.oidc")

NAME = "openidconnect-access-token-enforcement-flex"
INVALID_TOKEN = "Invalid token"
#: Signature algorithms accepted from a provider's JWKS (asymmetric only).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY = 60.0
#: A failed discovery is tried again at most this often (requests meanwhile get the 401).
DISCOVERY_RETRY = 5.0

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "authenticationTimeout": {"type": "integer", "minimum": 1, "default": 10000},
        "scopes": {"type": "string", "default": ""},
        "secureTrustStore": {"type": "boolean", "default": False},
        "scopeValidationCriteria": {"enum": ["AND", "OR", "and", "or"], "default": "AND"},
        "exposeHeaders": {"type": "boolean", "default": False},
        "skipClientIdValidation": {"type": "boolean", "default": True},
        "maxFederationExpirationTime": {"type": "integer", "minimum": -1, "default": -1},
        "maxCacheSize": {"type": "integer", "minimum": 0, "default": 1000},
        # flexgw's keys (Flex takes the provider from Anypoint)
        "issuer": {"type": "string", "pattern": "^https?://"},
        "clientId": {"type": "string", "minLength": 1},
        "clientSecret": {"type": "string"},
        "validation": {"enum": ["auto", "introspection", "jwks"], "default": "auto"},
        "discoveryTTL": {"type": "integer", "minimum": 1, "default": 3600},
    },
    "required": ["issuer"],
    "additionalProperties": False,
}


@attrs.frozen
class Settings:
    """The binding's config, normalised."""

    issuer: str
    client_id: str | None
    client_secret: str = attrs.field(repr=False)
    validation: str
    timeout: float
    scopes: tuple[str, ...]
    require_all: bool
    expose_headers: bool
    skip_client_id: bool
    ttl: float
    max_entries: int
    discovery_ttl: float


def settings_from(config: dict[str, Any]) -> Settings:
    """Check the config; errors name the field."""
    issuer = config.get("issuer")
    if not isinstance(issuer, str) or urlsplit(issuer).scheme not in ("http", "https") or not (
        urlsplit(issuer).hostname
    ):
        raise PolicyConfigError("issuer must be the provider's http(s) URL", "issuer")
    validation = config.get("validation", "auto")
    client_id = config.get("clientId")
    if validation == "introspection" and not client_id:
        raise PolicyConfigError("introspection needs clientId (and clientSecret)", "clientId")
    federation = config.get("maxFederationExpirationTime", -1)
    return Settings(
        issuer=issuer.rstrip("/"),
        client_id=client_id,
        client_secret=config.get("clientSecret", ""),
        validation=validation,
        timeout=config.get("authenticationTimeout", 10000) / 1000.0,
        scopes=tuple(config.get("scopes", "").split()),
        require_all=str(config.get("scopeValidationCriteria", "AND")).upper() == "AND",
        expose_headers=bool(config.get("exposeHeaders", False)),
        skip_client_id=bool(config.get("skipClientIdValidation", True)),
        ttl=float(federation) if federation > 0 else 600.0,
        max_entries=config.get("maxCacheSize", 1000),
        discovery_ttl=float(config.get("discoveryTTL", 3600)),
    )


class _BadProvider(Exception):
    """The provider's discovery document is unusable."""


@implementer(IPolicy)
class OidcPolicy(UsesRuntime):
    """One binding: the settings; the provider's metadata and the validator built from it."""

    def __init__(
        self, settings: Settings, clock: Any = None, reactor: Any = None, agent: Any = None,
        fetch: Any = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._reactor = reactor
        self._agent = agent
        self._fetch = fetch
        self.validator: Any = None  # an IntrospectionPolicy or a _JwksValidator
        self.discovered_at = float("-inf")
        self.failed_at = float("-inf")
        self._discovering: list[Deferred[Any]] | None = None
        self.discoveries = 0

    def fetcher(self) -> Any:
        """GET a JSON document (bounded in time and size): jwks.treq_fetcher's."""
        if self._fetch is None:
            from flexgw.policies.jwks import treq_fetcher

            self._fetch = treq_fetcher(self._runtime_reactor(), self._agent)
        return self._fetch

    # -- the request -----------------------------------------------------------------------------

    def on_request(self, ctx: PolicyContext) -> Any:
        """Validate with the current validator; discover the provider first when needed."""
        token = _extract(ctx)
        if isinstance(token, LocalResponse):
            return token
        now = self.clock.seconds()
        validator = self.validator
        if validator is not None and now - self.discovered_at < self.settings.discovery_ttl:
            return validator.on_request(ctx)
        if validator is not None and self._discovering is None:
            self._discover()  # refresh in the background; the current validator serves
            return validator.on_request(ctx)
        return self._discovered().addCallback(self._after_discovery, ctx)

    def _after_discovery(self, outcome: Any, ctx: PolicyContext) -> Any:
        if isinstance(outcome, LocalResponse):
            return outcome
        return self.validator.on_request(ctx)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""

    # -- discovery -------------------------------------------------------------------------------

    def _discovered(self) -> Deferred[Any]:
        """Fires with None once a validator exists, or with the LocalResponse to answer."""
        if self._discovering is None:
            if self.clock.seconds() - self.failed_at < DISCOVERY_RETRY:
                return succeed(_json_error(401, UNREACHABLE))
            self._discover()
        if self._discovering is None:  # finished synchronously
            return succeed(None if self.validator is not None else _json_error(401, UNREACHABLE))
        waiter: Deferred[Any] = Deferred()
        self._discovering.append(waiter)
        return waiter

    def _discover(self) -> None:
        self._discovering = []
        self.discoveries += 1
        url = self.settings.issuer + "/.well-known/openid-configuration"
        try:
            d = self.fetcher()(url, self.settings.timeout)
        except Exception:  # noqa: BLE001
            d = Deferred()
            d.errback(Failure())
        d.addCallback(self._use_metadata).addErrback(self._discovery_failed)
        d.addCallback(self._discovery_done)

    def _use_metadata(self, body: bytes) -> None:
        """Check the discovery document; build the validator it calls for."""
        try:
            document = json.loads(body)
        except ValueError:
            raise _BadProvider("the discovery document is not JSON") from None
        if not isinstance(document, dict):
            raise _BadProvider("the discovery document is not a JSON object")
        s = self.settings
        if str(document.get("issuer", "")).rstrip("/") != s.issuer:
            raise _BadProvider(f"the discovery document names issuer {document.get('issuer')!r}")
        introspection = document.get("introspection_endpoint")
        jwks_uri = document.get("jwks_uri")
        mode = s.validation
        if mode == "auto":
            mode = "introspection" if isinstance(introspection, str) and s.client_id else "jwks"
        if mode == "introspection":
            if not _http_url(introspection):
                raise _BadProvider("the provider lists no introspection_endpoint")
            credentials = f"{s.client_id}:{s.client_secret}".encode()
            self.validator = IntrospectionPolicy(
                IntrospectionSettings(
                    url=introspection, authorization="Basic " + b64encode(credentials).decode(),
                    ttl=s.ttl, timeout=s.timeout, skip_client_id=s.skip_client_id,
                    consumer_by="client_id", expose_headers=s.expose_headers, scopes=s.scopes,
                    require_all=s.require_all, max_entries=s.max_entries,
                ),
                self._clock, self._reactor, agent=self._agent,
            )
        else:
            if not _http_url(jwks_uri):
                raise _BadProvider("the provider lists no jwks_uri")
            self.validator = _JwksValidator(self, jwks_uri)
        self.discovered_at = self.clock.seconds()

    def _discovery_failed(self, failure: Failure) -> LocalResponse:
        self.failed_at = self.clock.seconds()
        _log.warn("OpenID discovery at {issuer} failed: {error}", issuer=self.settings.issuer,
                  error=failure.getErrorMessage())
        if self.validator is not None:
            return None  # type: ignore[return-value]  (the previous validator keeps serving)
        if failure.check(_BadProvider):
            return _json_error(500, BAD_RESPONSE)
        return _json_error(401, UNREACHABLE)

    def _discovery_done(self, outcome: Any) -> None:
        waiters, self._discovering = self._discovering or [], None
        for waiter in waiters:
            waiter.callback(outcome)


def _http_url(value: Any) -> bool:
    return isinstance(value, str) and urlsplit(value).scheme in ("http", "https")


class _JwksValidator:
    """Checks JWS access tokens with the provider's key set (jwks.JwksCache), then applies the
    same scope/client/expose rules as introspection to the claims."""

    def __init__(self, policy: OidcPolicy, jwks_uri: str) -> None:
        from flexgw.policies.jwks import JwksCache

        s = policy.settings
        self.settings = s
        self.clock = policy.clock
        self.cache = JwksCache(jwks_uri, s.discovery_ttl, s.timeout, policy.clock, policy.fetcher())
        # introspection's _accept applies scopes, client id, authentication and x-agw-* headers
        self.rules = IntrospectionPolicy(
            IntrospectionSettings(
                url=jwks_uri, authorization="", ttl=0, timeout=s.timeout,
                skip_client_id=s.skip_client_id, consumer_by="client_id",
                expose_headers=s.expose_headers, scopes=s.scopes, require_all=s.require_all,
                max_entries=0,
            ),
            policy.clock,
        )

    def on_request(self, ctx: PolicyContext) -> Any:
        token = _extract(ctx)
        if isinstance(token, LocalResponse):
            return token
        keys = self.cache.current(ctx.trace)
        if keys is None:
            waiting = self.cache.when_available(ctx.trace)
            if waiting is None:
                return _json_error(401, UNREACHABLE)
            return waiting.addCallback(lambda _: self._check(ctx, token, self.cache.keys))
        return self._check(ctx, token, keys)

    def _check(self, ctx: PolicyContext, token: str, keys: Any) -> Any:
        import jwt

        if keys is None:
            return _json_error(401, UNREACHABLE)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _json_error(401, INVALID_TOKEN)
        alg = header.get("alg")
        kid = header.get("kid")
        if alg not in ALGORITHMS:
            return _json_error(401, INVALID_TOKEN)
        candidates = [k for k in keys if (kid is None or k.kid == kid) and (k.alg in (None, alg))]
        if not candidates and kid is not None:
            refetch = self.cache.refetch_for_unknown_kid(ctx.trace)
            if refetch is not None:
                return refetch.addCallback(lambda _: self._verify(ctx, token, alg, kid))
        return self._verify(ctx, token, alg, kid, candidates)

    def _verify(self, ctx: PolicyContext, token: str, alg: str, kid: Any,
                candidates: list[Any] | None = None) -> Any:
        import jwt

        if candidates is None:
            keys = self.cache.keys or ()
            candidates = [k for k in keys if (kid is None or k.kid == kid) and k.alg in (None, alg)]
        claims = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token, key.key, algorithms=[alg], issuer=self.settings.issuer,
                    leeway=LEEWAY, options={"require": ["exp"], "verify_aud": False},
                )
                break
            except jwt.ExpiredSignatureError:
                return _json_error(401, EXPIRED)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
        if claims is None:
            return _json_error(401, INVALID_TOKEN)
        result = dict(claims)
        scp = result.get("scp")
        if "scope" not in result and isinstance(scp, list):
            result["scope"] = " ".join(str(s) for s in scp)
        if "client_id" not in result and isinstance(result.get("azp"), str):
            result["client_id"] = result["azp"]
        result.setdefault("active", True)
        return self.rules._accept(ctx, result)


@implementer(IPolicyKind)
class OidcKind:
    """The `openidconnect-access-token-enforcement-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> OidcPolicy:
        """Check the config; the provider is discovered at the first request."""
        services = context.services
        return OidcPolicy(
            settings_from(config),
            context.clock or services.clock,
            context.reactor or services.reactor,
            services.side_agent,
        )


KIND = register(OidcKind())
