"""`injection-protection-flex`: find SQL injection, XSS and custom patterns in the request; 400 or log.

Flex (docs `policies-included-injection-protection.adoc`, 1.12+): keys `builtInProtections`
(`sql`, `xss`, or both), `customProtections` (`[{name, regex}]`), `protectPathAndQuery`,
`protectHeaders`, `headersToProtect`, `protectBody`, `rejectRequests`. A request that matches
is rejected with **400** and the response header `x-injection-protection: blocked` when
`rejectRequests` is true, else forwarded and the violation logged. Only requests are checked.
The body is buffered only with `protectBody` (1 MiB buffer limit: 413 over it); binary content
(by content type, or not valid UTF-8) is skipped; multipart parts are inspected up to 4 levels
deep, deeper content is scanned as plain text.

What is scanned, each piece on its own: the path, every query parameter name and value (and the
whole query string); the headers named in `headersToProtect` (every header when the list is
empty; each `Cookie` pair separately); the body: JSON string keys and values (after JSON's
own unescaping), `application/x-www-form-urlencoded` names and values, multipart parts, any
other text as a whole.

Decoding before matching (evasions): percent-decoding repeated until stable (at most 3 rounds:
double and triple encoding), `%uXXXX`, overlong UTF-8 (`%C0%A7`), `+` as space in queries and
forms, HTML character references (twice), `\\uXXXX` / `\\xXX` escapes, Unicode NFKC (full-width
`＜script＞`), NUL and control characters dropped, lower case; for SQL, comments are removed
(`/*...*/` becomes a space, MySQL's `/*!50000 ... */` keeps its content) and whitespace runs
collapse; for `javascript:` URLs, whitespace and control characters inside the scheme are ignored.

Matching: the built-in signatures (`SQL_SIGNATURES`, `XSS_SIGNATURES`) and custom regexes are
RE2 (google-re2): matching time is linear in the input by construction, so no pattern and no
input can backtrack catastrophically. A custom regex that RE2 rejects, or that uses a
construct Flex's RE2 does not have (look-around, back-references), is a config error at
`customProtections.N.regex`. Custom regexes are matched against the decoded value
(percent-decoding, entities, NFKC) but not lower-cased (use `(?i)` as in Flex).

Measured detection rate and false positives: `bench/injection_corpus/` (README table).

Deliberate differences from Flex:
- Flex documents the status and header only: the body here is the gateway's usual JSON error,
  `{"error": "Injection detected: <protection>"}` naming the protection (`sql`, `xss`, or the
  custom protection's `name`), never echoing the request. The log line names the protection
  and where it matched (`path`, `query`, `header <name>`, `body`), not the matched text.
- `builtInProtections: []` is accepted when `customProtections` has entries (Flex requires at
  least one built-in); the booleans Flex marks REQUIRED are required, `headersToProtect`
  defaults to `[]` (all headers) and `customProtections` to `[]`.
- Flex's own signature set is not published: flexgw's is written from the public payload
  corpora named in `bench/injection_corpus/README.md`; results on other inputs may differ.
"""

from __future__ import annotations

import functools
import html
import json
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

import attrs
import re2
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.http import multipart
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.registry import register

NAME = "injection-protection-flex"
_log = Logger(namespace="flexgw.policies.injection_protection")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "builtInProtections": {
            "type": "array",
            "items": {"enum": ["sql", "xss"]},
            "uniqueItems": True,
        },
        "customProtections": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "regex": {"type": "string", "minLength": 1},
                },
                "required": ["name", "regex"],
                "additionalProperties": False,
            },
            "default": [],
        },
        "protectPathAndQuery": {"type": "boolean"},
        "protectHeaders": {"type": "boolean"},
        "headersToProtect": {"type": "array", "items": {"type": "string"}, "default": []},
        "protectBody": {"type": "boolean"},
        "rejectRequests": {"type": "boolean"},
    },
    "required": [
        "builtInProtections",
        "protectPathAndQuery",
        "protectHeaders",
        "protectBody",
        "rejectRequests",
    ],
    "additionalProperties": False,
}

BLOCKED_HEADER = (b"x-injection-protection", b"blocked")
MAX_MULTIPART_DEPTH = 4

# -- signatures ---------------------------------------------------------------------------------
# Written against lower-cased, decoded text (see `normalize`). RE2 syntax only.

