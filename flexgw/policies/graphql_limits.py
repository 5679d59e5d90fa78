"""`graphql-operation-limits-flex`: refuse GraphQL operations deeper, wider or busier than configured.

Flex (docs `policies-included-graphql-operation-limits.adoc`, 1.13+): keys `maxDepth`,
`maxAliases`, `maxRootFields`, `maxDirectives`. An operation over a limit is a **400** whose
body is the standard GraphQL error format listing each violation, e.g. "Query depth of 7
exceeds the maximum allowed depth of 5". Limits are evaluated at parse time on the written
document: fragment spreads are not expanded. A persisted query (no inline query text) passes;
a document the parser cannot read is logged (debug) and passes, so upstream validation runs.
Only requests are checked: GET reads the `query` URL parameter, POST the JSON body's `query`
(a batch, a JSON array, has each entry checked) or an `application/graphql` body; the body is
buffered (1 MiB limit, 413 over it).

Counting (on graphql-core's AST, parsed once per request):
- depth: the deepest field nesting in any operation or fragment definition (`{ a { b } }` is 2;
  inline fragments add no depth, spreads are not followed);
- aliases: aliased fields in the document;
- root fields: fields in an operation's top-level selection set (inline fragments there
  included), the largest over the document's operations;
- directives: directives anywhere in the document.

Deliberate differences from Flex:
- Every key is optional and an absent key is not checked (the material available listed the
  keys, not their defaults); a value must be at least 0.
- graphql-core refuses documents nested past its own bound (about 200 levels) as a syntax
  error; such a document is rejected as over `maxDepth` (when set) instead of passing as
  unreadable, so a parser limit cannot be used to slip a deep query through.
- The error body also carries `extensions.code` (`MAX_DEPTH_EXCEEDED`, ...) beside `message`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, LocalResponse, PolicyContext
from flexgw.policies.registry import register

NAME = "graphql-operation-limits-flex"
_log = Logger(namespace="flexgw.policies.graphql_limits")

#: (config key, what is counted for the message, extensions.code)
LIMITS: tuple[tuple[str, str, str], ...] = (
    ("maxDepth", "depth", "MAX_DEPTH_EXCEEDED"),
    ("maxAliases", "aliases", "MAX_ALIASES_EXCEEDED"),
    ("maxRootFields", "root fields", "MAX_ROOT_FIELDS_EXCEEDED"),
    ("maxDirectives", "directives", "MAX_DIRECTIVES_EXCEEDED"),
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: {"type": "integer", "minimum": 0} for key, _, _ in LIMITS},
    "additionalProperties": False,
}

#: Largest document the parser is given (tokens); more is refused as unreadable, i.e. passes.
MAX_TOKENS = 50_000


@attrs.frozen
class Metrics:
    """What one document contains."""

    depth: int
    aliases: int
    root_fields: int
    directives: int


def _selection_stats(selection_set: Any) -> tuple[int, int, int]:
    """(depth, aliases, directives) below a selection set, iteratively."""
    from graphql.language import FieldNode, InlineFragmentNode

    depth = aliases = directives = 0
    stack: list[tuple[Any, int]] = [(selection_set, 0)] if selection_set else []
    while stack:
        current, level = stack.pop()
        for selection in current.selections:
            directives += len(selection.directives or ())
            if isinstance(selection, FieldNode):
                if selection.alias is not None:
                    aliases += 1
                depth = max(depth, level + 1)
                if selection.selection_set is not None:
                    stack.append((selection.selection_set, level + 1))
            elif isinstance(selection, InlineFragmentNode):
                stack.append((selection.selection_set, level))
    return depth, aliases, directives


def _root_fields(selection_set: Any) -> int:
    """Fields at an operation's top level (inline fragments there included)."""
    from graphql.language import FieldNode, InlineFragmentNode

    count = 0
    stack = [selection_set]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FieldNode):
                count += 1
            elif isinstance(selection, InlineFragmentNode):
                stack.append(selection.selection_set)
    return count


