"""client-id-enforcement-flex: local registry (inline and file), origins, 401s, config errors, end to end."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies.base import BuildContext, LocalResponse, PolicyConfigError, PolicyContext
from flexgw.policies.client_id import KIND, SCHEMA
from flexgw.policies.expressions import compile_value
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import Gateway, api_document, free_port

CREDENTIALS = [
    {"clientId": "1234", "clientSecret": "abcd", "name": "billing-app"},
    {"clientId": "5678", "clientSecret": "efgh"},
]
NOT_PRESENT = {"error": "Client ID is not present"}
FAILED = {"error": "Authentication Attempt Failed"}
CUSTOM = (b"www-authenticate", b"Client-ID-Enforcement")
BASIC = (b"www-authenticate", b'Basic realm="mule-realm"')
BASIC_ORIGIN = {
    "credentialsOriginHasHttpBasicAuthenticationHeader": "httpBasicAuthenticationHeader"
}


def context(*headers: tuple[bytes, bytes], target: bytes = b"/x") -> PolicyContext:
    """A PolicyContext for a GET with extra headers."""
    head = analyze_head(b"GET", target, "1.1", [(b"Host", b"api"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def build(**config: Any) -> Any:
    """A policy for `config` (inline CREDENTIALS unless a registry is given)."""
    if "credentials" not in config and "credentialsFile" not in config:
        config["credentials"] = CREDENTIALS
    return KIND.build(config, BuildContext("default/cid", "default/api"))


def write_file(path: str, text: str) -> str:
    """Write `text` to `path`; its absolute path."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return os.path.abspath(path)


def basic(pair: bytes) -> tuple[bytes, bytes]:
    """An Authorization header for raw `id:secret`."""
    return (b"Authorization", b"Basic " + base64.b64encode(pair))