_CMP = r"(?:=|<>|!=|<=|>=|<|>|\blike\b|\brlike\b|\bregexp\b|\bsounds\s+like\b)"
_OPERAND = r"""(?:\d+(?:\.\d+)?|'[^']{0,40}'|"[^"]{0,40}"|[a-z_@]\w{0,40})"""

#: (name, pattern) of the SQL injection signatures.
SQL_SIGNATURES: tuple[tuple[str, str], ...] = (
    # ' or 1=1, " or "a"="a, 1 and 2>1, ') or ('x'='x: a number or a quoted string compared
    ("tautology",
     r"(?:^|['\")\d\s])\s*\)*\s*(?:or|and|xor|\|\||&&)\s+\(*\s*(?:\d+(?:\.\d+)?|'[^']{0,40}'|\"[^\"]{0,40}\")"
     + r"\s*\)*\s*" + _CMP + r"\s*\(*\s*(?:\d|'|\"|[a-z_@])"),
    # or a=a, or x like y: bare names compared need = or like
    ("tautology-names", r"\b(?:or|and|xor)\s+[a-z_]\w{0,40}\s*(?:=|\blike\b)\s*[a-z_\d]"),
    # admin' --, admin'#, '; --  (an unclosed /* comment reads as "--", see sql_form)
    ("quote-terminator", r"['\"]\s*\)*\s*(?:--(?:\s|$)|#(?:\s|$)|;\s*(?:--|#|$))"),
    ("or-comment", r"\b(?:or|and)\s+(?:\d+|'[^']*'|\"[^\"]*\"|true|false)\s*(?:--(?:\s|$)|#|;|$)"),
    ("quote-or",
     r"['\"]\s*\)*\s*(?:or|and|xor|\|\||&&)\s+\(*\s*(?:''|\"\"|'[^'\s]{0,20}'\s*[-+*&^|=<>]|\"[^\"\s]{0,20}\"\s*[-+*&^|=<>]|not\b|true\b|false\b|exists\b|sleep\b|benchmark\b|\()"),
    ("union-select", r"\bunion\b(?:\s+(?:all|distinct))?\s*\(*\s*\bselect\b"),
    ("stacked-query",
     (r";\s*(?:drop|truncate|shutdown|waitfor|declare|exec|execute|grant|revoke|call)\b"
      r"|;\s*(?:select|insert|update|delete|alter|create|replace|merge|rename)\b[^;]{0,120}?"
      r"\b(?:from|into|set|table|where|database|user|values|procedure|function)\b")),
    ("time-function", r"(?:^|[^.\w])(?:sleep|benchmark|pg_sleep|randomblob)\s*\(\s*[\d(]"),
    ("waitfor", r"\bwaitfor\s+(?:delay|time)\s*'"),
    ("dbms-function",
     r"\b(?:extractvalue|updatexml|load_file|dbms_pipe\.receive_message|utl_http\.request|utl_inaddr|xp_cmdshell|xp_regread|sp_oacreate|sp_executesql|sp_password|pg_read_file|exp\(~|name_const|make_set|geometrycollection|multipoint)\b"),
    ("system-table",
     r"\b(?:information_schema|sysobjects|syscolumns|sys\.tables|sqlite_master|pg_catalog|pg_shadow|mysql\.user|all_tables|user_tables|msysobjects)\b"),
    ("system-variable", r"@@(?:version|datadir|hostname|basedir|servername|identity|spid)\b"),
    ("into-file", r"\binto\s+(?:out|dump)file\b"),
    ("exec-proc", r"\bexec(?:ute)?\s*\(?\s*(?:master\.|xp_|sp_|@|'|\()"),
    ("order-by-probe", r"(?:['\")]|^)\s*(?:order|group)\s+by\s+[\d,\s]+(?:--|#|/\*|$)"),
    ("having", r"\bhaving\s+\d+\s*" + _CMP),
    ("char-concat", r"\b(?:char|chr|nchar)\s*\(\s*\d+\s*(?:,\s*\d+\s*){2,}\)"),
    ("hex-blob", r"\b(?:select|exec|declare|set)\b[^;]{0,80}0x[0-9a-f]{8,}"),
    ("select-from", r"\bselect\b[\s\S]{1,120}?\bfrom\b\s*[\w.`\[\"]+\s*(?:where\b|--|#|;|\)|$|limit\b)"),
    ("if-case-probe", r"\b(?:if|iif|case\s+when)\s*\(\s*\d+\s*" + _CMP),
    ("drop-table", r"\bdrop\s+(?:table|database|schema)\b"),
    ("insert-into", r"\binsert\s+into\b[^;]{0,200}\bvalues\s*\("),
    ("like-wildcard", r"['\"]\s*(?:or|and)\s+\w+\s+like\s+'%"),
    ("quote-concat-call", r"['\"]\s*\|\|\s*[\w.]+\s*\("),
)

