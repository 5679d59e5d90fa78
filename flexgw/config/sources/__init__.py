"""Config sources: interchangeable producers of resource documents, each document with its origin.

A source (today the file source, `flexgw.config.sources.files`; a Kubernetes API or etcd
source can plug in the same way) yields `Unit`s: one file, one Kubernetes object, one etcd
key, each named by its `origin` and holding the documents read from it. Every `Document` keeps
its origin and, when the source knows them, the line and column of each node; a problem found
in it reads "<origin>:<line>:<column>: ..." or, without positions, "<origin>: ...". The
pipeline (`flexgw.config.pipeline`: validate -> resolve -> compile -> swap) reads a source's
`Snapshot` and never the files, objects or keys behind it; the source announces changes
through its watcher. Nothing here knows about the data path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs

from flexgw.plan import Problem

FieldPath = tuple[str | int, ...]
Mark = tuple[int, int]  # (line, column), both 1-based


@attrs.frozen
class Document:
    """One resource document: its plain value, its origin and, when known, the 1-based location
    of each node by field path (no marks: the source has no positions, e.g. an API object)."""

    origin: str  # a file path; a Kubernetes "Kind namespace/name"; an etcd key
    index: int  # 0-based position in its unit
    value: Any
    marks: Mapping[FieldPath, Mark] = attrs.field(factory=dict)  # field path -> where its value starts
    # field path -> where its key is written
    key_marks: Mapping[FieldPath, Mark] = attrs.field(factory=dict)
    plain: frozenset[FieldPath] = frozenset()  # paths of unquoted (plain) scalars

    def locate(self, path: Iterable[str | int]) -> Mark | None:
        """The location of `path`, or of its nearest ancestor that has one (None: no positions)."""
        parts = tuple(path)
        while parts:
            if parts in self.marks:
                return self.marks[parts]
            parts = parts[:-1]
        return self.marks.get(())

    def locate_key(self, path: Iterable[str | int]) -> Mark | None:
        """Where the key of `path` is written (its value's location when there is no key)."""
        parts = tuple(path)
        return self.key_marks.get(parts) or self.locate(parts)

    def problem(
        self,
        severity: str,
        message: str,
        path: FieldPath = (),
        *,
        at_key: bool = False,
        offset: int | None = None,
        resource: str | None = None,
        field: str | None = None,
    ) -> Problem:
        """A Problem located at `path` in this document (`offset`: characters into a plain scalar)."""
        mark = self.locate_key(path) if at_key else self.locate(path)
        line, column = mark if mark is not None else (None, None)
        if offset is not None and column is not None and tuple(path) in self.plain:
            column += offset  # a plain scalar's text starts exactly at its mark
        return Problem(
            severity=severity,  # type: ignore[arg-type]
            message=message,
            file=self.origin,
            line=line,
            column=column,
            resource=resource,
            field=field,
        )


@attrs.frozen
class Unit:
    """What a source read from one origin (a file, an object, a key): its documents, or why it
    could not be read (`failed`: the last good resources it held keep serving)."""

    origin: str
    documents: tuple[Document, ...]
    problems: tuple[Problem, ...]
    failed: bool
    source: str = ""  # which source it came from, when several are combined ("files", "kubernetes")


@attrs.frozen
class Snapshot:
    """Everything a source holds now: its units in order, and problems about the source itself
    (e.g. a configuration directory that does not exist)."""

    units: tuple[Unit, ...]
    problems: tuple[Problem, ...] = ()
    # where in the source's history this is, when it has one (an etcd revision, a Kubernetes
    # resourceVersion): what a restart from a stored snapshot resumes from
    position: str | None = None


class Watcher(Protocol):
    """A started/stopped watch on a source; it calls back when the source changed."""

    def start(self) -> None:
        """Begin watching."""

    def stop(self) -> None:
        """Stop watching; no callback after this."""


class ConfigSource(Protocol):
    """A producer of resource documents: read all of it, or watch it for changes."""

    def read(self) -> Snapshot:
        """Every unit the source holds now; never raises on bad input (problems instead)."""

    def watcher(
        self,
        reactor: Any,
        on_change: Callable[[], Any],
        debounce_seconds: float,
        extra_files: Callable[[], Iterable[str]] | None = None,
    ) -> Watcher:
        """A watcher calling `on_change()` once things settle after the source changed (and
        after a change to one of `extra_files()`, the certificates the running plan read)."""


class CombinedSource:
    """Several sources read as one (e.g. --conf files and the Kubernetes API): their units in
    order, each tagged with its source's name, so the pipeline can tell a resource defined by two
    sources (a located conflict) from one defined twice within a source."""

    def __init__(self, sources: Iterable[tuple[str, ConfigSource]]) -> None:
        self.sources = list(sources)

    def read(self) -> Snapshot:
        """Every source's units, tagged, then every source's problems."""
        units: list[Unit] = []
        problems: list[Problem] = []
        for name, source in self.sources:
            snapshot = source.read()
            units.extend(attrs.evolve(unit, source=name) for unit in snapshot.units)
            problems.extend(snapshot.problems)
        return Snapshot(tuple(units), tuple(problems))

    def statuses(self) -> list[Any]:
        """The connection status of each source that has one."""
        found: list[Any] = []
        for _, source in self.sources:
            statuses = getattr(source, "statuses", None)
            if statuses is not None:
                found.extend(statuses())
        return found

    def watcher(
        self,
        reactor: Any,
        on_change: Callable[[], Any],
        debounce_seconds: float,
        extra_files: Callable[[], Iterable[str]] | None = None,
    ) -> Watcher:
        """One watcher per source (the first also polls `extra_files`), started and stopped together."""
        watchers = [
            source.watcher(reactor, on_change, debounce_seconds, extra_files if n == 0 else None)
            for n, (_, source) in enumerate(self.sources)
        ]
        return _Watchers(watchers)


class _Watchers:
    """Several watchers as one."""

    def __init__(self, watchers: list[Watcher]) -> None:
        self.watchers = watchers

    def start(self) -> None:
        """Start each."""
        for watcher in self.watchers:
            watcher.start()

    def stop(self) -> None:
        """Stop each."""
        for watcher in self.watchers:
            watcher.stop()
