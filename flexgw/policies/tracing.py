"""`tracing-flex`: the per-API override of `Configuration.spec.tracing` (Flex 1.10).

Flex (docs `policies-included-tracing`): `config.sampling.{client, random, overall}`
(percentages, each documented as required with default 100), `spanName` (optional), `labels[]`
(`{name, type: environment|requestHeader|literal, keyName, defaultValue}`, default empty). It
takes effect only where tracing is enabled gateway-wide (an exporter is configured).

The binding configures the API's tracing decision when the plan is compiled
(flexgw.config.compile puts it on `Api.tracing`); it never runs per request.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from zope.interface import implementer

from flexgw.policies.base import BuildContext, IPolicy, IPolicyKind, PolicyContext
from flexgw.policies.registry import register

NAME = "tracing-flex"

_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
LABELS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name", "type"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "type": {"enum": ["environment", "requestHeader", "literal"]},
            "keyName": {"type": "string"},
            "defaultValue": {"type": "string"},
        },
    },
}
SAMPLING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"client": _PERCENT, "random": _PERCENT, "overall": _PERCENT},
}


@implementer(IPolicy)
@attrs.frozen
class TracingOverride:
    """An API's tracing settings (read by the compiler; not a chain member)."""

    sampling: dict[str, Any]
    labels: tuple[dict[str, Any], ...] = ()
    span_name: str | None = None

    chain_member = False
    response_phase = False

    def on_request(self, ctx: PolicyContext) -> None:
        """Never called (not a chain member)."""

    def on_response(self, ctx: PolicyContext) -> None:
        """Never called (not a chain member)."""


@implementer(IPolicyKind)
class TracingKind:
    """The `tracing-flex` kind."""

    name = NAME
    schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["sampling"],
        "additionalProperties": False,
        "properties": {
            "sampling": SAMPLING_SCHEMA,
            "spanName": {"type": "string", "minLength": 1},
            "labels": LABELS_SCHEMA,
        },
    }
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> TracingOverride:
        """The API's override."""
        return TracingOverride(
            sampling=dict(config.get("sampling") or {}),
            labels=tuple(config.get("labels") or ()),
            span_name=config.get("spanName"),
        )


register(TracingKind())