_EVENTS = (
    "abort|activate|afterprint|afterscriptexecute|animationcancel|animationend|animationiteration|"
    "animationstart|auxclick|beforeactivate|beforecopy|beforecut|beforedeactivate|beforeinput|"
    "beforepaste|beforeprint|beforeunload|begin|blur|bounce|canplay|canplaythrough|change|click|"
    "close|contextmenu|copy|cuechange|cut|dblclick|deactivate|drag|dragend|dragenter|dragleave|"
    "dragover|dragstart|drop|durationchange|end|ended|error|finish|focus|focusin|focusout|"
    "formdata|fullscreenchange|hashchange|input|invalid|keydown|keypress|keyup|load|loadeddata|"
    "loadedmetadata|loadend|loadstart|message|mousedown|mouseenter|mouseleave|mousemove|"
    "mouseout|mouseover|mouseup|mousewheel|move|offline|online|pagehide|pageshow|paste|pause|"
    "play|playing|pointerdown|pointerenter|pointerleave|pointermove|pointerout|pointerover|"
    "pointerrawupdate|pointerup|popstate|progress|ratechange|readystatechange|repeat|reset|"
    "resize|scroll|scrollend|search|seeked|seeking|select|selectionchange|selectstart|show|"
    "start|stalled|storage|submit|suspend|timeupdate|toggle|touchend|touchmove|touchstart|"
    "transitioncancel|transitionend|transitionrun|transitionstart|unhandledrejection|unload|"
    "volumechange|waiting|webkitanimationend|webkitanimationiteration|webkitanimationstart|"
    "webkittransitionend|wheel|filterchange|help|layoutcomplete|losecapture|propertychange|"
    "rowenter|rowexit|rowsdelete|rowsinserted|start|stop|datasetchanged|dataavailable|"
    "errorupdate|controlselect|readystatechange|mozfullscreenchange"
)

#: (name, pattern) of the XSS signatures.
XSS_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("script-tag",
     r"<\s*/?\s*(?:script|iframe|frame|frameset|object|embed|applet|meta|base|svg|math|isindex|xml|xss|import|template|portal|noscript|style|link|form)\b"),
    ("event-handler", r"(?:^|[\s\"'/;`(<])on(?:" + _EVENTS + r")\s*=\s*[^\s>]"),
    ("script-url",
     r"(?:java|vb|live|mocha)script:\s*(?:[\w$.]+\s*[(\[=`.]|/|\{|'|\"|&|\\|%|\(|$)"),
    ("data-html", r"data:\s*(?:text/html|image/svg\+xml|application/(?:x-)?(?:javascript|ecmascript))"),
    ("url-attribute",
     r"<[^>]*\b(?:src|href|action|formaction|data|xlink:href|background|lowsrc|dynsrc|poster)\s*=\s*['\"`]?\s*(?:javascript|vbscript|data|livescript):"),
    ("css-expression", r"(?:expression\s*\(|-moz-binding|behavior\s*:\s*url|@import\b)"),
    ("js-sink",
     r"\b(?:document\.(?:cookie|write|writeln|domain|location)|window\.location|location\.(?:href|hash|replace)|\.innerhtml\s*=|\.outerhtml\s*=|string\.fromcharcode|fromcharcode\s*\(|settimeout\s*\(|setinterval\s*\(|eval\s*\(|execscript\s*\(|top\s*\[|self\s*\[|globalthis\b|constructor\s*\()"),
    ("dialog-call", r"(?:^|[^\w.])(?:alert|prompt|confirm|print)(?:\s*\(|`|\s*\.\s*(?:call|apply|bind)\b)"),
    ("html-breakout", r"['\"`]\s*/?>\s*<\s*[a-z!/]"),
    ("svg-animate", r"<\s*(?:animate|set|animatetransform|handler|listener)\b[^>]*\b(?:attributename|to|values|from|ev:event)\s*="),
    ("html-comment-trick", r"<!--[\s\S]{0,200}?(?:<script|-->\s*<)"),
    ("srcdoc", r"\bsrcdoc\s*="),
    ("generic-handler", r"<[a-z][^>]*[\s/'\"]on[a-z]{3,}\s*=\s*[^\s>]"),
    ("utf7-tag", r"\+ad[wx]-"),
    ("legacy-ie", r"<\?(?:import|xml:namespace)\b|<!--\[if\b|\bdatasrc\s*="),
)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad custom regex is reported as a config error, not on stderr