class ClientIdUnitTests(TestCase):
    """The policy object on hand-made requests."""

    def assertRefused(
        self, response: Any, body: dict[str, str], challenge: tuple[bytes, bytes] = CUSTOM
    ) -> None:
        """A 401 with the challenge and body."""
        self.assertIsInstance(response, LocalResponse)
        self.assertEqual(response.status, 401)
        self.assertEqual(
            list(response.headers), [challenge, (b"content-type", b"application/json")]
        )
        self.assertEqual(json.loads(response.body), body)

    def test_default_headers_accepted(self) -> None:
        """client_id / client_secret headers (the defaults) pass; authentication is set."""
        ctx = context((b"client_id", b"1234"), (b"client_secret", b"abcd"))
        self.assertIsNone(build().on_request(ctx))
        self.assertEqual(ctx.authentication["clientId"], "1234")
        self.assertEqual(ctx.authentication["clientName"], "billing-app")
        later = compile_value("#[authentication.clientName]")
        self.assertEqual(later.evaluate(ctx.expression_context()), "billing-app")

    def test_client_without_name(self) -> None:
        """A client registered without a name has clientName null."""
        ctx = context((b"client_id", b"5678"), (b"client_secret", b"efgh"))
        self.assertIsNone(build().on_request(ctx))
        self.assertIsNone(ctx.authentication["clientName"])

    def test_missing_id(self) -> None:
        """No client id (or an empty one): 'Client ID is not present'."""
        policy = build()
        self.assertRefused(policy.on_request(context()), NOT_PRESENT)
        self.assertRefused(policy.on_request(context((b"client_id", b""))), NOT_PRESENT)
        only_secret = context((b"client_secret", b"abcd"))
        self.assertRefused(policy.on_request(only_secret), NOT_PRESENT)

    def test_wrong_credentials(self) -> None:
        """Unknown id, wrong secret, missing secret, another client's secret: the same 401."""
        policy = build()
        cases = [
            [(b"client_id", b"9999"), (b"client_secret", b"abcd")],
            [(b"client_id", b"1234"), (b"client_secret", b"abce")],
            [(b"client_id", b"1234")],
            [(b"client_id", b"1234"), (b"client_secret", b"")],
            [(b"client_id", b"1234"), (b"client_secret", b"efgh")],
        ]
        for headers in cases:
            ctx = context(*headers)
            self.assertRefused(policy.on_request(ctx), FAILED)
            self.assertIsNone(ctx.authentication)

    def test_secret_optional(self) -> None:
        """clientSecretExpression null or "" checks the id only (clients may lack secrets)."""
        for blank in (None, ""):
            policy = build(
                clientSecretExpression=blank, credentials=[{"clientId": "1234", "name": "a"}]
            )
            self.assertIsNone(policy.on_request(context((b"client_id", b"1234"))))
            self.assertRefused(policy.on_request(context((b"client_id", b"12345"))), FAILED)

    def test_custom_expressions(self) -> None:
        """Query parameters, as in the Flex docs' example."""
        policy = build(
            clientIdExpression="#[attributes.queryParams.'client_id']",
            clientSecretExpression="#[attributes.queryParams.'client_secret']",
        )
        ok = context(target=b"/x?client_id=1234&client_secret=abcd")
        self.assertIsNone(policy.on_request(ok))
        bad = context(target=b"/x?client_id=1234&client_secret=nope")
        self.assertRefused(policy.on_request(bad), FAILED)

    def test_http_basic_origin(self) -> None:
        """Credentials from Authorization: Basic; the Basic challenge on 401."""
        policy = build(**BASIC_ORIGIN)
        ctx = context(basic(b"1234:abcd"))
        self.assertIsNone(policy.on_request(ctx))
        self.assertEqual(ctx.authentication["clientId"], "1234")
        self.assertRefused(policy.on_request(context(basic(b"1234:x"))), FAILED, BASIC)
        self.assertRefused(policy.on_request(context()), NOT_PRESENT, BASIC)
        headers_ignored = context((b"client_id", b"1234"), (b"client_secret", b"abcd"))
        self.assertRefused(policy.on_request(headers_ignored), NOT_PRESENT, BASIC)
        malformed = context((b"Authorization", b"Basic %%%"))
        self.assertRefused(policy.on_request(malformed), NOT_PRESENT, BASIC)
        latin1 = context(basic("jörg:abcd".encode("latin-1")))
        self.assertRefused(policy.on_request(latin1), NOT_PRESENT, BASIC)

    def test_secret_digests_only(self) -> None:
        """Secrets are held as digests, not in clear."""
        self.assertNotIn("abcd", repr(build()))

    def test_credentials_file_yaml_and_json(self) -> None:
        """A YAML list, a JSON list and a `credentials:` mapping all load; inline adds to them."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        files = {
            "c.yaml": "- {clientId: 1234, clientSecret: abcd, name: yaml-app}\n",
            "c.json": json.dumps([{"clientId": "1234", "clientSecret": "abcd"}]),
            "wrapped.yml": "credentials:\n  - clientId: '1234'\n    clientSecret: abcd\n",
        }
        for name, text in files.items():
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            policy = build(
                credentialsFile=path, credentials=[{"clientId": "x", "clientSecret": "y"}]
            )
            good = context((b"client_id", b"1234"), (b"client_secret", b"abcd"))
            self.assertIsNone(policy.on_request(good), name)
            self.assertIsNone(
                policy.on_request(context((b"client_id", b"x"), (b"client_secret", b"y")))
            )


class ClientIdConfigTests(TestCase):
    """Config errors name their field."""

    def assertConfigError(self, field: str, text: str, **config: Any) -> None:
        """Building raises PolicyConfigError at `field` with `text` in the message."""
        with self.assertRaises(PolicyConfigError) as caught:
            KIND.build(config, BuildContext("default/cid", "default/api"))
        self.assertEqual(caught.exception.field, field)
        self.assertIn(text, caught.exception.message)

    def test_no_registry(self) -> None:
        """Neither credentials nor credentialsFile."""
        self.assertConfigError("", "credentials or credentialsFile")

    def test_duplicate_client(self) -> None:
        """The same clientId twice."""
        dup = [{"clientId": "a", "clientSecret": "1"}, {"clientId": "a", "clientSecret": "2"}]
        self.assertConfigError("credentials.1", "registered twice", credentials=dup)

    def test_secret_required_when_checked(self) -> None:
        """A client without secret while secrets are checked."""
        self.assertConfigError(
            "credentials.0", "clientSecret is required", credentials=[{"clientId": "a"}]
        )

    def test_bad_entries(self) -> None:
        """Entries that are not mappings, or lack a clientId."""
        self.assertConfigError("credentials.0", "mapping", credentials=["a"])
        self.assertConfigError("credentials.0", "clientId", credentials=[{"clientSecret": "x"}])

    def test_bad_expression(self) -> None:
        """A syntax error in an expression is located on its field."""
        self.assertConfigError(
            "clientIdExpression",
            "clientIdExpression",
            clientIdExpression="#[attributes.headers[",
            credentials=CREDENTIALS,
        )

    def test_bad_origin(self) -> None:
        """An unknown credentials origin."""
        self.assertConfigError(
            "credentialsOriginHasHttpBasicAuthenticationHeader",
            "customExpression",
            credentialsOriginHasHttpBasicAuthenticationHeader="header",
            credentials=CREDENTIALS,
        )

    def test_file_errors(self) -> None:
        """Relative, missing, unparsable and wrongly shaped files."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.assertConfigError("credentialsFile", "absolute", credentialsFile="creds.yaml")
        missing = os.path.join(directory, "none.yaml")
        self.assertConfigError("credentialsFile", "none.yaml", credentialsFile=missing)
        for name, text, message in (
            ("bad.yaml", "- [unclosed\n", "not valid"),
            ("bad.json", "{", "not valid"),
            ("shape.yaml", "clientId: a\n", "must hold a list"),
            ("entry.yaml", "- {clientId: a}\n", "clientSecret is required"),
        ):
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            self.assertConfigError("credentialsFile", message, credentialsFile=path)

    def test_schema_keys(self) -> None:
        """Flex's Connected Mode keys plus the local registry keys."""
        self.assertEqual(
            set(SCHEMA["properties"]),
            {
                "credentialsOriginHasHttpBasicAuthenticationHeader",
                "clientIdExpression",
                "clientSecretExpression",
                "credentials",
                "credentialsFile",
            },
        )


