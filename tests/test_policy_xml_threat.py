"""xml-threat-protection-flex: each limit, DTD-based attacks refused, content types, config, end to end."""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
from twisted.trial.unittest import TestCase

from flexgw.http.request import RequestHead, analyze_head
from flexgw.policies import registry, xml_threat
from flexgw.policies.base import BuildContext, LocalResponse, PolicyContext
from flexgw.policies.xml_threat import (
    XmlLimits,
    XmlRejected,
    XmlThreatProtectionKind,
    check,
    is_xml_request,
)
from tests.harness import PolicyGatewayCase

UNLIMITED = XmlLimits()
KIND = XmlThreatProtectionKind()

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<foo>&xxe;</foo>
"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE foo SYSTEM "http://127.0.0.1:1/evil.dtd">
<foo>&ent;</foo>
"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY % ext SYSTEM "file:///etc/passwd"> %ext;]>
<foo/>
"""


def rejection(body: bytes, limits: XmlLimits = UNLIMITED) -> str | None:
    """The rejection message for `body`, or None when accepted."""
    try:
        check(body, limits)
    except XmlRejected as exc:
        return str(exc)
    return None


class CheckerTests(TestCase):
    """`check` on its own: well-formedness, DTD refusal and each limit with exact boundaries."""

    def test_well_formed_documents(self) -> None:
        """Declarations, namespaces, CDATA, comments, PIs, entities and UTF-16 are accepted."""
        for body in (
            b"<a/>",
            b'<?xml version="1.0" encoding="UTF-8"?>\n<a x="1"><b>t &amp; u</b><!-- c --></a>\n',
            b'<p:a xmlns:p="urn:x" xmlns="urn:y"><![CDATA[<not-a-tag>]]><?pi data?></p:a>',
            '<?xml version="1.0" encoding="UTF-16"?><a>été</a>'.encode("utf-16"),
        ):
            self.assertIsNone(rejection(body), body)

    def test_malformed_documents(self) -> None:
        """Unclosed and mismatched tags, two roots, undeclared entities and text-only bodies."""
        for body in (b"<a>", b"<a></b>", b"<a/><b/>", b"<a>&nope;</a>", b"plain text", b"<a x=1/>"):
            message = rejection(body)
            self.assertIsNotNone(message, body)
            self.assertTrue(message.startswith("Invalid XML: "), message)
        self.assertEqual(
            rejection(b"<a>\n<b></a>"), "Invalid XML: mismatched tag at line 2, column 5"
        )

    def test_billion_laughs_refused_at_once(self) -> None:
        """Nested entity expansion never happens: the DOCTYPE is refused before its subset."""
        started = time.perf_counter()
        self.assertEqual(rejection(BILLION_LAUGHS), "DTDs are not allowed")
        self.assertLess(time.perf_counter() - started, 0.1)

    def test_external_entities_refused(self) -> None:
        """XXE via an internal subset, an external DTD or a parameter entity: all refused, and
        nothing outside is read (a file URL would fail loudly otherwise, an http one would hang)."""
        for body in (EXTERNAL_ENTITY, EXTERNAL_DTD, PARAMETER_ENTITY):
            self.assertEqual(rejection(body), "DTDs are not allowed")

    def test_undeclared_entity_is_not_fetched(self) -> None:
        """Without a DTD an entity reference is simply an error."""
        self.assertEqual(
            rejection(b"<foo>&xxe;</foo>"), "Invalid XML: undefined entity at line 1, column 5"
        )

    def test_node_depth_boundary(self) -> None:
        """The root is depth 1: three nested elements pass at 3 and fail at 2."""
        body = b"<a><b><c/></b></a>"
        self.assertIsNone(rejection(body, XmlLimits(max_node_depth=3)))
        self.assertEqual(
            rejection(body, XmlLimits(max_node_depth=2)), "Node depth exceeded. Maximum allowed is: 2"
        )

    def test_child_count_boundary(self) -> None:
        """Child elements per element (text and comments are not children)."""
        body = b"<a>text<b/><!-- c --><c><x/><y/></c><d/></a>"
        self.assertIsNone(rejection(body, XmlLimits(max_child_count=3)))
        self.assertEqual(
            rejection(body, XmlLimits(max_child_count=2)), "Child count exceeded. Maximum allowed is: 2"
        )

    def test_attribute_count_excludes_namespace_declarations(self) -> None:
        """Two attributes plus two xmlns declarations count as two."""
        body = b'<a xmlns="urn:a" xmlns:p="urn:p" x="1" p:y="2"/>'
        self.assertIsNone(rejection(body, XmlLimits(max_attribute_count_per_element=2)))
        self.assertEqual(
            rejection(body, XmlLimits(max_attribute_count_per_element=1)),
            "Attribute count per element exceeded. Maximum allowed is: 1",
        )

    def test_attribute_length_boundary(self) -> None:
        """Attribute values are measured in characters after entity decoding."""
        body = '<a x="é&amp;cd"/>'.encode()
        self.assertIsNone(rejection(body, XmlLimits(max_attribute_length=4)))
        self.assertEqual(
            rejection(body, XmlLimits(max_attribute_length=3)),
            "Attribute length exceeded. Maximum allowed is: 3",
        )

    def test_text_length_counts_one_text_node(self) -> None:
        """A text node includes entity-decoded text and CDATA; tags split text nodes."""
        body = b"<a>12345&amp;<![CDATA[78]]><b>123456789</b>1234567890</a>"
        self.assertIsNone(rejection(body, XmlLimits(max_text_length=10)))
        self.assertEqual(
            rejection(body, XmlLimits(max_text_length=9)),
            "Text length exceeded. Maximum allowed is: 9",
        )

    def test_comment_length_boundary(self) -> None:
        """Comment characters, between `<!--` and `-->`."""
        body = b"<a><!--12345--></a>"
        self.assertIsNone(rejection(body, XmlLimits(max_comment_length=5)))
        self.assertEqual(
            rejection(body, XmlLimits(max_comment_length=4)),
            "Comment length exceeded. Maximum allowed is: 4",
        )

    def test_pathological_depth(self) -> None:
        """100 000 nested elements: refused at the limit at once, parsed without recursion when
        unlimited."""
        body = b"<a>" * 100_000 + b"</a>" * 100_000
        started = time.perf_counter()
        self.assertEqual(
            rejection(body, XmlLimits(max_node_depth=64)), "Node depth exceeded. Maximum allowed is: 64"
        )
        self.assertLess(time.perf_counter() - started, 0.5)
        self.assertIsNone(rejection(body))

    def test_many_small_violations_checked_in_order(self) -> None:
        """The first limit crossed in document order is reported."""
        body = b'<a x="long-value"><!--long comment--></a>'
        limits = XmlLimits(max_attribute_length=3, max_comment_length=3)
        self.assertEqual(rejection(body, limits), "Attribute length exceeded. Maximum allowed is: 3")


def context(body: bytes | None, content_type: bytes | None = b"application/xml") -> PolicyContext:
    """A POST PolicyContext carrying `body` and a Content-Type."""
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
    return KIND.build(config, BuildContext("default/xtp", "default/api"))


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
        self.assertIsInstance(registry.lookup("xml-threat-protection-flex"), XmlThreatProtectionKind)
        self.assertTrue(build({}).needs_body)

    def test_config_keys_map_to_limits(self) -> None:
        """Each Flex key sets its limit; absent keys are -1 (no limit)."""
        policy = build({"maxNodeDepth": 1, "maxChildCount": 2, "maxCommentLength": 3})
        self.assertEqual(
            policy.limits,
            XmlLimits(max_node_depth=1, max_child_count=2, max_comment_length=3),
        )
        self.assertEqual(build({}).limits, UNLIMITED)

    def test_accept_and_refuse(self) -> None:
        """Within limits goes on; a crossed limit, a DTD and malformed XML are 400s."""
        policy = build({"maxNodeDepth": 2})
        self.assertIsNone(policy.on_request(context(b"<a><b/></a>")))
        self.assert_refused(
            policy.on_request(context(b"<a><b><c/></b></a>")), "Node depth exceeded. Maximum allowed is: 2"
        )
        self.assert_refused(policy.on_request(context(BILLION_LAUGHS)), "DTDs are not allowed")
        self.assert_refused(
            policy.on_request(context(b"<a>")), "Invalid XML: no element found at line 1, column 3"
        )

    def test_content_types(self) -> None:
        """Checked: no Content-Type, subtype xml or +xml (any case, with parameters); others pass."""
        policy = build({})
        bad = b"<a>"
        for content_type in (
            None, b"application/xml", b"text/xml; charset=utf-8", b"application/soap+xml",
            b"Application/Atom+XML",
        ):
            self.assertIsInstance(policy.on_request(context(bad, content_type)), LocalResponse)
        for content_type in (b"application/json", b"text/plain", b"application/xml-dtd", b"xml", b""):
            self.assertIsNone(policy.on_request(context(bad, content_type)), content_type)
        self.assertTrue(is_xml_request(None))

    def test_empty_or_absent_body_not_checked(self) -> None:
        """A body-less request goes on."""
        policy = build({"maxNodeDepth": 1})
        self.assertIsNone(policy.on_request(context(None, None)))
        self.assertIsNone(policy.on_request(context(b"")))

    def test_schema(self) -> None:
        """Exactly Flex's six keys, integers of -1 or more."""
        self.assertEqual(set(xml_threat.SCHEMA["properties"]), set(xml_threat.KEYS))
        self.assertEqual(
            set(xml_threat.KEYS),
            {"maxNodeDepth", "maxAttributeCountPerElement", "maxChildCount", "maxTextLength",
             "maxAttributeLength", "maxCommentLength"},
        )
        validator = jsonschema.Draft202012Validator(xml_threat.SCHEMA)
        self.assertEqual(list(validator.iter_errors({"maxNodeDepth": -1, "maxChildCount": 0})), [])
        for bad in ({"maxNodeDepth": -2}, {"maxTextLength": "5"}, {"maxEntityDepth": 3}):
            self.assertEqual(len(list(validator.iter_errors(bad))), 1, bad)


