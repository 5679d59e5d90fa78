"""`spec-validation-flex`: validate requests against an OpenAPI 3.0/3.1 spec; 400 or a log line.

Flex (docs `policies-included-schema-validation.adoc`, 1.4+; reference §2.2): keys `source`
(`inline`, the only source in Local Mode), `spec` (the OpenAPI document as a JSON or YAML
string, one file), `apiBasePath` (default `/`), `blockOperation` (true: refuse with **400**;
false: log the violation and forward), `strictParamsValidation` (default false: parameters the
spec does not define are allowed). Path, query, header and cookie parameters are validated, and
bodies: `application/json`, and `multipart/form-data` since 1.14.

How: at load time the spec is parsed, checked whole with openapi-spec-validator (3.0 or 3.1,
from its `openapi` field) and compiled: one matcher per path template (literal paths before
templated ones, as OpenAPI requires), and per operation one jsonschema validator per parameter
and body media type (openapi-schema-validator's `OAS30WriteValidator` / `OAS31Validator`, which
know `nullable`, `readOnly`, OpenAPI formats; `$ref`s resolve inside the spec). A spec that does
not parse or validate is a config error naming its line and column inside `spec` and the JSON
path of the problem; the binding is not applied. Per request only the matched operation's
validators run: parameters are taken from the request (path segments, query pairs, headers,
`Cookie` pairs), turned into the schema's type (`integer`, `number`, `boolean`, `array` in
`form`/`simple` style, exploded or comma-separated), and validated; a JSON body is parsed once
and validated; a `multipart/form-data` body is split into its parts (files as strings, JSON
parts parsed, values typed by the property schema) and validated as an object;
`application/x-www-form-urlencoded` likewise. The body is buffered only for operations that
define a request body (1 MiB limit: 413 over it).

Deliberate differences from Flex:
- Flex documents the status only: the body is the gateway's JSON error naming the place and the
  failed keyword, e.g. `{"error":"Invalid query parameter 'limit': fails 'maximum' (10)"}`;
  request values are never echoed.
- `strictParamsValidation` applies to query parameters (a request always carries headers the
  spec does not list, such as Host).
- Media types other than JSON, multipart and url-encoded forms are checked against the
  operation's `content` keys (an unlisted type is refused) but their content is not parsed.
  `deepObject` and object-typed parameters are checked for presence only.
- `spec` is not searched for `$NAME` environment references (every other key is): an OpenAPI
  document is full of `$ref`.
- A request that matches no path, or a method the path does not define, is refused (404/405
  semantics folded into Flex's 400).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

import attrs
import yaml
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

NAME = "spec-validation-flex"
_log = Logger(namespace="flexgw.policies.spec_validation")
SPEC_URI = "urn:flexgw:spec"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "source": {"enum": ["inline"]},
        "spec": {"type": "string", "minLength": 1},
        "apiBasePath": {"type": "string", "default": "/"},
        "blockOperation": {"type": "boolean"},
        "strictParamsValidation": {"type": "boolean", "default": False},
    },
    "required": ["source", "spec", "blockOperation"],
    "additionalProperties": False,
}


class Violation(Exception):
    """The request does not comply; `message` says where and how (never the request's values)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- loading and locating spec errors -----------------------------------------------------------


def _node_at(root: Any, path: list[Any]) -> Any:
    """The YAML node at a JSON path (keys and indexes), as deep as it exists."""
    node = root
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if getattr(key, "value", None) == str(step):
                    node = value
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
        else:
            return node
    return node


def load_spec(text: str) -> dict[str, Any]:
    """Parse and check the spec; PolicyConfigError naming line:column inside it otherwise."""
    # (the OpenAPI libraries are imported on first use: a gateway without this policy does not
    # pay their import time)
    from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1} of the spec: " if mark else ""
        raise PolicyConfigError(f"{where}not YAML or JSON: {getattr(exc, 'problem', exc)}", "spec") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("openapi"), str):
        raise PolicyConfigError("not an OpenAPI 3 document (no `openapi` version field)", "spec")
    version = spec["openapi"]
    if version.startswith("3.0"):
        checker: Any = OpenAPIV30SpecValidator
    elif version.startswith("3.1"):
        checker = OpenAPIV31SpecValidator
    else:
        raise PolicyConfigError(f"OpenAPI {version} is not supported (3.0 or 3.1)", "spec")
    errors = sorted(checker(spec).iter_errors(), key=lambda e: len(list(e.absolute_path)))
    if errors:
        error = errors[0]
        path = list(error.absolute_path)
        node = _node_at(yaml.compose(text), path)
        mark = node.start_mark
        pointer = "/".join(str(p) for p in path) or "(root)"
        raise PolicyConfigError(
            f"line {mark.line + 1}, column {mark.column + 1} of the spec ({pointer}): "
            f"{error.message[:300]}",
            "spec",
        )
    return spec


