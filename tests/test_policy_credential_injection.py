"""credential-injection-basic-auth-flex and credential-injection-api-key-flex: what the upstream receives, overwrite, config errors, end to end."""

from __future__ import annotations

import base64
from typing import Any

import jsonschema
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyConfigError, PolicyContext
from flexgw.policies.credential_injection import API_KEY_KIND, BASIC_KIND
from flexgw.testing import client
from flexgw.testing.upstream import RecordingUpstream
from tests.harness import free_port
from tests.outbound import outbound_binding, start_outbound_gateway


def context(*headers: tuple[bytes, bytes]) -> PolicyContext:
    """A GET with the given extra headers."""
    head = analyze_head(b"GET", b"/x", "1.1", [(b"Host", b"api"), *headers], True)
    assert isinstance(head, RequestHead)
    return PolicyContext(head, "127.0.0.1", "http", "default/api")


def build(kind: Any, **config: Any) -> Any:
    """A policy of `kind` for a schema-valid `config`."""
    jsonschema.Draft202012Validator(kind.schema).validate(config)
    return kind.build(config, BuildContext("default/inject", None))


def sent(ctx: PolicyContext) -> list[tuple[bytes, bytes]]:
    """The headers the upstream would get."""
    return ctx.request_headers if ctx.request_headers_changed else list(ctx.head.headers)


class BasicInjectionTests(TestCase):
    """credential-injection-basic-auth-flex on hand-made requests."""

    def test_registered_outbound(self) -> None:
        """Both kinds are built-in outbound kinds."""
        self.assertIs(registry.lookup("credential-injection-basic-auth-flex"), BASIC_KIND)
        self.assertIs(registry.lookup("credential-injection-api-key-flex"), API_KEY_KIND)
        self.assertEqual((BASIC_KIND.phase, API_KEY_KIND.phase), ("outbound", "outbound"))

    def test_injects_and_replaces_clients(self) -> None:
        """overwrite (default): every client Authorization is replaced by the injected one."""
        policy = build(BASIC_KIND, username="svc", password="pw")
        ctx = context((b"Authorization", b"Bearer client-token"), (b"authorization", b"x"))
        self.assertIsNone(policy.on_request(ctx))
        values = [v for n, v in sent(ctx) if n.lower() == b"authorization"]
        self.assertEqual(values, [b"Basic " + base64.b64encode(b"svc:pw")])

    def test_overwrite_false_keeps_clients(self) -> None:
        """overwrite false: the client's value stays; a request without one gets ours."""
        policy = build(BASIC_KIND, username="svc", password="pw", overwrite=False)
        ctx = context((b"Authorization", b"Bearer client-token"))
        policy.on_request(ctx)
        self.assertEqual(
            [v for n, v in sent(ctx) if n.lower() == b"authorization"], [b"Bearer client-token"]
        )
        bare = context()
        policy.on_request(bare)
        self.assertIn((b"Authorization", b"Basic " + base64.b64encode(b"svc:pw")), sent(bare))

    def test_custom_header(self) -> None:
        """customHeader carries the credential; Authorization is left alone."""
        policy = build(BASIC_KIND, username="svc", password="pw", customHeader="X-Upstream-Auth")
        ctx = context((b"Authorization", b"Bearer mine"))
        policy.on_request(ctx)
        self.assertIn((b"Authorization", b"Bearer mine"), sent(ctx))
        self.assertIn((b"X-Upstream-Auth", b"Basic " + base64.b64encode(b"svc:pw")), sent(ctx))

    def test_config_errors(self) -> None:
        """A ':' in the username, a framing header, or no username are refused."""
        with self.assertRaises(PolicyConfigError) as caught:
            build(BASIC_KIND, username="a:b", password="pw")
        self.assertEqual(caught.exception.field, "username")
        with self.assertRaises(PolicyConfigError) as caught:
            build(BASIC_KIND, username="a", password="pw", customHeader="Content-Length")
        self.assertEqual(caught.exception.field, "customHeader")
        with self.assertRaises(jsonschema.ValidationError):
            build(BASIC_KIND, password="pw")

    def test_secret_not_in_repr(self) -> None:
        """The credential is not in the policy's repr (which may reach logs)."""
        policy = build(BASIC_KIND, username="svc", password="topsecret")
        self.assertNotIn(base64.b64encode(b"svc:topsecret").decode(), repr(policy))


