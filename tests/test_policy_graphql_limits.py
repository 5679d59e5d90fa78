"""graphql-operation-limits-flex: counting on the written document, GET and POST, end to end."""

from __future__ import annotations

import json
from urllib.parse import quote

from graphql import parse
from twisted.trial.unittest import TestCase

from flexgw.policies import registry
from flexgw.policies.base import BuildContext
from flexgw.policies.graphql_limits import KIND, GraphQLLimitsKind, measure
from tests.harness import PolicyGatewayCase, assert_loads_cleanly

FLEX_EXAMPLE = "    maxDepth: 3\n    maxAliases: 2\n    maxRootFields: 2\n    maxDirectives: 1\n"


def binding(config: str = FLEX_EXAMPLE) -> str:
    """A PolicyBinding document for graphql-operation-limits-flex on `test-api`."""
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        "metadata: {name: gql}\n"
        "spec:\n  targetRef: {name: test-api}\n  policyRef: {name: graphql-operation-limits-flex}\n"
        "  config:\n" + config
    )


class MeasureTests(TestCase):
    """What is counted, on the written document."""

    def test_counts(self) -> None:
        """Depth by fields (inline fragments add none, spreads not followed), aliases,
        root fields (largest operation), directives everywhere."""
        document = parse(
            """
            query Q @a { a { b: x { c } } d { ... on T { e @skip(if: true) } } }
            query R { f g h }
            fragment F on T { p { q { r { s } } } }
            """
        )
        metrics = measure(document)
        self.assertEqual((metrics.depth, metrics.aliases, metrics.root_fields, metrics.directives),
                         (4, 1, 3, 2))

    def test_violations_listed(self) -> None:
        """Every crossed limit gives one message, in Flex's phrasing for depth."""
        policy = KIND.build({"maxDepth": 1, "maxAliases": 0}, BuildContext("default/g", None))
        self.assertEqual(
            [m for m, _ in policy.violations("{ a: b { c } }")],
            ["Query depth of 2 exceeds the maximum allowed depth of 1",
             "Query aliases of 1 exceeds the maximum allowed aliases of 0"],
        )
        self.assertEqual(policy.violations("{ not graphql"), [])  # unreadable: passes
        deep = "{a" * 1000 + "}" * 1000
        self.assertEqual(policy.violations(deep)[0][1], "MAX_DEPTH_EXCEEDED")

    def test_registered_and_flex_example_validates(self) -> None:
        """Registered under Flex's name; the pipeline accepts Flex's keys."""
        self.assertIsInstance(registry.lookup("graphql-operation-limits-flex"), GraphQLLimitsKind)
        assert_loads_cleanly(self, binding())


class EndToEndTests(PolicyGatewayCase):
    """Through a real gateway and a recording upstream."""

    def setUp(self) -> None:
        """A recording upstream and a gateway with the binding."""
        super().setUp()
        self.start(binding())

    def post(self, payload: object, content_type: bytes = b"application/json") -> bytes:
        """A POST /graphql with `payload` (JSON-encoded unless bytes)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return (b"POST /graphql HTTP/1.1\r\nHost: t\r\nContent-Type: " + content_type
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    async def test_get_and_post_over_limits_are_graphql_400s(self) -> None:
        """GET ?query=, JSON POST, batched POST and application/graphql: a GraphQL errors body."""
        deep = "{ a { b { c { d } } } }"
        for raw in (
            b"GET /graphql?query=" + quote(deep).encode() + b" HTTP/1.1\r\nHost: t\r\n\r\n",
            self.post({"query": deep}),
            self.post([{"query": "{ a }"}, {"query": deep}]),
            self.post(deep.encode(), b"application/graphql"),
        ):
            response = await self.send(raw)
            self.assertEqual(response.status, 400, raw)
            self.assertEqual(response.header("content-type"), [b"application/json"])
            errors = json.loads(response.body)["errors"]
            self.assertEqual(errors[0]["message"], "Query depth of 4 exceeds the maximum allowed depth of 3")
        both = await self.send(self.post({"query": "{ x: a @a @b y: b z: c }"}))
        self.assertEqual(len(json.loads(both.body)["errors"]), 3)  # aliases, root fields, directives
        self.assertEqual(self.upstream.received, [])

    async def test_within_limits_unreadable_and_persisted_pass(self) -> None:
        """A small query, a syntax error and a persisted query reach the upstream unchanged."""
        persisted = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab"}}}
        for payload in ({"query": "{ a { b } }"}, {"query": "{ broken"}, persisted):
            self.assertEqual((await self.send(self.post(payload))).status, 200)
        self.assertEqual(len(self.upstream.received), 3)
        self.assertEqual(json.loads(self.upstream.received[0].body), {"query": "{ a { b } }"})
