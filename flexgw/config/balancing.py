"""`Service.spec.addresses` and `Service.spec.loadBalancer` (flexgw extensions): checked, then
compiled into the plan's `Balancing` (applied by flexgw.upstream.cluster)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from typing import Any

from flexgw.plan import Balancing, Endpoint
from flexgw.policies.expressions import ExpressionError, compile_value

FieldPath = tuple[str | int, ...]


def parse_endpoint(text: str, default_port: int) -> Endpoint:
    """`ip`, `ip:port`, `[ipv6]` or `[ipv6]:port` (weight 1); ValueError with the reason."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host, rest = text[1:end], text[end + 1 :]
        version = 6
    else:
        host, sep, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError("IPv6 addresses must be written in brackets, e.g. [::1]:8080")
        rest = sep + port_text
        version = 4
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (list IP addresses; a name goes in spec.address)"
        ) from None
    if parsed.version != version:
        raise ValueError("IPv6 addresses must be written in brackets, e.g. [::1]:8080")
    port = default_port
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"invalid port {rest[1:]!r}")
        port = int(rest[1:])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1..65535")
    return Endpoint(str(parsed), port)


def endpoints_of(raw: Any, default_port: int) -> Iterator[tuple[FieldPath, Endpoint | str]]:
    """Each entry of `spec.addresses` as (its field path, the Endpoint or the error text);
    a repeated address is an error at its second place."""
    seen: dict[tuple[str, int], int] = {}
    for n, item in enumerate(raw if isinstance(raw, list) else []):
        path: FieldPath = ("spec", "addresses", n)
        text, weight = item, 1
        if isinstance(item, dict):
            text, weight = item.get("address"), int(item.get("weight", 1))
            path = (*path, "address")
        if not isinstance(text, str):
            continue
        try:
            endpoint = parse_endpoint(text, default_port)
        except ValueError as exc:
            yield path, str(exc)
            continue
        key = (endpoint.host, endpoint.port)
        if key in seen:
            yield path, f"{text!r} repeats spec.addresses[{seen[key]}]"
            continue
        seen[key] = n
        yield path, Endpoint(endpoint.host, endpoint.port, weight)


def check_balancing(spec: Mapping[str, Any], default_port: int) -> Iterator[tuple[FieldPath, str]]:
    """The errors of a Service's `addresses` and `loadBalancer` a schema cannot catch."""
    for path, item in endpoints_of(spec.get("addresses"), default_port):
        if isinstance(item, str):
            yield path, item
    lb = spec.get("loadBalancer")
    if isinstance(lb, dict):
        low, high = lb.get("dnsMinRefreshSeconds", 5), lb.get("dnsMaxRefreshSeconds", 300)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            yield (
                ("spec", "loadBalancer", "dnsMinRefreshSeconds"),
                f"dnsMinRefreshSeconds ({low}) is above dnsMaxRefreshSeconds ({high})",
            )
    if isinstance(lb, dict) and isinstance(lb.get("hashOn"), str):
        try:
            _hash_on(lb["hashOn"])
        except ExpressionError as exc:
            yield ("spec", "loadBalancer", "hashOn"), f"invalid expression: {exc.message}"
        if lb.get("algorithm") not in ("ringHash", "maglev"):
            yield (
                ("spec", "loadBalancer", "hashOn"),
                "hashOn applies to the ringHash and maglev algorithms only",
            )


def _hash_on(text: str) -> Any:
    if text.strip() == "clientAddress":
        return "clientAddress"
    value = compile_value(text)
    if isinstance(value, str):
        raise ExpressionError("expected a #[...] expression or clientAddress", 0)
    return value


def balancing_of(spec: Mapping[str, Any], default_port: int) -> Balancing | None:
    """The Balancing of a checked Service spec (None: neither key is written)."""
    raw = spec.get("addresses")
    lb = spec.get("loadBalancer")
    if raw is None and lb is None:
        return None
    lb = lb or {}
    endpoints = tuple(
        item for _, item in endpoints_of(raw, default_port) if isinstance(item, Endpoint)
    )
    hash_source = lb.get("hashOn") or ""
    return Balancing(
        algorithm=lb.get("algorithm", "roundRobin"),
        endpoints=endpoints,
        hash_on=_hash_on(hash_source) if hash_source else None,
        hash_source=hash_source,
        dns_refresh=float(lb.get("dnsRefreshSeconds", 5)),
        dns_min_refresh=float(lb.get("dnsMinRefreshSeconds", 5)),
        dns_max_refresh=float(lb.get("dnsMaxRefreshSeconds", 300)),
        dns_failure_refresh=float(lb.get("dnsFailureRefreshSeconds", 30)),
        fail_open=lb.get("whenNoneHealthy", "failOpen") == "failOpen",
        panic_threshold=float(lb.get("panicThresholdPercent", 50)),
    )
