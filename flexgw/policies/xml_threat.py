"""`xml-threat-protection-flex`: reject XML request bodies whose structure exceeds configured limits.

Flex (docs `policies-included-xml-threat-protection.adoc`, Flex 1.10+; the 1.14 page's "Payload
Handling"): keys `maxNodeDepth`, `maxAttributeCountPerElement`, `maxChildCount`, `maxTextLength`,
`maxAttributeLength`, `maxCommentLength`, all optional, default -1 (no limit). Only requests are
checked, and only "when the Content-Type subtype is xml or ends in +xml, or when the request has
no Content-Type header"; other content types pass unchecked. A violation is a **400**. The Mule
policy the keys come from says namespace declarations are not counted as attributes.

Parsing: the standard library's expat (`xml.parsers.expat`), driven by handlers that count as the
parser goes (expat keeps its own element stack: deep nesting cannot exhaust Python's stack), and
**any DOCTYPE is refused** before its internal subset is read. Without a DTD there are no entity
declarations, so neither entity expansion ("billion laughs", quadratic blowup) nor external
entities (XXE: local files, SSRF) can happen; parameter entity parsing is switched off as well. A
reference to an undeclared entity is an XML error. This is what `defusedxml` does with
`forbid_dtd=True`, without the extra dependency.

What is counted:
- `maxNodeDepth`: element nesting; the root element is at depth 1.
- `maxChildCount`: child *elements* of one element (text, comments and PIs are not counted).
- `maxAttributeCountPerElement`: attributes of one element, `xmlns` / `xmlns:*` excluded.
- `maxAttributeLength`: characters of any one attribute value (namespace declarations too).
- `maxTextLength`: characters of one text node after entity decoding; CDATA sections are text, and
  a text node ends at the next tag, comment or processing instruction.
- `maxCommentLength`: characters of one comment.

Deliberate differences from Flex:
- Flex validates while the body streams and documents no size bound; flexgw buffers the body
  first, so the 1 MiB policy body limit applies (413 over it).
- Flex documents the status only, not the body: rejections here are the gateway's usual JSON
  error, `{"error": "..."}`, naming the limit (phrased like the Mule policy's log lines, e.g.
  "Child count exceeded. Maximum allowed is: 999"); malformed XML and DTDs are 400 with
  `{"error": "Invalid XML: ..."}` / `{"error": "DTDs are not allowed"}`.
- An empty body is not checked.
- Limits must be -1 or more; other negative numbers are a config error.
"""

from __future__ import annotations

from typing import Any
from xml.parsers import expat

import attrs
from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, LocalResponse, PolicyContext
from flexgw.policies.registry import register

#: Config keys in the order the docs list them.
KEYS: tuple[str, ...] = (
    "maxNodeDepth",
    "maxAttributeCountPerElement",
    "maxChildCount",
    "maxTextLength",
    "maxAttributeLength",
    "maxCommentLength",
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: {"type": "integer", "minimum": -1, "default": -1} for key in KEYS},
    "additionalProperties": False,
}


class XmlRejected(Exception):
    """The document is refused; the message is what the client is told."""


@attrs.frozen
class XmlLimits:
    """The six Flex limits; a negative value means no limit."""

    max_node_depth: int = -1
    max_attribute_count_per_element: int = -1
    max_child_count: int = -1
    max_text_length: int = -1
    max_attribute_length: int = -1
    max_comment_length: int = -1


def _exceeded(name: str, limit: int) -> XmlRejected:
    """The rejection for a crossed limit."""
    return XmlRejected(f"{name} exceeded. Maximum allowed is: {limit}")


