"""`Configuration.spec.tracing` (Flex 1.10, `gateway.mulesoft.com/v1beta1`) and the per-API
`tracing-flex` override, read into TracingSettings (export) and a Sampler per API (decision).

Flex keys: `provider.type: opentelemetry` with `properties.address` (`h2://host:4317`: OTLP over
gRPC; flexgw also takes `h2s://host:4317` or `grpcs://`, or `https://` with `serviceType: grpc`:
OTLP/gRPC over TLS, and `http(s)://host:4318[/v1/traces]`: OTLP/HTTP), `serviceType`,
`serviceName`, `timeout` (`10s`, `500ms` or seconds), `resourceAttributes` (a map);
`sampling.{client, random, overall}` (percentages, default 100); `labels[]`
`{name, type: environment|requestHeader|literal, keyName, defaultValue}`. Flex's `anypoint`
provider (Anypoint Monitoring) has no meaning in Local Mode here: a warning, tracing stays off.
Environment labels are read once, when the configuration is compiled. TLS to the collector uses
`Configuration.defaultTLS.outboundPolicyCalls` (the gateway's side-call TLS: trusted CA, client
certificate) when it is set, else the system trust store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from flexgw.config.located import last_configuration_block
from flexgw.http.tracecontext import Sampler, TraceLabel
from flexgw.plan import Problem, TracingSettings

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m)?\s*")


def duration(value: Any) -> float | None:
    """Seconds from `10s`, `500ms`, `1m` or a number (seconds); None when unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    match = _DURATION.fullmatch(str(value))
    if match is None or float(match.group(1)) <= 0:
        return None
    scale = {"ms": 0.001, "m": 60.0}.get(match.group(2) or "s", 1.0)
    return float(match.group(1)) * scale


def labels(raw: Any, environ: Mapping[str, str]) -> tuple[TraceLabel, ...]:
    """`labels[]` (schema-checked) as TraceLabels; environment ones read now (as literals)."""
    out = []
    for item in raw or ():
        kind = str(item.get("type", "literal"))
        key = str(item.get("keyName", ""))
        default = str(item.get("defaultValue", ""))
        if kind == "environment":
            out.append(TraceLabel(str(item["name"]), "literal", key, environ.get(key, default)))
        else:
            out.append(TraceLabel(str(item["name"]), kind, key, default))
    return tuple(out)


def sampler(sampling: Any, raw_labels: Any, environ: Mapping[str, str],
            span_name: str | None = None) -> Sampler:
    """A Sampler from a `sampling` block and `labels[]`."""
    sampling = sampling if isinstance(sampling, dict) else {}
    return Sampler(
        client=float(sampling.get("client", 100)),
        random=float(sampling.get("random", 100)),
        overall=float(sampling.get("overall", 100)),
        labels=labels(raw_labels, environ),
        span_name=span_name,
        environ=environ,
    )


def api_sampler(base: Sampler, override: Any) -> Sampler:
    """An API's Sampler: the gateway-wide one, or its `tracing-flex` binding's settings (whose
    labels come after the gateway's, and replace any of the same name)."""
    if override is None:
        return base
    own = sampler(override.sampling, override.labels, base.environ, override.span_name)
    names = {label.name for label in own.labels}
    kept = tuple(label for label in base.labels if label.name not in names)
    return attrs.evolve(own, labels=kept + own.labels)


def resolve_tracing(
    configurations: Sequence[Any], environ: Mapping[str, str], problems: list[Problem]
) -> tuple[TracingSettings, Sampler] | None:
    """The export settings and the gateway-wide Sampler of the last Configuration with
    `spec.tracing`; None when tracing is off (absent, or not exportable: reported)."""
    chosen = last_configuration_block(configurations, "tracing", problems)
    if chosen is None:
        return None
    block, origin = chosen
    provider = block.get("provider") or {}
    kind = provider.get("type", "opentelemetry")
    properties = provider.get("properties") or {}
    if kind != "opentelemetry":
        problems.append(origin.problem(
            "warning", f"provider type {kind!r} (Anypoint Monitoring) is not available in Local Mode"
            " here; use type: opentelemetry with properties.address; tracing is off",
            ("provider", "type")))
        return None
    address = str(properties.get("address") or "").strip()
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = parts.scheme.lower()
    grpc_type = str(properties.get("serviceType") or "").lower() == "grpc"
    secure = scheme in ("h2s", "grpcs") or (scheme == "https" and grpc_type)
    if scheme in ("h2", "h2c", "grpc", "h2s", "grpcs") or (grpc_type and scheme in ("http", "https")):
        protocol = "grpc"
        if port is None:
            port = 4317
    elif scheme in ("http", "https"):
        protocol = "http"
    else:
        protocol = ""
    if not protocol or not parts.hostname:
        problems.append(origin.problem(
            "error", f"address {address!r} is not h2://host:port (OTLP/gRPC; h2s:// over TLS) or"
            " http(s)://host:port (OTLP/HTTP); tracing is off", ("provider", "properties", "address")))
        return None
    if protocol == "grpc":
        host = parts.hostname
        scheme = "h2s" if secure else "h2c"
        address = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    elif parts.path in ("", "/"):
        address = address.rstrip("/") + "/v1/traces"
    timeout = duration(properties.get("timeout", 10))
    if timeout is None:
        problems.append(origin.problem(
            "warning", "timeout is not a duration such as 10s; 10s is used",
            ("provider", "properties", "timeout")))
        timeout = 10.0
    resource = properties.get("resourceAttributes") or {}
    delay = duration(properties.get("scheduleDelay", 0.5)) or 0.5
    settings = TracingSettings(
        address=address,
        protocol=protocol,
        service_name=str(properties.get("serviceName") or "flexgw"),
        service_type=str(properties.get("serviceType") or protocol),
        timeout=timeout,
        resource_attributes=tuple(sorted((str(k), str(v)) for k, v in resource.items())),
        max_queue=int(properties.get("maxQueueSize", 2048)),
        max_batch=int(properties.get("maxExportBatchSize", 512)),
        delay=delay,
    )
    return settings, sampler(block.get("sampling"), block.get("labels"), environ)
