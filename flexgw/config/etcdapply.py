"""`flexgw apply|diff|get|delete --etcd`: resource files checked locally, then written to etcd in
one transaction.

`plan_apply` reads the files as `flexgw validate` does, maps each resource to its key
(`flexgw.config.sources.etcd` layout), and checks the configuration the apply would leave in
etcd (what is there, overlaid with the files; with `prune`, the files alone) with the same
checks the gateways run: any error, located file:line:column (or key:line:column for a value
already in etcd), and nothing is written. `changes()` compares with what etcd holds (by parsed
value: formatting alone is no change); `txn_ops()` turns the changes into one transaction
guarded by each key's mod revision, so an apply racing another one fails whole instead of
overwriting it. Every apply and delete also puts `<prefix>/meta/last-change`, whose revision
`flexgw fleet` compares with what each gateway applied.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import yaml

from flexgw.config.pipeline import load_config
from flexgw.config.sources import Document, Snapshot, Unit
from flexgw.config.sources.etcd import (
    MAX_VALUE_BYTES,
    normalise_prefix,
    parse_key,
    resource_key,
    resources_prefix,
    value_unit,
)
from flexgw.config.sources.etcd_client import Compare, Delete, KeyValue, Put
from flexgw.config.sources.files import FileSource
from flexgw.plan import Problem


def last_change_key(prefix: str) -> str:
    """The key every apply/delete transaction also writes (its revision: the last change)."""
    return normalise_prefix(prefix) + "/meta/last-change"


def encode(value: Any) -> bytes:
    """A resource as stored: YAML, keys in their written order."""
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).encode("utf-8")


@attrs.frozen
class Desired:
    """What the files say etcd should hold: key -> (document, stored value)."""

    entries: Mapping[str, tuple[Document, bytes]]
    problems: tuple[Problem, ...]
    units: tuple[Unit, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that stop an apply."""
        return tuple(p for p in self.problems if p.severity == "error")


def read_files(paths: Sequence[str], prefix: str) -> Desired:
    """The resources in `paths` (files or directories) by key; a document that cannot be stored
    (no kind or name, a kind etcd keys do not hold, larger than etcd takes) is a located error."""
    snapshot = FileSource(paths).read()
    problems: list[Problem] = list(snapshot.problems)
    entries: dict[str, tuple[Document, bytes]] = {}
    resources = resources_prefix(prefix)
    for unit in snapshot.units:
        problems.extend(unit.problems)
        for document in unit.documents:
            if not isinstance(document.value, dict) or "kind" not in document.value:
                continue  # the checks say what is wrong (or that it is ignored)
            key = resource_key(prefix, document.value)
            named = parse_key(resources, key) if key is not None else "no apiVersion, kind or name"
            if isinstance(named, str):
                problems.append(document.problem("error", f"cannot be stored in etcd: {named}", ("kind",)))
                continue
            assert key is not None
            data = encode(document.value)
            if len(data) > MAX_VALUE_BYTES:
                problems.append(document.problem(
                    "error", f"{len(data)} bytes: larger than etcd takes ({MAX_VALUE_BYTES} bytes)"
                ))
                continue
            entries[key] = (document, data)
    return Desired(entries, tuple(problems), snapshot.units)


@attrs.frozen
class _Fixed:
    """A source holding fixed units (the configuration an apply would leave)."""

    snapshot: Snapshot

    def read(self) -> Snapshot:
        return self.snapshot

    def watcher(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never watched
        raise NotImplementedError


def check_result(
    desired: Desired,
    current: Mapping[str, KeyValue],
    prefix: str,
    environ: Mapping[str, str],
    *,
    prune: bool = False,
    strict: bool = False,
) -> list[Problem]:
    """Every problem of the configuration the apply would leave in etcd (files first)."""
    resources = resources_prefix(prefix)
    kept = [
        value_unit(resources, key, kv.value)
        for key, kv in sorted(current.items())
        if key not in desired.entries and not prune
    ]
    state = load_config(_Fixed(Snapshot((*desired.units, *kept))), environ, strict=strict)
    return [*[p for p in desired.problems if p not in state.problems], *state.problems]


@attrs.frozen
class Change:
    """One key to write or delete; `old`/`new` are the stored values (None: absent)."""

    key: str
    old: KeyValue | None
    new: bytes | None

    @property
    def action(self) -> str:
        """"create", "update" or "delete"."""
        if self.new is None:
            return "delete"
        return "update" if self.old is not None else "create"

    def diff(self, source: str) -> str:
        """A unified diff of the stored YAML (etcd's value against the files')."""
        before = _as_yaml(self.old.value) if self.old is not None else ""
        after = self.new.decode("utf-8") if self.new is not None else ""
        lines = difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{self.key} (etcd)" if self.old is not None else "/dev/null",
            tofile=f"{self.key} ({source})" if self.new is not None else "/dev/null",
        )
        return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _as_yaml(value: bytes) -> str:
    """A stored value shown as the YAML apply would write (its own text when it does not parse)."""
    try:
        return encode(yaml.safe_load(value)).decode("utf-8")
    except (yaml.YAMLError, UnicodeDecodeError):
        return value.decode("utf-8", "replace")


def _same(stored: bytes, document: Document) -> bool:
    """Whether a stored value parses to the document's value."""
    try:
        return bool(yaml.safe_load(stored) == document.value)
    except (yaml.YAMLError, UnicodeDecodeError):
        return False


def changes(desired: Desired, current: Mapping[str, KeyValue], *, prune: bool = False) -> list[Change]:
    """What an apply writes: new and changed keys, and with `prune` the keys the files lack."""
    found = [
        Change(key, current.get(key), data)
        for key, (document, data) in sorted(desired.entries.items())
        if key not in current or not _same(current[key].value, document)
    ]
    if prune:
        found += [Change(key, kv, None) for key, kv in sorted(current.items()) if key not in desired.entries]
    return found


def txn_ops(found: Iterable[Change], prefix: str) -> tuple[list[Compare], list[Put | Delete]]:
    """One transaction's compares (each key as it was read) and operations (with the
    last-change marker)."""
    compares: list[Compare] = []
    ops: list[Put | Delete] = []
    count = 0
    for change in found:
        key = change.key.encode("utf-8")
        if change.old is None:
            compares.append(Compare(key, "VERSION", "EQUAL", 0))
        else:
            compares.append(Compare(key, "MOD", "EQUAL", change.old.mod_revision))
        ops.append(Put(key, change.new) if change.new is not None else Delete(key))
        count += 1
    marker = {"by": f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}", "changes": count}
    ops.append(Put(last_change_key(prefix).encode("utf-8"), json.dumps(marker).encode("utf-8")))
    return compares, ops