class ClientIdEndToEndTests(TestCase):
    """Through a real gateway and upstream."""

    def setUp(self) -> None:
        """A recording upstream and a gateway port."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    def start(self, config: str) -> Gateway:
        """A gateway with one API and a client-id binding with `config`."""
        text = api_document(self.port, self.upstream.address[1]) + (
            "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
            "metadata: {name: cid}\n"
            "spec:\n  targetRef: {kind: ApiInstance, name: test-api}\n"
            "  policyRef: {name: client-id-enforcement-flex}\n"
            "  config:\n" + config
        )
        gateway = Gateway(self, {"api.yaml": text})
        gateway.start()
        return gateway

    async def get(self, *headers: bytes) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_inline_registry(self) -> None:
        """Registered pair reaches the upstream; missing and wrong ones get Flex's 401s."""
        self.start(
            "    credentials:\n      - {clientId: '1234', clientSecret: abcd, name: billing}\n"
        )
        ok = await self.get(b"client_id: 1234", b"client_secret: abcd")
        self.assertEqual(ok.status, 200)
        self.assertEqual(self.upstream.received[0].header("client_id"), [b"1234"])
        missing = await self.get()
        self.assertEqual(missing.status, 401)
        self.assertEqual(missing.header("www-authenticate"), [b"Client-ID-Enforcement"])
        self.assertEqual(json.loads(missing.body), NOT_PRESENT)
        wrong = await self.get(b"client_id: 1234", b"client_secret: nope")
        self.assertEqual(wrong.status, 401)
        self.assertEqual(json.loads(wrong.body), FAILED)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_file_registry_with_basic_origin(self) -> None:
        """A credentials file and the HTTP Basic origin."""
        path = write_file(self.mktemp(), "- clientId: app\n  clientSecret: s3cret\n")
        self.start(
            "    credentialsOriginHasHttpBasicAuthenticationHeader: httpBasicAuthenticationHeader\n"
            f"    credentialsFile: {path}\n"
        )
        token = base64.b64encode(b"app:s3cret")
        self.assertEqual((await self.get(b"Authorization: Basic " + token)).status, 200)
        refused = await self.get(b"Authorization: Basic " + base64.b64encode(b"app:x"))
        self.assertEqual(refused.status, 401)
        self.assertEqual(refused.header("www-authenticate"), [b'Basic realm="mule-realm"'])

    async def test_missing_file_fails_closed(self) -> None:
        """A missing credentials file is an error at spec.config.credentialsFile."""
        gateway = self.start("    credentialsFile: /nonexistent/flexgw-clients.yaml\n")
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.credentialsFile" for p in errors),
            [(p.message, p.field) for p in errors],
        )
        self.assertEqual(gateway.service.plan.listeners, ())
