"""jwt-validation-flex: tokens made here with PyJWT: signatures, algorithms, claims, JWKS caching and rotation over loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jsonschema
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.jwt_validation import KIND, SCHEMA, build_policy
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port
from tests.keyserver import JsonServer

SECRET = "s" * 64
NOW = 1_700_000_000.0
INVALID = b'{"error":"Invalid token."}'
REQUIRED = b'{"error":"JWT Token is required."}'

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> str:
    """The PEM of a private key's public half."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def bare_pem(key: Any) -> str:
    """The public key as Flex wants `textKey`: the base64 body without BEGIN/END lines."""
    return "".join(line for line in public_pem(key).splitlines() if "-----" not in line)


def jwk(key: Any, kid: str, alg: str = "RS256") -> dict[str, Any]:
    """A public JWK for a private key."""
    algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    data = json.loads(algorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "use": "sig", "alg": alg})
    return data


def claims(**extra: Any) -> dict[str, Any]:
    """Claims valid at NOW, plus `extra` (a None value removes a claim)."""
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 600, "client_id": "app-1"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any] | None = None, secret: str = SECRET, alg: str = "HS256") -> str:
    """An HMAC-signed token."""
    return jwt.encode(claims() if payload is None else payload, secret, algorithm=alg)


def b64(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], mac_key: bytes | None) -> str:
    """A token built by hand: unsigned (`alg: none`) or HMAC'd with any bytes (confusion attack)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if mac_key is None:
        return signing_input + "."
    mac = hmac.new(mac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def context(
    token: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> PolicyContext:
    """A request context with `Authorization: Bearer token` (or the given headers)."""
    raw = [(b"Host", b"api")]
    if token is not None:
        raw.append((b"Authorization", b"Bearer " + token.encode()))
    raw.extend(headers or [])
    head = analyze_head(b"GET", b"/orders", "1.1", raw, True)
    assert not isinstance(head, LocalResponse) and hasattr(head, "headers"), head
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


class Base(TestCase):
    """Helpers: a fake clock at NOW and a policy builder."""

    def setUp(self) -> None:
        """A clock at NOW."""
        self.clock = Clock()
        self.clock.advance(NOW)

    def build(self, fetcher: Any = None, **config: Any) -> Any:
        """A policy from config (validated against the schema first)."""
        jsonschema.Draft202012Validator(SCHEMA).validate(config)
        return build_policy(
            config, BuildContext("default/jwt", "default/api", clock=self.clock), fetcher
        )

    async def call(self, policy: Any, ctx: PolicyContext) -> Any:
        """on_request, awaited when it returns a Deferred."""
        result = policy.on_request(ctx)
        if isinstance(result, defer.Deferred):
            result = await result
        return result

    def assertRefused(self, result: Any, status: int, body: bytes) -> None:
        """A Flex JSON refusal."""
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual((result.status, result.body), (status, body))
        self.assertEqual(dict(result.headers)[b"Content-Type"], b"application/json")


class TokenTests(Base):
    """Text keys: accept and reject paths."""

    def hmac_policy(self, **config: Any) -> Any:
        """An HS256 policy with SECRET."""
        return self.build(signingMethod="hmac", signingKeyLength=256, textKey=SECRET, **config)

    def test_registered(self) -> None:
        """The kind is a built-in."""
        self.assertIs(registry.lookup("jwt-validation-flex"), KIND)

    def test_valid_token_exposes_claims(self) -> None:
        """A valid token continues; claims go to vars.claimSet and authentication.properties."""
        token = hs256()
        ctx = context(token)
        self.assertIsNone(self.hmac_policy().on_request(ctx))
        self.assertEqual(ctx.vars["claimSet"]["sub"], "alice")
        assert ctx.authentication is not None
        self.assertEqual(ctx.authentication["properties"]["claims"], claims())
        self.assertEqual(ctx.authentication["properties"]["jwt"], token)
        self.assertEqual(ctx.authentication["clientId"], "app-1")

    def test_claims_reach_later_expressions(self) -> None:
        """`#[authentication.properties.claims.sub]` and `#[vars.claimSet.sub]` see the claims."""
        from flexgw.policies.expressions import compile_value

        ctx = context(hs256())
        ctx.expression_context()  # built before the policy runs, as an earlier policy would
        self.assertIsNone(self.hmac_policy().on_request(ctx))
        for source in ("#[authentication.properties.claims.sub]", "#[vars.claimSet.sub]"):
            expr = compile_value(source)
            self.assertEqual(expr.evaluate(ctx.expression_context()), "alice")  # type: ignore[union-attr]

    def test_no_token_is_400(self) -> None:
        """No Authorization header, another scheme, or an empty bearer: 400, Flex's body."""
        policy = self.hmac_policy()
        self.assertRefused(policy.on_request(context()), 400, REQUIRED)
        basic = context(headers=[(b"Authorization", b"Basic dTpw")])
        self.assertRefused(policy.on_request(basic), 400, REQUIRED)
        self.assertRefused(policy.on_request(context("")), 400, REQUIRED)

    def test_bearer_scheme_case_insensitive(self) -> None:
        """`bearer` works as `Bearer`."""
        ctx = context(headers=[(b"authorization", b"bearer " + hs256().encode())])
        self.assertIsNone(self.hmac_policy().on_request(ctx))

    def test_garbage_and_bad_signature_are_401(self) -> None:
        """An unparsable token or one signed with another secret: 401, Flex's body."""
        policy = self.hmac_policy()
        self.assertRefused(policy.on_request(context("not.a.token")), 401, INVALID)
        self.assertRefused(policy.on_request(context("garbage")), 401, INVALID)
        other = hs256(secret="t" * 64)
        self.assertRefused(policy.on_request(context(other)), 401, INVALID)
        good = hs256()
        tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        self.assertRefused(policy.on_request(context(tampered)), 401, INVALID)

    def test_expired(self) -> None:
        """exp in the past, or exactly now, is refused; a minute ahead is accepted."""
        policy = self.hmac_policy()
        self.assertRefused(policy.on_request(context(hs256(claims(exp=NOW - 1)))), 401, INVALID)
        self.assertRefused(policy.on_request(context(hs256(claims(exp=NOW)))), 401, INVALID)
        self.assertIsNone(policy.on_request(context(hs256(claims(exp=NOW + 60)))))

    def test_expiry_follows_the_clock(self) -> None:
        """The same token passes, then fails once the clock passes its exp."""
        policy = self.hmac_policy()
        token = hs256(claims(exp=NOW + 10))
        self.assertIsNone(policy.on_request(context(token)))
        self.clock.advance(10)
        self.assertRefused(policy.on_request(context(token)), 401, INVALID)

    def test_nbf(self) -> None:
        """nbf in the future is refused; now or past is accepted."""
        policy = self.hmac_policy()
        self.assertRefused(policy.on_request(context(hs256(claims(nbf=NOW + 5)))), 401, INVALID)
        self.assertIsNone(policy.on_request(context(hs256(claims(nbf=NOW)))))

    def test_mandatory_exp_and_nbf(self) -> None:
        """Missing exp/nbf pass unless mandatory; a non-numeric exp is refused."""
        no_exp = hs256(claims(exp=None))
        self.assertIsNone(self.hmac_policy().on_request(context(no_exp)))
        self.assertRefused(
            self.hmac_policy(mandatoryExpClaim=True).on_request(context(no_exp)), 401, INVALID
        )
        self.assertRefused(
            self.hmac_policy(mandatoryNbfClaim=True).on_request(context(hs256())), 401, INVALID
        )
        self.assertIsNone(
            self.hmac_policy(mandatoryNbfClaim=True).on_request(context(hs256(claims(nbf=NOW))))
        )
        self.assertRefused(
            self.hmac_policy().on_request(context(hs256(claims(exp="tomorrow")))), 401, INVALID
        )

    def test_audience(self) -> None:
        """With validateAudClaim, aud must hold one supported audience; missing only when not
        mandatory; without validateAudClaim aud is ignored."""
        policy = self.hmac_policy(validateAudClaim=True, supportedAudiences="orders, billing")
        self.assertIsNone(policy.on_request(context(hs256(claims(aud="billing")))))
        self.assertIsNone(policy.on_request(context(hs256(claims(aud=["x", "orders"])))))
        self.assertRefused(policy.on_request(context(hs256(claims(aud="other")))), 401, INVALID)
        self.assertRefused(policy.on_request(context(hs256(claims(aud=["a", "b"])))), 401, INVALID)
        self.assertIsNone(policy.on_request(context(hs256())))
        strict = self.hmac_policy(
            validateAudClaim=True, mandatoryAudClaim=True, supportedAudiences="orders"
        )
        self.assertRefused(strict.on_request(context(hs256())), 401, INVALID)
        self.assertIsNone(self.hmac_policy().on_request(context(hs256(claims(aud="other")))))

    def test_wrong_algorithm_refused(self) -> None:
        """The algorithm is pinned: HS384 and HS512 tokens fail an HS256 policy, and the reverse."""
        self.assertRefused(self.hmac_policy().on_request(context(hs256(alg="HS384"))), 401, INVALID)
        hs512 = self.build(signingMethod="hmac", signingKeyLength=512, textKey=SECRET)
        self.assertRefused(hs512.on_request(context(hs256())), 401, INVALID)
        self.assertIsNone(hs512.on_request(context(hs256(alg="HS512"))))

    def test_alg_none_refused_unless_configured(self) -> None:
        """An unsigned token fails every signing method but `none`."""
        unsigned = forged({"alg": "none", "typ": "JWT"}, claims(), None)
        self.assertRefused(self.hmac_policy().on_request(context(unsigned)), 401, INVALID)
        rsa_policy = self.build(textKey=bare_pem(RSA_KEY))
        self.assertRefused(rsa_policy.on_request(context(unsigned)), 401, INVALID)

    def test_signing_method_none(self) -> None:
        """`none` validates no signature (as Flex) but still checks the claims."""
        policy = self.build(signingMethod="none")
        unsigned = forged({"alg": "none", "typ": "JWT"}, claims(), None)
        self.assertIsNone(policy.on_request(context(unsigned)))
        self.assertIsNone(policy.on_request(context(hs256(secret="any" * 11))))
        expired = forged({"alg": "none"}, claims(exp=NOW - 1), None)
        self.assertRefused(policy.on_request(context(expired)), 401, INVALID)

    def test_rsa_text_key(self) -> None:
        """RSA with the PEM body (no BEGIN/END) as Flex documents, or a full PEM block."""
        token = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
        for text_key in (bare_pem(RSA_KEY), public_pem(RSA_KEY)):
            policy = self.build(signingMethod="rsa", signingKeyLength=256, textKey=text_key)
            self.assertIsNone(policy.on_request(context(token)))
        policy = self.build(textKey=bare_pem(RSA_KEY))  # rsa and 256 are the defaults
        other = jwt.encode(claims(), RSA_KEY_2, algorithm="RS256")
        self.assertRefused(policy.on_request(context(other)), 401, INVALID)
        rs384 = jwt.encode(claims(), RSA_KEY, algorithm="RS384")
        self.assertRefused(policy.on_request(context(rs384)), 401, INVALID)

    def test_hmac_rsa_confusion_refused(self) -> None:
        """An HS256 token MAC'd with the RSA public key (PEM or DER) fails the RSA policy."""
        policy = self.build(textKey=bare_pem(RSA_KEY))
        header = {"alg": "HS256", "typ": "JWT"}
        for mac_key in (public_pem(RSA_KEY).encode(), bare_pem(RSA_KEY).encode()):
            token = forged(header, claims(), mac_key)
            self.assertRefused(policy.on_request(context(token)), 401, INVALID)

    def test_es256(self) -> None:
        """ES256 with an EC text key; an RS256 token is refused by it."""
        policy = self.build(signingMethod="es", signingKeyLength=256, textKey=bare_pem(EC_KEY))
        self.assertIsNone(policy.on_request(context(jwt.encode(claims(), EC_KEY, "ES256"))))
        rs = jwt.encode(claims(), RSA_KEY, algorithm="RS256")
        self.assertRefused(policy.on_request(context(rs)), 401, INVALID)

    def test_custom_claims(self) -> None:
        """Mandatory claims must be present and match; non-mandatory ones only when present;
        `#[...]` values must be true; literals match a value or an array member."""
        policy = self.hmac_policy(
            validateCustomClaim=True,
            mandatoryCustomClaims=[
                {"key": "iss", "value": "https://idp"},
                {"key": "role", "value": "#[vars.claimSet.role == 'admin']"},
            ],
            nonMandatoryCustomClaims=[{"key": "groups", "value": "ops"}],
        )
        good = claims(iss="https://idp", role="admin")
        self.assertIsNone(policy.on_request(context(hs256(good))))
        self.assertIsNone(policy.on_request(context(hs256({**good, "groups": ["dev", "ops"]}))))
        for bad in (
            {**good, "iss": "https://evil"},
            {**good, "role": "user"},
            {k: v for k, v in good.items() if k != "iss"},
            {**good, "groups": ["dev"]},
            {**good, "groups": "dev"},
        ):
            self.assertRefused(policy.on_request(context(hs256(bad))), 401, INVALID)

    def test_custom_claims_ignored_unless_enabled(self) -> None:
        """Without validateCustomClaim the lists are not checked."""
        policy = self.hmac_policy(mandatoryCustomClaims=[{"key": "iss", "value": "x"}])
        self.assertIsNone(policy.on_request(context(hs256())))

    def test_token_from_expression(self) -> None:
        """jwtOrigin customExpression reads the token where jwtExpression says (default: `jwt`)."""
        policy = self.hmac_policy(jwtOrigin="customExpression")
        self.assertIsNone(policy.on_request(context(headers=[(b"JWT", hs256().encode())])))
        self.assertRefused(policy.on_request(context(hs256())), 400, REQUIRED)
        by_query = self.hmac_policy(
            jwtOrigin="customExpression", jwtExpression="#[attributes.queryParams.token]"
        )
        head = analyze_head(b"GET", b"/x?token=" + hs256().encode(), "1.1", [(b"Host", b"a")], True)
        ctx = PolicyContext(head, "127.0.0.1", "http", "default/api")  # type: ignore[arg-type]
        self.assertIsNone(by_query.on_request(ctx))

    def test_client_id_required_without_skip(self) -> None:
        """skipClientIdValidation false: the client id expression must yield a value."""
        policy = self.hmac_policy(skipClientIdValidation=False)
        self.assertIsNone(policy.on_request(context(hs256())))
        self.assertRefused(policy.on_request(context(hs256(claims(client_id=None)))), 401, INVALID)
        custom = self.hmac_policy(
            skipClientIdValidation=False, clientIdExpression="#[vars.claimSet.azp]"
        )
        ctx = context(hs256(claims(azp="web")))
        self.assertIsNone(custom.on_request(ctx))
        assert ctx.authentication is not None
        self.assertEqual(ctx.authentication["clientId"], "web")

    def test_claims_to_headers(self) -> None:
        """claimsToHeaders copies claims into upstream request headers (replacing the client's)."""
        policy = self.hmac_policy(claimsToHeaders=[{"claimName": "sub", "headerName": "X-User"}])
        ctx = context(hs256(), headers=[(b"X-User", b"mallory")])
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual([v for k, v in ctx.request_headers if k.lower() == b"x-user"], [b"alice"])

    def test_key_from_expression(self) -> None:
        """jwtKeyOrigin customExpression: the key comes from the request; unusable key is a 401."""
        policy = self.build(
            signingMethod="hmac",
            jwtKeyOrigin="customExpression",
            customKeyExpression="#[attributes.headers['x-key']]",
        )
        ok = context(hs256(), headers=[(b"X-Key", SECRET.encode())])
        self.assertIsNone(policy.on_request(ok))
        wrong = context(hs256(), headers=[(b"X-Key", b"other" * 8)])
        self.assertRefused(policy.on_request(wrong), 401, INVALID)
        rsa_policy = self.build(
            jwtKeyOrigin="customExpression", customKeyExpression="#[attributes.headers['x-key']]"
        )
        junk = context(jwt.encode(claims(), RSA_KEY, "RS256"), headers=[(b"X-Key", b"junk!")])
        self.assertRefused(rsa_policy.on_request(junk), 401, INVALID)


