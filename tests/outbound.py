"""Configuration helpers for outbound-policy tests: an ApiInstance routed to a `Service` resource, plus bindings on that Service."""

from __future__ import annotations

import textwrap

from twisted.trial.unittest import TestCase

from tests.harness import Gateway


def service_api(
    port: int, upstream_port: int, upstream_host: str = "127.0.0.1", scheme: str = "http"
) -> str:
    """ApiInstance `api` on 127.0.0.1:port, routed to Service `partner` at scheme://upstream_host:upstream_port."""
    return textwrap.dedent(
        f"""\
        apiVersion: gateway.mulesoft.com/v1alpha1
        kind: ApiInstance
        metadata: {{name: api}}
        spec:
          address: http://127.0.0.1:{port}
        ---
        apiVersion: gateway.mulesoft.com/v1alpha1
        kind: Service
        metadata: {{name: partner}}
        spec:
          address: {scheme}://{upstream_host}:{upstream_port}
        ---
        apiVersion: gateway.mulesoft.com/v1alpha1
        kind: PolicyBinding
        metadata: {{name: route}}
        spec:
          targetRef: {{kind: ApiInstance, name: api}}
          policyRef: {{name: route}}
          config:
            destinationRef: {{name: partner}}
        """
    )


def outbound_binding(name: str, policy: str, config: str, target: str = "partner") -> str:
    """A PolicyBinding of `policy` on Service `target`; `config` is YAML (indented by the caller or not)."""
    body = textwrap.indent(textwrap.dedent(config).strip("\n"), "    ")
    return (
        "---\napiVersion: gateway.mulesoft.com/v1alpha1\nkind: PolicyBinding\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  targetRef: {{kind: Service, name: {target}}}\n"
        f"  policyRef: {{name: {policy}}}\n"
        "  config:\n" + body + "\n"
    )


def start_outbound_gateway(
    case: TestCase, port: int, upstream_port: int, bindings: str,
    environ: dict[str, str] | None = None, extra: str = "",
) -> Gateway:
    """A started gateway: `service_api(...)` + `bindings` (+ `extra` documents)."""
    gateway = Gateway(case, {"api.yaml": service_api(port, upstream_port) + bindings + extra}, environ)
    gateway.start()
    return gateway
