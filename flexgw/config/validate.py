"""Check one loaded document on its own: identity, spelling variants, env expansion, JSON Schema, regexes."""

from __future__ import annotations

import copy
import functools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any, Literal

import attrs
import jsonschema

from flexgw.config.address import AddressError, parse_api_address, parse_service_address
from flexgw.config.balancing import check_balancing
from flexgw.config.envexpand import expand_value
from flexgw.config.kubernetes import (
    KUBERNETES_API_VERSIONS,
    KUBERNETES_KINDS,
    check_kubernetes,
    is_kubernetes,
)
from flexgw.config.regex import RegexError, compile_rule_regex
from flexgw.config.sources import Document, FieldPath
from flexgw.plan import Problem
from flexgw.policies.registry import lookup as lookup_policy

KINDS = {
    kind.lower(): kind
    for kind in ("ApiInstance", "Service", "PolicyBinding", "Configuration", "Extension")
}
TARGET_KINDS = {kind.lower(): kind for kind in ("ApiInstance", "Service", "Selector")}
API_VERSIONS = frozenset({"gateway.mulesoft.com/v1alpha1", "gateway.mulesoft.com/v1beta1"})
ROUTE_POLICIES = {"route": "policy-route", "route-weighted": "policy-route-weighted"}
UNSUPPORTED_CONFIGURATION: tuple[str, ...] = ()  # Flex keys read but not acted on (a warning)
DEFAULT_NAMESPACE = "default"

Severity = Literal["error", "warning", "info"]


@attrs.frozen(order=True)
class ResourceId:
    """The identity of a resource across files and reloads: (kind, namespace, name)."""

    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> str:
        """`namespace/name`, the key plan objects use."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@attrs.frozen
class Resource:
    """A document that passed its own checks: normalised, env-expanded and schema-valid."""

    id: ResourceId
    api_version: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    document: Document  # locations refer to the normalised value

    @property
    def origin(self) -> str:
        """Where the resource came from: a file path, a Kubernetes object, an etcd key."""
        return self.document.origin


@attrs.frozen
class Checked:
    """The outcome of checking one document."""

    id: ResourceId | None  # None when the document is not an identifiable resource
    resource: Resource | None  # None when the document has errors (or is ignored)
    problems: tuple[Problem, ...]
    document: Document  # normalised (spelling variants fixed, env not expanded)


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in flexgw/config/schemas."""
    text = resources.files("flexgw.config").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


def dotted(path: Iterable[str | int]) -> str:
    """`spec.rules[0].path` for ("spec", "rules", 0, "path")."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


class _Reporter:
    """Collects problems for one document, located through its marks."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.resource: str | None = None
        self.problems: list[Problem] = []
        self.unset_paths: set[FieldPath] = set()  # schema errors there would only repeat the cause

    def add(
        self,
        severity: Severity,
        message: str,
        path: FieldPath = (),
        *,
        at_key: bool = False,
        offset: int | None = None,
    ) -> None:
        self.problems.append(
            self.document.problem(
                severity,
                message,
                tuple(path),
                at_key=at_key,
                offset=offset,
                resource=self.resource,
                field=dotted(path) or None,
            )
        )

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems)


def _rename_key(
    mapping: dict[str, Any],
    old: str,
    new: str,
    path: FieldPath,
    marks: dict[Any, Any],
    key_marks: dict[Any, Any],
) -> None:
    """Rename `old` to `new` in `mapping`, keeping the locations of the old key."""
    mapping[new] = mapping.pop(old)
    for table in (marks, key_marks):
        if path + (old,) in table:
            table[path + (new,)] = table[path + (old,)]


