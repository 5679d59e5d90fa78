"""spec-validation-flex: compiling the spec (located errors), parameters and bodies, end to end."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from twisted.trial.unittest import TestCase

from flexgw.http.request import analyze_head
from flexgw.policies import registry
from flexgw.policies.base import BuildContext, PolicyConfigError, PolicyContext
from flexgw.policies.spec_validation import KIND, SpecValidationKind
from tests.harness import PolicyGatewayCase, assert_loads_cleanly

SPEC = """\
openapi: 3.0.3
info: {title: orders, version: '1'}
paths:
  /items/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer}}
    get:
      parameters:
        - {name: limit, in: query, schema: {type: integer, maximum: 10}}
        - {name: tags, in: query, schema: {type: array, items: {type: string, enum: [a, b]}}}
        - {name: X-Tenant, in: header, required: true, schema: {type: string}}
        - {name: session, in: cookie, schema: {type: string, minLength: 3}}
      responses: {'200': {description: ok}}
  /items:
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Item'}
          multipart/form-data:
            schema:
              type: object
              required: [file]
              properties: {file: {type: string, format: binary}, qty: {type: integer}}
      responses: {'201': {description: created}}
components:
  schemas:
    Item:
      type: object
      required: [name]
      additionalProperties: false
      properties: {name: {type: string}, qty: {type: integer, minimum: 1}}
"""


def build(spec: str = SPEC, **config: Any) -> Any:
    """The policy for `spec`."""
    return KIND.build(
        {"source": "inline", "spec": spec, "blockOperation": True, **config},
        BuildContext("default/spec", "default/api"),
    )


def context(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] = (), body: bytes | None = None) -> PolicyContext:
    """A request context (with its body, as the exchange hands it over)."""
    extra = [(b"Content-Length", b"%d" % len(body))] if body is not None else []
    head = analyze_head(method, target, "1.1", [(b"Host", b"t"), *headers, *extra], True)
    ctx = PolicyContext(head, "127.0.0.1", "http", "default/api")
    ctx.body = body
    return ctx


def error(response: Any) -> str | None:
    """The error message of a 400, None when the request passed."""
    if response is None:
        return None
    assert response.status == 400
    return json.loads(response.body)["error"]


def binding(spec: str = SPEC, extra: str = "    blockOperation: true\n") -> str:
    """A PolicyBinding document with the spec inline."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: spec}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: spec-validation-flex}\n"
        "  config:\n    source: inline\n    apiBasePath: /\n" + extra
        + "    spec: |\n" + textwrap.indent(spec, "      ")
    )