# -- compiling ----------------------------------------------------------------------------------


def _pointer(path: tuple[Any, ...]) -> str:
    return "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _absolute_refs(node: Any) -> Any:
    """A copy of a schema whose local `$ref`s (`#/...`) point into the spec resource."""
    if isinstance(node, dict):
        return {
            k: (SPEC_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_absolute_refs(v) for v in node]
    return node


class Compiler:
    """Builds validators for parts of one spec (its `$ref`s resolved inside it)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from openapi_schema_validator import (
            OAS30WriteValidator,
            OAS31Validator,
            oas30_format_checker,
            oas31_format_checker,
        )
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4, DRAFT202012

        self.spec = spec
        v31 = spec["openapi"].startswith("3.1")
        self.validator_class: Any = OAS31Validator if v31 else OAS30WriteValidator
        self.format_checker = oas31_format_checker if v31 else oas30_format_checker
        resource = Resource.from_contents(spec, default_specification=DRAFT202012 if v31 else DRAFT4)
        self.registry: Any = Registry().with_resource(SPEC_URI, resource)

    def deref(self, node: Any, path: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        """Follow local `$ref`s: (the node, its path in the spec)."""
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
            ref = node["$ref"]
            if not ref.startswith("#/"):
                raise PolicyConfigError(f"only local $refs are supported, not {ref!r}", "spec")
            path = tuple(unquote(p).replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/"))
            node = self.spec
            for step in path:
                node = node[int(step)] if isinstance(node, list) else node[step]
            seen += 1
        return node, path

    def validator(self, path: tuple[Any, ...]) -> Any:
        """A validator for the schema at `path` in the spec: the schema itself (no reference
        to follow per request), its own `#/...` references made absolute into the spec."""
        schema, _ = self.deref({"$ref": "#/" + _pointer(path)}, ())
        return self.validator_class(
            _absolute_refs(schema), registry=self.registry, format_checker=self.format_checker
        )


@attrs.frozen
class Param:
    """One parameter of an operation."""

    name: str
    location: str  # path, query, header, cookie
    required: bool
    kind: str  # the schema's type ("" when none or several)
    item_kind: str  # for arrays, the items' type
    explode: bool
    validator: Any


@attrs.frozen
class Body:
    """An operation's request body."""

    required: bool
    media: tuple[tuple[str, Any, dict[str, str]], ...]  # (media type, validator|None, property types)


@attrs.frozen
class Operation:
    """What one method on one path template checks."""

    params: tuple[Param, ...]
    query_names: frozenset[str]
    body: Body | None


@attrs.frozen
class PathTemplate:
    """A spec path: its matcher and its operations by method."""

    template: str
    regex: re.Pattern[str]
    names: tuple[str, ...]
    operations: dict[str, Operation]


def _type_of(schema: Any) -> str:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else ""


def _compile_param(compiler: Compiler, node: Any, path: tuple[Any, ...]) -> Param:
    node, path = compiler.deref(node, path)
    location = node["in"]
    schema_path = path + ("schema",)
    schema = node.get("schema")
    if schema is None and "content" in node:  # `content` form: the first media type's schema
        media = next(iter(node["content"]))
        schema_path = path + ("content", media, "schema")
        schema = node["content"][media].get("schema")
    kind = item_kind = ""
    validator = None
    if schema is not None:
        resolved, _ = compiler.deref(schema, schema_path)
        kind = _type_of(resolved)
        if kind == "array":
            items, _ = compiler.deref(resolved.get("items", {}), schema_path + ("items",))
            item_kind = _type_of(items)
        validator = compiler.validator(schema_path)
    style_form = node.get("style", "form" if location in ("query", "cookie") else "simple") == "form"
    return Param(
        name=node["name"],
        location=location,
        required=bool(node.get("required", location == "path")),
        kind=kind,
        item_kind=item_kind,
        explode=bool(node.get("explode", style_form)),
        validator=validator,
    )


def _compile_body(compiler: Compiler, node: Any, path: tuple[Any, ...]) -> Body:
    node, path = compiler.deref(node, path)
    media = []
    for media_type, spec in (node.get("content") or {}).items():
        validator = None
        properties: dict[str, str] = {}
        if isinstance(spec, dict) and spec.get("schema") is not None:
            schema_path = path + ("content", media_type, "schema")
            validator = compiler.validator(schema_path)
            resolved, _ = compiler.deref(spec["schema"], schema_path)
            for name, prop in (resolved.get("properties") or {}).items():
                prop_resolved, _ = compiler.deref(prop, schema_path + ("properties", name))
                properties[name] = _type_of(prop_resolved)
        media.append((media_type.lower(), validator, properties))
    return Body(bool(node.get("required", False)), tuple(media))


def compile_spec(spec: dict[str, Any]) -> tuple[PathTemplate, ...]:
    """Every path template with its operations, literal paths first."""
    compiler = Compiler(spec)
    templates = []
    for template, item in (spec.get("paths") or {}).items():
        if not isinstance(item, dict):
            continue
        names = tuple(re.findall(r"\{([^}/]+)\}", template))
        pattern = "".join(
            "([^/]+)" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[^}/]+\})", template)
        )
        shared = item.get("parameters") or []
        operations = {}
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            params: dict[tuple[str, str], Param] = {}
            for i, node in enumerate(shared):
                p = _compile_param(compiler, node, ("paths", template, "parameters", i))
                params[(p.name, p.location)] = p
            for i, node in enumerate(op.get("parameters") or []):
                p = _compile_param(compiler, node, ("paths", template, method, "parameters", i))
                params[(p.name, p.location)] = p
            body = None
            if op.get("requestBody") is not None:
                body = _compile_body(compiler, op["requestBody"], ("paths", template, method, "requestBody"))
            operations[method] = Operation(
                tuple(params.values()),
                frozenset(p.name for p in params.values() if p.location == "query"),
                body,
            )
        templates.append(PathTemplate(template, re.compile(pattern + r"\Z"), names, operations))
    templates.sort(key=lambda t: (len(t.names), -len(t.template)))
    return tuple(templates)


