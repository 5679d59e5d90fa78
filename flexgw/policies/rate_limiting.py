"""`rate-limiting-flex`: fixed-window quotas per key, several limits at once, 429 when one is spent.

Flex behaviour reproduced (docs `policies-included-rate-limiting.adoc`, reference §2.2):
- `rateLimits` (required, one or more `{maximumRequests, timePeriodInMilliseconds}`): a request
  passes only if *every* limit has quota left in its current window; a refused request uses no
  quota. Each (key, limit) has a **fixed window** that starts at the key's first request
  ("lazy creation") and lasts `timePeriodInMilliseconds`; the quota resets when it ends and the
  next request starts the next window.
- `keySelector` (optional `#[...]` expression): one independent set of counters per value,
  rendered as text (`true`/`false`, numbers as DataWeave prints them); a missing value (null) is
  its own bucket, the empty string. Without it, one set of counters for the whole binding. A
  plain string (no `#[...]`) is one constant bucket, as a Connected Mode "regular String".
- `exposeHeaders` (default false): `x-ratelimit-limit` (the limit's maximumRequests),
  `x-ratelimit-remaining` and `x-ratelimit-reset` (milliseconds until the window ends) on every
  response of the policy, allowed (added to the upstream's response) and refused (on the 429).
  Names are written lower-case, as Envoy-based Flex puts them on the wire (the docs spell them
  `X-Ratelimit-*`; header names are case-insensitive).
- Refusal: **429** with `content-type: application/json` and `{"error":"Too Many Requests"}`
  (compact JSON, as observed on Flex).
- `clusterizable` (default true) and `blockOnUnknownQuota` (1.11+, default true) are accepted.
- `keySelector`, `exposeHeaders` and `clusterizable` are accepted inside a `rateLimits[]` item
  too (a field report found that working; the docs put them at the top level). A value given in
  several places must be the same everywhere (a config error otherwise, at the conflicting item).

Several limits and the headers: the values shown are those of the limit with the fewest requests
left (ties: the one whose window ends last); on a 429, of the spent limit whose window ends last,
so `x-ratelimit-reset` says when the request could pass. Flex documents no rule for this.

Deliberate differences from Flex:
- A 429 carries `retry-after` (whole seconds, rounded up, until every spent limit's window ends),
  as the flexgw policy issue asks; Flex sends none [obs].
- Storage: with `clusterizable: true` (the default) and `Configuration.spec.sharedStorage.redis`,
  the `RedisRateLimitStore` (`flexgw.storage.redis`: one atomic Lua script per request, keys
  `flexgw:rl:<api>:<binding>:<limits fingerprint>:<key value>`), so every gateway sharing the
  Redis shares the quota. Otherwise (no shared storage, or `clusterizable: false`) the
  in-process `MemoryRateLimitStore` (bounded memory: see `flexgw.storage.memory`), so quotas are
  per gateway process, which is what Flex does without Redis. `blockOnUnknownQuota` applies when
  the store cannot answer (Redis unreachable, timed out, refused AUTH, its TLS certificate not
  trusted, no sentinel naming a reachable master): true refuses with the
  same 429, false lets the request through. The memory store always
  answers.
- A 429 for an unknown quota is not a rate-limit rejection: it carries `x-flexgw-error:
  quota_unavailable` (the access log's `error` and the `flexgw_requests` metric's `cause` say
  the same, not `policy_rejected`), and every unknown-quota decision, refused or let through, is
  counted in `flexgw_rate_limit_unknown_quota{api,outcome}`. While Redis is known down (the
  store's breaker, `flexgw.storage.breaker`) the store fails at once, so the decision is
  immediate; the outage is logged by the store once when it starts and once when it ends, never
  per request; an error reply from a Redis that is up (out of memory, ACL) is logged by the
  store at a bounded rate. Any other store failure (a bug) is logged with its traceback. Under `--workers N` (N > 1) without Redis, the counters are held by the supervisor
  process and reached over AMP (`flexgw.storage.supervised`), so the quota is exact across the
  workers whatever `clusterizable` says (the workers are one gateway).
- A rejected request that finds one of the key's windows ended opens that limit's next window
  (it is "the first request" of it), although it is counted in none.

Counters and reloads: a reload rebuilds every policy object. The store lives in
`context.services.shared` (the gateway's policy runtime, which survives reloads) under
`rate-limiting-flex:<api>:<binding>`, together with a fingerprint of the limits and key
selector: a rebuilt binding with the same limits and key selector keeps its counters; a changed
one starts from zero (and replaces the old store, so at most one store per binding and API is
kept). Without `services` (e.g. `flexgw validate`, unit tests) the store is private to the
policy object.

Time comes from `context.clock`; when none was given, the global reactor is taken at the first
request (never at build time, so `flexgw validate` needs no reactor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    PolicyServices,
)
from flexgw.policies.expressions import Expression, ExpressionError, compile_value, to_text
from flexgw.policies.registry import register
from flexgw.storage.interfaces import HitResult, Quota, RateLimit, StoreUnavailable
from flexgw.storage.memory import MemoryRateLimitStore
from flexgw.storage.redis import RedisRateLimitStore
from flexgw.storage.supervised import SupervisedRateLimitStore

NAME = "rate-limiting-flex"

_log = Logger(namespace="flexgw.policies.rate_limiting")

LIMIT_HEADER = b"x-ratelimit-limit"
REMAINING_HEADER = b"x-ratelimit-remaining"
RESET_HEADER = b"x-ratelimit-reset"
RETRY_AFTER = b"retry-after"
TOO_MANY_BODY = b'{"error":"Too Many Requests"}'
JSON = (b"content-type", b"application/json")
#: The cause of a 429 given because the store could not answer (blockOnUnknownQuota).
QUOTA_UNAVAILABLE = "quota_unavailable"
UNKNOWN_QUOTA_RESPONSE = LocalResponse(
    429, (JSON, (b"x-flexgw-error", QUOTA_UNAVAILABLE.encode("ascii"))), TOO_MANY_BODY,
    QUOTA_UNAVAILABLE,
)

_NESTABLE = {
    "keySelector": {"type": "string"},
    "exposeHeaders": {"type": "boolean"},
    "clusterizable": {"type": "boolean"},
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rateLimits": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "maximumRequests": {"type": "integer", "minimum": 1},
                    "timePeriodInMilliseconds": {"type": "integer", "minimum": 1},
                    **_NESTABLE,
                },
                "required": ["maximumRequests", "timePeriodInMilliseconds"],
                "additionalProperties": False,
            },
        },
        **_NESTABLE,
        "blockOnUnknownQuota": {"type": "boolean"},
    },
    "required": ["rateLimits"],
    "additionalProperties": False,
}


def too_many_requests(headers: Sequence[tuple[bytes, bytes]] = ()) -> LocalResponse:
    """Flex's 429: `{"error":"Too Many Requests"}`, plus the given headers."""
    return LocalResponse(429, (JSON, *headers), TOO_MANY_BODY)


