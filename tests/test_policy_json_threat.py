"""json-threat-protection-flex: the iterative scanner, each limit, content types, config, end to end."""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import json_threat, registry
from flexgw.policies.base import BuildContext, LocalResponse, PolicyContext
from flexgw.policies.json_threat import (
    JsonLimits,
    JsonSyntaxError,
    JsonThreatProtectionKind,
    LimitExceeded,
    is_json_request,
    scan,
)
from tests.harness import PolicyGatewayCase

UNLIMITED = JsonLimits()
KIND = JsonThreatProtectionKind()

#: (config key, JsonLimits field, metric name) for the five limits.
LIMIT_FIELDS = (
    ("maxContainerDepth", "max_container_depth", "depth"),
    ("maxObjectEntryCount", "max_object_entry_count", "entries"),
    ("maxObjectEntryNameLength", "max_object_entry_name_length", "name"),
    ("maxArrayElementCount", "max_array_element_count", "elements"),
    ("maxStringValueLength", "max_string_value_length", "string"),
)


def metrics(value: Any) -> dict[str, int]:
    """The largest depth/entry count/name length/element count/string length in a (small) value."""
    found = {"depth": 0, "entries": 0, "name": 0, "elements": 0, "string": 0}

    def walk(v: Any, depth: int) -> None:
        if isinstance(v, dict):
            found["depth"] = max(found["depth"], depth + 1)
            found["entries"] = max(found["entries"], len(v))
            for key, item in v.items():
                found["name"] = max(found["name"], len(key))
                walk(item, depth + 1)
        elif isinstance(v, list):
            found["depth"] = max(found["depth"], depth + 1)
            found["elements"] = max(found["elements"], len(v))
            for item in v:
                walk(item, depth + 1)
        elif isinstance(v, str):
            found["string"] = max(found["string"], len(v))

    walk(value, 0)
    return found


def limits_from(values: dict[str, int]) -> JsonLimits:
    """JsonLimits from metric-named values."""
    return JsonLimits(**{field: values[metric] for _, field, metric in LIMIT_FIELDS})