class ValidationTests(TestCase):
    """The compiled spec on hand-made requests."""

    def test_parameters(self) -> None:
        """Path, query (typed, arrays), header and cookie parameters; values never echoed."""
        policy = build()
        tenant = [(b"X-Tenant", b"acme")]
        self.assertIsNone(policy.on_request(context(b"GET", b"/items/5?limit=3&tags=a&tags=b", tenant)))
        cases = (
            (b"/items/x", tenant, "Invalid path parameter 'id': not of type 'integer'"),
            (b"/items/5?limit=30", tenant, "Invalid query parameter 'limit': fails 'maximum' (10)"),
            (b"/items/5?tags=zzz", tenant, "Invalid query parameter 'tags': fails 'enum' ([\"a\", \"b\"]) at /0"),
            (b"/items/5", [], "Missing required header parameter 'X-Tenant'"),
            (b"/items/5", [*tenant, (b"Cookie", b"session=ab")],
             "Invalid cookie parameter 'session': fails 'minLength' (3)"),
            (b"/nowhere", tenant, "Path not found in the API specification"),
        )
        for target, headers, message in cases:
            self.assertEqual(error(policy.on_request(context(b"GET", target, headers))), message)
        self.assertEqual(error(policy.on_request(context(b"DELETE", b"/items/5", tenant))),
                         "Method not allowed for this path in the API specification")

    def test_strict_params_and_base_path(self) -> None:
        """strictParamsValidation refuses unknown query parameters; apiBasePath is stripped."""
        policy = build(strictParamsValidation=True, apiBasePath="/api/")
        tenant = [(b"X-Tenant", b"acme")]
        self.assertIsNone(policy.on_request(context(b"GET", b"/api/items/5?limit=1", tenant)))
        self.assertEqual(error(policy.on_request(context(b"GET", b"/api/items/5?debug=1", tenant))),
                         "Query parameter not defined in the API specification")
        self.assertEqual(error(policy.on_request(context(b"GET", b"/items/5", tenant))),
                         "Path not found in the API specification")

    def test_bodies(self) -> None:
        """JSON through a $ref, multipart with a file, the content type and required bodies."""
        policy = build()
        json_type = [(b"Content-Type", b"application/json")]
        self.assertIsNone(policy.on_request(context(b"POST", b"/items", json_type, b'{"name": "a", "qty": 2}')))
        self.assertEqual(error(policy.on_request(context(b"POST", b"/items", json_type, b'{"name": "a", "qty": 0}'))),
                         "Invalid request body: fails 'minimum' (1) at /qty")
        self.assertEqual(error(policy.on_request(context(b"POST", b"/items", json_type, b'{"nam'))),
                         "Invalid request body: not JSON")
        self.assertEqual(error(policy.on_request(context(b"POST", b"/items", json_type, None))),
                         "Missing required request body")
        self.assertEqual(error(policy.on_request(context(b"POST", b"/items", [(b"Content-Type", b"text/plain")], b"x"))),
                         "Content type not allowed by the API specification")
        form = [(b"Content-Type", b"multipart/form-data; boundary=XyZ")]
        good = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
                b'Content-Type: application/octet-stream\r\n\r\n\x00\x01\r\n'
                b'--XyZ\r\nContent-Disposition: form-data; name="qty"\r\n\r\n3\r\n--XyZ--\r\n')
        self.assertIsNone(policy.on_request(context(b"POST", b"/items", form, good)))
        bad = b'--XyZ\r\nContent-Disposition: form-data; name="qty"\r\n\r\nthree\r\n--XyZ--\r\n'
        self.assertEqual(error(policy.on_request(context(b"POST", b"/items", form, bad))),
                         "Invalid request body: fails 'required' ([\"file\"])")
        self.assertTrue(policy.needs_body)
        self.assertFalse(build(SPEC.split("  /items:\n")[0]).needs_body)

    def test_broken_specs_are_located(self) -> None:
        """Bad YAML and a spec OpenAPI rejects name the line and column inside `spec`."""
        with self.assertRaises(PolicyConfigError) as caught:
            build("openapi: 3.0.3\npaths: {a: [\n")
        self.assertEqual(caught.exception.field, "spec")
        self.assertIn("line 3, column 1 of the spec", caught.exception.message)
        broken = SPEC.replace("in: cookie", "in: body")
        with self.assertRaises(PolicyConfigError) as caught:
            build(broken)
        self.assertIn("line 12, column 11 of the spec (paths//items/{id}/get/parameters/3)",
                      caught.exception.message)
        with self.assertRaises(PolicyConfigError):
            build("swagger: '2.0'\n")

    def test_registered_and_flex_example_validates(self) -> None:
        """Registered under Flex's name; `flexgw validate`'s pipeline accepts Flex's keys."""
        self.assertIsInstance(registry.lookup("spec-validation-flex"), SpecValidationKind)
        assert_loads_cleanly(self, binding())


class EndToEndTests(PolicyGatewayCase):
    """Through a real gateway and a recording upstream."""

    async def test_block_and_log_only(self) -> None:
        """Blocked: 400 with the reason, nothing forwarded; valid requests pass intact; with
        blockOperation false the invalid request is forwarded."""
        gateway = self.start(binding())
        bad = await self.send(b"GET /items/5?limit=99 HTTP/1.1\r\nHost: t\r\nX-Tenant: a\r\n\r\n")
        self.assertEqual(bad.status, 400)
        self.assertEqual(json.loads(bad.body), {"error": "Invalid query parameter 'limit': fails 'maximum' (10)"})
        body = b'{"name": "widget", "qty": 2}'
        ok = await self.send(b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(ok.status, 200)
        self.assertEqual([r.body for r in self.upstream.received], [body])
        await gateway.stop()
        self.start(binding(extra="    blockOperation: false\n"))
        forwarded = await self.send(b"GET /items/5?limit=99 HTTP/1.1\r\nHost: t\r\nX-Tenant: a\r\n\r\n")
        self.assertEqual(forwarded.status, 200)

    async def test_broken_spec_is_a_located_error(self) -> None:
        """A spec OpenAPI rejects: the API is not served and the problem names the binding."""
        gateway = self.start(binding(SPEC.replace("in: cookie", "in: body")))
        errors = [str(p) for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(any("spec.config.spec" in e and "line 12, column 11 of the spec" in e for e in errors), errors)
        self.assertEqual(gateway.service.plan.listeners, ())