class _Checker:
    """Expat handlers counting one document against the limits (raise to stop the parse)."""

    def __init__(self, limits: XmlLimits) -> None:
        self.limits = limits
        self.children: list[int] = []  # child elements so far, per open element
        self.text = 0  # characters in the current text node

    def start(self, name: str, attributes: list[str]) -> None:
        """An element opens: depth, its parent's child count, its attributes."""
        limits = self.limits
        self.text = 0
        children = self.children
        if children:
            children[-1] += 1
            if 0 <= limits.max_child_count < children[-1]:
                raise _exceeded("Child count", limits.max_child_count)
        if 0 <= limits.max_node_depth < len(children) + 1:
            raise _exceeded("Node depth", limits.max_node_depth)
        children.append(0)
        if not attributes:
            return
        count = 0
        length_limit = limits.max_attribute_length
        for i in range(0, len(attributes), 2):
            attr = attributes[i]
            if attr != "xmlns" and not attr.startswith("xmlns:"):
                count += 1
            if 0 <= length_limit < len(attributes[i + 1]):
                raise _exceeded("Attribute length", length_limit)
        if 0 <= limits.max_attribute_count_per_element < count:
            raise _exceeded("Attribute count per element", limits.max_attribute_count_per_element)

    def end(self, name: str) -> None:
        """An element closes."""
        self.children.pop()
        self.text = 0

    def characters(self, data: str) -> None:
        """Text (expat may deliver one text node in several pieces)."""
        self.text += len(data)
        if 0 <= self.limits.max_text_length < self.text:
            raise _exceeded("Text length", self.limits.max_text_length)

    def comment(self, data: str) -> None:
        """A comment."""
        self.text = 0
        if 0 <= self.limits.max_comment_length < len(data):
            raise _exceeded("Comment length", self.limits.max_comment_length)

    def processing_instruction(self, target: str, data: str) -> None:
        """A processing instruction ends the current text node."""
        self.text = 0

    def doctype(self, *args: Any) -> None:
        """Any DTD is refused: no entity declarations, hence no expansion bombs and no XXE."""
        raise XmlRejected("DTDs are not allowed")

    def entity(self, *args: Any) -> None:
        """Entity declarations never get here (the DOCTYPE is refused first); refuse anyway."""
        raise XmlRejected("DTDs are not allowed")

    def external_entity(
        self, context: str, base: str | None, system_id: str | None, public_id: str | None
    ) -> int:
        """External entities are never fetched (they need a DTD, refused first); refuse anyway."""
        raise XmlRejected("External entities are not allowed")


def check(body: bytes, limits: XmlLimits) -> None:
    """Parse `body` with DTDs refused, raising `XmlRejected` for a limit, a DTD or bad XML."""
    checker = _Checker(limits)
    parser = expat.ParserCreate()
    parser.ordered_attributes = True  # attributes as a flat [name, value, ...] list
    parser.buffer_text = True  # fewer, larger character-data callbacks
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = checker.doctype
    parser.EntityDeclHandler = checker.entity
    parser.UnparsedEntityDeclHandler = checker.entity
    parser.ExternalEntityRefHandler = checker.external_entity
    parser.StartElementHandler = checker.start
    parser.EndElementHandler = checker.end
    parser.CharacterDataHandler = checker.characters
    parser.CommentHandler = checker.comment
    parser.ProcessingInstructionHandler = checker.processing_instruction
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise XmlRejected(
            f"Invalid XML: {expat.ErrorString(exc.code)} at line {exc.lineno}, column {exc.offset}"
        ) from None


def is_xml_request(content_type: bytes | None) -> bool:
    """Flex's rule: no Content-Type, or a media type whose subtype is xml or ends in +xml."""
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    _, slash, subtype = media.partition(b"/")
    return bool(slash) and (subtype == b"xml" or subtype.endswith(b"+xml"))


@implementer(IPolicy)
@attrs.frozen
class XmlThreatProtectionPolicy:
    """Checks buffered XML request bodies against the binding's limits."""

    limits: XmlLimits
    needs_body = True  # the exchange buffers the request body (bounded) for this policy

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """400 for an XML body that is malformed, has a DTD or crosses a limit; else go on."""
        body = ctx.body
        if not body or not is_xml_request(ctx.request_header(b"content-type")):
            return None
        try:
            check(body, self.limits)
        except XmlRejected as exc:
            return LocalResponse.json_error(400, str(exc))
        return None

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses pass unchanged (Flex checks requests only)."""


@implementer(IPolicyKind)
class XmlThreatProtectionKind:
    """The `xml-threat-protection-flex` kind."""

    name = "xml-threat-protection-flex"
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> XmlThreatProtectionPolicy:
        """A policy holding the configured limits (-1, the default, for each one not given)."""
        return XmlThreatProtectionPolicy(
            XmlLimits(
                max_node_depth=int(config.get("maxNodeDepth", -1)),
                max_attribute_count_per_element=int(config.get("maxAttributeCountPerElement", -1)),
                max_child_count=int(config.get("maxChildCount", -1)),
                max_text_length=int(config.get("maxTextLength", -1)),
                max_attribute_length=int(config.get("maxAttributeLength", -1)),
                max_comment_length=int(config.get("maxCommentLength", -1)),
            )
        )


register(XmlThreatProtectionKind())
