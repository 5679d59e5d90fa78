"""The registry of policy kinds: built-ins, plus third-party kinds from the `flexgw.policies` entry point."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from twisted.logger import Logger
from zope.interface.verify import verifyObject

from flexgw.policies.base import IPolicyKind

_log = Logger(namespace="flexgw.policies")

#: Modules whose import registers the built-in kinds (each calls `register`).
BUILTIN_MODULES: tuple[str, ...] = (
    "flexgw.policies.timeouts",
    "flexgw.policies.json_threat",
    "flexgw.policies.xml_threat",
    "flexgw.policies.message_logging",
    "flexgw.policies.basic_auth",
    "flexgw.policies.ip_filter",
    "flexgw.policies.client_id",
    "flexgw.policies.jwt_validation",
    "flexgw.policies.introspection",
    "flexgw.policies.ldap_auth",
    "flexgw.policies.ext_authz",
    "flexgw.policies.ext_proc",
    "flexgw.policies.oidc",
    "flexgw.policies.rate_limiting",
    "flexgw.policies.spike_control",
    "flexgw.policies.cors",
    "flexgw.policies.headers",
    "flexgw.policies.credential_injection",
    "flexgw.policies.oauth2_injection",
    "flexgw.policies.circuit_breaker",
    "flexgw.policies.tls",
    "flexgw.policies.forward_proxy",
    "flexgw.policies.tracing",
    "flexgw.policies.upstream_resilience",
    "flexgw.policies.http_caching",
    "flexgw.policies.injection_protection",
    "flexgw.policies.graphql_limits",
    "flexgw.policies.spec_validation",
    "flexgw.policies.soap_validation",
    "flexgw.policies.javascript_scripting",
)

_kinds: dict[str, Any] = {}
_loaded = False


def register(kind: Any) -> Any:
    """Register a policy kind (an object providing IPolicyKind); returns it (usable as decorator)."""
    verifyObject(IPolicyKind, kind)
    _kinds[kind.name] = kind
    return kind


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for entry in entry_points(group="flexgw.policies"):
        try:
            loaded = entry.load()
            for kind in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
                register(kind)
        except Exception:  # noqa: BLE001 (a broken plugin must not stop the gateway)
            _log.failure("Cannot load policy plugin {entry}", entry=entry.name)


def load_modules(names: list[str] | tuple[str, ...]) -> None:
    """Import third-party policy modules by dotted name (each calls `register` on import).

    For kinds not installed as a distribution with a `flexgw.policies` entry point: e.g.
    `twistd flexgw --policy-module mycompany.policies` with the module on PYTHONPATH.
    An import error propagates: a gateway must not start without a policy its config names.
    """
    import importlib

    _load()
    for name in names:
        importlib.import_module(name)


def lookup(name: str) -> Any | None:
    """The kind registered as `name`, or None."""
    _load()
    return _kinds.get(name)


def names() -> list[str]:
    """Every registered kind's name."""
    _load()
    return sorted(_kinds)


def unregister(name: str) -> None:
    """Remove a registered kind (tests register kinds of their own)."""
    _kinds.pop(name, None)
