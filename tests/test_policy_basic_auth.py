"""http-basic-authentication-flex: accepted and refused credentials, config errors, end to end."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import basic_auth
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.basic_auth import KIND, UNAUTHORIZED_BODY, parse_basic
from flexgw.policies.expressions import compile_value
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port

FLEX_BODY = (
    "Registered authentication is set to HTTP basic authentication but there was no security "
    "context on the session."
)


def basic(credentials: bytes) -> bytes:
    """An Authorization value for raw `user:password` bytes."""
    return b"Basic " + base64.b64encode(credentials)


def context(*headers: tuple[bytes, bytes]) -> PolicyContext:
    """A PolicyContext for a GET with the given extra headers."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"api"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def build(config: dict[str, Any]) -> Any:
    """A policy for `config`."""
    return KIND.build(config, BuildContext("default/auth", "default/api"))


class BasicAuthUnitTests(TestCase):
    """The policy object on hand-made requests."""

    def setUp(self) -> None:
        """A binding for chris / admin."""
        self.policy = build({"username": "chris", "password": "admin"})

    def assertRefused(self, response: Any) -> None:
        """The exact 401 Flex sends."""
        self.assertIsInstance(response, LocalResponse)
        self.assertEqual(response.status, 401)
        self.assertEqual(
            list(response.headers),
            [
                (b"www-authenticate", b'Basic realm="mule-realm"'),
                (b"content-type", b"application/json; charset=UTF-8"),
            ],
        )
        self.assertEqual(json.loads(response.body), {"error": FLEX_BODY})
        self.assertEqual(response.body, UNAUTHORIZED_BODY)
        self.assertNotIn(b'": "', response.body)  # compact JSON, as observed

    def test_right_credentials_pass_and_set_principal(self) -> None:
        """The configured pair continues; authentication.principal is the username."""
        ctx = context((b"Authorization", basic(b"chris:admin")))
        self.assertIsNone(self.policy.on_request(ctx))
        self.assertEqual(ctx.authentication["principal"], "chris")

    def test_principal_visible_to_later_expressions(self) -> None:
        """`#[authentication.principal]` evaluated after the policy sees the username, even when
        an expression ran on this request before it."""
        ctx = context((b"Authorization", basic(b"chris:admin")))
        expression = compile_value("#[authentication.principal]")
        self.assertIsNone(expression.evaluate(ctx.expression_context()))
        self.policy.on_request(ctx)
        self.assertEqual(expression.evaluate(ctx.expression_context()), "chris")

    def test_authorization_header_left_for_upstream(self) -> None:
        """The policy does not touch the upstream request headers."""
        ctx = context((b"Authorization", basic(b"chris:admin")))
        self.policy.on_request(ctx)
        self.assertFalse(ctx.request_headers_changed)

    def test_scheme_case_insensitive_and_missing_padding(self) -> None:
        """`basic` in any case, and base64 without its padding, are accepted."""
        token = base64.b64encode(b"chris:admin").rstrip(b"=")
        self.assertIsNone(self.policy.on_request(context((b"authorization", b"bAsIc  " + token))))

    def test_password_with_colons(self) -> None:
        """Only the first colon separates the user-id (RFC 7617)."""
        policy = build({"username": "u", "password": "a:b:c"})
        self.assertIsNone(policy.on_request(context((b"Authorization", basic(b"u:a:b:c")))))

    def test_utf8_credentials(self) -> None:
        """Non-ASCII credentials compare as UTF-8."""
        policy = build({"username": "jörg", "password": "pässword"})
        ok = basic("jörg:pässword".encode())
        self.assertIsNone(policy.on_request(context((b"Authorization", ok))))
        latin1 = basic("jörg:pässword".encode("latin-1"))
        self.assertRefused(policy.on_request(context((b"Authorization", latin1))))

    def test_wrong_password_or_user(self) -> None:
        """Either half wrong is the same 401."""
        for pair in (b"chris:admiN", b"chriS:admin", b"chris:", b":admin", b"x:y"):
            self.assertRefused(self.policy.on_request(context((b"Authorization", basic(pair)))))

    def test_missing_header(self) -> None:
        """No Authorization header: 401."""
        self.assertRefused(self.policy.on_request(context()))

    def test_malformed_headers_are_401(self) -> None:
        """Another scheme, bad base64, no colon, junk: 401, never an exception."""
        values = [
            b"Bearer abc",
            b"Basic",
            b"Basic ",
            b"Basic !!!!",
            b"Basic " + base64.b64encode(b"chrisadmin"),
            b"Basic " + base64.b64encode(b"chris:admin") + b"x",
            b"Digest username=chris",
            b"\xff\xfe",
            b"Basic " + b"A" * 20000,
        ]
        for value in values:
            self.assertRefused(self.policy.on_request(context((b"Authorization", value))))

    def test_several_authorization_headers_refused(self) -> None:
        """Two Authorization headers are ambiguous: 401 even if one is right."""
        ctx = context((b"Authorization", basic(b"chris:admin")), (b"Authorization", basic(b"x:y")))
        self.assertRefused(self.policy.on_request(ctx))

    def test_parse_basic(self) -> None:
        """The credential parser splits user-id and password."""
        self.assertEqual(parse_basic(basic(b"a:b:c")), (b"a", b"b:c"))
        self.assertIsNone(parse_basic(b"Basic @@@"))

    def test_comparison_is_digest_based(self) -> None:
        """Stored values are digests (so a compare cannot short-circuit on length)."""
        self.assertEqual(len(self.policy.user_digest), 32)
        self.assertEqual(len(self.policy.password_digest), 32)
        self.assertNotIn("admin", repr(self.policy))

    def test_accepted_values_remembered_exactly(self) -> None:
        """A value that passed is remembered (its exact bytes) and passes without the digest;
        values close to it (another case, a space, another password, one header too many)
        still take the full check and are refused."""
        right = basic(b"chris:admin")
        self.assertIsNone(self.policy.on_request(context((b"Authorization", right))))
        self.assertEqual(list(self.policy.accepted), [right])
        self.patch(basic_auth, "_digest", lambda value: self.fail("digest on a remembered value"))
        self.assertIsNone(self.policy.on_request(context((b"Authorization", right))))
        self.patch(basic_auth, "_digest", lambda value: basic_auth.hashlib.sha256(value).digest())
        for wrong in (
            basic(b"chris:admiN"),
            basic(b"Chris:admin"),
            basic(b"chris:admin ").rstrip(b"="),
            right[:-2],
            right + b"A",
            right.replace(b"Basic", b"Bearer"),
        ):
            self.assertRefused(self.policy.on_request(context((b"Authorization", wrong))))
        self.assertRefused(
            self.policy.on_request(context((b"Authorization", right), (b"Authorization", right)))
        )
        self.assertEqual(list(self.policy.accepted), [right])

    def test_accepted_values_bounded(self) -> None:
        """However many spellings of the right credentials arrive, at most ACCEPTED_LIMIT are
        remembered; each still passes."""
        token = base64.b64encode(b"chris:admin")
        for spaces in range(1, 3 * basic_auth.ACCEPTED_LIMIT):
            value = b"Basic" + b" " * spaces + token
            self.assertIsNone(self.policy.on_request(context((b"Authorization", value))))
            self.assertLessEqual(len(self.policy.accepted), basic_auth.ACCEPTED_LIMIT)

    def test_other_binding_remembers_nothing(self) -> None:
        """What one binding accepted (remembered) is nothing to a binding with another
        password, as after a reload that changed it."""
        right = basic(b"chris:admin")
        self.assertIsNone(self.policy.on_request(context((b"Authorization", right))))
        changed = build({"username": "chris", "password": "admin2"})
        self.assertRefused(changed.on_request(context((b"Authorization", right))))