def _alternation(signatures: tuple[tuple[str, str], ...]) -> Any:
    return re2.compile("|".join(f"(?:{pattern})" for _, pattern in signatures), _RE2_OPTIONS)


#: Every SQL signature needs one of these in the text (checked first: a cheap test that spares
#: most benign values the signature search). bench/injection_corpus/measure.py keeps it honest.
_SQL_NEEDS = re.compile(
    r"['\"`;()@#=<>*\-]|union|select|drop|insert|waitfor|having|information_schema|sysobjects"
    r"|syscolumns|sqlite_master|pg_|mysql\.user|all_tables|user_tables|msysobjects|order|group"
    r"|outfile|dumpfile|exec|char|chr|0x|like"
)
_XSS_NEEDS = re.compile(r"[<=(:`\[]|\+ad[wx]-|globalthis|@import|-moz-binding|behavior")


@functools.cache
def _compiled() -> tuple[Any, Any, tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]:
    """The signatures compiled (once, at the first binding built: a gateway without this policy
    does not pay for it): SQL any, XSS any, SQL each, XSS each."""
    return (
        _alternation(SQL_SIGNATURES),
        _alternation(XSS_SIGNATURES),
        tuple((name, re2.compile(pattern, _RE2_OPTIONS)) for name, pattern in SQL_SIGNATURES),
        tuple((name, re2.compile(pattern, _RE2_OPTIONS)) for name, pattern in XSS_SIGNATURES),
    )

# -- decoding -----------------------------------------------------------------------------------

_PERCENT = re.compile(rb"%(?:u([0-9a-fA-F]{4})|([0-9a-fA-F]{2}))")
_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]")
_JS_ESCAPE = re.compile(r"\\(?:u\{?([0-9a-fA-F]{4,6})\}?|x([0-9a-fA-F]{2}))")
_SQL_COMMENT = re.compile(r"/\*!\d*([\s\S]*?)\*/|/\*[\s\S]*?\*/")
_SQL_OPEN_COMMENT = re.compile(r"/\*[\s\S]*\Z")
_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00\u200b-\u200f\u2060\ufeff]")  # dropped: NUL, zero-width
_SPACING = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f\u2028\u2029]")  # read as a space
_CSS_ESCAPE = re.compile(r"\\([0-9a-fA-F]{2,6})\s?")
#: Typographic quotes read as ASCII quotes (a database given them may fold them too).
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2032": "'"})
_SCHEME_GAPS = re.compile(r"(?<=[a-z])[\s\x00-\x1f]+(?=[a-z:])")
#: Text made only of these characters cannot match any built-in signature (fast path).
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/\-]*\Z")


def _percent_once(data: bytes) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        if m.group(1) is not None:
            return chr(int(m.group(1), 16)).encode("utf-8")
        return bytes([int(m.group(2), 16)])

    return _PERCENT.sub(one, data)


def _overlong(m: re.Match[bytes]) -> bytes:
    raw = m.group(0)
    if len(raw) == 2:
        value = ((raw[0] & 0x1F) << 6) | (raw[1] & 0x3F)
    else:
        value = ((raw[0] & 0x0F) << 12) | ((raw[1] & 0x3F) << 6) | (raw[2] & 0x3F)
    return chr(value).encode("utf-8")


def percent_decode(data: bytes, plus: bool = False) -> str:
    """Percent-decoding repeated until stable (at most 3 rounds), `%uXXXX`, overlong UTF-8."""
    if plus:
        data = data.replace(b"+", b" ")
    for _ in range(3):
        if b"%" not in data:
            break
        decoded = _percent_once(data)
        if decoded == data:
            break
        data = decoded
    if b"\xc0" in data or b"\xc1" in data or b"\xe0" in data:
        data = _OVERLONG.sub(_overlong, data)
    return data.decode("utf-8", "replace")