def measure(document: Any) -> Metrics:
    """Depth, aliases, root fields and directives of a parsed document (spreads not followed)."""
    from graphql.language import FragmentDefinitionNode, OperationDefinitionNode

    depth = aliases = roots = directives = 0
    for definition in document.definitions:
        if isinstance(definition, (OperationDefinitionNode, FragmentDefinitionNode)):
            directives += len(definition.directives or ())
            d, a, n = _selection_stats(definition.selection_set)
            depth, aliases, directives = max(depth, d), aliases + a, directives + n
            if isinstance(definition, OperationDefinitionNode):
                roots = max(roots, _root_fields(definition.selection_set))
    return Metrics(depth, aliases, roots, directives)


def _message(what: str, value: int, limit: int) -> str:
    return f"Query {what} of {value} exceeds the maximum allowed {what} of {limit}"


@implementer(IPolicy)
class GraphQLLimitsPolicy:
    """One binding's limits (None: not checked)."""

    needs_body = True  # a POST's operation is in its body (buffered, bounded)
    response_phase = False

    def __init__(self, limits: dict[str, int], binding: str) -> None:
        self.limits = limits
        self.binding = binding

    def _queries(self, ctx: PolicyContext) -> list[str]:
        """The operation texts of the request (none: persisted or not GraphQL)."""
        head = ctx.head
        if head.method == b"GET":
            for name, value in parse_qsl(head.query[1:].decode("latin-1"), errors="replace"):
                if name == "query":
                    return [value]
            return []
        body = ctx.body
        if not body:
            return []
        content_type = b""
        for name, value in head.headers:
            if name.lower() == b"content-type":
                content_type = value.lower()
                break
        if content_type.startswith(b"application/graphql"):
            return [body.decode("utf-8", "replace")]
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return []
        entries = payload if isinstance(payload, list) else [payload]
        return [e["query"] for e in entries if isinstance(e, dict) and isinstance(e.get("query"), str)]

    def violations(self, query: str) -> list[tuple[str, str]]:
        """(message, code) for every limit `query` crosses; [] when within or unreadable."""
        from graphql import GraphQLError, parse  # (imported on first use: a gateway without
        # this policy does not pay graphql-core's import time)

        limits = self.limits
        try:
            document = parse(query, no_location=True, max_tokens=MAX_TOKENS)
        except GraphQLError as exc:
            if "nested too deeply" in exc.message and "maxDepth" in limits:
                limit = limits["maxDepth"]
                return [(f"Query depth exceeds the maximum allowed depth of {limit}",
                         "MAX_DEPTH_EXCEEDED")]
            _log.debug("{binding}: unreadable GraphQL document passed: {error}",
                       binding=self.binding, error=exc.message)
            return []
        except RecursionError:
            return []
        metrics = measure(document)
        values = {
            "maxDepth": metrics.depth,
            "maxAliases": metrics.aliases,
            "maxRootFields": metrics.root_fields,
            "maxDirectives": metrics.directives,
        }
        found = []
        for key, what, code in LIMITS:
            limit = limits.get(key)
            if limit is not None and values[key] > limit:
                found.append((_message(what, values[key], limit), code))
        return found

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """400 with a GraphQL `errors` array when an operation crosses a limit."""
        found: list[tuple[str, str]] = []
        for query in self._queries(ctx):
            found.extend(self.violations(query))
        if not found:
            return None
        body = json.dumps(
            {"errors": [{"message": m, "extensions": {"code": c}} for m, c in found]},
            separators=(",", ":"),
        ).encode()
        return LocalResponse(400, ((b"Content-Type", b"application/json"),), body)

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses pass unchanged."""


@implementer(IPolicyKind)
class GraphQLLimitsKind:
    """The `graphql-operation-limits-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> GraphQLLimitsPolicy:
        """Keep the limits that are set."""
        limits = {key: int(config[key]) for key, _, _ in LIMITS if config.get(key) is not None}
        return GraphQLLimitsPolicy(limits, context.binding)


KIND = register(GraphQLLimitsKind())