def _canonical_kind(value: Any, table: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return table.get(value.lower(), value)
    return value


def _normalise(document: Document, reporter: _Reporter) -> Document:
    """Accept Flex's spelling variants: `Kind` for `kind`, kinds in any case, an omitted targetRef kind."""
    value = copy.deepcopy(document.value)
    marks = dict(document.marks)
    key_marks = dict(document.key_marks)
    value["kind"] = _canonical_kind(value.get("kind"), KINDS)
    spec = value.get("spec")
    if value["kind"] == "PolicyBinding" and isinstance(spec, dict):
        for ref_name, table in (
            ("targetRef", TARGET_KINDS),
            ("policyRef", {"extension": "Extension"}),
        ):
            ref = spec.get(ref_name)
            path: FieldPath = ("spec", ref_name)
            if not isinstance(ref, dict):
                continue
            if "Kind" in ref:
                if "kind" in ref:
                    reporter.add(
                        "warning",
                        "both 'Kind' and 'kind' given; using 'kind'",
                        path + ("Kind",),
                        at_key=True,
                    )
                    ref.pop("Kind")
                else:
                    _rename_key(ref, "Kind", "kind", path, marks, key_marks)
            if "kind" in ref:
                ref["kind"] = _canonical_kind(ref["kind"], table)
            elif ref_name == "targetRef":
                ref["kind"] = "ApiInstance"
                reporter.add("warning", "targetRef.kind omitted; assuming ApiInstance", path)
            selector = ref.get("selector")
            if isinstance(selector, dict) and "kind" in selector:
                selector["kind"] = _canonical_kind(selector["kind"], KINDS)
        config = spec.get("config")
        if isinstance(config, dict):
            refs: list[tuple[dict[str, Any], FieldPath]] = []
            if isinstance(config.get("destinationRef"), dict):
                refs.append((config["destinationRef"], ("spec", "config", "destinationRef")))
            routes = config.get("routes")
            for i, item in enumerate(routes if isinstance(routes, list) else []):
                if isinstance(item, dict) and isinstance(item.get("destinationRef"), dict):
                    refs.append(
                        (item["destinationRef"], ("spec", "config", "routes", i, "destinationRef"))
                    )
            for ref, path in refs:
                if "Kind" in ref and "kind" not in ref:
                    _rename_key(ref, "Kind", "kind", path, marks, key_marks)
                if "kind" in ref:
                    ref["kind"] = _canonical_kind(ref["kind"], {"service": "Service"})
    return attrs.evolve(document, value=value, marks=marks, key_marks=key_marks)


_kind_validators: dict[str, jsonschema.protocols.Validator] = {}


def _kind_validator(kind: Any) -> jsonschema.protocols.Validator:
    """The (cached) validator for a registered policy kind's config schema."""
    validator = _kind_validators.get(kind.name)
    if validator is None or validator.schema is not kind.schema:
        cls = jsonschema.validators.validator_for(kind.schema)
        cls.check_schema(kind.schema)
        validator = _kind_validators[kind.name] = cls(kind.schema)
    return validator


def _policy_config_problems(
    pname: str | None, config: Any, base: FieldPath, reporter: _Reporter, strict: bool
) -> None:
    """Validate a policy binding's config against its route schema or its registered kind's."""
    if pname in ROUTE_POLICIES:
        _schema_problems(ROUTE_POLICIES[pname], config or {}, base, reporter, strict)
        return
    kind = lookup_policy(pname) if pname else None
    if kind is not None:
        _schema_problems(_kind_validator(kind), config or {}, base, reporter, strict)


def _default_tls_problems(block: Any, reporter: _Reporter, strict: bool) -> None:
    """`Configuration.spec.defaultTLS`: `outboundPolicyCalls` has the tls-outbound schema."""
    if not isinstance(block, dict):
        return
    for key in block:
        if key != "outboundPolicyCalls":
            reporter.add(
                "error" if strict else "warning",
                f"unknown key {key!r}" + ("" if strict else "; ignored"),
                ("spec", "defaultTLS", key),
                at_key=True,
            )
    calls = block.get("outboundPolicyCalls")
    kind = lookup_policy("tls-outbound")
    if calls is not None and kind is not None:
        _schema_problems(
            _kind_validator(kind), calls, ("spec", "defaultTLS", "outboundPolicyCalls"),
            reporter, strict,
        )


def _schema_problems(
    name: str | jsonschema.protocols.Validator,
    instance: Any,
    base: FieldPath,
    reporter: _Reporter,
    strict: bool,
) -> None:
    """Validate `instance` (found at `base`) against a schema, reporting every error."""
    validator = _validator(name) if isinstance(name, str) else name
    errors = sorted(
        validator.iter_errors(instance),
        key=lambda e: (tuple(str(p) for p in e.absolute_path), e.validator),
    )
    for error in errors:
        path = base + tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            for key in error.instance:
                if key not in known:
                    severity: Severity = "error" if strict else "warning"
                    suffix = "" if strict else "; ignored"
                    reporter.add(
                        severity, f"unknown key {key!r}{suffix}", path + (key,), at_key=True
                    )
            continue
        if path in reporter.unset_paths:
            continue
        reporter.add("error", _message(error), path)


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"{error.instance!r} is not one of {allowed}"
    if error.validator == "const":
        return f"expected {error.validator_value!r}, got {error.instance!r}"
    if error.validator == "type":
        expected = error.validator_value
        if isinstance(expected, list):
            expected = " or ".join(expected)
        return f"expected {expected}, got {_json_type(error.instance)}"
    if error.validator == "pattern" and isinstance(error.instance, str):
        return f"{error.instance!r} is not a valid name (no '/' or spaces)"
    return str(error.message)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_rules(rules: Any, base: FieldPath, reporter: _Reporter) -> None:
    if not isinstance(rules, list):
        return
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        items: list[tuple[FieldPath, Any]] = [
            ((i, key), rule.get(key)) for key in ("path", "methods", "host")
        ]
        headers = rule.get("headers")
        if isinstance(headers, dict):
            items.extend(((i, "headers", name), value) for name, value in headers.items())
        for sub, pattern in items:
            if not isinstance(pattern, str):
                continue
            try:
                compile_rule_regex(pattern)
            except RegexError as exc:
                where = "" if exc.position is None else f" at position {exc.position + 1}"
                reporter.add(
                    "error",
                    f"invalid regex{where}: {exc.message}",
                    base + sub,
                    offset=exc.position,
                )


def _check_spec(kind: str, spec: Mapping[str, Any], reporter: _Reporter) -> None:
    """Checks JSON Schema cannot express: addresses, regexes, networks."""
    if kind == "ApiInstance":
        address = spec.get("address")
        if isinstance(address, str):
            try:
                parse_api_address(address)
            except AddressError as exc:
                reporter.add("error", str(exc), ("spec", "address"))
        services = spec.get("services")
        for key, service in services.items() if isinstance(services, dict) else ():
            if not isinstance(service, dict):
                continue
            if isinstance(service.get("address"), str):
                try:
                    parse_service_address(service["address"])
                except AddressError as exc:
                    reporter.add("error", str(exc), ("spec", "services", key, "address"))
            routes = service.get("routes")
            for n, route in enumerate(routes if isinstance(routes, list) else []):
                if isinstance(route, dict):
                    _check_rules(
                        route.get("rules"),
                        ("spec", "services", key, "routes", n, "rules"),
                        reporter,
                    )
        policies = spec.get("policies")
        for n, policy in enumerate(policies if isinstance(policies, list) else []):
            if isinstance(policy, dict):
                _check_rules(policy.get("rules"), ("spec", "policies", n, "rules"), reporter)
    elif kind == "Service":
        address = spec.get("address")
        if isinstance(address, str):
            try:
                port = parse_service_address(address).port
            except AddressError as exc:
                reporter.add("error", str(exc), ("spec", "address"))
            else:
                for path, message in check_balancing(spec, port):
                    reporter.add("error", message, path)
    elif kind == "PolicyBinding":
        _check_rules(spec.get("rules"), ("spec", "rules"), reporter)
        target = spec.get("targetRef")
        if isinstance(target, dict) and target.get("kind") != "Selector" and "name" not in target:
            reporter.add("error", "'name' is a required property", ("spec", "targetRef"))
    elif kind == "Configuration":
        http = spec.get("http")
        proxies = http.get("trustedProxies") if isinstance(http, dict) else None
        for n, item in enumerate(proxies if isinstance(proxies, list) else []):
            if isinstance(item, str):
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    reporter.add(
                        "error",
                        f"{item!r} is not an IP address or CIDR network",
                        ("spec", "http", "trustedProxies", n),
                    )
        for key in UNSUPPORTED_CONFIGURATION:
            if key in spec:
                reporter.add(
                    "warning", f"{key!r} is not supported yet; ignored", ("spec", key), at_key=True
                )
    elif kind == "Extension" and _is_wasm(spec):
        reporter.add(
            "warning",
            "WASM policy implementations are unsupported; this Extension cannot be bound",
            ("spec",),
        )


def _is_wasm(spec: Mapping[str, Any]) -> bool:
    extends = spec.get("extends")
    items = extends if isinstance(extends, list) else []
    names = {item.get("name") for item in items if isinstance(item, dict)}
    if names & {"proxy-wasm-filter", "envoy-filter"}:
        return True
    properties = spec.get("properties")
    implementation = properties.get("implementation") if isinstance(properties, dict) else None
    default = implementation.get("default") if isinstance(implementation, dict) else None
    return isinstance(default, str) and (
        default.startswith("base64://") or default.endswith(".wasm")
    )


def _expand(
    kind: str,
    value: dict[str, Any],
    document: Document,
    environ: Mapping[str, str],
    reporter: _Reporter,
) -> None:
    """Expand env references in place where Flex expands them; unset variables are errors."""
    spec = value.get("spec")
    if not isinstance(spec, dict):
        return
    targets: list[tuple[dict[str, Any], str, FieldPath, bool]] = []
    if kind == "PolicyBinding" and "config" in spec:
        _config_targets(targets, spec, policy_name(spec), ("spec", "config"))
    elif kind == "ApiInstance":
        policies = spec.get("policies")
        for n, policy in enumerate(policies if isinstance(policies, list) else []):
            if isinstance(policy, dict) and "config" in policy:
                _config_targets(
                    targets, policy, policy_name(policy), ("spec", "policies", n, "config")
                )
    elif kind == "Configuration":
        for key in list(spec):
            targets.append((spec, key, ("spec", key), True))
    for holder, key, path, typed in targets:
        expanded, unset = expand_value(
            holder[key],
            environ,
            path,
            (lambda p: p in document.plain) if typed else None,
        )
        holder[key] = expanded
        for item in unset:
            reporter.unset_paths.add(item.path)
            reporter.add(
                "error",
                f"environment variable {item.name!r} is not set",
                item.path,
            )


def _config_targets(
    targets: list[tuple[dict[str, Any], str, FieldPath, bool]],
    holder: dict[str, Any],
    name: str | None,
    path: FieldPath,
) -> None:
    """A policy config to expand: whole, or key by key without the kind's `literal_fields`
    (config keys holding documents that use `$` themselves: an OpenAPI spec's `$ref`, a
    script's `${...}`), which are taken as written."""
    kind = lookup_policy(name) if name is not None else None
    literal = frozenset(getattr(kind, "literal_fields", ()))
    config = holder["config"]
    if not literal or not isinstance(config, dict):
        targets.append((holder, "config", path, False))
        return
    for key in config:
        if key not in literal:
            targets.append((config, key, (*path, key), False))


def policy_name(spec: Any) -> str | None:
    """`spec.policyRef.name` of a PolicyBinding spec, when it is a string."""
    ref = spec.get("policyRef") if isinstance(spec, dict) else None
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) else None