def _js_unescape(m: re.Match[str]) -> str:
    code = int(m.group(1) or m.group(2), 16)
    return chr(code) if code <= 0x10FFFF else ""


def _css_unescape(m: re.Match[str]) -> str:
    code = int(m.group(1), 16)
    return chr(code) if 0 < code <= 0x10FFFF else ""


def normalize(text: str) -> str:
    """Entities, JS escapes, NFKC, control characters, lower case (see the module docstring)."""
    if "&" in text:
        text = html.unescape(html.unescape(text))
    if "\\" in text:
        text = _JS_ESCAPE.sub(_js_unescape, text)
        text = _CSS_ESCAPE.sub(_css_unescape, text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    return _SPACING.sub(" ", _CONTROL.sub("", text)).lower()


def sql_form(text: str) -> str:
    """The normalized text with SQL comments removed and whitespace runs collapsed."""
    if "/*" in text:
        text = _SQL_COMMENT.sub(lambda m: " " + (m.group(1) or "") + " ", text)
        # a comment never closed hides the rest of the query: the same as a trailing "--"
        text = _SQL_OPEN_COMMENT.sub(" -- ", text)
    return _SPACE.sub(" ", text)


# -- config -------------------------------------------------------------------------------------


@attrs.frozen
class Protection:
    """One thing to look for: a name and the regexes that find it."""

    name: str
    builtin: bool
    any: Any  # re2 pattern: does anything match
    each: tuple[tuple[str, Any], ...] = ()  # (signature name, pattern), to name what matched


@attrs.frozen
class InjectionConfig:
    """The checked config of one binding."""

    sql: bool
    xss: bool
    custom: tuple[Protection, ...]
    path_and_query: bool
    headers: bool
    headers_to_protect: frozenset[bytes]  # lower-case; empty: every header
    body: bool
    reject: bool


def compile_custom(index: int, name: str, pattern: str) -> Protection:
    """A custom protection's regex with RE2; a located config error when RE2 rejects it."""
    field = f"customProtections.{index}.regex"
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except Exception as exc:  # noqa: BLE001 (re2.error and friends: any is a config error)
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PolicyConfigError(f"invalid regex (RE2): {detail}", field) from None
    return Protection(name, False, compiled)


def parse_config(config: dict[str, Any]) -> InjectionConfig:
    """Check and normalise a binding's config (the schema has checked types)."""
    builtins = list(config.get("builtInProtections", []))
    custom = tuple(
        compile_custom(i, item["name"], item["regex"])
        for i, item in enumerate(config.get("customProtections") or [])
    )
    if not builtins and not custom:
        raise PolicyConfigError(
            "nothing to protect against: give builtInProtections or customProtections",
            "builtInProtections",
        )
    return InjectionConfig(
        sql="sql" in builtins,
        xss="xss" in builtins,
        custom=custom,
        path_and_query=bool(config.get("protectPathAndQuery", True)),
        headers=bool(config.get("protectHeaders", False)),
        headers_to_protect=frozenset(
            h.strip().lower().encode("latin-1") for h in config.get("headersToProtect") or []
        ),
        body=bool(config.get("protectBody", False)),
        reject=bool(config.get("rejectRequests", True)),
    )


# -- scanning -----------------------------------------------------------------------------------


def detect(text: str, sql: bool, xss: bool, custom: tuple[Protection, ...] = ()) -> str | None:
    """The name of the first protection `text` (already percent-decoded) violates, or None."""
    if not text or (not custom and _PLAIN.match(text)):
        return None
    norm = normalize(text)
    sql_any, xss_any, _, _ = _compiled()
    if sql and _SQL_NEEDS.search(norm) and sql_any.search(sql_form(norm)):
        return "sql"
    if xss and _XSS_NEEDS.search(norm):
        if xss_any.search(norm):
            return "xss"
        if "script" in norm or "&#" in text:
            squeezed = _SCHEME_GAPS.sub("", norm)
            if squeezed != norm and xss_any.search(squeezed):
                return "xss"
    if custom:
        # Custom regexes see the decoded text in its own case (use (?i) for any case).
        cased = _CONTROL.sub("", html.unescape(text)) if "&" in text else text
        for protection in custom:
            if protection.any.search(cased):
                return protection.name
    return None


def signature(text: str, protection: str) -> str | None:
    """Which built-in signature matched (for logs and the corpus report)."""
    norm = normalize(text)
    _, _, sql_each, xss_each = _compiled()
    if protection == "sql":
        for name, pattern in sql_each:
            if pattern.search(sql_form(norm)):
                return name
    elif protection == "xss":
        for candidate in (norm, _SCHEME_GAPS.sub("", norm)):
            for name, pattern in xss_each:
                if pattern.search(candidate):
                    return name
    return None


def _query_pieces(query: bytes) -> Iterator[str]:
    """The whole query and each parameter name and value, decoded ('+' is a space)."""
    yield percent_decode(query, plus=True)
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name:
            yield percent_decode(name, plus=True)
        if value:
            yield percent_decode(value, plus=True)


def _json_strings(value: Any) -> Iterator[str]:
    """Every string key and value of a parsed JSON document, iteratively."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for key, inner in item.items():
                yield key
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


_BINARY_TYPES = (
    b"image/", b"audio/", b"video/", b"font/", b"application/octet-stream", b"application/pdf",
    b"application/zip", b"application/gzip", b"application/x-protobuf", b"application/grpc",
    b"application/x-tar", b"application/msword", b"application/vnd.",
)


def body_pieces(body: bytes, content_type: bytes, depth: int = 0) -> Iterator[str]:
    """The text pieces of a body worth scanning (binary content yields nothing);
    `content_type` as sent (a multipart boundary is case-sensitive)."""
    kind = content_type.lower()
    if not body or kind.startswith(_BINARY_TYPES):
        return
    if kind.startswith(b"multipart/") and depth < MAX_MULTIPART_DEPTH:
        delimiter = multipart.boundary(content_type)
        if delimiter is not None:
            for headers, content in multipart.parts(body, delimiter):
                for name, value in headers:
                    if name.lower() == b"content-disposition":
                        yield value.decode("utf-8", "replace")
                yield from body_pieces(content, multipart.media_type(headers), depth + 1)
            return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return  # not UTF-8: binary, skipped (as Flex)
    if b"json" in kind or (not kind and text[:1] in "{["):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            yield from _json_strings(document)
            return
    if kind.startswith(b"application/x-www-form-urlencoded"):
        yield from _query_pieces(body)
        return
    yield text


@implementer(IPolicy)
class InjectionProtectionPolicy:
    """One binding: scans each request's selected parts."""

    response_phase = False

    def __init__(self, config: InjectionConfig, binding: str) -> None:
        self.config = config
        self.binding = binding
        self.needs_body = config.body

    def _pieces(self, ctx: PolicyContext) -> Iterator[tuple[str, str]]:
        """(where, decoded text) of everything this binding scans."""
        config = self.config
        head = ctx.head
        if config.path_and_query:
            yield "path", percent_decode(head.path.encode("latin-1"))
            query = head.query
            if len(query) > 1:
                for piece in _query_pieces(query[1:]):
                    yield "query", piece
        if config.headers:
            wanted = config.headers_to_protect
            for name, value in head.headers:
                lname = name.lower()
                if wanted and lname not in wanted:
                    continue
                where = "header " + lname.decode("latin-1")
                if lname == b"cookie":
                    for pair in value.split(b";"):
                        for part in pair.strip().partition(b"=")[::2]:
                            if part:
                                yield where, percent_decode(part)
                else:
                    yield where, percent_decode(value)
        if config.body and ctx.body:
            for piece in body_pieces(ctx.body, multipart.media_type(head.headers)):
                yield "body", piece

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """400 with `x-injection-protection: blocked` on the first violation (or log it)."""
        config = self.config
        for where, text in self._pieces(ctx):
            found = detect(text, config.sql, config.xss, config.custom)
            if found is None:
                continue
            _log.warn(
                "{binding}: injection ({protection}) in {where} of {method} request"
                "{action}",
                binding=self.binding,
                protection=found,
                where=where,
                method=ctx.head.method.decode("latin-1"),
                action="; rejected" if config.reject else "; allowed (rejectRequests false)",
            )
            if config.reject:
                return LocalResponse.json_error(
                    400, f"Injection detected: {found}", (BLOCKED_HEADER,)
                )
            return None
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses pass unchanged."""


@implementer(IPolicyKind)
class InjectionProtectionKind:
    """The `injection-protection-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> InjectionProtectionPolicy:
        """Check the config and compile the custom regexes (and, once, the signatures)."""
        _compiled()
        return InjectionProtectionPolicy(parse_config(config), context.binding)


KIND = register(InjectionProtectionKind())