def strict_loads(text: str) -> Any:
    """json.loads without Python's NaN/Infinity extensions (RFC 8259 JSON only)."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def violation(text: str, limits: JsonLimits) -> str | None:
    """The config key of the limit `text` crosses, or None when accepted."""
    try:
        scan(text, limits)
    except LimitExceeded as exc:
        return exc.key
    return None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40,
)


class ScannerTests(TestCase):
    """`scan` on its own: JSON syntax and each limit, with exact boundaries."""

    def test_valid_documents(self) -> None:
        """Scalars, containers, escapes and whitespace are accepted."""
        for text in (
            "1", "-0.5e+3", '"a"', "true", "false", "null", "[]", "{}", " [ 1 , 2 ] \n",
            '{"a":[1,{"b":null}],"c":"\\u00e9\\n\\"\\\\"}', "[[],[[]]]", '"\\ud83d\\ude00"',
        ):
            scan(text, UNLIMITED)

    def test_invalid_documents(self) -> None:
        """Truncations, trailing commas, bad literals and numbers, raw control characters,
        non-string keys, trailing data and mismatched brackets are syntax errors."""
        for text in (
            "", " ", "[", "[1,]", '{"a"}', '{"a":1,}', "01", "tru", "1 2", '"\x01"', "{1:2}",
            "[1 2]", '"\\x"', "]", '{"a":1]', "[1}", "NaN", "Infinity", "+1", ".5", "1.",
            '"abc', "'a'", '{"a" 1}', "[,1]", "nul", "-", "1e",
        ):
            with self.assertRaises(JsonSyntaxError, msg=repr(text)):
                scan(text, UNLIMITED)

    def test_syntax_error_offset(self) -> None:
        """The error names where scanning stopped."""
        with self.assertRaises(JsonSyntaxError) as caught:
            scan('{"a": 1,, }', UNLIMITED)
        self.assertEqual(caught.exception.offset, 8)

    def test_container_depth_boundary(self) -> None:
        """Depth 3 is accepted at a limit of 3 and refused at 2; a scalar has depth 0."""
        text = '{"a": [[1]]}'
        self.assertIsNone(violation(text, JsonLimits(max_container_depth=3)))
        self.assertEqual(violation(text, JsonLimits(max_container_depth=2)), "maxContainerDepth")
        self.assertIsNone(violation("5", JsonLimits(max_container_depth=0)))
        self.assertEqual(violation("[]", JsonLimits(max_container_depth=0)), "maxContainerDepth")

    def test_object_entry_count_boundary(self) -> None:
        """Entries are counted per object, not across the document."""
        text = '{"a": 1, "b": {"c": 1, "d": 2}, "e": 3}'
        self.assertIsNone(violation(text, JsonLimits(max_object_entry_count=3)))
        self.assertEqual(
            violation(text, JsonLimits(max_object_entry_count=2)), "maxObjectEntryCount"
        )

    def test_array_element_count_boundary(self) -> None:
        """Elements are counted per array; nested arrays count as one element of their parent."""
        text = "[1, [2, 3, 4], 5]"
        self.assertIsNone(violation(text, JsonLimits(max_array_element_count=3)))
        self.assertEqual(
            violation(text, JsonLimits(max_array_element_count=2)), "maxArrayElementCount"
        )

    def test_entry_name_length_counts_decoded_characters(self) -> None:
        """`"\\u00e9t\\u00e9"` is a 3-character name (escapes decoded, characters not bytes)."""
        text = '{"\\u00e9t\\u00e9": 1, "ab": 2}'
        self.assertIsNone(violation(text, JsonLimits(max_object_entry_name_length=3)))
        self.assertEqual(
            violation(text, JsonLimits(max_object_entry_name_length=2)),
            "maxObjectEntryNameLength",
        )
        self.assertIsNone(violation('{"été": 1}', JsonLimits(max_object_entry_name_length=3)))

    def test_string_value_length_ignores_keys(self) -> None:
        """Values are limited, keys are not (they have their own limit)."""
        text = '{"a-long-key": "abcd", "k": ["xy"]}'
        self.assertIsNone(violation(text, JsonLimits(max_string_value_length=4)))
        self.assertEqual(
            violation(text, JsonLimits(max_string_value_length=3)), "maxStringValueLength"
        )
        self.assertEqual(
            violation('"\\n\\n\\n"', JsonLimits(max_string_value_length=2)), "maxStringValueLength"
        )

    def test_pathological_depth_rejected_quickly(self) -> None:
        """100 000 nested arrays: refused at the limit without recursion, in far less than a second."""
        text = "[" * 100_000 + "]" * 100_000
        started = time.perf_counter()
        self.assertEqual(violation(text, JsonLimits(max_container_depth=64)), "maxContainerDepth")
        self.assertLess(time.perf_counter() - started, 0.5)

    def test_pathological_depth_unlimited_no_recursion_error(self) -> None:
        """Without a depth limit the same document is scanned iteratively (json.loads would
        raise RecursionError on it)."""
        text = "[" * 100_000 + "]" * 100_000
        scan(text, UNLIMITED)
        with self.assertRaises(JsonSyntaxError):
            scan(text[:-1], UNLIMITED)
        with self.assertRaises(RecursionError):
            json.loads(text)

    @given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
    @settings(max_examples=300, deadline=None)
    def test_random_documents_within_limits_accepted(
        self, value: Any, ascii_only: bool, indent: int | None
    ) -> None:
        """Any document is accepted when every limit equals its own maximum."""
        text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
        scan(text, limits_from(metrics(value)))

    @given(json_values, st.booleans(), st.sampled_from(LIMIT_FIELDS))
    @settings(max_examples=300, deadline=None)
    def test_random_documents_beyond_a_limit_rejected(
        self, value: Any, ascii_only: bool, limit: tuple[str, str, str]
    ) -> None:
        """Lowering one limit to one below the document's maximum refuses it, for that limit."""
        key, field, metric = limit
        found = metrics(value)
        if found[metric] == 0:
            return  # nothing to go below (-1 means unlimited)
        text = json.dumps(value, ensure_ascii=ascii_only)
        limits = JsonLimits(**{field: found[metric] - 1})
        self.assertEqual(violation(text, limits), key)

    @given(st.text(alphabet='[]{}:,"\\ \t0123456789.eE+-truefalsn', max_size=24))
    @settings(max_examples=1000, deadline=None)
    def test_syntax_agrees_with_json_module(self, text: str) -> None:
        """On random JSON-ish text the scanner accepts exactly what strict json.loads accepts."""
        try:
            strict_loads(text)
            valid = True
        except (ValueError, RecursionError):
            valid = False
        try:
            scan(text, UNLIMITED)
            accepted = True
        except JsonSyntaxError:
            accepted = False
        self.assertEqual(accepted, valid, repr(text))


