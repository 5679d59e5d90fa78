"""`json-threat-protection-flex`: reject JSON request bodies whose structure exceeds configured limits.

Flex (docs `policies-included-json-threat-protection.adoc`, Flex 1.4+; the 1.14 page's "Payload
Handling"): keys `maxContainerDepth`, `maxStringValueLength`, `maxObjectEntryNameLength`,
`maxObjectEntryCount`, `maxArrayElementCount`, all optional, default -1 (no limit). Only
requests are checked; the body is buffered (the 1 MB `FLEX_DOWNSTREAM_CONNECTION_BUFFER_LIMIT_BYTES`
limit applies: 413 over it) and validated "when the Content-Type header starts with
application/json or when the request has no Content-Type header"; other content types pass
unchecked. A violation, or a body that is not JSON, is a **400**.

How it checks: an iterative tokenizer (`scan`) walks the body once with an explicit stack, so a
body nested 100 000 levels deep costs one list entry per level and is rejected as soon as the
depth limit is crossed; nothing recursive (`json.loads`) ever sees the whole document. String
lengths are counted in characters after unescaping (as Jackson and Kong count them), not bytes.
Depth: a top-level scalar is depth 0, `{}` and `[]` are depth 1, `{"a": [1]}` is depth 2.

Deliberate differences from Flex:
- Flex documents the status only, not the body: rejections here are the gateway's usual JSON
  error, `{"error": "..."}`, naming the limit that was crossed (phrased like the Mule policy's
  log lines, e.g. "Array element count exceeded. Maximum allowed is: 10"); invalid JSON gives
  `{"error": "Invalid JSON: ..."}` with an offset, never echoing the body.
- An empty body is not checked (it is not a JSON document, but a body-less GET without a
  Content-Type must not become a 400).
- Limits must be -1 or more; other negative numbers are a config error.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, LocalResponse, PolicyContext
from flexgw.policies.registry import register

#: Config keys, in the order the docs list them, with their human names for messages.
LIMITS: tuple[tuple[str, str], ...] = (
    ("maxContainerDepth", "Container depth"),
    ("maxObjectEntryCount", "Object entry count"),
    ("maxObjectEntryNameLength", "Object entry name length"),
    ("maxArrayElementCount", "Array element count"),
    ("maxStringValueLength", "String value length"),
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: {"type": "integer", "minimum": -1, "default": -1} for key, _ in LIMITS},
    "additionalProperties": False,
}

_WS = re.compile(r"[ \t\n\r]*")
# A JSON string (RFC 8259 §7): no raw control characters, only the defined escapes. The
# unrolled form keeps the regex engine from backtracking per character.
_STRING = re.compile(
    r'"([^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*)"'
)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WHITESPACE = frozenset(" \t\n\r")

# Scanner states.
_VALUE = 0  # a value must come (top level, after ':' or after ',' in an array)
_VALUE_OR_CLOSE = 1  # just after '['
_KEY_OR_CLOSE = 2  # just after '{'
_KEY = 3  # after ',' in an object
_COLON = 4  # after a key
_NEXT = 5  # after a value inside a container: ',' or the closing bracket
_END = 6  # after the top-level value: only whitespace may follow


class JsonSyntaxError(ValueError):
    """The body is not JSON; `offset` is the character where scanning stopped."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset {offset}")
        self.message = message
        self.offset = offset


class LimitExceeded(Exception):
    """A configured limit was crossed; `key` is the config key, `limit` its value."""

    def __init__(self, key: str, name: str, limit: int) -> None:
        super().__init__(f"{name} exceeded. Maximum allowed is: {limit}")
        self.key = key
        self.limit = limit


def _decoded_length(raw: str) -> int:
    """Characters in a string token's contents once its escapes are decoded."""
    if "\\" not in raw:
        return len(raw)
    return len(json.loads('"' + raw + '"'))


@attrs.frozen
class JsonLimits:
    """The five Flex limits; a negative value means no limit."""

    max_container_depth: int = -1
    max_object_entry_count: int = -1
    max_object_entry_name_length: int = -1
    max_array_element_count: int = -1
    max_string_value_length: int = -1