class ConfigTests(Base):
    """Config errors name their field."""

    def error(self, **config: Any) -> PolicyConfigError:
        """The PolicyConfigError building this config raises."""
        return self.assertRaises(
            PolicyConfigError, build_policy, config, BuildContext("b", "a", clock=self.clock)
        )

    def test_errors_name_the_field(self) -> None:
        """Missing or unusable keys and impossible combinations."""
        self.assertEqual(self.error(signingMethod="hmac").field, "textKey")
        self.assertEqual(self.error(textKey="not base64 !!").field, "textKey")
        self.assertEqual(self.error(textKey=bare_pem(EC_KEY)).field, "textKey")  # rsa wanted
        es512 = self.error(signingMethod="es", signingKeyLength=512, textKey=bare_pem(EC_KEY))
        self.assertEqual(es512.field, "signingKeyLength")
        es384 = self.error(signingMethod="es", signingKeyLength=384, textKey=bare_pem(EC_KEY))
        self.assertEqual(es384.field, "textKey")  # a P-256 key for ES384
        self.assertEqual(self.error(jwtKeyOrigin="jwks").field, "jwksUrl")
        self.assertEqual(self.error(jwtKeyOrigin="jwks", jwksUrl="ftp://x/k").field, "jwksUrl")
        self.assertEqual(self.error(jwtKeyOrigin="customExpression").field, "customKeyExpression")
        bad_claim = self.error(
            signingMethod="none",
            validateCustomClaim=True,
            mandatoryCustomClaims=[{"key": "a", "value": "#[vars.claimSet.a ==]"}],
        )
        self.assertEqual(bad_claim.field, "mandatoryCustomClaims.0.value")
        bad_origin = self.error(
            signingMethod="none", jwtOrigin="customExpression", jwtExpression="#[nope]"
        )
        self.assertEqual(bad_origin.field, "jwtExpression")
        aud = self.error(signingMethod="none", validateAudClaim=True)
        self.assertEqual(aud.field, "supportedAudiences")

    def test_schema(self) -> None:
        """Unknown keys and bad values are schema errors; Flex's full key set is accepted."""
        validator = jsonschema.Draft202012Validator(SCHEMA)
        self.assertFalse(validator.is_valid({"jwtKey": "x"}))
        self.assertFalse(validator.is_valid({"signingMethod": "rsa-pss"}))
        self.assertFalse(validator.is_valid({"signingKeyLength": 1024}))
        self.assertFalse(validator.is_valid({"mandatoryCustomClaims": [{"key": "a"}]}))
        full = {
            "jwtOrigin": "httpBearerAuthenticationHeader",
            "jwtExpression": "#[attributes.headers['jwt']]",
            "signingMethod": "rsa",
            "signingKeyLength": "256",
            "jwtKeyOrigin": "jwks",
            "textKey": "your-(256|384|512)-bit-secret",
            "jwksUrl": "https://idp/keys",
            "jwksServiceTimeToLive": 60,
            "jwksServiceConnectionTimeout": 10000,
            "customKeyExpression": "#[authentication.properties['k']]",
            "skipClientIdValidation": True,
            "clientIdExpression": "#[vars.claimSet.client_id]",
            "validateAudClaim": True,
            "mandatoryAudClaim": True,
            "supportedAudiences": "aud.example.com",
            "mandatoryExpClaim": True,
            "mandatoryNbfClaim": False,
            "validateCustomClaim": False,
            "mandatoryCustomClaims": [{"key": "iss", "value": "x"}],
            "nonMandatoryCustomClaims": [],
            "claimsToHeaders": [{"claimName": "scope", "headerName": "X-Scopes"}],
        }
        self.assertTrue(validator.is_valid(full))
        build_policy(full, BuildContext("b", "a"))  # the unused textKey is not parsed with jwks

    def test_builds_without_a_reactor(self) -> None:
        """`flexgw validate` builds with no clock or reactor: nothing is fetched or scheduled."""
        policy = build_policy(
            {"jwtKeyOrigin": "jwks", "jwksUrl": "http://127.0.0.1:9/keys"}, BuildContext("b", "a")
        )
        self.assertIsNone(policy._caches)


