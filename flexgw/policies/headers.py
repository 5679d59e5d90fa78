"""`header-injection-flex` and `header-removal-flex`: add or strip request (inbound) and response (outbound) headers.

Flex behaviour relied on (docs `policies-included-header-injection.adoc` and
`policies-included-header-removal.adoc`, current and 1.0/1.1 versions; reference §2.2):

- Injection: `inboundHeaders` / `outboundHeaders`, each a list of `{key, value}` (the 1.0/1.1 docs
  spell the name `name`; both spellings are accepted, one per item). Both lists default to `[]`
  and cannot both be empty. Key and value may be `#[...]` expressions ("in the value or name of the
  header"), compiled once at build time. An injected header is **added** next to existing ones;
  only `access-control-allow-origin` and `content-type` (Flex's list also names `content-length`
  and `transfer-encoding`, refused here, see below) are overwritten. A failed evaluation is a 500.
- Removal: `inboundHeaders` / `outboundHeaders`, lists of header names or regular expressions
  (`Access-Control.*`), matched against the whole name, case-insensitively; both default to `[]`
  and cannot both be empty. `accept`, `host`, `content-type`, `content-length`, `date`,
  `transfer-encoding` and `connection` are never removed, whatever matches them.
- Inbound headers go to the upstream request (`on_request`), outbound ones to the response
  (`on_response`).

Deliberate differences from Flex:
- Injecting a framing or connection header (`host`, `content-length`, `transfer-encoding`,
  `connection`, `keep-alive`, `proxy-connection`, `te`, `trailer`, `upgrade`,
  `proxy-authorization`, `proxy-authenticate`) is refused at load time with a config error naming
  the item (`inboundHeaders.2.key`): Flex lets `content-length`/`transfer-encoding` be overwritten,
  which in a proxy that re-frames bodies is a request/response smuggling hole. A header *name*
  computed by an expression that turns out to be one of these, or not a valid header name, fails
  that request with a 500 (an evaluation error), as does any computed value containing CR, LF,
  NUL or another control character except tab: a header value must never be able to split a
  request or response. Literal names and values are checked the same way at load time.
- A removal entry written as `#[...]` is evaluated per request and removes the header(s) it names
  exactly (a string, or an array of strings); it is never compiled as a regular expression
  (request data must not become a regex). A literal entry naming a protected header is accepted,
  logged as a warning and ignored (Flex ignores it silently).
- Regular expressions are Python's `re` (Flex uses Rust's `regex`); the common subset behaves the
  same.
- Outbound headers are applied to the upstream's response. A local answer from a later policy
  (a 401, a 429) does not pass through `on_response` in flexgw's chain, so it gets no outbound
  injection or removal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.http.headers import HOP_BY_HOP, HeaderList
from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.expressions import (
    EvaluationError,
    Expression,
    ExpressionError,
    compile_value,
    to_text,
)
from flexgw.policies.registry import register

_log = Logger(namespace="flexgw.policies.headers")

#: Headers the injection policy refuses to write: framing and connection-level fields.
NOT_INJECTABLE = HOP_BY_HOP | frozenset({b"host", b"content-length"})

#: Headers Flex overwrites instead of adding another value (its other two are NOT_INJECTABLE).
OVERWRITTEN = frozenset({b"access-control-allow-origin", b"content-type"})

#: Headers the removal policy never removes (Flex docs: "may not be removed").
NOT_REMOVABLE = frozenset(
    {
        b"accept",
        b"host",
        b"content-type",
        b"content-length",
        b"date",
        b"transfer-encoding",
        b"connection",
    }
)

#: RFC 9110 §5.6.2 token: what a header name may be.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: Control characters a header value must not contain (HTAB is allowed).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

#: Largest number of distinct header names whose removal verdict is cached per list.
_CACHE_LIMIT = 512


def _bool_schema() -> dict[str, Any]:
    """A boolean, also as the strings "true"/"false" ($ENV substitution yields strings)."""
    return {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false"]}]}


_INJECTION_ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "value": {"type": ["string", "number", "boolean"]},
    },
    "required": ["value"],
    "anyOf": [{"required": ["key"]}, {"required": ["name"]}],
    "additionalProperties": False,
}

INJECTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "inboundHeaders": {"type": "array", "items": _INJECTION_ITEM, "default": []},
        "outboundHeaders": {"type": "array", "items": _INJECTION_ITEM, "default": []},
    },
    "additionalProperties": False,
}

REMOVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "inboundHeaders": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "default": [],
        },
        "outboundHeaders": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "default": [],
        },
    },
    "additionalProperties": False,
}


# -- checks shared by build time and request time ----------------------------------------------


def header_name_problem(name: bytes) -> str | None:
    """Why `name` cannot be injected (not a token, or a framing/connection header), else None."""
    if not _TOKEN.match(name):
        return f"{name.decode('latin-1')!r} is not a valid header name"
    if name.lower() in NOT_INJECTABLE:
        return f"the {name.decode('latin-1')} header cannot be injected"
    return None


def header_value_problem(value: bytes) -> str | None:
    """Why `value` cannot be a header value (CR, LF, NUL or another control character), else None."""
    if _BAD_VALUE.search(value):
        return "a header value must not contain CR, LF, NUL or other control characters"
    return None


def _scalar_text(value: Any) -> str:
    """A literal config value as header text (YAML may give numbers or booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _compile(text: str, field: str) -> Expression | str:
    """`compile_value`, with an expression error turned into a config error at `field`."""
    try:
        return compile_value(text)
    except ExpressionError as exc:
        raise PolicyConfigError(f"invalid expression: {exc}", field) from None


# -- injection ---------------------------------------------------------------------------------


@attrs.frozen
class Injection:
    """One header to inject: literal name/value bytes, or expressions evaluated per request."""

    name: bytes | Expression
    value: bytes | Expression

    def resolve(self, ctx: PolicyContext) -> tuple[bytes, bytes]:
        """The (name, value) for this request; EvaluationError if an expression gives a bad one."""
        name = self.name
        if isinstance(name, Expression):
            source = name.source
            name = _computed(name, ctx, strip=True)
            problem = header_name_problem(name)
            if problem is not None:
                raise EvaluationError(f"{problem} (from #[{source}])")
        value = self.value
        if isinstance(value, Expression):
            source = value.source
            value = _computed(value, ctx, strip=False)
            problem = header_value_problem(value)
            if problem is not None:
                raise EvaluationError(f"{problem} (from #[{source}])")
        return name, value


def _computed(expression: Expression, ctx: PolicyContext, strip: bool) -> bytes:
    """An expression's result on this request, as header bytes (UTF-8)."""
    text = to_text(expression.evaluate(ctx.expression_context()))
    return (text.strip() if strip else text).encode("utf-8")


def _build_injections(items: Sequence[dict[str, Any]], field: str) -> tuple[Injection, ...]:
    """Compile one list of `{key, value}` items, checking literal names and values."""
    built = []
    for index, item in enumerate(items):
        where = f"{field}.{index}"
        if "key" in item and "name" in item:
            raise PolicyConfigError("give the header name as `key` or `name`, not both", where)
        key_field = "key" if "key" in item else "name"
        raw_name = _compile(str(item[key_field]), f"{where}.{key_field}")
        name: bytes | Expression
        if isinstance(raw_name, str):
            literal = raw_name.strip().encode("utf-8")
            problem = header_name_problem(literal)
            if problem is not None:
                raise PolicyConfigError(problem, f"{where}.{key_field}")
            name = literal
        else:
            name = raw_name
        raw_value = item["value"]
        compiled = _compile(raw_value, f"{where}.value") if isinstance(raw_value, str) else None
        if isinstance(compiled, Expression):
            value: bytes | Expression = compiled
        else:
            value = _scalar_text(raw_value).encode("utf-8")
            problem = header_value_problem(value)
            if problem is not None:
                raise PolicyConfigError(problem, f"{where}.value")
        built.append(Injection(name, value))
    return tuple(built)


def _uses_payload(items: Sequence[Injection]) -> bool:
    """True when an expression reads `payload` (the request body must then be buffered)."""
    return any(
        isinstance(part, Expression) and "payload" in part.references
        for item in items
        for part in (item.name, item.value)
    )


@implementer(IPolicy)
@attrs.frozen
class HeaderInjectionPolicy:
    """Adds the configured headers to the upstream request and to the upstream's response."""

    inbound: tuple[Injection, ...]
    outbound: tuple[Injection, ...]
    needs_body: bool = False
    # The inbound list when every entry is a literal that is added (none overwrites): the same
    # pairs for every request, appended in one step. None when some entry needs the request.
    inbound_appended: tuple[tuple[bytes, bytes], ...] | None = attrs.field(init=False)

    @inbound_appended.default
    def _literal_appends(self) -> tuple[tuple[bytes, bytes], ...] | None:
        pairs = []
        for item in self.inbound:
            name, value = item.name, item.value
            if not isinstance(name, bytes) or not isinstance(value, bytes):
                return None
            if name.lower() in OVERWRITTEN:
                return None
            pairs.append((name, value))
        return tuple(pairs)

    def on_request(self, ctx: PolicyContext) -> None:
        """Inject the inbound headers (evaluated first, then applied)."""
        if not self.inbound:
            return
        appended = self.inbound_appended
        if appended is not None:
            headers = ctx.changed_headers
            if headers is None:  # the first change: the copy and the additions in one step
                ctx.changed_headers = [*ctx.head.headers, *appended]
            else:
                headers.extend(appended)
            return
        resolved = [item.resolve(ctx) for item in self.inbound]
        for name, value in resolved:
            if name.lower() in OVERWRITTEN:
                ctx.set_request_header(name, value)
            else:
                ctx.add_request_header(name, value)

    @property
    def response_phase(self) -> bool:
        """Only a binding with outbound entries needs the response phase."""
        return bool(self.outbound)

    def on_response(self, ctx: PolicyContext) -> None:
        """Inject the outbound headers into the response head."""
        headers = ctx.response_headers
        if not self.outbound or headers is None:
            return
        resolved = [item.resolve(ctx) for item in self.outbound]
        for name, value in resolved:
            lname = name.lower()
            if lname in OVERWRITTEN:
                headers[:] = [(k, v) for k, v in headers if k.lower() != lname]
            headers.append((name, value))


@implementer(IPolicyKind)
class HeaderInjectionKind:
    """The `header-injection-flex` kind."""

    name = "header-injection-flex"
    schema = INJECTION_SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> HeaderInjectionPolicy:
        """Compile both lists; literal names and values are checked now, expressions per request."""
        inbound = _build_injections(config.get("inboundHeaders") or [], "inboundHeaders")
        outbound = _build_injections(config.get("outboundHeaders") or [], "outboundHeaders")
        if not inbound and not outbound:
            raise PolicyConfigError("inboundHeaders and outboundHeaders cannot both be empty")
        return HeaderInjectionPolicy(inbound, outbound, _uses_payload(inbound))


# -- removal -----------------------------------------------------------------------------------


@attrs.frozen
class RemovalList:
    """The headers one list removes: a combined regex plus per-request expressions."""

    pattern: re.Pattern[str] | None
    expressions: tuple[Expression, ...]
    _cache: dict[bytes, bool] = attrs.field(factory=dict, eq=False, repr=False)

    def __bool__(self) -> bool:
        """True when the list removes anything."""
        return self.pattern is not None or bool(self.expressions)

    def _matches(self, lname: bytes) -> bool:
        """Whether the configured patterns remove the (lower-cased) header name."""
        cache = self._cache
        verdict = cache.get(lname)
        if verdict is None:
            pattern = self.pattern
            verdict = pattern is not None and pattern.fullmatch(lname.decode("latin-1")) is not None
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[lname] = verdict
        return verdict

    def _named(self, ctx: PolicyContext) -> frozenset[bytes]:
        """The header names the expressions give for this request (lower-cased)."""
        names: set[bytes] = set()
        for expression in self.expressions:
            result = expression.evaluate(ctx.expression_context())
            for item in result if isinstance(result, (list, tuple)) else [result]:
                text = to_text(item).strip()
                if text:
                    names.add(text.lower().encode("utf-8"))
        return frozenset(names)

    def filter(self, ctx: PolicyContext, headers: HeaderList) -> HeaderList | None:
        """`headers` without the removed ones, or None when nothing is removed."""
        named = self._named(ctx) if self.expressions else frozenset()
        kept = []
        removed = False
        for name, value in headers:
            lname = name.lower()
            if lname not in NOT_REMOVABLE and (lname in named or self._matches(lname)):
                removed = True
                continue
            kept.append((name, value))
        return kept if removed else None


def _build_removals(entries: Sequence[str], field: str) -> RemovalList:
    """Compile one list of names/regexes (and `#[...]` entries) into a RemovalList."""
    sources = []
    expressions = []
    for index, entry in enumerate(entries):
        where = f"{field}.{index}"
        compiled = _compile(entry, where)
        if isinstance(compiled, Expression):
            expressions.append(compiled)
            continue
        text = entry.strip()
        try:
            re.compile(text, re.IGNORECASE)
        except re.error as exc:
            raise PolicyConfigError(f"invalid regular expression {text!r}: {exc}", where) from None
        if text.lower().encode("latin-1", "replace") in NOT_REMOVABLE:
            _log.warn(
                "header-removal-flex: the {header} header cannot be removed; {field} is ignored",
                header=text,
                field=where,
            )
        sources.append(f"(?:{text})")
    pattern = re.compile("|".join(sources), re.IGNORECASE) if sources else None
    return RemovalList(pattern, tuple(expressions))


@implementer(IPolicy)
@attrs.frozen
class HeaderRemovalPolicy:
    """Removes matching headers from the upstream request and from the upstream's response."""

    inbound: RemovalList
    outbound: RemovalList

    def on_request(self, ctx: PolicyContext) -> None:
        """Remove matching request headers before the upstream sees them."""
        if not self.inbound:
            return
        current = ctx.request_headers if ctx.request_headers_changed else ctx.head.headers
        kept = self.inbound.filter(ctx, current)
        if kept is not None:
            ctx.request_headers[:] = kept

    @property
    def response_phase(self) -> bool:
        """Only a binding with outbound entries needs the response phase."""
        return bool(self.outbound)

    def on_response(self, ctx: PolicyContext) -> None:
        """Remove matching response headers."""
        headers = ctx.response_headers
        if not self.outbound or headers is None:
            return
        kept = self.outbound.filter(ctx, headers)
        if kept is not None:
            headers[:] = kept


@implementer(IPolicyKind)
class HeaderRemovalKind:
    """The `header-removal-flex` kind."""

    name = "header-removal-flex"
    schema = REMOVAL_SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> HeaderRemovalPolicy:
        """Compile both lists into case-insensitive whole-name matchers."""
        inbound = _build_removals(config.get("inboundHeaders") or [], "inboundHeaders")
        outbound = _build_removals(config.get("outboundHeaders") or [], "outboundHeaders")
        if not inbound and not outbound:
            raise PolicyConfigError("inboundHeaders and outboundHeaders cannot both be empty")
        return HeaderRemovalPolicy(inbound, outbound)


register(HeaderInjectionKind())
register(HeaderRemovalKind())
