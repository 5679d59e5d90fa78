"""`message-logging-flex`: log `#[...]` messages per request, before the upstream and/or after its response.

Flex (docs `policies-included-message-logging.adoc`, Local Mode table):

    config:
      loggingConfiguration:            # required, array
        - itemName: <string>           # required
          itemData:                    # required
            message: <dataweave>       # required
            conditional: <dataweave>   # optional, default true
            category: <string>         # optional, a prefix of the log line
            level: <string>            # required: INFO | WARN | ERROR | DEBUG
            firstSection: <bool>       # optional: log on the request ("Before Calling API")
            secondSection: <bool>      # optional: log on the response ("After Calling API")

`firstSection` defaults to true and `secondSection` to false (reference §2.2; the docs mark both
optional without a default). Lines go to `twisted.logger.Logger(namespace="flexgw.messagelogging")`
at the item's level (TRACE, accepted besides the four documented levels, is logged as debug), as
`[<binding>] <category>: <message>` (`[<binding>] <message>` without a category), with the fields
`binding`, `api`, `item`, `category`, `section` ("first"/"second") and `text` in the
event for structured observers. First-section items run at the policy's place in the request
chain; second-section items run in the response phase with `attributes.statusCode` and the
response's headers. The message is rendered with `expressions.to_text` (objects and arrays as
compact JSON); a plain (non-`#[...]`) message is logged as written. A conditional is met when it
yields `true` (or the string "true"); a plain conditional must be "true" or "false".

The body: the policy sets `needs_body` (so the exchange buffers the request body, bounded) only
when a first-section item's message or conditional references `payload` (`Expression.references`,
as the 1.14 docs' "Payload Handling": the payload is read only when an item needs it); `payload`
is then the request body as text (UTF-8, undecodable bytes replaced).

Deliberate differences from Flex:
- A log item whose expression fails on a request (a type error, say) does **not** fail the request:
  the policy logs the failure (error level, same namespace, naming the binding and the item) and
  goes on. Flex gives no status codes for this policy ("No return codes exist for this policy",
  and "Message Logging Policy does not interfere with the execution of any policy nor its flow"),
  whereas flexgw's other expression-using policies answer 500 on an evaluation error.
- The request body is buffered with the gateway's 1 MiB policy limit (413 over it); Flex reads it
  "in streaming mode" without its payload limit.
- In the second section `payload` (Flex: the response body) is null: response bodies are
  streamed, never buffered, by flexgw.
- The log line has no `[req: <id>]` / `wasm log ...` prefix of Flex's Envoy output.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.expressions import Expression, ExpressionError, compile_value, to_text
from flexgw.policies.registry import register

#: Flex's levels (plus TRACE) and the twisted.logger level each maps to.
LEVELS: dict[str, LogLevel] = {
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "DEBUG": LogLevel.debug,
    "TRACE": LogLevel.debug,
}

NAMESPACE = "flexgw.messagelogging"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "loggingConfiguration": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "itemName": {"type": "string"},
                    "itemData": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "conditional": {"type": ["string", "boolean"]},
                            "category": {"type": "string"},
                            "level": {"enum": list(LEVELS)},
                            "firstSection": {"type": "boolean", "default": True},
                            "secondSection": {"type": "boolean", "default": False},
                        },
                        "required": ["message", "level"],
                        "additionalProperties": False,
                    },
                },
                "required": ["itemName", "itemData"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["loggingConfiguration"],
    "additionalProperties": False,
}


@attrs.frozen
class LogItem:
    """One `loggingConfiguration` entry, compiled."""

    name: str
    message: Expression | str
    conditional: Expression | bool
    category: str | None
    level: LogLevel
    first: bool
    second: bool
    format: str  # the twisted.logger format of its line

    def uses_payload(self) -> bool:
        """True when its message or conditional reads `payload`."""
        return any(
            isinstance(e, Expression) and "payload" in e.references
            for e in (self.message, self.conditional)
        )


def _compile(text: str, field: str) -> Expression | str:
    """compile_value, with a syntax error reported against `field`."""
    try:
        return compile_value(text)
    except ExpressionError as exc:
        raise PolicyConfigError(f"invalid expression: {exc}", field) from None


def compile_item(index: int, raw: dict[str, Any]) -> LogItem:
    """Compile one item (schema-valid) into a LogItem; PolicyConfigError names the bad field."""
    base = f"loggingConfiguration.{index}.itemData"
    data = raw["itemData"]
    message = _compile(data["message"], base + ".message")
    conditional: Expression | bool = True
    raw_conditional = data.get("conditional", True)
    if isinstance(raw_conditional, bool):
        conditional = raw_conditional
    else:
        compiled = _compile(raw_conditional, base + ".conditional")
        if isinstance(compiled, Expression):
            conditional = compiled
        elif compiled.strip().lower() in ("true", "false"):
            conditional = compiled.strip().lower() == "true"
        else:
            raise PolicyConfigError(
                "conditional must be a #[...] expression, true or false", base + ".conditional"
            )
    category = data.get("category") or None
    return LogItem(
        name=raw["itemName"],
        message=message,
        conditional=conditional,
        category=category,
        level=LEVELS[data["level"]],
        first=bool(data.get("firstSection", True)),
        second=bool(data.get("secondSection", False)),
        format="[{binding}] {category}: {text}" if category else "[{binding}] {text}",
    )


@implementer(IPolicy)
@attrs.frozen
class MessageLoggingPolicy:
    """Logs each item whose section is running and whose conditional holds."""

    binding: str
    api: str | None
    first: tuple[LogItem, ...]
    second: tuple[LogItem, ...]
    needs_body: bool = False  # a first-section item reads `payload`
    log: Logger = attrs.field(factory=lambda: Logger(namespace=NAMESPACE))
    sink: Any = None  # the gateway's MessageLog (fast JSON lines); None: the Twisted log
    # Each section's items with what records their lines: the sink's `writer` for the item,
    # asked once here (None: the sink has none, or there is no sink).
    _first: tuple[tuple[LogItem, Any], ...] = attrs.field(init=False, repr=False, eq=False)
    _second: tuple[tuple[LogItem, Any], ...] = attrs.field(init=False, repr=False, eq=False)

    @_first.default
    def _first_writers(self) -> tuple[tuple[LogItem, Any], ...]:
        return self._writers(self.first, "first")

    @_second.default
    def _second_writers(self) -> tuple[tuple[LogItem, Any], ...]:
        return self._writers(self.second, "second")

    def _writers(self, items: tuple[LogItem, ...], section: str) -> tuple[tuple[LogItem, Any], ...]:
        writer = getattr(self.sink, "writer", None)
        return tuple(
            (
                item,
                None
                if writer is None
                else writer(
                    item.level.name.upper(), item.category, self.binding, self.api, item.name,
                    section,
                ),
            )
            for item in items
        )

    def on_request(self, ctx: PolicyContext) -> None:
        """Log the first-section items; never stops the request."""
        if not self.first:
            return
        context = ctx.expression_context()
        if self.needs_body and context.payload is None:
            context.payload = (ctx.body or b"").decode("utf-8", "replace")
        for item, write in self._first:
            message = item.message
            if write is None or item.conditional is not True or type(message) is not Expression:
                self._emit(item, context, "first", write)
                continue
            # The usual item (always logged, an expression for a message, the sink's writer):
            # here, without _emit's call and checks.
            try:
                text = message.evaluate(context)
                if type(text) is not str:
                    text = to_text(text)
            except Exception as exc:  # noqa: BLE001 (logging must never fail the request)
                self._failed(item, "first", exc)
                continue
            write(text)

    @property
    def response_phase(self) -> bool:
        """Only a binding with second-section items needs the response phase."""
        return bool(self.second)

    def on_response(self, ctx: PolicyContext) -> None:
        """Log the second-section items (the context has the status code and response headers)."""
        if not self.second:
            return
        context = ctx.expression_context()
        for item, write in self._second:
            self._emit(item, context, "second", write)

    def _emit(self, item: LogItem, context: Any, section: str, write: Any) -> None:
        """Evaluate one item and log it (`write`: the sink's writer for it, or None); an
        evaluation failure is logged, not raised."""
        try:
            conditional = item.conditional
            if isinstance(conditional, Expression):
                met = conditional.evaluate(context)
                if met is not True and not (isinstance(met, str) and met.lower() == "true"):
                    return
            elif not conditional:
                return
            message = item.message
            text = to_text(message.evaluate(context)) if isinstance(message, Expression) else message
        except Exception as exc:  # noqa: BLE001 (logging must never fail the request)
            self._failed(item, section, exc)
            return
        if write is not None:
            write(text)
            return
        sink = self.sink
        if sink is not None:
            sink.emit(
                item.level.name.upper(), item.category, self.binding, self.api, item.name,
                section, text,
            )
            return
        self.log.emit(
            item.level,
            item.format,
            binding=self.binding,
            api=self.api,
            item=item.name,
            category=item.category,
            section=section,
            text=text,
        )


    def _failed(self, item: LogItem, section: str, exc: Exception) -> None:
        """An item's expression failed on this request: log that (as an error), not the item."""
        self.log.error(
            "[{binding}] message logging item {item!r} ({section} section) failed: {error}",
            binding=self.binding,
            api=self.api,
            item=item.name,
            section=section,
            error=str(exc),
        )


@implementer(IPolicyKind)
class MessageLoggingKind:
    """The `message-logging-flex` kind."""

    name = "message-logging-flex"
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> MessageLoggingPolicy:
        """Compile every item; `needs_body` only when a first-section item reads `payload`."""
        items = [compile_item(i, raw) for i, raw in enumerate(config["loggingConfiguration"])]
        first = tuple(item for item in items if item.first)
        second = tuple(item for item in items if item.second)
        return MessageLoggingPolicy(
            binding=context.binding,
            api=context.api,
            first=first,
            second=second,
            needs_body=any(item.uses_payload() for item in first),
            sink=context.services.message_log,
        )


register(MessageLoggingKind())
