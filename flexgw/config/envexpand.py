"""Expand `$NAME` / `${NAME}` environment references inside policy configs and Configuration scalars."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import yaml

from flexgw.config.sources import FieldPath

_REFERENCE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@attrs.frozen
class UnsetVariable:
    """A reference to an environment variable that is not set, and where it was written."""

    name: str
    path: FieldPath


def expand_string(text: str, environ: Mapping[str, str]) -> tuple[str, list[str], bool]:
    """(expanded text, names of unset variables, whether any variable was referenced)."""
    if "$" not in text:
        return text, [], False
    missing: list[str] = []
    referenced = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal referenced
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(3)
        referenced = True
        value = environ.get(name)
        if value is None:
            missing.append(name)
            return ""
        return value

    return _REFERENCE.sub(substitute, text), missing, referenced


def _resolve_plain(text: str) -> Any:
    """Type a plain scalar the way YAML would have (so `$PORT` can fill an integer field)."""
    tag = yaml.resolver.Resolver().resolve(yaml.ScalarNode, text, (True, False))
    if tag.rsplit(":", 1)[-1] in ("int", "float", "bool", "null"):
        return yaml.constructor.SafeConstructor().construct_object(yaml.ScalarNode(tag, text))
    return text


def expand_value(
    value: Any,
    environ: Mapping[str, str],
    path: FieldPath = (),
    is_plain: Callable[[FieldPath], bool] | None = None,
) -> tuple[Any, list[UnsetVariable]]:
    """Expand every string inside `value` (recursively); unset variables are returned, not raised.

    When `is_plain(path)` says a scalar was written unquoted and it referenced a variable, the
    expanded text is typed as YAML would type it (int, float, bool, null), so a Configuration
    field like `upstreamResponseSeconds: $TIMEOUT` gets a number.
    """
    unset: list[UnsetVariable] = []

    def walk(node: Any, where: FieldPath) -> Any:
        if isinstance(node, str):
            text, missing, referenced = expand_string(node, environ)
            unset.extend(UnsetVariable(name, where) for name in missing)
            if referenced and not missing and is_plain is not None and is_plain(where):
                return _resolve_plain(text)
            return text
        if isinstance(node, dict):
            return {key: walk(item, where + (key,)) for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item, where + (i,)) for i, item in enumerate(node)]
        return node

    return walk(value, path), unset
