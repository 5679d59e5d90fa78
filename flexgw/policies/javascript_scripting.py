"""`javascript-scripting-flex`: run a user's JavaScript module on requests and responses (V8).

Flex (docs `policies-included-javascript-scripting.adoc`, 1.14+): key `script`, a JavaScript ES
module exporting `requestFilter(request)` and/or `responseFilter(response, requestData)` (at
least one, else the binding does not load). `requestFilter` runs for every request: it may read
and change the request, let it continue, or answer at once with an immediate response;
`responseFilter` runs for every upstream response and may change it. Module-level variables
persist across calls (a counter works). The runtime provides `console`, `TextEncoder` and
`TextDecoder`; filters are synchronous (a Promise returned is an error). A thrown error is a
**500**. Bodies are buffered up to 1 MiB.

The API as flexgw implements it:
- `request`: `{method, path, query, headers, body}`; `headers` maps lower-case names to a string
  (an array when the header is repeated); `body` is the request body as text (UTF-8) or `null`.
  Changing `headers` changes what the upstream gets; assigning another `body` string replaces
  the body (re-framed). Returning an object with `statusCode` (and optional `headers`, `body`)
  answers the client with it; returning nothing continues.
- `response`: `{statusCode, headers, body}`, changed in place (`body` is the upstream's response
  body as text; assigning another string replaces it, re-framed); `requestData`: `{method, path,
  query, headers}` of the request as the script left it. For `responseFilter` the gateway holds
  the upstream's response and reads its whole body (bounded by the body buffer limit, 1 MiB by
  default as Flex's; a larger body is a 500) before the filter runs: the exchange's asynchronous
  response phase (`response_async`, `PolicyContext.want_response_body`).

Isolation and limits: one QuickJS runtime per binding (the `quickjs` bindings: in process, a
call costs microseconds), never the gateway's own Python; the module is evaluated as a real ES
module once at load time (strict mode; `import` fails: there is nothing to import). Each call
has a CPU-time limit (`SCRIPT_TIMEOUT_MS`, 100 ms) enforced by QuickJS's interrupt handler, so
a runaway script (`while(true){}`) is stopped inside the engine: the request gets a 500 and the
reactor was held for at most that long. The heap is capped (`HEAP_LIMIT_BYTES`, 64 MiB); a
script that reaches it gets a 500 and the runtime is rebuilt from the module (its module-level
state restarts). `console.*` lines go to the gateway log.

Deliberate differences from Flex:
- Exports are found in the source text (`export function f`, `export const f = ...`,
  `export { f, g as requestFilter }`); a computed or re-exported binding is not seen.
- `responseFilter` runs for upstream responses only, not for answers the gateway or a policy
  makes (Flex documents it for upstream responses).
- `request.path` is read-only (route to another path with the `route` policy).
- The time and memory limits are flexgw's (Flex documents none).
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import quickjs
from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.registry import register

NAME = "javascript-scripting-flex"
_log = Logger(namespace="flexgw.policies.javascript")

SCRIPT_TIMEOUT_MS = 100
HEAP_LIMIT_BYTES = 64 * 1024 * 1024
#: Bodies handed to scripts are at most this large (Flex's 1 MiB; the exchange enforces it: 413).
BODY_LIMIT = 1024 * 1024

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"script": {"type": "string", "minLength": 1}},
    "required": ["script"],
    "additionalProperties": False,
}

#: The glue around the user's module: console, TextEncoder/TextDecoder, and the two entry
#: points the policy calls with JSON text (one V8 call per phase).
PRELUDE = r"""
var __flexgwLogs = [];
var console = (function () {
  function out(level) {
    return function () {
      var parts = [];
      for (var i = 0; i < arguments.length; i++) {
        var a = arguments[i];
        parts.push(typeof a === 'string' ? a : JSON.stringify(a));
      }
      if (__flexgwLogs.length < 100) __flexgwLogs.push([level, parts.join(' ')]);
    };
  }
  return {log: out('info'), info: out('info'), debug: out('debug'), warn: out('warn'), error: out('error')};
})();
class TextEncoder {
  get encoding() { return 'utf-8'; }
  encode(text) {
    var bytes = unescape(encodeURIComponent(String(text === undefined ? '' : text)));
    var out = new Uint8Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
    return out;
  }
}
class TextDecoder {
  get encoding() { return 'utf-8'; }
  decode(data) {
    if (!data) return '';
    var view = data instanceof Uint8Array ? data : new Uint8Array(data.buffer || data);
    var s = '';
    for (var i = 0; i < view.length; i++) s += String.fromCharCode(view[i]);
    try { return decodeURIComponent(escape(s)); } catch (e) { return s; }
  }
}
"""

ENTRY = r"""
function __flexgwCall(phase, text, extra) {
  __flexgwLogs = [];
  var arg = JSON.parse(text);
  var result;
  if (phase === 'request') {
    result = __flexgwFilters.requestFilter(arg);
  } else {
    result = __flexgwFilters.responseFilter(arg, JSON.parse(extra));
  }
  if (result && typeof result.then === 'function') {
    throw new Error(phase + 'Filter must be synchronous (it returned a Promise)');
  }
  var answer = null;
  if (phase === 'request' && result && typeof result === 'object' && 'statusCode' in result) {
    answer = {statusCode: result.statusCode, headers: result.headers || {},
              body: result.body === undefined || result.body === null ? '' : String(result.body)};
  }
  return JSON.stringify({value: arg, answer: answer, logs: __flexgwLogs});
}
"""

_EXPORT_LIST = re.compile(r"\bexport\s*\{([^}]*)\}")
_EXPORT_DECL = re.compile(
    r"\bexport\s+(?:default\s+)?(?:async\s+)?(?:function\s*\*?\s*|const\s+|let\s+|var\s+|class\s+)"
    r"([A-Za-z_$][\w$]*)"
)


class ScriptError(Exception):
    """The script failed in a call (thrown error, timeout, memory)."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def exports_of(source: str) -> dict[str, str]:
    """Exported name -> local name, read from the module's export statements."""
    found: dict[str, str] = {}
    for match in _EXPORT_DECL.finditer(source):
        found[match.group(1)] = match.group(1)
    for match in _EXPORT_LIST.finditer(source):
        for item in match.group(1).split(","):
            parts = item.split()
            if len(parts) == 3 and parts[1] == "as":
                found[parts[2]] = parts[0]
            elif len(parts) == 1:
                found[parts[0]] = parts[0]
    return found