def scan(text: str, limits: JsonLimits) -> None:
    """Check that `text` is one JSON value within `limits`, iteratively.

    Raises `JsonSyntaxError` for text that is not JSON and `LimitExceeded` for the first limit
    crossed (in document order); returns None when the document is acceptable.
    """
    depth_limit = limits.max_container_depth
    entries_limit = limits.max_object_entry_count
    name_limit = limits.max_object_entry_name_length
    elements_limit = limits.max_array_element_count
    string_limit = limits.max_string_value_length
    # One entry per open container: its count so far; objects and arrays tracked separately.
    is_object: list[bool] = []
    counts: list[int] = []
    n = len(text)
    pos = 0
    state = _VALUE
    ws_match = _WS.match
    while True:
        if pos < n and text[pos] in _WHITESPACE:  # (a `*` pattern always matches)
            pos = ws_match(text, pos).end()  # type: ignore[union-attr]
        if pos >= n:
            if state == _END:
                return
            raise JsonSyntaxError("unexpected end of data", pos)
        c = text[pos]
        if state == _NEXT:
            in_object = is_object[-1]
            if c == ",":
                pos += 1
                state = _KEY if in_object else _VALUE
            elif c == ("}" if in_object else "]"):
                pos += 1
                is_object.pop()
                counts.pop()
                state = _NEXT if counts else _END
            else:
                raise JsonSyntaxError("expected ',' or a closing bracket", pos)
            continue
        if state == _VALUE or state == _VALUE_OR_CLOSE:
            if c == "]" and state == _VALUE_OR_CLOSE:
                pos += 1
                is_object.pop()
                counts.pop()
                state = _NEXT if counts else _END
                continue
            if counts and not is_object[-1]:
                counts[-1] += 1
                if 0 <= elements_limit < counts[-1]:
                    raise LimitExceeded("maxArrayElementCount", "Array element count", elements_limit)
            if c == "{" or c == "[":
                if 0 <= depth_limit < len(counts) + 1:
                    raise LimitExceeded("maxContainerDepth", "Container depth", depth_limit)
                pos += 1
                is_object.append(c == "{")
                counts.append(0)
                state = _KEY_OR_CLOSE if c == "{" else _VALUE_OR_CLOSE
                continue
            if c == '"':
                m = _STRING.match(text, pos)
                if m is None:
                    raise JsonSyntaxError("invalid string", pos)
                if string_limit >= 0 and _decoded_length(m.group(1)) > string_limit:
                    raise LimitExceeded("maxStringValueLength", "String value length", string_limit)
                pos = m.end()
            elif c == "-" or "0" <= c <= "9":
                m = _NUMBER.match(text, pos)
                if m is None:
                    raise JsonSyntaxError("invalid number", pos)
                pos = m.end()
            elif c == "t" and text.startswith("true", pos):
                pos += 4
            elif c == "f" and text.startswith("false", pos):
                pos += 5
            elif c == "n" and text.startswith("null", pos):
                pos += 4
            else:
                raise JsonSyntaxError("expected a value", pos)
            state = _NEXT if counts else _END
            continue
        if state == _KEY or state == _KEY_OR_CLOSE:
            if c == "}" and state == _KEY_OR_CLOSE:
                pos += 1
                is_object.pop()
                counts.pop()
                state = _NEXT if counts else _END
                continue
            if c != '"':
                raise JsonSyntaxError("expected an object key", pos)
            m = _STRING.match(text, pos)
            if m is None:
                raise JsonSyntaxError("invalid string", pos)
            counts[-1] += 1
            if 0 <= entries_limit < counts[-1]:
                raise LimitExceeded("maxObjectEntryCount", "Object entry count", entries_limit)
            if name_limit >= 0 and _decoded_length(m.group(1)) > name_limit:
                raise LimitExceeded(
                    "maxObjectEntryNameLength", "Object entry name length", name_limit
                )
            pos = m.end()
            state = _COLON
            continue
        if state == _COLON:
            if c != ":":
                raise JsonSyntaxError("expected ':'", pos)
            pos += 1
            state = _VALUE
            continue
        # state == _END: something follows the top-level value.
        raise JsonSyntaxError("unexpected data after the JSON value", pos)


def is_json_request(content_type: bytes | None) -> bool:
    """Flex's rule: no Content-Type, or one that starts with application/json."""
    if content_type is None:
        return True
    return content_type.strip().lower().startswith(b"application/json")


@implementer(IPolicy)
@attrs.frozen
class JsonThreatProtectionPolicy:
    """Checks buffered JSON request bodies against the binding's limits."""

    limits: JsonLimits
    needs_body = True  # the exchange buffers the request body (bounded) for this policy

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """400 for a JSON body that is invalid or crosses a limit; otherwise go on."""
        body = ctx.body
        if not body or not is_json_request(ctx.request_header(b"content-type")):
            return None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return LocalResponse.json_error(
                400, f"Invalid JSON: not UTF-8 at offset {exc.start}"
            )
        try:
            scan(text, self.limits)
        except JsonSyntaxError as exc:
            return LocalResponse.json_error(400, f"Invalid JSON: {exc}")
        except LimitExceeded as exc:
            return LocalResponse.json_error(400, str(exc))
        return None

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses pass unchanged (Flex checks requests only)."""


@implementer(IPolicyKind)
class JsonThreatProtectionKind:
    """The `json-threat-protection-flex` kind."""

    name = "json-threat-protection-flex"
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> JsonThreatProtectionPolicy:
        """A policy holding the configured limits (-1, the default, for each one not given)."""
        return JsonThreatProtectionPolicy(
            JsonLimits(
                max_container_depth=int(config.get("maxContainerDepth", -1)),
                max_object_entry_count=int(config.get("maxObjectEntryCount", -1)),
                max_object_entry_name_length=int(config.get("maxObjectEntryNameLength", -1)),
                max_array_element_count=int(config.get("maxArrayElementCount", -1)),
                max_string_value_length=int(config.get("maxStringValueLength", -1)),
            )
        )


register(JsonThreatProtectionKind())