def context(body: bytes | None, content_type: bytes | None = b"application/json") -> PolicyContext:
    """A POST PolicyContext with `body` (as the exchange hands it over) and a Content-Type."""
    headers = [(b"Host", b"t")]
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    if body is not None:
        headers.append((b"Content-Length", b"%d" % len(body)))
    head = analyze_head(b"POST", b"/x", "1.1", headers, True)
    assert isinstance(head, RequestHead)
    ctx = PolicyContext(head, "127.0.0.1", "http", "default/api")
    ctx.body = body
    return ctx


def build(config: dict[str, Any]) -> Any:
    """A policy for `config`."""
    return KIND.build(config, BuildContext("default/jtp", "default/api"))


class PolicyUnitTests(TestCase):
    """The policy object on hand-made requests."""

    def assert_refused(self, response: Any, message: str) -> None:
        """A 400 with the JSON error body."""
        self.assertIsInstance(response, LocalResponse)
        self.assertEqual(response.status, 400)
        self.assertEqual(list(response.headers), [(b"Content-Type", b"application/json")])
        self.assertEqual(json.loads(response.body), {"error": message})

    def test_registered_and_needs_body(self) -> None:
        """Registered under Flex's name; the policy asks the exchange for the body."""
        self.assertIsInstance(registry.lookup("json-threat-protection-flex"), JsonThreatProtectionKind)
        self.assertTrue(build({}).needs_body)

    def test_within_limits_continues(self) -> None:
        """A document inside every limit goes on."""
        policy = build({"maxContainerDepth": 2, "maxArrayElementCount": 3})
        self.assertIsNone(policy.on_request(context(b'{"a": [1, 2, 3]}')))

    def test_each_limit_refused_with_its_message(self) -> None:
        """Each limit, crossed by one, gives a 400 naming it and its value."""
        cases = (
            ({"maxContainerDepth": 1}, b'{"a": []}', "Container depth exceeded. Maximum allowed is: 1"),
            ({"maxObjectEntryCount": 1}, b'{"a": 1, "b": 2}', "Object entry count exceeded. Maximum allowed is: 1"),
            ({"maxObjectEntryNameLength": 2}, b'{"abc": 1}', "Object entry name length exceeded. Maximum allowed is: 2"),
            ({"maxArrayElementCount": 2}, b"[1, 2, 3]", "Array element count exceeded. Maximum allowed is: 2"),
            ({"maxStringValueLength": 3}, b'["abcd"]', "String value length exceeded. Maximum allowed is: 3"),
        )
        for config, body, message in cases:
            self.assert_refused(build(config).on_request(context(body)), message)
            self.assertIsNone(build({}).on_request(context(body)))  # -1 defaults: no limit

    def test_invalid_json_is_400(self) -> None:
        """Bad JSON and non-UTF-8 bytes are 400s that never echo the body."""
        policy = build({})
        self.assert_refused(
            policy.on_request(context(b'{"secret": ')), "Invalid JSON: unexpected end of data at offset 11"
        )
        self.assert_refused(
            policy.on_request(context(b'["\xff"]')), "Invalid JSON: not UTF-8 at offset 2"
        )

    def test_content_types(self) -> None:
        """Checked: no Content-Type, or one starting with application/json (any case, parameters
        allowed); not checked: anything else."""
        policy = build({})
        bad = b"{not json"
        for content_type in (
            None, b"application/json", b"Application/JSON; charset=utf-8", b" application/json",
            b"application/json-patch+json",
        ):
            self.assertIsInstance(policy.on_request(context(bad, content_type)), LocalResponse)
        for content_type in (b"text/plain", b"application/xml", b"application/vnd.api+json", b""):
            self.assertIsNone(policy.on_request(context(bad, content_type)), content_type)
        self.assertTrue(is_json_request(None))
        self.assertFalse(is_json_request(b"text/json"))

    def test_empty_or_absent_body_not_checked(self) -> None:
        """A body-less request (GET without Content-Type, say) goes on."""
        policy = build({"maxContainerDepth": 0})
        self.assertIsNone(policy.on_request(context(None, None)))
        self.assertIsNone(policy.on_request(context(b"", b"application/json")))

    def test_response_untouched(self) -> None:
        """The response phase changes nothing."""
        ctx = context(b"{}")
        ctx.response_status = 200
        ctx.response_headers = [(b"X", b"y")]
        build({}).on_response(ctx)
        self.assertEqual((ctx.response_status, ctx.response_headers), (200, [(b"X", b"y")]))

    def test_schema(self) -> None:
        """Exactly Flex's five keys, integers of -1 or more."""
        self.assertEqual(set(json_threat.SCHEMA["properties"]), {key for key, _, _ in LIMIT_FIELDS})
        validator = jsonschema.Draft202012Validator(json_threat.SCHEMA)
        self.assertEqual(list(validator.iter_errors({"maxContainerDepth": -1, "maxArrayElementCount": 0})), [])
        for bad in ({"maxContainerDepth": -2}, {"maxContainerDepth": "10"}, {"maxContainerDepth": 1.5},
                    {"maxDepth": 3}):
            self.assertEqual(len(list(validator.iter_errors(bad))), 1, bad)


BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: jtp}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: json-threat-protection-flex}
  config:
    maxContainerDepth: 3
    maxArrayElementCount: 4
"""


def post(body: bytes, content_type: bytes | None = b"application/json", chunked: bool = False) -> bytes:
    """A raw POST with `body`, Content-Length or chunked framing."""
    head = b"POST /x HTTP/1.1\r\nHost: t\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    if chunked:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
            for i in range(0, len(body), 1000)
        )
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class JsonThreatEndToEndTests(PolicyGatewayCase):
    """Through a real gateway and upstream."""

    documents = BINDING

    async def test_accepted_body_reaches_upstream_intact(self) -> None:
        """A document within the limits is forwarded byte for byte (CL and chunked)."""
        self.start()
        body = b'{"a": [1, 2, 3, {"b": 4}], "s": "\\u00e9"}'
        response = await self.send(post(body))
        self.assertEqual(response.status, 200)
        chunked = await self.send(post(body, chunked=True))
        self.assertEqual(chunked.status, 200)
        self.assertEqual([r.body for r in self.upstream.received], [body, body])

    async def test_violation_and_invalid_json_are_400(self) -> None:
        """Too deep, too many elements, and broken JSON: 400 with a JSON error; nothing forwarded."""
        gateway = self.start()
        for body, message in (
            (b"[[[[1]]]]", "Container depth exceeded. Maximum allowed is: 3"),
            (b"[1,2,3,4,5]", "Array element count exceeded. Maximum allowed is: 4"),
            (b'{"a": tru}', "Invalid JSON: expected a value at offset 6"),
        ):
            response = await self.send(post(body))
            self.assertEqual(response.status, 400)
            self.assertEqual(response.header("content-type"), [b"application/json"])
            self.assertEqual(json.loads(response.body), {"error": message})
        deep = await self.send(post(b"[" * 100_000 + b"]" * 100_000, chunked=True))
        self.assertEqual(deep.status, 400)
        self.assertEqual(self.upstream.received, [])
        self.assertEqual([r["status"] for r in gateway.records()], [400, 400, 400, 400])

    async def test_other_content_types_and_bodyless_requests_pass(self) -> None:
        """text/plain bodies are not inspected; a GET without a body goes through."""
        self.start()
        response = await self.send(post(b"[[[[[[not json", b"text/plain"))
        self.assertEqual(response.status, 200)
        get = await self.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(get.status, 200)
        self.assertEqual(len(self.upstream.received), 2)

    async def test_body_over_the_buffer_limit_is_413(self) -> None:
        """A body over 1 MiB cannot be buffered for the check: 413 payload_too_large."""
        self.start()
        body = b"[" + b"1," * (600 * 1024) + b"1]"
        response = await self.send(post(body))
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("x-flexgw-error"), [b"payload_too_large"])
        self.assertEqual(self.upstream.received, [])

    async def test_bad_limit_is_a_located_error(self) -> None:
        """`maxContainerDepth: -2` is refused at its field; the API is not served."""
        gateway = self.start(BINDING.replace("maxContainerDepth: 3", "maxContainerDepth: -2"))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.maxContainerDepth" for p in errors), [str(p) for p in errors]
        )
        self.assertEqual(gateway.service.plan.listeners, ())
