"""Read YAML resource files into plain Python documents that remember where every node came from."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from flexgw.plan import Problem

FieldPath = tuple[str | int, ...]
Mark = tuple[int, int]  # (line, column), both 1-based

YAML_SUFFIXES = (".yaml", ".yml")
MAX_NODES = 200_000  # alias expansion bound ("billion laughs")
MAX_FILE_BYTES = 16 * 1024 * 1024


@attrs.frozen
class Document:
    """One YAML document: its plain value and the 1-based location of each node, by field path."""

    file: str
    index: int  # 0-based position in its file
    value: Any
    marks: Mapping[FieldPath, Mark]  # field path -> where its value starts
    # field path -> where its key is written
    key_marks: Mapping[FieldPath, Mark] = attrs.field(factory=dict)
    plain: frozenset[FieldPath] = frozenset()  # paths of unquoted (plain) scalars

    def locate(self, path: Iterable[str | int]) -> Mark:
        """The location of `path`, or of its nearest ancestor that has one."""
        parts = tuple(path)
        while parts:
            if parts in self.marks:
                return self.marks[parts]
            parts = parts[:-1]
        return self.marks.get((), (1, 1))

    def locate_key(self, path: Iterable[str | int]) -> Mark:
        """Where the key of `path` is written (its value's location when there is no key)."""
        parts = tuple(path)
        return self.key_marks.get(parts) or self.locate(parts)


@attrs.frozen
class FileLoad:
    """The documents of one file, or why it could not be parsed (`failed`)."""

    path: str
    documents: tuple[Document, ...]
    problems: tuple[Problem, ...]
    failed: bool


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


def _problem(message: str, file: str, mark: Mark | None, severity: str = "error") -> Problem:
    line, column = mark if mark else (None, None)
    return Problem(severity=severity, message=message, file=file, line=line, column=column)  # type: ignore[arg-type]


def load_text(text: str, file: str) -> FileLoad:
    """Parse the text of one file; never raises (every failure becomes a Problem)."""
    documents: list[Document] = []
    try:
        for index, node in enumerate(yaml.compose_all(text, Loader=yaml.SafeLoader)):
            if node is None:
                continue
            builder = _Builder()
            try:
                value = builder.build(node, ())
            except _DocumentError as exc:
                mark = _mark(exc.node) if exc.node is not None else None
                return FileLoad(file, (), (_problem(exc.message, file, mark),), True)
            if value is None:
                continue
            documents.append(
                Document(
                    file=file,
                    index=index,
                    value=value,
                    marks=builder.marks,
                    key_marks=builder.key_marks,
                    plain=frozenset(builder.plain),
                )
            )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark is not None else None
        message = "YAML syntax error: " + " ".join(
            part for part in (exc.context, exc.problem) if part
        )
        return FileLoad(file, (), (_problem(message.strip(), file, where),), True)
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as exc:
        name = type(exc).__name__
        return FileLoad(file, (), (_problem(f"cannot parse YAML ({name})", file, None),), True)
    return FileLoad(file, tuple(documents), (), False)


def load_file(path: str | os.PathLike[str]) -> FileLoad:
    """Read and parse one file; never raises."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            # Check the size first: read(n) would allocate n bytes up front for every file.
            if os.fstat(handle.fileno()).st_size > MAX_FILE_BYTES:
                return FileLoad(
                    name,
                    (),
                    (_problem(f"file larger than {MAX_FILE_BYTES} bytes", name, None),),
                    True,
                )
            data = handle.read()
    except OSError as exc:
        return FileLoad(
            name, (), (_problem(f"cannot read file: {exc.strerror}", name, None),), True
        )
    if len(data) > MAX_FILE_BYTES:
        return FileLoad(
            name, (), (_problem(f"file larger than {MAX_FILE_BYTES} bytes", name, None),), True
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text (byte {exc.start})"
        return FileLoad(name, (), (_problem(message, name, None),), True)
    return load_text(text, name)


def discover_files(conf_dirs: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[Problem]]:
    """Every *.yaml / *.yml file below each directory, recursively, sorted per directory."""
    files: list[str] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for conf_dir in conf_dirs:
        root = Path(conf_dir)
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = []
            visited: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                real_dir = os.path.realpath(dirpath)
                if real_dir in visited:  # a symlink loop
                    dirnames[:] = []
                    continue
                visited.add(real_dir)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in filenames:
                    if filename.endswith(YAML_SUFFIXES) and not filename.startswith("."):
                        candidates.append(Path(dirpath) / filename)
            candidates.sort(key=lambda p: p.relative_to(root).parts)
        else:
            problems.append(_problem("configuration directory not found", str(root), None))
            continue
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if real in seen:
                continue
            seen.add(real)
            files.append(str(candidate))
    return files, problems