def quota_headers(quota: Quota) -> tuple[tuple[bytes, bytes], ...]:
    """The three `x-ratelimit-*` headers for one limit's quota."""
    return (
        (LIMIT_HEADER, b"%d" % quota.limit.maximum_requests),
        (REMAINING_HEADER, b"%d" % quota.remaining),
        (RESET_HEADER, b"%d" % quota.reset_ms),
    )


def shown_quota(result: HitResult) -> Quota:
    """The limit whose values the headers show (see the module docstring)."""
    quotas = result.quotas
    if len(quotas) == 1:
        return quotas[0]
    if not result.allowed:
        spent = [q for q in quotas if q.remaining <= 0]
        return max(spent, key=lambda q: q.reset_ms)
    return min(quotas, key=lambda q: (q.remaining, -q.reset_ms))


def retry_after_seconds(result: HitResult) -> int:
    """Whole seconds (rounded up, at least 1) until every spent limit has quota again."""
    wait = max((q.reset_ms for q in result.quotas if q.remaining <= 0), default=0)
    return max(1, -(-wait // 1000))


@attrs.frozen
class RateLimitConfig:
    """One binding's validated configuration."""

    limits: tuple[RateLimit, ...]
    key_selector: Expression | str | None = None
    expose_headers: bool = False
    clusterizable: bool = True
    block_on_unknown_quota: bool = True

    def fingerprint(self) -> str:
        """What decides whether counters survive a reload: the limits and the key selector."""
        selector = self.key_selector
        source = selector if isinstance(selector, str) or selector is None else selector.source
        text = repr(([(lim.maximum_requests, lim.period_ms) for lim in self.limits], source))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _merged(config: dict[str, Any], key: str, default: Any) -> tuple[Any, str]:
    """A key accepted at the top level and inside `rateLimits[]` items: (value, field path)."""
    found: list[tuple[str, Any]] = []
    if key in config:
        found.append((key, config[key]))
    for index, item in enumerate(config["rateLimits"]):
        if key in item:
            found.append((f"rateLimits.{index}.{key}", item[key]))
    if not found:
        return default, key
    first_field, first_value = found[0]
    for field, value in found[1:]:
        if value != first_value:
            raise PolicyConfigError(
                f"{key} is given different values at {first_field} and {field};"
                " a rate-limiting-flex binding has one",
                field,
            )
    return first_value, first_field


def parse_config(config: dict[str, Any]) -> RateLimitConfig:
    """Validate a binding's config (already schema-checked) into a RateLimitConfig."""
    limits = tuple(
        RateLimit(int(item["maximumRequests"]), int(item["timePeriodInMilliseconds"]))
        for item in config["rateLimits"]
    )
    selector_text, selector_field = _merged(config, "keySelector", None)
    selector: Expression | str | None = None
    if selector_text is not None:
        try:
            selector = compile_value(selector_text)
        except ExpressionError as exc:
            raise PolicyConfigError(
                f"invalid expression at offset {exc.offset}: {exc.message}", selector_field
            ) from None
    expose, _ = _merged(config, "exposeHeaders", False)
    clusterizable, _ = _merged(config, "clusterizable", True)
    return RateLimitConfig(
        limits=limits,
        key_selector=selector,
        expose_headers=bool(expose),
        clusterizable=bool(clusterizable),
        block_on_unknown_quota=bool(config.get("blockOnUnknownQuota", True)),
    )


@implementer(IPolicy)
class RateLimitPolicy:
    """One binding: its config and its counter store (shared by every request of the binding)."""

    __slots__ = (
        "_counted", "_store", "binding", "clock", "config", "constant_key", "expose", "limits",
        "unknown", "unknown_key",
    )

    def __init__(
        self, config: RateLimitConfig, store: Any, clock: Any, binding: str,
        api: str | None = None, unknown: dict[tuple[str | None, str], int] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.binding = binding
        self.limits = config.limits
        self.expose = config.expose_headers
        self._store: Any = None
        self._counted: Any = None
        self.store = store  # None until the first request when no clock was given
        selector = config.key_selector
        self.constant_key = "" if selector is None else selector if isinstance(selector, str) else None
        # unknown-quota decisions, (api, "refused" | "allowed") -> count (PolicyRuntime's, read
        # by the metrics collector; a private dict without one)
        self.unknown = {} if unknown is None else unknown
        self.unknown_key = (api, "refused" if config.block_on_unknown_quota else "allowed")

    @property
    def store(self) -> Any:
        """The counter store (None until the first request when no clock was given)."""
        return self._store

    @store.setter
    def store(self, store: Any) -> None:
        self._store = store
        # The store's `counted` (MemoryRateLimitStore's) when the response needs no quota
        # figures: an allowed request then costs no HitResult. None otherwise.
        self._counted = None if self.expose else getattr(store, "counted", None)

    def key(self, ctx: PolicyContext) -> str:
        """The counter key of this request (an evaluation error propagates: a 500)."""
        if self.constant_key is not None:
            return self.constant_key
        selector = self.config.key_selector
        assert isinstance(selector, Expression)
        return to_text(selector.evaluate(ctx.expression_context()))

    def on_request(self, ctx: PolicyContext) -> Any:
        """Count the request; None when every limit had quota, else a 429."""
        key = self.constant_key
        if key is None:
            key = self.key(ctx)
        counted = self._counted
        if counted is not None and counted(key, self.limits):
            return None  # allowed, and no headers to add
        store = self._store
        if store is None:
            store = self._first_use()
        try:
            result = store.hit(key, self.limits)
        except StoreUnavailable:  # known down: decided at once, the store logs the outage
            return self._unavailable()
        except Exception:  # noqa: BLE001 (an unreachable store is decided by blockOnUnknownQuota)
            return self._unknown(Failure())
        if isinstance(result, Deferred):
            return result.addCallbacks(self._decide, self._unknown, callbackArgs=(ctx,))
        if result.allowed and not self.expose:
            return None
        return self._decide(result, ctx)

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing: headers were added in the request phase (they reach any response)."""

    def _decide(self, result: HitResult, ctx: PolicyContext) -> LocalResponse | None:
        """Turn the store's answer into the request's fate and headers."""
        if result.allowed:
            if self.config.expose_headers:
                quota = shown_quota(result)
                ctx.add_response_header(LIMIT_HEADER, b"%d" % quota.limit.maximum_requests)
                ctx.add_response_header(REMAINING_HEADER, b"%d" % quota.remaining)
                ctx.add_response_header(RESET_HEADER, b"%d" % quota.reset_ms)
            return None
        headers: tuple[tuple[bytes, bytes], ...] = (
            (RETRY_AFTER, b"%d" % retry_after_seconds(result)),
        )
        if self.config.expose_headers:
            headers = quota_headers(shown_quota(result)) + headers
        return too_many_requests(headers)

    def _unknown(self, failure: Failure) -> LocalResponse | None:
        """The store could not answer: refuse or let through per blockOnUnknownQuota (logged
        here unless the store said it is unavailable: it logs its outages itself)."""
        if not failure.check(StoreUnavailable):
            _log.failure(
                "Rate limit store failed for {binding}; request {outcome} (blockOnUnknownQuota)",
                failure,
                binding=self.binding,
                outcome=self.unknown_key[1],
            )
        return self._unavailable()

    def _unavailable(self) -> LocalResponse | None:
        """Count one unknown-quota decision; the 429 `quota_unavailable`, or None (let through)."""
        unknown = self.unknown
        key = self.unknown_key
        unknown[key] = unknown.get(key, 0) + 1
        return UNKNOWN_QUOTA_RESPONSE if self.config.block_on_unknown_quota else None

    def _first_use(self) -> Any:
        """No clock was given at build time: use the global reactor's, from now on."""
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self.store = MemoryRateLimitStore(self.clock)
        return self._store


def _shared_store(
    services: PolicyServices, key: str, fingerprint: str, clock: Any
) -> MemoryRateLimitStore | None:
    """The binding's store from the reload-surviving registry (created or replaced as needed)."""
    shared = services.shared
    if shared is None or clock is None:
        return None
    kept = shared.get(key)
    if kept is not None and kept[0] == fingerprint:
        store: MemoryRateLimitStore = kept[1]
        return store
    store = MemoryRateLimitStore(clock)
    shared[key] = (fingerprint, store)
    return store


@implementer(IPolicyKind)
class RateLimitKind:
    """The `rate-limiting-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> RateLimitPolicy:
        """Validate the config and find (or make) the binding's counter store."""
        parsed = parse_config(config)
        services = context.services
        clock = context.clock if context.clock is not None else services.clock
        unknown = services.unknown_quota
        redis = services.redis if parsed.clusterizable else None
        store: Any
        if redis is not None and clock is not None:
            namespace = f"flexgw:rl:{context.api}:{context.binding}:{parsed.fingerprint()[:16]}:"
            store = RedisRateLimitStore(redis, clock, namespace)
        elif services.supervisor is not None:
            # --workers: one quota for every worker, in the supervisor
            namespace = f"{NAME}:{context.api}:{context.binding}:{parsed.fingerprint()}"
            store = SupervisedRateLimitStore(services.supervisor, namespace)
        else:
            store = _shared_store(
                services, f"{NAME}:{context.api}:{context.binding}", parsed.fingerprint(), clock
            )
            if store is None and clock is not None:
                store = MemoryRateLimitStore(clock)
        return RateLimitPolicy(parsed, store, clock, context.binding, context.api, unknown)


KIND = register(RateLimitKind())