class BasicAuthConfigTests(TestCase):
    """Config errors a schema cannot catch name their field."""

    def test_empty_values(self) -> None:
        """Empty username or password (an unset $ENV) is refused."""
        for field in ("username", "password"):
            config = {"username": "u", "password": "p", field: ""}
            with self.assertRaises(PolicyConfigError) as caught:
                build(config)
            self.assertEqual(caught.exception.field, field)

    def test_colon_in_username(self) -> None:
        """A username with ':' could never match."""
        with self.assertRaises(PolicyConfigError) as caught:
            build({"username": "a:b", "password": "p"})
        self.assertEqual(caught.exception.field, "username")

    def test_schema_lists_flex_keys(self) -> None:
        """The schema knows exactly Flex's keys."""
        self.assertEqual(set(basic_auth.SCHEMA["properties"]), {"username", "password"})
        self.assertFalse(basic_auth.SCHEMA["additionalProperties"])


BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: auth}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: http-basic-authentication-flex}
  config:
    username: chris
    password: $PASSWORD
"""


class BasicAuthEndToEndTests(TestCase):
    """Through a real gateway and upstream."""

    def setUp(self) -> None:
        """A recording upstream and a gateway port."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, binding: str, environ: dict[str, str] | None = None) -> Gateway:
        """A gateway with one API and `binding`."""
        api = api_document(self.port, self.upstream.address[1])
        gateway = Gateway(self, {"api.yaml": api + binding}, environ)
        gateway.start()
        return gateway

    async def get(self, *headers: bytes) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_accept_and_refuse(self) -> None:
        """The right pair reaches the upstream with its Authorization header; others get 401."""
        self.start(BINDING, {"PASSWORD": "s3cret"})
        good = b"Authorization: " + basic(b"chris:s3cret")
        response = await self.get(good)
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.upstream.received), 1)
        self.assertEqual(
            self.upstream.received[0].header("authorization"), [basic(b"chris:s3cret")]
        )

        refused = await self.get(b"Authorization: " + basic(b"chris:wrong"))
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.header("www-authenticate"), [b'Basic realm="mule-realm"'])
        self.assertEqual(refused.header("content-type"), [b"application/json; charset=UTF-8"])
        self.assertEqual(json.loads(refused.body), {"error": FLEX_BODY})
        missing = await self.get()
        self.assertEqual(missing.status, 401)
        garbage = await self.get(b"Authorization: Basic %%%")
        self.assertEqual(garbage.status, 401)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_missing_password_is_config_error(self) -> None:
        """A binding without password does not serve the API (fail closed), with its location."""
        gateway = self.start(BINDING.replace("    password: $PASSWORD\n", ""))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(any("password" in p.message for p in errors), errors)
        self.assertEqual(gateway.service.plan.listeners, ())