BINDING = """\
---
apiVersion: gateway.mulesoft.com/v1alpha1
kind: PolicyBinding
metadata: {name: xtp}
spec:
  targetRef: {kind: ApiInstance, name: test-api}
  policyRef: {name: xml-threat-protection-flex}
  config:
    maxNodeDepth: 3
    maxChildCount: 2
"""


def post(body: bytes, content_type: bytes | None = b"application/xml") -> bytes:
    """A raw POST with `body`."""
    head = b"POST /x HTTP/1.1\r\nHost: t\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class XmlThreatEndToEndTests(PolicyGatewayCase):
    """Through a real gateway and upstream."""

    documents = BINDING

    async def test_accepted_document_forwarded(self) -> None:
        """A document within the limits reaches the upstream unchanged."""
        self.start()
        body = b'<?xml version="1.0"?><order><item id="1"/><item id="2">x</item></order>'
        response = await self.send(post(body, b"text/xml"))
        self.assertEqual(response.status, 200)
        self.assertEqual([r.body for r in self.upstream.received], [body])

    async def test_attacks_and_violations_are_400(self) -> None:
        """Billion laughs, XXE, too many children, too deep: 400s, nothing forwarded."""
        gateway = self.start()
        for body, message in (
            (BILLION_LAUGHS, "DTDs are not allowed"),
            (EXTERNAL_ENTITY, "DTDs are not allowed"),
            (b"<a><b/><c/><d/></a>", "Child count exceeded. Maximum allowed is: 2"),
            (b"<a><b><c><d/></c></b></a>", "Node depth exceeded. Maximum allowed is: 3"),
        ):
            response = await self.send(post(body))
            self.assertEqual(response.status, 400)
            self.assertEqual(response.header("content-type"), [b"application/json"])
            self.assertEqual(json.loads(response.body), {"error": message})
        self.assertEqual(self.upstream.received, [])
        self.assertEqual([r["status"] for r in gateway.records()], [400] * 4)

    async def test_other_content_types_pass(self) -> None:
        """A JSON body is not parsed as XML."""
        self.start()
        response = await self.send(post(b'{"a": 1}', b"application/json"))
        self.assertEqual(response.status, 200)
        self.assertEqual(len(self.upstream.received), 1)

    async def test_bad_limit_is_a_located_error(self) -> None:
        """`maxChildCount: many` is refused at its field; the API is not served."""
        gateway = self.start(BINDING.replace("maxChildCount: 2", "maxChildCount: many"))
        errors = [p for p in gateway.service.state.problems if p.severity == "error"]
        self.assertTrue(
            any(p.field == "spec.config.maxChildCount" for p in errors), [str(p) for p in errors]
        )
        self.assertEqual(gateway.service.plan.listeners, ())