def _header_map(headers: Any) -> dict[str, Any]:
    """Lower-case name -> value (a list when repeated), as the script sees headers."""
    found: dict[str, Any] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in found:
            old = found[key]
            found[key] = [*old, text] if isinstance(old, list) else [old, text]
        else:
            found[key] = text
    return found


def _header_list(mapping: Any) -> list[tuple[bytes, bytes]]:
    """The script's header object as header lines (CR, LF and NUL refused: ScriptError)."""
    if not isinstance(mapping, dict):
        raise ScriptError("script_error", "headers must be an object")
    lines = []
    for name, value in mapping.items():
        for item in value if isinstance(value, list) else [value]:
            text = str(item if not isinstance(item, bool) else str(item).lower())
            if any(c in name + text for c in "\r\n\0") or not name or " " in name or ":" in name:
                raise ScriptError("script_error", f"invalid header set by the script: {name!r}")
            lines.append((name.encode("latin-1", "replace"), text.encode("latin-1", "replace")))
    return lines


class Isolate:
    """One QuickJS context with the module evaluated; calls run on the reactor's thread."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.ctx: Any = None
        self.entry: Any = None
        self._load()

    def _load(self) -> None:
        ctx = quickjs.Context()
        ctx.set_memory_limit(HEAP_LIMIT_BYTES)
        ctx.set_time_limit(SCRIPT_TIMEOUT_MS * 10 / 1000)  # the module's top level: a bigger budget
        ctx.eval(PRELUDE)
        ctx.module(self.module)
        ctx.eval(ENTRY)
        ctx.set_time_limit(SCRIPT_TIMEOUT_MS / 1000)
        self.ctx = ctx
        self.entry = ctx.get("__flexgwCall")

    def call(self, phase: str, value: dict[str, Any], extra: Any = None) -> dict[str, Any]:
        """Run a filter on `value` (JSON round trip); ScriptError on any failure."""
        try:
            text = self.entry(phase, json.dumps(value), json.dumps(extra))
        except quickjs.JSException as exc:
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "error"
            if "interrupted" in message:
                raise ScriptError("script_timeout", f"exceeded {SCRIPT_TIMEOUT_MS} ms") from None
            if "out of memory" in message:
                self._load()  # a fresh runtime: the module's state restarts
                raise ScriptError("script_memory", "exceeded the heap limit") from None
            raise ScriptError("script_error", message) from None
        return json.loads(text)


@attrs.frozen
class Exports:
    """Which filters the module exports."""

    request: bool
    response: bool


@implementer(IPolicy)
class JavaScriptPolicy:
    """One binding's module in its isolate."""

    def __init__(self, isolate: Isolate, exports: Exports, binding: str) -> None:
        self.isolate = isolate
        self.exports = exports
        self.binding = binding
        self.needs_body = exports.request
        self.response_phase = exports.response
        # responseFilter gets the whole response body: the exchange holds the response for it
        self.response_async = exports.response

    def _logs(self, logs: list[Any]) -> None:
        for level, line in logs:
            emit = getattr(_log, level if level in ("debug", "info", "warn", "error") else "info")
            emit("{binding}: console: {line}", binding=self.binding, line=line)

    def _failed(self, exc: ScriptError) -> LocalResponse:
        _log.warn("{binding}: script failed ({cause}): {error}", binding=self.binding,
                  cause=exc.cause, error=str(exc))
        return LocalResponse.gateway_error(500, exc.cause, "JavaScript policy error")

    def _request_data(self, ctx: PolicyContext) -> dict[str, Any]:
        head = ctx.head
        return {
            "method": head.method.decode("latin-1"),
            "path": head.path,
            "query": head.query[1:].decode("latin-1"),
            "headers": _header_map(ctx.request_headers),
        }

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """Run requestFilter; apply its changes or answer with its response."""
        if not self.exports.request:
            return None
        request = self._request_data(ctx)
        body = ctx.body
        request["body"] = body.decode("utf-8", "replace") if body is not None else None
        try:
            result = self.isolate.call("request", request)
            if result["logs"]:
                self._logs(result["logs"])
            answer = result["answer"]
            if answer is not None:
                status = answer["statusCode"]
                if not isinstance(status, int) or not 100 <= status <= 599:
                    raise ScriptError("script_error", "statusCode must be an integer 100-599")
                return LocalResponse(status, tuple(_header_list(answer["headers"])),
                                     answer["body"].encode("utf-8"), cause="script_response")
            changed = result["value"]
            headers = _header_list(changed.get("headers") or {})
        except ScriptError as exc:
            return self._failed(exc)
        if changed.get("headers") != request["headers"]:
            ctx.request_headers[:] = headers
        new_body = changed.get("body")
        if new_body != request["body"] and body is not None:
            ctx.replace_body(b"" if new_body is None else str(new_body).encode("utf-8"))
        if self.exports.response:
            if ctx.scratch is None:
                ctx.scratch = {}
            ctx.scratch[self] = {k: changed.get(k, request[k]) for k in ("method", "path", "query", "headers")}
        return None

    def on_response(self, ctx: PolicyContext) -> Any:
        """Ask for the whole response body: responseFilter runs once it is here."""
        if not self.exports.response:
            return None
        ctx.want_response_body(lambda pieces, trailers: self._respond(ctx, pieces))
        return succeed(None)

    def _respond(self, ctx: PolicyContext, pieces: list[bytes]) -> None:
        """Run responseFilter on the status, headers and body; apply its changes."""
        request = (ctx.scratch or {}).get(self) or self._request_data(ctx)
        text = b"".join(pieces).decode("utf-8", "replace")
        response = {"statusCode": ctx.response_status,
                    "headers": _header_map(ctx.response_headers or []), "body": text}
        try:
            result = self.isolate.call("response", response, request)
            if result["logs"]:
                self._logs(result["logs"])
            changed = result["value"]
            status = changed.get("statusCode", ctx.response_status)
            if not isinstance(status, int) or not 100 <= status <= 599:
                raise ScriptError("script_error", "statusCode must be an integer 100-599")
            headers = _header_list(changed.get("headers") or {})
        except ScriptError as exc:
            # the chain turns an exception into its 500 (with a correlation id)
            raise RuntimeError(f"javascript responseFilter failed ({exc.cause}): {exc}") from None
        ctx.response_status = status
        if changed.get("headers") != response["headers"]:
            ctx.response_headers = headers
        new_body = changed.get("body")
        if new_body != text:
            ctx.replace_response_body(b"" if new_body is None else str(new_body).encode("utf-8"))


@implementer(IPolicyKind)
class JavaScriptKind:
    """The `javascript-scripting-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"
    # `${...}` in a script is a template literal, not an environment reference.
    literal_fields = ("script",)

    def build(self, config: dict[str, Any], context: BuildContext) -> JavaScriptPolicy:
        """Load the module once into its isolate (a syntax error or a failing top level is a
        config error)."""
        source = config["script"]
        exported = exports_of(source)
        exports = Exports("requestFilter" in exported, "responseFilter" in exported)
        if not (exports.request or exports.response):
            raise PolicyConfigError("the module must export requestFilter and/or responseFilter", "script")
        # the module hands its filters to the entry points through one global
        tail = "\nglobalThis.__flexgwFilters = {" + ", ".join(
            f"{name}: {exported[name]}" for name in ("requestFilter", "responseFilter") if name in exported
        ) + "};\n"
        try:
            isolate = Isolate(source + tail)
        except quickjs.JSException as exc:
            message = str(exc).strip().splitlines()
            raise PolicyConfigError(
                f"the script does not load: {' '.join(message[:3])[:300]}", "script"
            ) from None
        return JavaScriptPolicy(isolate, exports, context.binding)


KIND = register(JavaScriptKind())