def identify(value: Any) -> tuple[str | None, str | None, str]:
    """(canonical kind or the raw one, name, namespace) of a raw document value, best effort."""
    kind = _canonical_kind(value.get("kind"), KINDS) if isinstance(value, dict) else None
    metadata = value.get("metadata") if isinstance(value, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if not isinstance(namespace, str) or not namespace:
        namespace = DEFAULT_NAMESPACE
    return (
        (kind if isinstance(kind, str) else None),
        (name if isinstance(name, str) else None),
        namespace,
    )


def check_document(document: Document, environ: Mapping[str, str], strict: bool = False) -> Checked:
    """Run every per-document check; `resource` is set only when there are no errors."""
    reporter = _Reporter(document)
    value = document.value
    if not isinstance(value, dict):
        reporter.add("error", f"a resource must be a mapping, got {_json_type(value)}")
        return Checked(None, None, tuple(reporter.problems), document)
    if "kind" not in value:
        what = "registration file" if "registration" in document.origin.lower() else "document"
        reporter.add("warning", f"{what} without 'kind'; ignored")
        return Checked(None, None, tuple(reporter.problems), document)
    if is_kubernetes(value.get("apiVersion"), value.get("kind")):
        return _check_kubernetes_document(document, reporter)
    kind, name, namespace = identify(value)
    if kind is None or kind not in KINDS.values():
        reporter.add("warning", f"unknown kind {value.get('kind')!r}; ignored", ("kind",))
        return Checked(None, None, tuple(reporter.problems), document)
    if name is None:
        reporter.add("error", "metadata.name is required", ("metadata",))
        return Checked(None, None, tuple(reporter.problems), document)
    rid = ResourceId(kind, namespace, name)
    reporter.resource = str(rid)
    api_version = value.get("apiVersion")
    if api_version not in API_VERSIONS:
        reporter.add(
            "error",
            f"unsupported apiVersion {api_version!r} (expected gateway.mulesoft.com/v1alpha1 or v1beta1)",
            ("apiVersion",),
        )
    normalised = _normalise(document, reporter)
    expanded = copy.deepcopy(normalised.value)
    _expand(kind, expanded, normalised, environ, reporter)
    _schema_problems(kind, expanded, (), reporter, strict)
    spec = expanded.get("spec")
    if kind == "PolicyBinding" and isinstance(spec, dict):
        _policy_config_problems(
            policy_name(spec), spec.get("config"), ("spec", "config"), reporter, strict
        )
    elif kind == "Configuration" and isinstance(spec, dict):
        _default_tls_problems(spec.get("defaultTLS"), reporter, strict)
    elif kind == "ApiInstance" and isinstance(spec, dict):
        inline = spec.get("policies")
        for n, item in enumerate(inline if isinstance(inline, list) else []):
            if isinstance(item, dict):
                _policy_config_problems(
                    policy_name(item),
                    item.get("config"),
                    ("spec", "policies", n, "config"),
                    reporter,
                    strict,
                )
    if isinstance(spec, dict):
        _check_spec(kind, spec, reporter)
    problems = tuple(reporter.problems)
    if reporter.has_errors:
        return Checked(rid, None, problems, normalised)
    labels = (expanded.get("metadata") or {}).get("labels") or {}
    resource = Resource(
        id=rid,
        api_version=str(api_version),
        labels={str(k): str(v) for k, v in labels.items()},
        spec=spec if isinstance(spec, dict) else {},
        document=normalised,
    )
    return Checked(rid, resource, problems, normalised)


# Kubernetes kinds without a `spec`: their resource spec is the document minus its header
_NO_SPEC = frozenset({"Secret", "Endpoints", "EndpointSlice"})


def _check_kubernetes_document(document: Document, reporter: _Reporter) -> Checked:
    """Check a Kubernetes document (Ingress, v1 Service, Secret, ...) against flexgw's subset.

    Unknown fields under `spec` would change routing, so they are errors even without
    --strict; metadata is open (annotations of other controllers, managedFields, ...).
    """
    value = document.value
    raw_kind = value.get("kind")
    api_version = value.get("apiVersion")
    kind = KUBERNETES_KINDS.get((api_version, raw_kind))
    _, name, namespace = identify(value)
    if name is None:
        reporter.add("error", "metadata.name is required", ("metadata",))
        return Checked(None, None, tuple(reporter.problems), document)
    if kind is None:
        rid = ResourceId(str(raw_kind), namespace, name)
        reporter.resource = str(rid)
        reporter.add(
            "error",
            f"unsupported apiVersion {api_version!r} for {raw_kind} (expected {KUBERNETES_API_VERSIONS[str(raw_kind)]})",
            ("apiVersion",),
        )
        return Checked(rid, None, tuple(reporter.problems), document)
    rid = ResourceId(kind, namespace, name)
    reporter.resource = str(rid)
    _schema_problems(kind, value, (), reporter, strict=True)
    check_kubernetes(
        kind,
        value,
        lambda severity, message, path, offset: reporter.add(
            severity, message, path, offset=offset  # type: ignore[arg-type]
        ),
    )
    problems = tuple(reporter.problems)
    if reporter.has_errors:
        return Checked(rid, None, problems, document)
    metadata = value.get("metadata") or {}
    if kind in _NO_SPEC:
        spec = {k: v for k, v in value.items() if k not in ("apiVersion", "kind", "metadata")}
    else:
        spec = value.get("spec") or {}
    resource = Resource(
        id=rid,
        api_version=str(api_version),
        labels={str(k): str(v) for k, v in (metadata.get("labels") or {}).items()},
        spec=spec,
        document=document,
    )
    return Checked(rid, resource, problems, document)
