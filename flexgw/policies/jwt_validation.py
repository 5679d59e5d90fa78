"""`jwt-validation-flex`: JWS signature and claim validation with a text key, a key expression or a JWKS, as Flex Gateway.

Flex behaviour relied on (docs `policies-included-jwt-validation.adoc`; reference §2.2; field
reports on Flex 1.13.3):
- Config keys and defaults as Flex's (see SCHEMA). `textKey` is the HMAC secret as plain text,
  or for rsa/es a PEM public key with or without its BEGIN/END lines.
- No token: 400 `{"error":"JWT Token is required."}`. A token that does not parse, whose
  signature or algorithm is wrong, or whose claims fail: 401 `{"error":"Invalid token."}`.
- JWKS: fetched on demand, cached `jwksServiceTimeToLive` minutes, retried with backoff after a
  failure while the stale set keeps serving; 503 only when no set was ever obtained (see jwks.py).
- Claims go to later policies as `vars.claimSet`, `authentication.properties.claims` and the token
  as `authentication.properties.jwt`.
- exp/nbf are checked whenever present and required when `mandatory*Claim`; aud is checked only
  with `validateAudClaim` (at least one of `supportedAudiences`, comma-separated); custom claims
  only with `validateCustomClaim`: a mandatory one must be present, a non-mandatory one is checked
  when present; a `#[...]` value must evaluate to `true`, a literal value must equal the claim
  (or be one of its values when the claim is an array).

Deliberate differences from Flex:
- The accepted algorithm is pinned to `signingMethod` + `signingKeyLength` (RS*, HS*, ES256/ES384;
  PS* is not RSA here). A token with `alg: none` is only accepted with `signingMethod: none`,
  which (as Flex: "no signature validation") accepts any token without checking its signature.
- Absurd `exp` values are a normal 401/200 decision, not the 503 Flex's WASM panic gives.
- With `skipClientIdValidation: false` there are no API contracts to check in Local Mode: the
  client id from `clientIdExpression` must merely be present (401 otherwise); it becomes
  `authentication.clientId` in both cases when it evaluates to a value.
- A JWKS is retried lazily (by the first request after the backoff) rather than by a background
  timer; a token with an unknown `kid` triggers one refetch at most every 30 s (key rotation).
- No RFC 9728 `WWW-Authenticate` hint (Flex 1.14): the 401 carries only the JSON body.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import PyJWTError
from twisted.internet.defer import Deferred
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
from flexgw.policies.expressions import Expression, ExpressionError, compile_value, to_text
from flexgw.policies.jwks import JwksCache, Key, treq_fetcher
from flexgw.policies.registry import register

NAME = "jwt-validation-flex"

NO_TOKEN = "JWT Token is required."
INVALID = "Invalid token."
NO_KEYS = "Service Unavailable"

_BOOL = {"type": "boolean"}
_CLAIMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"key": {"type": "string", "minLength": 1}, "value": {"type": "string"}},
        "required": ["key", "value"],
        "additionalProperties": False,
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "jwtOrigin": {"enum": ["httpBearerAuthenticationHeader", "customExpression"]},
        "jwtExpression": {"type": "string"},
        "signingMethod": {"enum": ["rsa", "hmac", "es", "none"]},
        "signingKeyLength": {"enum": [256, 384, 512, "256", "384", "512"]},
        "jwtKeyOrigin": {"enum": ["text", "jwks", "customExpression"]},
        "textKey": {"type": "string"},
        "customKeyExpression": {"type": "string"},
        "jwksUrl": {"type": "string"},
        "jwksServiceTimeToLive": {"type": "number", "exclusiveMinimum": 0},
        "jwksServiceConnectionTimeout": {"type": "integer", "minimum": 1},
        "skipClientIdValidation": _BOOL,
        "clientIdExpression": {"type": "string"},
        "validateAudClaim": _BOOL,
        "mandatoryAudClaim": _BOOL,
        "supportedAudiences": {"type": "string"},
        "mandatoryExpClaim": _BOOL,
        "mandatoryNbfClaim": _BOOL,
        "validateCustomClaim": _BOOL,
        "mandatoryCustomClaims": _CLAIMS,
        "nonMandatoryCustomClaims": _CLAIMS,
        "claimsToHeaders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "claimName": {"type": "string", "minLength": 1},
                    "headerName": {"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"},
                },
                "required": ["claimName", "headerName"],
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

#: signingMethod -> {signingKeyLength: JWS alg}
ALGORITHMS: dict[str, dict[int, str]] = {
    "rsa": {256: "RS256", 384: "RS384", 512: "RS512"},
    "hmac": {256: "HS256", 384: "HS384", 512: "HS512"},
    "es": {256: "ES256", 384: "ES384"},
}
_KTY = {"rsa": "RSA", "hmac": "oct", "es": "EC"}
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}
#: Parsed keys kept for `customKeyExpression` values (by key text).
KEY_CACHE_SIZE = 16


def _error(status: int, message: str) -> LocalResponse:
    """Flex's JSON error answer, compact as Flex writes it: `{"error":"Invalid token."}`."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode("utf-8")
    return LocalResponse(status, ((b"Content-Type", b"application/json"),), body)


