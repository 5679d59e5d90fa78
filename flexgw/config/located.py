"""Located pieces of checked resources, for error messages: `Origin` (a field of a resource's
document) and `last_configuration_block` (which Configuration's `spec.<key>` applies).

Below resolve and the Configuration parsers (forward proxy, logging, shared storage) that all
use it, so none of them imports resolve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from flexgw.config.sources import Document, FieldPath
from flexgw.config.validate import Resource, dotted
from flexgw.plan import Problem


@attrs.frozen
class Origin:
    """Where a resolved object was written, for error messages."""

    document: Document
    path: FieldPath
    resource: str

    def problem(
        self, severity: str, message: str, sub: FieldPath = (), at_key: bool = False
    ) -> Problem:
        """A Problem located at `path + sub` in this origin's document."""
        full = self.path + sub
        return self.document.problem(
            severity, message, full, at_key=at_key, resource=self.resource, field=dotted(full) or None
        )


def origin_of(resource: Resource, path: FieldPath = ()) -> Origin:
    """The Origin of `path` (a field path) in `resource`."""
    return Origin(resource.document, path, str(resource.id))


def last_configuration_block(
    configurations: Sequence[Resource], key: str, problems: list[Problem]
) -> tuple[dict[str, Any], Origin] | None:
    """`spec.<key>` of the last Configuration that has it, whole (a block is not merged key by
    key), and where it is; a different earlier block gets an "overrides" warning."""
    chosen: tuple[dict[str, Any], Origin] | None = None
    for resource in configurations:
        block = resource.spec.get(key)
        if not isinstance(block, dict):
            continue
        origin = origin_of(resource, ("spec", key))
        if chosen is not None and chosen[0] != block:
            problems.append(
                origin.problem("warning", f"overrides the value set in {chosen[1].resource}")
            )
        chosen = (block, origin)
    return chosen
