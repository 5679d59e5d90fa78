"""Generate deploy/kubernetes/crds.yaml: the four Flex CRDs (gateway.mulesoft.com ApiInstance,
Service, PolicyBinding, Configuration; v1alpha1 stored, v1beta1 served alike) whose OpenAPI v3
schemas are converted from flexgw's own JSON Schemas (flexgw/config/schemas), so the API server
refuses what `flexgw validate` refuses at the schema level.

    python tools/crds.py            # print
    python tools/crds.py --write    # rewrite deploy/kubernetes/crds.yaml
    python tools/crds.py --check    # exit 1 when the committed file differs

The conversion makes a Kubernetes *structural* schema: `$ref`s inlined, `const` as a one-value
enum, `["T", "null"]` as `nullable`, `["integer", "string"]` as `x-kubernetes-int-or-string`,
an open or untyped value as `x-kubernetes-preserve-unknown-fields`, a JSON Schema 2020-12
`exclusiveMinimum: N` as OpenAPI 3.0's `minimum: N, exclusiveMinimum: true`; `additionalProperties:
false` is dropped (the API server prunes, and with kubectl's default strict field validation
refuses, unknown fields).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "deploy", "kubernetes", "crds.yaml")
GROUP = "gateway.mulesoft.com"
VERSIONS = ("v1alpha1", "v1beta1")  # the first is stored
KINDS = (("ApiInstance", "apiinstances"), ("Service", "services"),
         ("PolicyBinding", "policybindings"), ("Configuration", "configurations"))
KEEP = ("description", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
        "maxItems", "uniqueItems", "default", "format")


def load(name: str) -> dict[str, Any]:
    """flexgw's JSON Schema of kind `name`."""
    with open(os.path.join(ROOT, "flexgw", "config", "schemas", f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)  # type: ignore[no-any-return]


def _enum_type(values: list[Any]) -> str | None:
    types = {type(v) for v in values}
    for python, name in ((str, "string"), (bool, "boolean"), (int, "integer")):
        if types == {python}:
            return name
    if types <= {int, float}:
        return "number"
    return None


def convert(schema: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node as a structural OpenAPI v3 schema node."""
    if not isinstance(schema, dict):
        return {"x-kubernetes-preserve-unknown-fields": True}
    if "$ref" in schema:
        name = schema["$ref"].rpartition("/")[2]
        return convert({**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}, defs)
    out: dict[str, Any] = {}
    types = schema.get("type")
    enum = schema.get("enum")
    if "const" in schema:
        enum = [schema["const"]]
    if isinstance(types, list):
        if "null" in types:
            out["nullable"] = True
        types = [t for t in types if t != "null"]
        if len(types) == 1:
            types = types[0]
        elif set(types) == {"integer", "string"}:
            out["x-kubernetes-int-or-string"] = True
            types = None
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
            types = None
    if types is None and enum is not None and not out.get("x-kubernetes-int-or-string"):
        types = _enum_type(enum)
    if types is not None:
        out["type"] = types
    if enum is not None:
        out["enum"] = enum
    for key in KEEP:
        if key in schema:
            out[key] = schema[key]
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        out["minimum"] = schema["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(schema["exclusiveMaximum"], bool):
        out["maximum"] = schema["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if types == "array":
        out["items"] = convert(schema.get("items", {}), defs)
    if types == "object" or "properties" in schema:
        out["type"] = "object"
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties:
            out["properties"] = {k: convert(v, defs) for k, v in properties.items()}
            if "required" in schema:
                out["required"] = list(schema["required"])
            if extra is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict):
            out["additionalProperties"] = convert(extra, defs)
        elif extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of a Flex kind."""
    schema = load(kind)
    defs = schema.get("$defs", {})
    properties = schema["properties"]
    root: dict[str, Any] = {
        "type": "object",
        "description": schema.get("title", kind),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": convert(properties["spec"], defs),
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    if "spec" in schema.get("required", ()):
        root["required"] = ["spec"]
    return root


def crd(kind: str, plural: str) -> dict[str, Any]:
    """The CustomResourceDefinition of a Flex kind."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "flexgw"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [
                {"name": version, "served": True, "storage": n == 0, "schema": {"openAPIV3Schema": crd_schema(kind)}}
                for n, version in enumerate(VERSIONS)
            ],
        },
    }


def render() -> str:
    """The whole crds.yaml text."""
    header = ("# Generated by tools/crds.py from flexgw/config/schemas: do not edit; run\n"
              "# `python tools/crds.py --write` after changing a schema.\n")
    documents = [crd(kind, plural) for kind, plural in KINDS]
    return header + yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True, width=100)


def main(argv: list[str] | None = None) -> int:
    """Print, write or check deploy/kubernetes/crds.yaml."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite deploy/kubernetes/crds.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(OUTPUT, "w", encoding="utf-8") as handle:
            handle.write(text)
        return 0
    if args.check:
        try:
            with open(OUTPUT, encoding="utf-8") as handle:
                same = handle.read() == text
        except OSError:
            same = False
        if not same:
            print(f"{OUTPUT} is stale: run python tools/crds.py --write", file=sys.stderr)
        return 0 if same else 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