class ApiKeyInjectionTests(TestCase):
    """credential-injection-api-key-flex on hand-made requests."""

    def test_api_key_default_header(self) -> None:
        """apiKey goes to Authorization by default, replacing the client's."""
        policy = build(API_KEY_KIND, authType="apiKey", apiKey="k-123")
        ctx = context((b"Authorization", b"client"))
        policy.on_request(ctx)
        self.assertEqual([v for n, v in sent(ctx) if n.lower() == b"authorization"], [b"k-123"])

    def test_api_key_custom_header(self) -> None:
        """customHeader names the header; the client's copy of it is replaced."""
        policy = build(API_KEY_KIND, authType="apiKey", apiKey="k-123", customHeader="X-Api-Key")
        ctx = context((b"x-api-key", b"client-key"))
        policy.on_request(ctx)
        self.assertEqual([v for n, v in sent(ctx) if n.lower() == b"x-api-key"], [b"k-123"])

    def test_client_credentials(self) -> None:
        """clientCredentials: client_id / client_secret, or the custom header names."""
        policy = build(API_KEY_KIND, authType="clientCredentials", clientId="id", clientSecret="s")
        ctx = context()
        policy.on_request(ctx)
        self.assertIn((b"client_id", b"id"), sent(ctx))
        self.assertIn((b"client_secret", b"s"), sent(ctx))
        custom = build(
            API_KEY_KIND, authType="clientCredentials", clientId="id", clientSecret="s",
            customClientIdHeader="X-Id", customClientSecretHeader="X-Secret", overwrite=False,
        )
        ctx = context((b"X-Id", b"client-id"))
        custom.on_request(ctx)
        self.assertIn((b"X-Id", b"client-id"), sent(ctx))  # overwrite false: kept
        self.assertNotIn((b"X-Id", b"id"), sent(ctx))
        self.assertIn((b"X-Secret", b"s"), sent(ctx))

    def test_schema_requires_per_auth_type(self) -> None:
        """apiKey needs apiKey; clientCredentials needs both; expression keys are refused."""
        for config in (
            {"authType": "apiKey"},
            {"authType": "clientCredentials", "clientId": "id"},
            {"authType": "apiKey", "apiKey": "k", "apiKeyType": "expression"},
            {"authType": "other", "apiKey": "k"},
        ):
            with self.assertRaises(jsonschema.ValidationError, msg=config):
                build(API_KEY_KIND, **config)

    def test_value_with_newline_refused(self) -> None:
        """A key with CR/LF (header injection) is a config error."""
        with self.assertRaises(PolicyConfigError) as caught:
            build(API_KEY_KIND, authType="apiKey", apiKey="k\r\nX-Evil: 1")
        self.assertEqual(caught.exception.field, "apiKey")


class InjectionEndToEndTests(TestCase):
    """Bound to a Service, through a real gateway and a recording upstream."""

    def setUp(self) -> None:
        """A recording upstream and a gateway port."""
        self.upstream = RecordingUpstream(reactor=reactor)
        self.upstream.listen(reactor)
        self.addCleanup(self.upstream.stop)
        self.port = free_port()

    async def get(self, *headers: bytes) -> client.Response:
        """One GET through the gateway."""
        raw = b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return await client.request(reactor, "127.0.0.1", self.port, raw)

    async def test_basic_auth_replaces_client_credentials(self) -> None:
        """The upstream gets the Service's credentials from $ENV, never the client's."""
        bindings = outbound_binding(
            "inject", "credential-injection-basic-auth-flex",
            "username: svc\npassword: $UPSTREAM_PASSWORD\n",
        )
        start_outbound_gateway(
            self, self.port, self.upstream.address[1], bindings, {"UPSTREAM_PASSWORD": "pw!"}
        )
        response = await self.get(b"Authorization: Bearer client-secret-token")
        self.assertEqual(response.status, 200)
        received = self.upstream.received[0]
        self.assertEqual(received.header("authorization"), [b"Basic " + base64.b64encode(b"svc:pw!")])
        self.assertNotIn(b"client-secret-token", received.raw)

    async def test_api_key_and_client_credentials_stack(self) -> None:
        """Two injection bindings on one Service both apply; API-level clients are unaffected."""
        bindings = outbound_binding(
            "key", "credential-injection-api-key-flex",
            "authType: apiKey\napiKey: k-1\ncustomHeader: X-Api-Key\n",
        ) + outbound_binding(
            "cc", "credential-injection-api-key-flex",
            "authType: clientCredentials\nclientId: the-id\nclientSecret: the-secret\n",
        )
        start_outbound_gateway(self, self.port, self.upstream.address[1], bindings)
        response = await self.get(b"X-Api-Key: forged", b"client_secret: forged")
        self.assertEqual(response.status, 200)
        received = self.upstream.received[0]
        self.assertEqual(received.header("x-api-key"), [b"k-1"])
        self.assertEqual(received.header("client_id"), [b"the-id"])
        self.assertEqual(received.header("client_secret"), [b"the-secret"])
        self.assertNotIn(b"forged", received.raw)

    async def test_invalid_binding_fails_closed(self) -> None:
        """An invalid outbound binding keeps the APIs routed to the Service from being served."""
        bindings = outbound_binding(
            "key", "credential-injection-api-key-flex", "authType: apiKey\n"
        )
        gateway = start_outbound_gateway(self, self.port, self.upstream.address[1], bindings)
        self.assertEqual(gateway.service.plan.listeners, ())
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(any(p.file and p.line for p in errors), errors)