def _compile(text: str, field: str) -> Expression | str:
    """compile_value, with expression errors reported as config errors on `field`."""
    try:
        return compile_value(text)
    except ExpressionError as e:
        raise PolicyConfigError(f"{e.message} (at offset {e.offset})", field) from None


def load_key(text: str, method: str, alg: str, field: str) -> Any:
    """The verification key for `textKey` (or an expression's value): HMAC secret bytes, or a PEM
    public key (BEGIN/END lines optional) of the family `method` names."""
    if method == "hmac":
        if not text:
            raise PolicyConfigError("the HMAC secret is empty", field)
        return text.encode("utf-8")
    body = text.strip()
    if "-----BEGIN" not in body:
        compact = "".join(body.split())
        try:
            base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise PolicyConfigError(
                "not a PEM public key (base64 without BEGIN/END lines, or a full PEM block)", field
            ) from None
        lines = [compact[i : i + 64] for i in range(0, len(compact), 64)]
        body = "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"
    try:
        key = load_pem_public_key(body.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise PolicyConfigError(f"not a usable PEM public key: {e}", field) from None
    if method == "rsa" and not isinstance(key, rsa.RSAPublicKey):
        raise PolicyConfigError("signingMethod rsa needs an RSA public key", field)
    if method == "es":
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PolicyConfigError("signingMethod es needs an EC public key", field)
        if key.curve.name != _CURVES[alg]:
            raise PolicyConfigError(
                f"{alg} needs a {_CURVES[alg]} key, not {key.curve.name}", field
            )
    return key


@attrs.frozen
class ClaimRule:
    """One custom claim check: the claim name and a literal or a `#[...]` expression."""

    key: str
    value: Expression | str
    mandatory: bool


class _Reject(Exception):
    """The token is refused: answer `status` with `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@implementer(IPolicy)
class JwtValidationPolicy(UsesRuntime):
    """One binding of jwt-validation-flex (config immutable; the JWKS caches are shared state)."""

    def __init__(
        self,
        *,
        bearer: bool,
        token_expression: Expression | str | None,
        method: str,
        alg: str | None,
        key_origin: str,
        text_key: Any,
        key_expression: Expression | str | None,
        jwks_urls: Sequence[str],
        jwks_ttl: float,
        jwks_timeout: float,
        skip_client_id: bool,
        client_id_expression: Expression | str | None,
        validate_aud: bool,
        mandatory_aud: bool,
        audiences: frozenset[str],
        mandatory_exp: bool,
        mandatory_nbf: bool,
        claim_rules: Sequence[ClaimRule],
        claims_to_headers: Sequence[tuple[str, bytes]],
        clock: Any,
        reactor: Any,
        fetcher: Any = None,
        agent: Any = None,
    ) -> None:
        self.bearer = bearer
        self.token_expression = token_expression
        self.method = method
        self.alg = alg
        self.key_origin = key_origin
        self.text_key = text_key
        self.key_expression = key_expression
        self.jwks_urls = tuple(jwks_urls)
        self.jwks_ttl = jwks_ttl
        self.jwks_timeout = jwks_timeout
        self.skip_client_id = skip_client_id
        self.client_id_expression = client_id_expression
        self.validate_aud = validate_aud
        self.mandatory_aud = mandatory_aud
        self.audiences = audiences
        self.mandatory_exp = mandatory_exp
        self.mandatory_nbf = mandatory_nbf
        self.claim_rules = tuple(claim_rules)
        self.claims_to_headers = tuple(claims_to_headers)
        self._clock = clock
        self._reactor = reactor
        self._fetcher = fetcher
        self._agent = agent  # treq Agent with defaultTLS.outboundPolicyCalls, or None
        self._caches: tuple[JwksCache, ...] | None = None
        self._parsed_keys: OrderedDict[str, Any] = OrderedDict()

    # -- shared state, built on first use ---------------------------------------------------------

    @property
    def caches(self) -> tuple[JwksCache, ...]:
        """One JwksCache per `jwksUrl` entry."""
        if self._caches is None:
            fetch = self._fetcher or treq_fetcher(self._runtime_reactor(), self._agent)
            self._caches = tuple(
                JwksCache(url, self.jwks_ttl, self.jwks_timeout, self.clock, fetch)
                for url in self.jwks_urls
            )
        return self._caches

    # -- the request -----------------------------------------------------------------------------

    def on_request(self, ctx: PolicyContext) -> Any:
        """Validate the request's JWT: None, a 400/401/503 LocalResponse, or a Deferred (JWKS)."""
        token = self._token(ctx)
        if not token:
            return _error(400, NO_TOKEN)
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            return _error(401, INVALID)
        if self.method == "none" or self.key_origin != "jwks":
            try:
                keys = self._static_keys(ctx)
            except _KeyUnusable:
                return _error(401, INVALID)
            return self._finish(ctx, token, keys)
        return self._with_jwks(ctx, token, header)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do on the response."""

    def _token(self, ctx: PolicyContext) -> str:
        """The token from the Bearer header or from `jwtExpression` ("" when there is none)."""
        if self.bearer:
            value = ctx.request_header(b"authorization")
            if value is None:
                return ""
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return ""
            return rest.strip().decode("latin-1")
        expr = self.token_expression
        if isinstance(expr, Expression):
            return to_text(expr.evaluate(ctx.expression_context())).strip()
        return (expr or "").strip()

    def _static_keys(self, ctx: PolicyContext) -> list[Any]:
        """The keys for text and expression origins (none for signingMethod none)."""
        if self.method == "none":
            return []
        if self.key_origin == "text":
            return [self.text_key]
        expr = self.key_expression
        text = (
            to_text(expr.evaluate(ctx.expression_context()))
            if isinstance(expr, Expression)
            else (expr or "")
        )
        key = self._parsed_keys.get(text)
        if key is None:
            assert self.alg is not None
            try:
                key = load_key(text, self.method, self.alg, "customKeyExpression")
            except PolicyConfigError:
                raise _KeyUnusable() from None
            self._parsed_keys[text] = key
            if len(self._parsed_keys) > KEY_CACHE_SIZE:
                self._parsed_keys.popitem(last=False)
        else:
            self._parsed_keys.move_to_end(text)
        return [key]

    def _with_jwks(self, ctx: PolicyContext, token: str, header: dict[str, Any]) -> Any:
        """Validate against the cached key sets, waiting for a first fetch or a rotation refetch."""
        kid = header.get("kid")
        sets = [cache.current(ctx.trace) for cache in self.caches]
        if all(keys is None for keys in sets):
            waits = [d for d in (c.when_available(ctx.trace) for c in self.caches) if d is not None]
            if not waits:
                return _error(503, NO_KEYS)
            return _gather(waits).addCallback(lambda _: self._after_first_fetch(ctx, token, kid))
        keys = self._candidates(sets, kid)
        if not keys and isinstance(kid, str):
            waits = [d for d in (c.refetch_for_unknown_kid(ctx.trace) for c in self.caches)
                     if d is not None]
            if waits:
                return _gather(waits).addCallback(
                    lambda _: self._finish(
                        ctx, token, self._candidates([c.keys for c in self.caches], kid)
                    )
                )
        return self._finish(ctx, token, keys)

    def _after_first_fetch(self, ctx: PolicyContext, token: str, kid: Any) -> LocalResponse | None:
        """After waiting for a first JWKS: 503 if still none, else validate."""
        sets = [cache.keys for cache in self.caches]
        if all(keys is None for keys in sets):
            return _error(503, NO_KEYS)
        return self._finish(ctx, token, self._candidates(sets, kid))

    def _candidates(self, sets: Sequence[tuple[Key, ...] | None], kid: Any) -> list[Any]:
        """The keys of the right type (and `kid`, when the token names one) for the pinned alg."""
        kty = _KTY[self.method]
        out = []
        for keys in sets:
            for key in keys or ():
                if key.kty != kty or (key.alg is not None and key.alg != self.alg):
                    continue
                if isinstance(kid, str) and key.kid != kid:
                    continue
                out.append(key.key)
        return out

    def _finish(self, ctx: PolicyContext, token: str, keys: list[Any]) -> LocalResponse | None:
        """Verify the signature with one of `keys`, check the claims, expose them."""
        try:
            claims = self._verify(token, keys)
            self._check_claims(ctx, claims)
            client_id = self._client_id(ctx, claims)
        except _Reject as r:
            return _error(r.status, r.message)
        ctx.vars["claimSet"] = claims
        ctx.authentication = {
            "principal": None,
            "clientId": client_id,
            "clientName": None,
            "properties": {"claims": claims, "jwt": token},
        }
        for claim, header in self.claims_to_headers:
            if claim in claims and claims[claim] is not None:
                value = to_text(claims[claim])
                if "\r" not in value and "\n" not in value and "\0" not in value:
                    ctx.set_request_header(header, value.encode("utf-8", "replace"))
        return None

    def _verify(self, token: str, keys: list[Any]) -> dict[str, Any]:
        """The claims of a token whose signature one of `keys` verifies (with the pinned alg)."""
        options: Any = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": False,
            "verify_iss": False,
            "verify_sub": False,
            "verify_jti": False,
        }
        if self.method == "none":
            try:
                claims = jwt.decode(token, options={"verify_signature": False, **options})
            except PyJWTError:
                raise _Reject(401, INVALID) from None
            return _as_claims(claims)
        assert self.alg is not None
        for key in keys:
            try:
                claims = jwt.decode(token, key, algorithms=[self.alg], options=options)
            except (PyJWTError, ValueError, TypeError):
                continue  # wrong key, bad signature, wrong alg, malformed token
            return _as_claims(claims)
        raise _Reject(401, INVALID)

    def _check_claims(self, ctx: PolicyContext, claims: dict[str, Any]) -> None:
        """exp, nbf, aud and the custom claims, as Flex."""
        now = self.clock.seconds()
        exp = claims.get("exp")
        if exp is None:
            if self.mandatory_exp:
                raise _Reject(401, INVALID)
        elif not _is_number(exp) or now >= exp:
            raise _Reject(401, INVALID)
        nbf = claims.get("nbf")
        if nbf is None:
            if self.mandatory_nbf:
                raise _Reject(401, INVALID)
        elif not _is_number(nbf) or now < nbf:
            raise _Reject(401, INVALID)
        if self.validate_aud:
            aud = claims.get("aud")
            if aud is None:
                if self.mandatory_aud:
                    raise _Reject(401, INVALID)
            else:
                values = aud if isinstance(aud, list) else [aud]
                if not any(isinstance(v, str) and v in self.audiences for v in values):
                    raise _Reject(401, INVALID)
        if self.claim_rules:
            ctx.vars["claimSet"] = claims
            for rule in self.claim_rules:
                if rule.key not in claims:
                    if rule.mandatory:
                        raise _Reject(401, INVALID)
                    continue
                if not self._claim_ok(ctx, rule, claims[rule.key]):
                    raise _Reject(401, INVALID)

    def _claim_ok(self, ctx: PolicyContext, rule: ClaimRule, value: Any) -> bool:
        """A custom claim's check: the expression is `true`, or the literal matches."""
        if isinstance(rule.value, Expression):
            return rule.value.evaluate(ctx.expression_context()) is True
        if isinstance(value, list):
            return any(to_text(v) == rule.value for v in value)
        return to_text(value) == rule.value

    def _client_id(self, ctx: PolicyContext, claims: dict[str, Any]) -> str | None:
        """`clientIdExpression`'s value; required (401) unless `skipClientIdValidation`."""
        expr = self.client_id_expression
        value: Any
        try:
            if isinstance(expr, Expression):
                ctx.vars["claimSet"] = claims
                value = expr.evaluate(ctx.expression_context())
            else:
                value = expr
        except Exception:
            if not self.skip_client_id:
                raise
            value = None
        text = to_text(value) if value is not None else ""
        if not text and not self.skip_client_id:
            raise _Reject(401, INVALID)
        return text or None


class _KeyUnusable(Exception):
    """The key from `customKeyExpression` is not a usable key: the token cannot be verified."""


def _is_number(value: Any) -> bool:
    """A JSON number (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_claims(claims: Any) -> dict[str, Any]:
    """The payload as a claims object (a JWT payload must be a JSON object)."""
    if not isinstance(claims, dict):
        raise _Reject(401, INVALID)
    return claims


def _gather(waits: list[Deferred[None]]) -> Deferred[None]:
    """A Deferred firing when every one of `waits` has fired (they never fail)."""
    if len(waits) == 1:
        return waits[0]
    from twisted.internet.defer import gatherResults

    return gatherResults(waits).addCallback(lambda _: None)


@implementer(IPolicyKind)
class JwtValidationKind:
    """The `jwt-validation-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> JwtValidationPolicy:
        """Check and compile the config; keys are parsed now, JWKS fetched at first use."""
        return build_policy(config, context)


def build_policy(
    config: dict[str, Any], context: BuildContext, fetcher: Any = None
) -> JwtValidationPolicy:
    """Build a policy (tests pass a `fetcher` to replace treq)."""
    method = config.get("signingMethod", "rsa")
    length = int(config.get("signingKeyLength", 256))
    alg: str | None = None
    if method != "none":
        alg = ALGORITHMS[method].get(length)
        if alg is None:
            raise PolicyConfigError(
                f"signingKeyLength {length} is not available with signingMethod {method}"
                " (256 or 384)",
                "signingKeyLength",
            )
    key_origin = config.get("jwtKeyOrigin", "text")
    text_key = None
    key_expression: Expression | str | None = None
    urls: list[str] = []
    if method != "none":
        if key_origin == "text":
            if "textKey" not in config:
                raise PolicyConfigError("textKey is required with jwtKeyOrigin text", "textKey")
            assert alg is not None
            text_key = load_key(config["textKey"], method, alg, "textKey")
        elif key_origin == "customExpression":
            if "customKeyExpression" not in config:
                raise PolicyConfigError(
                    "customKeyExpression is required with jwtKeyOrigin customExpression",
                    "customKeyExpression",
                )
            key_expression = _compile(config["customKeyExpression"], "customKeyExpression")
        else:
            raw = config.get("jwksUrl", "")
            urls = [u.strip() for u in raw.split(",") if u.strip()]
            if not urls:
                raise PolicyConfigError("jwksUrl is required with jwtKeyOrigin jwks", "jwksUrl")
            for url in urls:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise PolicyConfigError(f"not an http(s) URL: {url!r}", "jwksUrl")
    bearer = config.get("jwtOrigin", "httpBearerAuthenticationHeader") != "customExpression"
    token_expression = None
    if not bearer:
        token_expression = _compile(
            config.get("jwtExpression", "#[attributes.headers['jwt']]"), "jwtExpression"
        )
    rules: list[ClaimRule] = []
    if config.get("validateCustomClaim", False):
        for field, mandatory in (
            ("mandatoryCustomClaims", True),
            ("nonMandatoryCustomClaims", False),
        ):
            for index, item in enumerate(config.get(field, [])):
                value = _compile(item["value"], f"{field}.{index}.value")
                rules.append(ClaimRule(item["key"], value, mandatory))
    audiences = frozenset(
        a.strip() for a in config.get("supportedAudiences", "").split(",") if a.strip()
    )
    if config.get("validateAudClaim", False) and not audiences:
        raise PolicyConfigError(
            "validateAudClaim needs at least one audience in supportedAudiences",
            "supportedAudiences",
        )
    return JwtValidationPolicy(
        bearer=bearer,
        token_expression=token_expression,
        method=method,
        alg=alg,
        key_origin=key_origin,
        text_key=text_key,
        key_expression=key_expression,
        jwks_urls=urls,
        jwks_ttl=float(config.get("jwksServiceTimeToLive", 60)) * 60.0,
        jwks_timeout=config.get("jwksServiceConnectionTimeout", 10000) / 1000.0,
        skip_client_id=config.get("skipClientIdValidation", True),
        client_id_expression=_compile(
            config.get("clientIdExpression", "#[vars.claimSet.client_id]"), "clientIdExpression"
        ),
        validate_aud=config.get("validateAudClaim", False),
        mandatory_aud=config.get("mandatoryAudClaim", False),
        audiences=audiences,
        mandatory_exp=config.get("mandatoryExpClaim", False),
        mandatory_nbf=config.get("mandatoryNbfClaim", False),
        claim_rules=rules,
        claims_to_headers=[
            (item["claimName"], item["headerName"].encode("ascii"))
            for item in config.get("claimsToHeaders", [])
        ],
        clock=context.clock,
        reactor=context.reactor,
        fetcher=fetcher,
        agent=context.services.side_agent,
    )


KIND = register(JwtValidationKind())

__all__ = ["KIND", "SCHEMA", "JwtValidationKind", "JwtValidationPolicy", "build_policy"]