class JwksTests(Base):
    """JWKS from a local key server: first fetch, TTL, rotation, stale set, 503."""

    def setUp(self) -> None:
        """A key server with one RSA key (kid k1)."""
        super().setUp()
        self.keys = [jwk(RSA_KEY, "k1")]
        self.status = 200
        self.server = JsonServer(lambda request: (self.status, {"keys": self.keys}))
        self.server.listen(reactor)
        self.addCleanup(self.server.stop)

    def policy(self, **config: Any) -> Any:
        """An RS256 JWKS policy on the key server (TTL 1 minute unless given)."""
        config.setdefault("jwksServiceTimeToLive", 1)
        return self.build(jwtKeyOrigin="jwks", jwksUrl=self.server.url + "/keys", **config)

    def token(self, key: Any = RSA_KEY, kid: str | None = "k1", **extra: Any) -> str:
        """An RS256 token."""
        headers = {"kid": kid} if kid else None
        return jwt.encode(claims(**extra), key, algorithm="RS256", headers=headers)

    async def test_first_fetch_then_cached(self) -> None:
        """The first request waits for the set; later ones use the cache without fetching."""
        policy = self.policy()
        self.assertIsNone(await self.call(policy, context(self.token())))
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(self.server.requests[0]["method"], b"GET")
        self.assertEqual(self.server.requests[0]["path"], b"/keys")
        result = policy.on_request(context(self.token()))
        self.assertIsNone(result)  # synchronous: no Deferred once the set is cached
        self.assertRefused(await self.call(policy, context(self.token(RSA_KEY_2))), 401, INVALID)
        self.assertEqual(len(self.server.requests), 1)

    async def test_concurrent_first_requests_share_one_fetch(self) -> None:
        """Requests arriving while the first fetch is in flight wait for that same fetch."""
        policy = self.policy()
        self.server.held = []
        first = policy.on_request(context(self.token()))
        second = policy.on_request(context(self.token()))
        self.assertIsInstance(first, defer.Deferred)
        self.assertIsInstance(second, defer.Deferred)
        await self.server.arrival(1)
        self.server.release()
        self.assertEqual([await first, await second], [None, None])
        self.assertEqual(len(self.server.requests), 1)

    async def test_ttl_refresh_uses_stale_set_meanwhile(self) -> None:
        """After jwksServiceTimeToLive the next request is served from the old set at once and
        starts a refetch; the new set is used once it arrives."""
        policy = self.policy()
        await self.call(policy, context(self.token()))
        self.clock.advance(61)
        self.keys = [jwk(RSA_KEY_2, "k2")]
        self.server.held = []
        self.assertIsNone(policy.on_request(context(self.token(exp=NOW + 3600))))
        await self.server.arrival(2)
        self.server.release()
        await policy.caches[0].settled()
        self.assertIsNone(policy.on_request(context(self.token(RSA_KEY_2, "k2", exp=NOW + 3600))))
        self.assertEqual(len(self.server.requests), 2)

    async def test_rotation_unknown_kid_refetches_once(self) -> None:
        """A token with a kid the cached set lacks triggers one refetch (the key rotated), at most
        one per 30 s since the last fetch (rate limit), well before the TTL ends."""
        policy = self.policy(jwksServiceTimeToLive=60)
        await self.call(policy, context(self.token()))
        self.keys = [jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2")]
        self.clock.advance(10)  # within 30 s of the last fetch: the set is taken as current
        self.assertRefused(
            await self.call(policy, context(self.token(RSA_KEY_2, "k2"))), 401, INVALID
        )
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(21)
        self.assertIsNone(await self.call(policy, context(self.token(RSA_KEY_2, "k2"))))
        self.assertEqual(len(self.server.requests), 2)
        self.assertRefused(
            await self.call(policy, context(self.token(RSA_KEY_2, "k3"))), 401, INVALID
        )
        self.assertEqual(len(self.server.requests), 2)
        self.clock.advance(31)
        self.assertRefused(
            await self.call(policy, context(self.token(RSA_KEY_2, "k3"))), 401, INVALID
        )
        self.assertEqual(len(self.server.requests), 3)

    async def test_token_without_kid_tries_each_key(self) -> None:
        """A token with no kid is checked against every key of the right type."""
        self.keys = [jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2"), jwk(EC_KEY, "e1", "ES256")]
        policy = self.policy()
        self.assertIsNone(await self.call(policy, context(self.token(RSA_KEY_2, None))))

    async def test_stale_set_used_when_server_fails(self) -> None:
        """Once a set was obtained, a failing server never causes a refusal: the stale set keeps
        serving, and refetches follow a doubling backoff."""
        policy = self.policy()
        await self.call(policy, context(self.token()))
        self.status = 500
        self.clock.advance(61)
        token = self.token(exp=NOW + 3600)
        self.assertIsNone(await self.call(policy, context(token)))
        await policy.caches[0].settled()
        self.assertEqual(len(self.server.requests), 2)
        self.assertEqual(policy.caches[0].failures, 1)
        self.assertIsNone(await self.call(policy, context(token)))  # within the 1 s backoff
        self.assertEqual(len(self.server.requests), 2)
        self.clock.advance(1)
        self.assertIsNone(await self.call(policy, context(token)))  # retried, failed again
        await policy.caches[0].settled()
        self.assertEqual(len(self.server.requests), 3)
        self.clock.advance(1)  # the backoff is now 2 s
        self.assertIsNone(await self.call(policy, context(token)))
        self.assertEqual(len(self.server.requests), 3)
        self.status = 200
        self.clock.advance(1)
        self.assertIsNone(await self.call(policy, context(token)))
        await policy.caches[0].settled()
        self.assertEqual(len(self.server.requests), 4)
        self.assertEqual(policy.caches[0].failures, 0)

    async def test_503_when_never_fetched(self) -> None:
        """No set ever obtained: 503; no new attempt within the backoff; success afterwards."""
        self.status = 500
        policy = self.policy()
        result = await self.call(policy, context(self.token()))
        self.assertIsInstance(result, LocalResponse)
        self.assertEqual(result.status, 503)
        self.assertEqual(json.loads(result.body), {"error": "Service Unavailable"})
        self.assertRefused(policy.on_request(context(self.token())), 503, result.body)
        self.assertEqual(len(self.server.requests), 1)
        self.status = 200
        self.clock.advance(1)
        self.assertIsNone(await self.call(policy, context(self.token())))
        self.assertEqual(len(self.server.requests), 2)

    async def test_503_when_unreachable_or_not_a_jwks(self) -> None:
        """A closed port, or a body that is not a key set, is a failed fetch."""
        port = free_port()
        policy = self.build(jwtKeyOrigin="jwks", jwksUrl=f"http://127.0.0.1:{port}/keys")
        result = await self.call(policy, context(self.token()))
        self.assertEqual(result.status, 503)
        self.keys = [{"kty": "nope"}]
        result = await self.call(self.policy(), context(self.token()))
        self.assertEqual(result.status, 503)

    async def test_several_urls(self) -> None:
        """A comma-separated jwksUrl merges the sets."""
        other = JsonServer(lambda request: (200, {"keys": [jwk(RSA_KEY_2, "k2")]}))
        other.listen(reactor)
        self.addCleanup(other.stop)
        policy = self.build(
            jwtKeyOrigin="jwks", jwksUrl=f"{self.server.url}/keys, {other.url}/keys"
        )
        self.assertIsNone(await self.call(policy, context(self.token())))
        self.assertIsNone(await self.call(policy, context(self.token(RSA_KEY_2, "k2"))))


class GatewayTests(TestCase):
    """jwt-validation-flex through a real gateway: text key and JWKS."""

    def setUp(self) -> None:
        """A recording upstream and a key server."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.keys = JsonServer(lambda request: (200, {"keys": [jwk(RSA_KEY, "k1")]}))
        self.keys.listen(reactor)
        self.addCleanup(self.keys.stop)
        self.port = free_port()

    def start(self, config: str) -> Gateway:
        """A gateway with one API protected by jwt-validation-flex."""
        text = api_document(self.port, self.upstream.address[1], name="jwt-api") + (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: jwt}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: jwt-api}\n"
            "  policyRef: {name: jwt-validation-flex}\n"
            f"  config:\n{config}"
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        return gateway

    async def get(self, token: str | None) -> client.Response:
        """One GET through the gateway."""
        auth = b"" if token is None else b"Authorization: Bearer " + token.encode() + b"\r\n"
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + auth + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_hmac_text_key(self) -> None:
        """400 without a token, 401 with a bad one (upstream untouched), 200 with a good one."""
        gateway = self.start(
            f"    signingMethod: hmac\n    signingKeyLength: 256\n    textKey: '{SECRET}'\n"
            "    mandatoryExpClaim: true\n"
        )
        missing = await self.get(None)
        self.assertEqual((missing.status, missing.body), (400, REQUIRED))
        self.assertEqual(missing.header("content-type"), [b"application/json"])
        bad = await self.get("not.a.token")
        self.assertEqual((bad.status, bad.body), (401, INVALID))
        self.assertEqual(self.upstream.received, [])
        import time

        token = jwt.encode({"sub": "a", "exp": time.time() + 600}, SECRET, algorithm="HS256")
        good = await self.get(token)
        self.assertEqual(good.status, 200)
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(
            self.upstream.received[0].header("authorization"), [b"Bearer " + token.encode()]
        )
        self.assertEqual([r["status"] for r in gateway.records()], [400, 401, 200])

    async def test_jwks(self) -> None:
        """RS256 tokens checked against a JWKS fetched from a loopback key server."""
        self.start(f"    jwtKeyOrigin: jwks\n    jwksUrl: {self.keys.url}/jwks.json\n")
        token = jwt.encode({"sub": "a"}, RSA_KEY, algorithm="RS256", headers={"kid": "k1"})
        self.assertEqual((await self.get(token)).status, 200)
        forged_token = jwt.encode({"sub": "a"}, RSA_KEY_2, "RS256", headers={"kid": "k1"})
        response = await self.get(forged_token)
        self.assertEqual((response.status, response.body), (401, INVALID))
        self.assertEqual(len(self.keys.requests), 1)
        self.assertEqual(len(self.upstream.received), 1)
