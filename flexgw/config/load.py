"""Parse YAML text into plain Python documents that remember where every node came from.

Source-neutral: the file source (`flexgw.config.sources.files`) parses each file with it, and a
source holding YAML elsewhere (an etcd value, a ConfigMap key) can too, with its own origin.
A Kubernetes list document (`kind: List`, as `kubectl get ... -o yaml` prints, or a typed list
such as `IngressList`) is unwrapped: each of its `items` becomes a document of its own, located
where it is written."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from flexgw.config.sources import Document, FieldPath, Mark, Unit
from flexgw.plan import Problem

MAX_NODES = 200_000  # alias expansion bound ("billion laughs")


class _DocumentError(Exception):
    """A document that parsed as YAML but cannot be turned into plain values."""

    def __init__(self, message: str, node: Node | None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node


def _mark(node: Node) -> Mark:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    """Turns one composed YAML node tree into plain values plus location maps."""

    def __init__(self) -> None:
        self.constructor = SafeConstructor()
        self.marks: dict[FieldPath, Mark] = {}
        self.key_marks: dict[FieldPath, Mark] = {}
        self.plain: set[FieldPath] = set()
        self.count = 0
        self.active: set[int] = set()

    def build(self, node: Node, path: FieldPath) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _DocumentError(f"document expands to more than {MAX_NODES} nodes", node)
        # a collection is located at its key (a block mapping's own mark is its first child)
        self.marks[path] = self.key_marks.get(path, _mark(node)) if path else _mark(node)
        if isinstance(node, ScalarNode):
            self.marks[path] = _mark(node)
            return self._scalar(node, path)
        if id(node) in self.active:
            raise _DocumentError("recursive alias", node)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
        finally:
            self.active.discard(id(node))
        raise _DocumentError("unsupported YAML node", node)  # pragma: no cover

    def _scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        if node.style is None:
            self.plain.add(path)
        if node.tag in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:binary"):
            return node.value
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise _DocumentError(getattr(exc, "problem", None) or str(exc), node) from None

    def _mapping(self, node: MappingNode, path: FieldPath) -> dict[str, Any]:
        try:
            self.constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            raise _DocumentError(getattr(exc, "problem", None) or str(exc), node) from None
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _DocumentError("mapping keys must be plain strings", key_node)
            key = key_node.value
            child = path + (key,)
            if key in result:
                # YAML forbids duplicate keys (Flex's Go loader rejects them); PyYAML would not.
                raise _DocumentError(f"duplicate key {key!r}", key_node)
            self.key_marks[child] = _mark(key_node)
            result[key] = self.build(value_node, child)
        return result


def is_list(value: Any) -> bool:
    """Whether a document is a Kubernetes list: `kind: List` or a typed `<Kind>List` with `items`."""
    if not isinstance(value, dict):
        return False
    kind = value.get("kind")
    if kind == "List":
        return True
    return isinstance(kind, str) and kind.endswith("List") and len(kind) > 4 and "items" in value


def unwrap_list(document: Document) -> tuple[list[Document], list[Problem]]:
    """The items of a Kubernetes list document, each a Document located where it is written.

    An item of a typed list (`IngressList` from the API, whose items omit them) takes the kind
    (`Ingress`) and the apiVersion of its list; an item of `kind: List` carries its own, as
    kubectl prints them. Items keep the list's origin and index (they share its YAML document).
    """
    value = document.value
    items = value.get("items")
    if items is None:  # kubectl prints `items: []` for nothing; a bare List is empty too
        return [], []
    if not isinstance(items, list):
        return [], [document.problem("error", "'items' of a List must be a sequence", ("items",))]
    kind = value["kind"]
    item_kind = kind[: -len("List")] if kind != "List" else None
    api_version = value.get("apiVersion")
    # the location maps of each item, re-rooted at the item, in one pass over the list's maps
    marks: list[dict[FieldPath, Mark]] = [{} for _ in items]
    key_marks: list[dict[FieldPath, Mark]] = [{} for _ in items]
    plain: list[set[FieldPath]] = [set() for _ in items]
    for source, target in ((document.marks, marks), (document.key_marks, key_marks)):
        for path, mark in source.items():
            if len(path) >= 2 and path[0] == "items" and isinstance(path[1], int):
                target[path[1]][path[2:]] = mark
    for path in document.plain:
        if len(path) >= 2 and path[0] == "items" and isinstance(path[1], int):
            plain[path[1]].add(path[2:])
    documents = []
    for n, item in enumerate(items):
        if item_kind is not None and isinstance(item, dict):
            if "kind" not in item:
                item = {"kind": item_kind, **item}
            if "apiVersion" not in item and api_version is not None:
                item = {"apiVersion": api_version, **item}
        documents.append(
            Document(
                origin=document.origin,
                index=document.index,
                value=item,
                marks=marks[n],
                key_marks=key_marks[n],
                plain=frozenset(plain[n]),
            )
        )
    return documents, []


def problem_at(message: str, origin: str, mark: Mark | None, severity: str = "error") -> Problem:
    """A problem located in `origin` (at `mark` when known), for what a source cannot read."""
    line, column = mark if mark else (None, None)
    return Problem(severity=severity, message=message, file=origin, line=line, column=column)  # type: ignore[arg-type]


def load_text(text: str, file: str) -> Unit:
    """Parse YAML text read from `file` (its origin); never raises (every failure becomes a Problem)."""
    documents: list[Document] = []
    problems: list[Problem] = []
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=yaml.SafeLoader)):
            if node is None:
                continue
            builder = _Builder()
            try:
                value = builder.build(node, ())
            except _DocumentError as exc:
                mark = _mark(exc.node) if exc.node is not None else None
                return Unit(file, (), (problem_at(exc.message, file, mark),), True)
            if value is None:
                continue
            document = Document(
                origin=file,
                index=index,
                value=value,
                marks=builder.marks,
                key_marks=builder.key_marks,
                plain=frozenset(builder.plain),
            )
            if is_list(value):
                items, list_problems = unwrap_list(document)
                documents.extend(items)
                problems.extend(list_problems)
            else:
                documents.append(document)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark is not None else None
        message = "YAML syntax error: " + " ".join(
            part for part in (exc.context, exc.problem) if part
        )
        return Unit(file, (), (problem_at(message.strip(), file, where),), True)
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        name = type(exc).__name__
        return Unit(file, (), (problem_at(f"cannot parse YAML ({name})", file, None),), True)
    return Unit(file, tuple(documents), tuple(problems), False)