# -- per request --------------------------------------------------------------------------------


def _coerce(value: str, kind: str) -> Any:
    """A parameter string as its schema type; raises ValueError when it is not one."""
    if kind == "integer":
        return int(value)
    if kind == "number":
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if kind == "boolean":
        if value in ("true", "false"):
            return value == "true"
        raise ValueError(value)
    return value


def _describe(error: Any) -> str:
    """A validation error without the request's values: the path and the failed keyword."""
    where = "/".join(str(p) for p in error.absolute_path)
    value = json.dumps(error.validator_value, default=str)
    if len(value) > 80:
        value = value[:77] + "..."
    place = f" at /{where}" if where else ""
    return f"fails '{error.validator}' ({value}){place}"


def _check(validator: Any, value: Any, what: str) -> None:
    if validator is None or validator.is_valid(value):
        return
    error = next(iter(validator.iter_errors(value)), None)
    if error is not None:
        raise Violation(f"{what}: {_describe(error)}")


def _cookies(headers: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        if name.lower() == b"cookie":
            for pair in value.decode("latin-1").split(";"):
                key, sep, val = pair.strip().partition("=")
                if sep:
                    found.setdefault(key, val)
    return found


def _form_object(pairs: Iterator[tuple[str, Any]], properties: dict[str, str]) -> dict[str, Any]:
    """Form fields as an object, typed by the properties' schemas (repeated names: arrays)."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        kind = properties.get(name, "")
        if isinstance(value, str) and kind not in ("", "string", "array", "object"):
            try:
                value = _coerce(value, kind)
            except ValueError:
                pass  # left a string: the schema reports the type
        if kind == "array":
            result.setdefault(name, []).append(value)
        else:
            result[name] = value
    return result


def _multipart_object(body: bytes, content_type: bytes, properties: dict[str, str]) -> dict[str, Any]:
    delimiter = multipart.boundary(content_type)
    if delimiter is None:
        raise Violation("Invalid request body: multipart without a boundary")

    def fields() -> Iterator[tuple[str, Any]]:
        for headers, content in multipart.parts(body, delimiter):
            disposition = next((v for n, v in headers if n.lower() == b"content-disposition"), b"")
            params = multipart.disposition_params(disposition)
            if "name" not in params:
                continue
            part_type = multipart.media_type(headers).lower()
            if b"json" in part_type:
                try:
                    yield params["name"], json.loads(content)
                    continue
                except ValueError:
                    raise Violation(f"Invalid request body: part '{params['name']}' is not JSON") from None
            yield params["name"], content.decode("utf-8" if "filename" not in params else "latin-1", "replace")

    return _form_object(fields(), properties)


@attrs.frozen
class SpecConfig:
    """The checked config of one binding."""

    templates: tuple[PathTemplate, ...]
    base_path: str  # "" or "/api" (no trailing slash)
    block: bool
    strict: bool


@implementer(IPolicy)
class SpecValidationPolicy:
    """One binding: the compiled spec and what to do with a violation."""

    response_phase = False

    def __init__(self, config: SpecConfig, binding: str) -> None:
        self.config = config
        self.binding = binding
        self.needs_body = any(
            op.body is not None for t in config.templates for op in t.operations.values()
        )

    def _match(self, path: str) -> tuple[PathTemplate, dict[str, str]]:
        base = self.config.base_path
        if base:
            if not (path == base or path.startswith(base + "/")):
                raise Violation("Path not found in the API specification")
            path = path[len(base):] or "/"
        for template in self.config.templates:
            m = template.regex.match(path)
            if m is not None:
                return template, {n: unquote(v) for n, v in zip(template.names, m.groups(), strict=True)}
        raise Violation("Path not found in the API specification")

    def validate(self, ctx: PolicyContext) -> None:
        """Raise Violation for the first thing that does not comply."""
        head = ctx.head
        template, path_values = self._match(head.path)
        operation = template.operations.get(head.method.decode("latin-1").lower())
        if operation is None:
            raise Violation("Method not allowed for this path in the API specification")
        query: dict[str, list[str]] = {}
        for name, value in parse_qsl(head.query[1:].decode("latin-1"), keep_blank_values=True, errors="replace"):
            query.setdefault(name, []).append(value)
        if self.config.strict:
            for name in query:
                if name not in operation.query_names:
                    raise Violation("Query parameter not defined in the API specification")
        cookies: dict[str, str] | None = None
        for param in operation.params:
            location = param.location
            values: list[str] | None
            if location == "path":
                values = [path_values[param.name]] if param.name in path_values else None
            elif location == "query":
                values = query.get(param.name)
            elif location == "header":
                lname = param.name.lower().encode("latin-1")
                found = [v.decode("latin-1") for n, v in head.headers if n.lower() == lname]
                values = [", ".join(found)] if found else None
            else:
                if cookies is None:
                    cookies = _cookies(head.headers)
                values = [cookies[param.name]] if param.name in cookies else None
            what = f"Invalid {location} parameter '{param.name}'"
            if values is None:
                if param.required:
                    raise Violation(f"Missing required {location} parameter '{param.name}'")
                continue
            if param.kind == "object" or param.validator is None:
                continue
            try:
                if param.kind == "array":
                    items = values if param.explode or len(values) > 1 else values[0].split(",")
                    value: Any = [_coerce(v, param.item_kind) for v in items]
                else:
                    value = _coerce(values[0], param.kind)
            except ValueError:
                raise Violation(f"{what}: not of type '{param.kind}'") from None
            _check(param.validator, value, what)
        if operation.body is not None:
            self._validate_body(operation.body, ctx)

    def _validate_body(self, body: Body, ctx: PolicyContext) -> None:
        data = ctx.body
        if not data:
            if body.required:
                raise Violation("Missing required request body")
            return
        content_type = multipart.media_type(ctx.head.headers)
        essence = content_type.split(b";")[0].strip().decode("latin-1").lower()
        chosen = None
        for candidate in (essence, essence.split("/")[0] + "/*", "*/*"):
            for media in body.media:
                if media[0] == candidate:
                    chosen = media
                    break
            if chosen is not None:
                break
        if chosen is None:
            raise Violation("Content type not allowed by the API specification")
        _, validator, properties = chosen
        if validator is None:
            return
        if essence == "application/json" or essence.endswith("+json"):
            try:
                document = json.loads(data)
            except (ValueError, RecursionError):
                raise Violation("Invalid request body: not JSON") from None
        elif essence == "multipart/form-data":
            document = _multipart_object(data, content_type, properties)
        elif essence == "application/x-www-form-urlencoded":
            document = _form_object(
                iter(parse_qsl(data.decode("latin-1"), keep_blank_values=True, errors="replace")),
                properties,
            )
        else:
            return
        _check(validator, document, "Invalid request body")

    def on_request(self, ctx: PolicyContext) -> LocalResponse | None:
        """400 on a violation (blockOperation), else log it and go on."""
        try:
            self.validate(ctx)
        except Violation as exc:
            _log.warn(
                "{binding}: request does not comply with the API specification: {reason}"
                "{action}",
                binding=self.binding,
                reason=exc.message,
                action="" if self.config.block else " (forwarded: blockOperation false)",
            )
            if self.config.block:
                return LocalResponse.json_error(400, exc.message)
        return None

    def on_response(self, ctx: PolicyContext) -> None:
        """Responses are not validated."""


@implementer(IPolicyKind)
class SpecValidationKind:
    """The `spec-validation-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"
    # The spec's `$ref`s are not environment references: `spec` is taken as written.
    literal_fields = ("spec",)

    def build(self, config: dict[str, Any], context: BuildContext) -> SpecValidationPolicy:
        """Parse, check and compile the spec once."""
        spec = load_spec(config["spec"])
        try:
            templates = compile_spec(spec)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PolicyConfigError(f"cannot compile the spec: {exc!r}", "spec") from None
        base = (config.get("apiBasePath") or "/").rstrip("/")
        if base and not base.startswith("/"):
            raise PolicyConfigError("must start with /", "apiBasePath")
        parsed = SpecConfig(templates, base, bool(config["blockOperation"]),
                            bool(config.get("strictParamsValidation", False)))
        return SpecValidationPolicy(parsed, context.binding)


KIND = register(SpecValidationKind())
