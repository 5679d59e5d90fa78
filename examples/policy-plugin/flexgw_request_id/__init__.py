"""A worked third-party flexgw policy kind: `request-id-flex` gives every request an id.

Bind it like any Flex policy (see conf/custom-policy/). The request gets `headerName`
(default X-Request-Id) if the client did not send one (or always, with `overwrite: true`),
the upstream sees it, and the response echoes it. Install this directory
(`pip install examples/policy-plugin`) to register the kind through the `flexgw.policies`
entry point, or pass `--policy-module flexgw_request_id` with it on PYTHONPATH.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    PolicyConfigError,
    PolicyContext,
)
from flexgw.policies.registry import register


@implementer(IPolicy)
@attrs.frozen
class RequestIdPolicy:
    """One binding: which header carries the id, and whether a client's id is replaced."""

    header: bytes
    overwrite: bool

    def on_request(self, ctx: PolicyContext) -> None:
        """Give the request an id (synchronous: no Deferred)."""
        current = ctx.request_header(self.header)
        if current is None or self.overwrite:
            current = uuid.uuid4().hex.encode("ascii")
            ctx.set_request_header(self.header, current)
        ctx.vars["requestId"] = current.decode("latin-1")
        ctx.add_response_header(self.header, current)

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing to do: the id was added to whatever response goes back."""


@implementer(IPolicyKind)
class RequestIdKind:
    """The `request-id-flex` kind: its config schema and its builder."""

    name = "request-id-flex"
    phase = "inbound"
    schema: dict[str, Any] = {  # noqa: RUF012 (a constant)
        "type": "object",
        "properties": {
            "headerName": {"type": "string", "minLength": 1},
            "overwrite": {"type": "boolean"},
        },
        "additionalProperties": False,
    }

    def build(self, config: dict[str, Any], context: BuildContext) -> RequestIdPolicy:
        """Check what the schema cannot (a valid header name) and build the policy."""
        name = config.get("headerName", "X-Request-Id")
        if not all(c.isalnum() or c in "-_" for c in name):
            raise PolicyConfigError(f"{name!r} is not a header name", "headerName")
        return RequestIdPolicy(name.encode("ascii"), bool(config.get("overwrite", False)))


KIND = register(RequestIdKind())
