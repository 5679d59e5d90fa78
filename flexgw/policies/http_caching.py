"""`http-caching-flex`: answer repeated requests from a bounded cache of whole upstream responses.

Flex (docs `policies-included-http-caching.adoc`, 1.0+; reference §2.2): keys `httpCachingKey`
(default `#[attributes.requestPath]`), `maxCacheEntries` (10000), `ttl` (600 s),
`useHttpCacheHeaders` (true), `invalidationHeader` (""), `requestExpression`
(`#[attributes.method == 'GET' or attributes.method == 'HEAD']`), `responseExpression`
(`#[[200, 203, 204, 206, 300, 301, 404, 405, 410, 414, 501] contains attributes.statusCode]`),
`distributed` (false: shared through the configured Redis when true), `persistCache` (false).
No status of its own. Policies ordered after this one do not run for a response served from the
cache (Flex says the same: put authentication and rate limiting before it).

How a request goes:
- With `invalidationHeader` set, a request carrying that header with the value `invalidate`
  drops the entry of its key, `invalidate-all` drops every entry of the binding (Mule's values);
  the request then goes on as a miss.
- `requestExpression` false: not cached, no further work (no response phase).
- The key is `httpCachingKey` evaluated on the request. A fresh entry answers at once (a function
  call, no Deferred, in memory) with the stored status, headers and body plus `Age`; HEAD is
  answered from the GET entry without its body.
- A miss goes upstream. Concurrent misses for one key are coalesced: the first goes upstream, the
  others wait for it and are answered from the entry it stored (when it stored none, or after
  `COALESCE_WAIT` seconds, each goes upstream itself).
- The response is stored when `responseExpression` holds, it is whole (no trailers, not cut
  off, `Content-Length` or chunked/close-delimited body) and at most `MAX_ENTRY_BYTES`, and it
  is not `text/event-stream`. A response over the size limit or a stream is passed through
  untouched as it arrives (the collector drops what it held at the limit); nothing waits for a
  body to finish before forwarding.

With `useHttpCacheHeaders` (RFC 9111, as a shared cache):
- request `Cache-Control: no-cache` (or `Pragma: no-cache` without Cache-Control) goes upstream
  (its response may be stored); `no-store` is neither served nor stored; `max-age=N` accepts an
  entry at most N s old, `min-fresh=N` one fresh for N s more; `only-if-cached` on a miss is 504.
- response `no-store`, `private`, `no-cache` (flexgw does not revalidate) and `Vary: *` are not
  stored; a response to a request with `Authorization` only with `public`, `s-maxage` or
  `must-revalidate` (§3.5). Freshness: `s-maxage`, else `max-age`, else `Expires` − `Date`,
  else `ttl`; minus the upstream's `Age`. `Vary` is honoured: the entry keeps the request's values
  of the named headers and only requests with the same values use it (one variant per key).
Without it, every stored response lives `ttl` seconds and request directives are ignored.

Storage: in memory, per binding, an LRU bounded by `maxCacheEntries` and by `maxCacheBytes`
bytes of bodies (kept across config reloads while the binding's config is unchanged). With
`distributed: true` and `Configuration.sharedStorage.redis`, entries live in Redis
(`flexgw:cache:<api>:<binding>:<key>`, `SET ... PX <freshness>`), so replicas share one cache: one
GET per request; while Redis is down (the storage breaker) requests go upstream, uncached.

Deliberate differences from Flex:
- `maxCacheBytes` (default 64 MiB) is a flexgw key bounding the memory the bodies take, and one
  response is cached only up to `MAX_ENTRY_BYTES` (1 MiB, Flex's body buffer limit): Flex has no
  byte bound, and 10000 entries of any size is no bound at all.
- Responses with `Set-Cookie` are never stored (another client's session must not be replayed),
  even with `useHttpCacheHeaders: false`.
- `persistCache: true` without Redis keeps the cache across config reloads only (flexgw has no
  file store); with `distributed` the entries are in Redis and survive restarts either way.
- In distributed mode `maxCacheEntries` is not enforced (entries expire with their freshness;
  bound Redis with its `maxmemory` policy), and coalescing is per replica.
- A key, request or response expression that fails on a request leaves that request uncached
  (Flex does not document this case) instead of failing it.
- A cached 204 is answered with `Content-Length: 0` (local answers always carry a length).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from email.utils import parsedate_to_datetime
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyConfigError,
    PolicyContext,
    UsesRuntime,
)
from flexgw.policies.expressions import (
    EvaluationError,
    Expression,
    ExpressionError,
    compile_value,
    to_text,
)
from flexgw.policies.registry import register

NAME = "http-caching-flex"
_log = Logger(namespace="flexgw.policies.http_caching")

DEFAULT_KEY = "#[attributes.requestPath]"
DEFAULT_REQUEST = "#[attributes.method == 'GET' or attributes.method == 'HEAD']"
DEFAULT_RESPONSE = (
    "#[[200, 203, 204, 206, 300, 301, 404, 405, 410, 414, 501] contains attributes.statusCode]"
)
#: The largest response body kept (Flex's 1 MiB body buffer limit).
MAX_ENTRY_BYTES = 1024 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: How long a coalesced miss waits for the request it joined before going upstream itself.
COALESCE_WAIT = 15.0

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "httpCachingKey": {"type": "string", "minLength": 1, "default": DEFAULT_KEY},
        "maxCacheEntries": {"type": "integer", "minimum": 1, "default": 10000},
        "ttl": {"type": "integer", "minimum": 1, "default": 600},
        "useHttpCacheHeaders": {"type": "boolean", "default": True},
        "invalidationHeader": {"type": "string", "default": ""},
        "requestExpression": {"type": "string", "minLength": 1, "default": DEFAULT_REQUEST},
        "responseExpression": {"type": "string", "minLength": 1, "default": DEFAULT_RESPONSE},
        "distributed": {"type": "boolean", "default": False},
        "persistCache": {"type": "boolean", "default": False},
        "maxCacheBytes": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_BYTES},
    },
    "additionalProperties": False,
}

#: Response headers never stored (recomputed on a hit, or per-connection).
_NOT_STORED = frozenset({b"age", b"content-length", b"transfer-encoding", b"connection"})


# -- Cache-Control ------------------------------------------------------------------------------


def parse_cache_control(values: list[bytes]) -> dict[str, str | None]:
    """Directives of every `Cache-Control` value: lower-case name -> argument (None if none)."""
    directives: dict[str, str | None] = {}
    for value in values:
        for part in value.decode("latin-1").split(","):
            name, sep, arg = part.strip().partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument = arg.strip().strip('"') if sep else None
            directives.setdefault(name, argument)
    return directives


def _seconds(value: str | None) -> int | None:
    """A delta-seconds argument (RFC 9111 §1.2.2), None when missing or not a number."""
    if value is None or not value.isdigit():
        return None
    return int(value)


def _http_date(value: bytes | None) -> float | None:
    """An HTTP-date as a POSIX time, None when missing or invalid."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _values(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], name: bytes) -> list[bytes]:
    """Every value of a header (lower-case `name`)."""
    return [v for n, v in headers if n.lower() == name]


def freshness_lifetime(
    directives: dict[str, str | None], headers: list[tuple[bytes, bytes]], default: int
) -> int:
    """RFC 9111 §4.2.1 for a shared cache: s-maxage, max-age, Expires − Date, else `default`."""
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = _seconds(directives[name])
            return 0 if seconds is None else seconds
    expires = _values(headers, b"expires")
    if expires:
        when = _http_date(expires[0])
        if when is None:
            return 0  # an invalid Expires means "already expired" (§5.3)
        dates = _values(headers, b"date")
        date = _http_date(dates[0]) if dates else None
        if date is not None:
            return max(0, int(when - date))
    return default


# -- entries and stores -------------------------------------------------------------------------


@attrs.frozen
class Entry:
    """One stored response: what to answer, when it was stored and for how long it is fresh."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored: float  # clock time it was stored
    lifetime: float  # seconds of freshness from `stored` (already less the upstream's Age)
    initial_age: int = 0  # the upstream's Age when stored
    vary: tuple[tuple[bytes, bytes | None], ...] = ()  # (lower-case request header, its value)

    def age(self, now: float) -> float:
        """Seconds old now (RFC 9111 §4.2.3, from the upstream's Age and our storing time)."""
        return self.initial_age + max(0.0, now - self.stored)

    def fresh(self, now: float) -> bool:
        """Still fresh."""
        return now - self.stored < self.lifetime

    def matches(self, headers: Any) -> bool:
        """The request has the values of the headers named by `Vary` that this entry was for."""
        for name, value in self.vary:
            if _joined(headers, name) != value:
                return False
        return True

    def response(self, now: float) -> LocalResponse:
        """The answer for a hit, with `Age` (for a HEAD the front sends the head only, with the
        body's Content-Length, as for GET)."""
        headers = (*self.headers, (b"Age", b"%d" % int(self.age(now))))
        cause = "cache_hit" if self.status >= 400 else None
        return LocalResponse(self.status, headers, self.body, cause)

    def encode(self) -> bytes:
        """For Redis: a JSON head line, then the body."""
        head = {
            "s": self.status,
            "h": [[base64.b64encode(n).decode(), base64.b64encode(v).decode()] for n, v in self.headers],
            "t": self.stored,
            "l": self.lifetime,
            "a": self.initial_age,
            "v": [[n.decode("latin-1"), None if v is None else v.decode("latin-1")] for n, v in self.vary],
        }
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """The inverse of `encode` (ValueError/KeyError on garbage)."""
        line, _, body = data.partition(b"\n")
        head = json.loads(line)
        return cls(
            int(head["s"]),
            tuple((base64.b64decode(n), base64.b64decode(v)) for n, v in head["h"]),
            body,
            float(head["t"]),
            float(head["l"]),
            int(head["a"]),
            tuple((n.encode("latin-1"), None if v is None else v.encode("latin-1")) for n, v in head["v"]),
        )


def _joined(headers: Any, lname: bytes) -> bytes | None:
    """All values of a request header joined with ", " (None when absent)."""
    found = [v for n, v in headers if n.lower() == lname]
    if not found:
        return None
    return found[0] if len(found) == 1 else b", ".join(found)


class MemoryCache:
    """An LRU of entries bounded by count and by body bytes (one per binding)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, marked most recently used."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        """Store (replacing), then evict the least recently used past the bounds."""
        self.delete(key)
        self.entries[key] = entry
        self.bytes += len(entry.body)
        entries = self.entries
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            _, old = entries.popitem(last=False)
            self.bytes -= len(old.body)

    def delete(self, key: str) -> None:
        """Drop one entry."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.body)

    def clear(self) -> None:
        """Drop every entry."""
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)


#: Deletes every key under a prefix with SCAN (not KEYS), in one script.
_CLEAR_SCRIPT = """
local cursor = "0"
local removed = 0
repeat
  local reply = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 500)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    redis.call("DEL", key)
    removed = removed + 1
  end
until cursor == "0"
return removed
"""
_CLEAR_SHA = hashlib.sha1(_CLEAR_SCRIPT.encode()).hexdigest()


class RedisCache:
    """Entries in Redis under one prefix per binding; every call answers a Deferred."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, key: str) -> bytes:
        raw = key.encode("utf-8")
        if len(raw) > 200:
            raw = b"sha256:" + hashlib.sha256(raw).hexdigest().encode()
        return self.prefix.encode("utf-8") + raw

    def get(self, key: str) -> Deferred[Entry | None]:
        """The entry, None when absent or unreadable."""

        def parse(data: Any) -> Entry | None:
            if not data:
                return None
            try:
                return Entry.decode(bytes(data))
            except (ValueError, KeyError, TypeError):
                return None

        return self.client.execute(b"GET", self._key(key)).addCallback(parse)

    def put(self, key: str, entry: Entry) -> Deferred[Any]:
        """Store with a Redis expiry of the entry's freshness."""
        milliseconds = max(1, int(entry.lifetime * 1000))
        return self.client.execute(b"SET", self._key(key), entry.encode(), b"PX", b"%d" % milliseconds)

    def delete(self, key: str) -> Deferred[Any]:
        """Drop one entry."""
        return self.client.execute(b"DEL", self._key(key))

    def clear(self) -> Deferred[Any]:
        """Drop every entry of the binding."""
        pattern = self.prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
        pattern = pattern.replace("[", "\\[") + "*"
        return self.client.evalsha(_CLEAR_SHA, _CLEAR_SCRIPT, [], [pattern.encode("utf-8")])


# -- per request --------------------------------------------------------------------------------


class Collector:
    """The response tap of a miss: keeps the body until it passes `limit` bytes."""

    __slots__ = ("abandoned", "chunks", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.abandoned = False

    def feed(self, data: bytes) -> None:
        """A piece of the body on its way downstream."""
        if self.abandoned:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.abandon()
            return
        self.chunks.append(data)

    def abandon(self) -> None:
        """This response will not be stored (too large, trailers)."""
        self.abandoned = True
        self.chunks = []

    def body(self) -> bytes:
        """The whole body collected."""
        return b"".join(self.chunks)


class _Miss:
    """What a request that went upstream needs in its later phases."""

    __slots__ = ("collector", "entry", "key", "leader", "store")

    def __init__(self, key: str, store: bool, leader: bool) -> None:
        self.key = key
        self.store = store  # the request allows storing its response
        self.leader = leader  # other requests for this key wait for this one
        self.collector: Collector | None = None
        self.entry: tuple[int, tuple[tuple[bytes, bytes], ...], float, int, tuple[Any, ...]] | None = None


class _InFlight:
    """A miss on its way upstream and the requests waiting for its entry."""

    __slots__ = ("started", "waiters")

    def __init__(self, started: float) -> None:
        self.started = started
        self.waiters: list[Deferred[Any]] = []


@attrs.frozen
class CachingConfig:
    """The checked config of one binding."""

    key: Expression | str
    request: Expression
    response: Expression
    ttl: int
    use_headers: bool
    invalidation_header: bytes  # lower-case, b"" when unset
    max_entries: int
    max_bytes: int
    distributed: bool
    persist: bool


def _expression(config: dict[str, Any], field: str, default: str) -> Expression | str:
    text = config.get(field, default)
    try:
        return compile_value(text)
    except ExpressionError as exc:
        raise PolicyConfigError(f"invalid expression: {exc}", field) from None


def parse_config(config: dict[str, Any]) -> CachingConfig:
    """Check and normalise a binding's config (the schema has checked types)."""
    request = _expression(config, "requestExpression", DEFAULT_REQUEST)
    response = _expression(config, "responseExpression", DEFAULT_RESPONSE)
    for field, value in (("requestExpression", request), ("responseExpression", response)):
        if not isinstance(value, Expression):
            raise PolicyConfigError("must be an expression, #[...]", field)
    header = config.get("invalidationHeader", "") or ""
    if header and not all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={} ' for c in header):
        raise PolicyConfigError("not a valid header name", "invalidationHeader")
    return CachingConfig(
        key=_expression(config, "httpCachingKey", DEFAULT_KEY),
        request=request,  # type: ignore[arg-type]
        response=response,  # type: ignore[arg-type]
        ttl=int(config.get("ttl", 600)),
        use_headers=bool(config.get("useHttpCacheHeaders", True)),
        invalidation_header=header.lower().encode("ascii"),
        max_entries=int(config.get("maxCacheEntries", 10000)),
        max_bytes=int(config.get("maxCacheBytes", DEFAULT_MAX_BYTES)),
        distributed=bool(config.get("distributed", False)),
        persist=bool(config.get("persistCache", False)),
    )


@implementer(IPolicy)
class HttpCachingPolicy(UsesRuntime):
    """One binding's cache: answers hits, coalesces misses, stores whole responses."""

    needs_body = False

    def __init__(
        self, config: CachingConfig, cache: Any, reactor: Any, clock: Any, binding: str
    ) -> None:
        self.config = config
        self.cache = cache  # MemoryCache, or RedisCache when distributed
        self.remote = isinstance(cache, RedisCache)
        self._reactor = reactor
        self._clock = clock
        self.binding = binding
        self.in_flight: dict[str, _InFlight] = {}

    # -- request phase ---------------------------------------------------------------------------

    def on_request(self, ctx: PolicyContext) -> Any:
        """Invalidate if asked, answer a fresh entry, join a miss in flight, or go upstream."""
        config = self.config
        try:
            if not config.request.evaluate(ctx.expression_context()):
                return None
            key = config.key
            key = key if isinstance(key, str) else to_text(key.evaluate(ctx.expression_context()))
        except EvaluationError as exc:
            _log.debug("{binding}: not cached: {error}", binding=self.binding, error=exc)
            return None
        serve = store = True
        max_age = min_fresh = None
        only_if_cached = False
        if config.invalidation_header or config.use_headers:
            # One pass over the request's headers for everything this policy reads.
            invalidation = config.invalidation_header
            cache_control = []
            pragma = order = None
            for name, value in ctx.head.headers:
                lname = name.lower()
                if lname == b"cache-control":
                    cache_control.append(value)
                elif lname == b"pragma":
                    pragma = value
                elif lname == invalidation:
                    order = value.strip().lower()
            if order == b"invalidate":
                self._quietly(self.cache.delete(key), "invalidation")
                serve = False
            elif order == b"invalidate-all":
                self._quietly(self.cache.clear(), "invalidation")
                serve = False
            if not config.use_headers:
                pass
            elif cache_control:
                directives = parse_cache_control(cache_control)
                if "no-store" in directives:
                    serve = store = False
                if "no-cache" in directives:
                    serve = False
                max_age = _seconds(directives.get("max-age"))
                min_fresh = _seconds(directives.get("min-fresh"))
                only_if_cached = "only-if-cached" in directives
            elif pragma is not None and b"no-cache" in pragma.lower():
                serve = False
        head_only = ctx.head.method == b"HEAD"
        if serve:
            if self.remote:
                return self.cache.get(key).addCallbacks(
                    self._looked_up,
                    self._remote_failed,
                    callbackArgs=(ctx, key, store, max_age, min_fresh, only_if_cached, head_only),
                    errbackArgs=(ctx, key, store),
                )
            return self._looked_up(
                self.cache.get(key), ctx, key, store, max_age, min_fresh, only_if_cached, head_only
            )
        return self._looked_up(None, ctx, key, store, None, None, only_if_cached, head_only, serve)

    def _usable(
        self,
        entry: Entry,
        ctx: PolicyContext,
        max_age: int | None,
        min_fresh: int | None,
    ) -> LocalResponse | None:
        """The answer from `entry` when it is fresh enough for this request, else None."""
        now = self.clock.seconds()
        if not entry.fresh(now) or not entry.matches(ctx.head.headers):
            return None
        if max_age is not None and entry.age(now) > max_age:
            return None
        if min_fresh is not None and now - entry.stored + min_fresh >= entry.lifetime:
            return None
        return entry.response(now)

    def _miss(self, ctx: PolicyContext, key: str, store: bool, serve: bool, head_only: bool) -> Any:
        """Go upstream, or wait for the request already fetching this key."""
        now = self.clock.seconds()
        flight = self.in_flight.get(key)
        if serve and flight is not None and now - flight.started < COALESCE_WAIT:
            return self._wait(flight, ctx)
        leader = store and not head_only and (flight is None or now - flight.started >= COALESCE_WAIT)
        if leader:
            self.in_flight[key] = _InFlight(now)
        if store and not head_only:
            if ctx.scratch is None:
                ctx.scratch = {}
            ctx.scratch[self] = _Miss(key, store, leader)
        return None

    def _wait(self, flight: _InFlight, ctx: PolicyContext) -> Deferred[Any]:
        """Wait for the leader of `key`; then answer its entry, or go upstream."""
        timer: Any = None

        def cancel(d: Deferred[Any]) -> None:
            if d in flight.waiters:
                flight.waiters.remove(d)
            if timer is not None and timer.active():
                timer.cancel()

        waiter: Deferred[Any] = Deferred(cancel)
        flight.waiters.append(waiter)

        def give_up() -> None:
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)
                waiter.callback(None)

        timer = self.clock.callLater(max(0.0, COALESCE_WAIT - (self.clock.seconds() - flight.started)), give_up)

        def released(entry: Entry | None) -> Any:
            if timer.active():
                timer.cancel()
            if entry is not None:
                answer = self._usable(entry, ctx, None, None)
                if answer is not None:
                    return answer
            return None  # nothing stored: this request goes upstream itself, uncached

        return waiter.addCallback(released)

    def _looked_up(
        self,
        entry: Entry | None,
        ctx: PolicyContext,
        key: str,
        store: bool,
        max_age: int | None,
        min_fresh: int | None,
        only_if_cached: bool,
        head_only: bool,
        serve: bool = True,
    ) -> Any:
        """The entry found for `key` (None: none): answer it if usable, else a miss."""
        if entry is not None:
            answer = self._usable(entry, ctx, max_age, min_fresh)
            if answer is not None:
                return answer
        if only_if_cached:
            return LocalResponse.gateway_error(504, "cache_miss", "Not in the cache (only-if-cached)")
        return self._miss(ctx, key, store, serve, head_only)

    def _remote_failed(self, failure: Any, ctx: PolicyContext, key: str, store: bool) -> None:
        """Redis did not answer: this request goes upstream and its response is not stored."""
        _log.debug("{binding}: cache lookup failed: {error}", binding=self.binding, error=failure.value)

    def _quietly(self, result: Any, what: str) -> None:
        """A Redis call nobody waits for: its failure is logged (debug), not left unhandled."""
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: _log.debug(
                    "{binding}: cache {what} failed: {error}",
                    binding=self.binding, what=what, error=f.value,
                )
            )

    # -- response phase --------------------------------------------------------------------------

    def on_response(self, ctx: PolicyContext) -> None:
        """A miss's response head: decide whether it may be stored; if so, collect its body."""
        scratch = ctx.scratch
        if scratch is None:
            return
        miss = scratch.get(self)
        if miss is None or ctx.response_tap is not None:
            return
        config = self.config
        headers = ctx.response_headers or []
        try:
            if not config.response.evaluate(ctx.expression_context()):
                return
        except EvaluationError:
            return
        lifetime: float = config.ttl
        stored_headers = []
        vary_names: list[bytes] = []
        for name, value in headers:
            lname = name.lower()
            if lname == b"set-cookie":
                return
            if lname == b"content-type" and value.lower().startswith(b"text/event-stream"):
                return  # a stream: passed through as it comes, never kept
            if lname == b"vary":
                vary_names.extend(v.strip().lower() for v in value.split(b",") if v.strip())
            if lname not in _NOT_STORED:
                stored_headers.append((name, value))
        initial_age = 0
        if config.use_headers:
            directives = parse_cache_control(_values(headers, b"cache-control"))
            if {"no-store", "private", "no-cache"} & directives.keys():
                return
            if b"*" in vary_names:
                return
            if ctx.head.headers and _joined(ctx.head.headers, b"authorization") is not None and not (
                {"public", "s-maxage", "must-revalidate"} & directives.keys()
            ):
                return
            ages = _values(headers, b"age")
            initial_age = _seconds(ages[0].decode("latin-1").strip()) or 0 if ages else 0
            lifetime = freshness_lifetime(directives, headers, config.ttl) - initial_age
            if lifetime <= 0:
                return
        else:
            vary_names = []
        vary = tuple((name, _joined(ctx.head.headers, name)) for name in vary_names)
        miss.collector = ctx.response_tap = Collector(MAX_ENTRY_BYTES)
        miss.entry = (ctx.response_status, tuple(stored_headers), lifetime, initial_age, vary)

    def on_done(self, ctx: PolicyContext, status: int, cause: str | None) -> None:
        """The request ended: store its response if it came whole; release coalesced requests."""
        scratch = ctx.scratch
        miss = scratch.get(self) if scratch is not None else None
        if miss is None:
            return
        entry = None
        collector = miss.collector
        if (
            cause is None
            and collector is not None
            and not collector.abandoned
            and miss.entry is not None
        ):
            status, headers, lifetime, initial_age, vary = miss.entry
            entry = Entry(
                status, headers, collector.body(), self.clock.seconds(), lifetime, initial_age, vary
            )
            self._quietly(self.cache.put(miss.key, entry), "store")
        if miss.leader:
            flight = self.in_flight.pop(miss.key, None)
            if flight is not None:
                for waiter in flight.waiters:
                    waiter.callback(entry)


@implementer(IPolicyKind)
class HttpCachingKind:
    """The `http-caching-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> HttpCachingPolicy:
        """Check the config; find the binding's cache (Redis, or memory kept across reloads)."""
        parsed = parse_config(config)
        services = context.services
        clock = context.clock if context.clock is not None else services.clock
        reactor = context.reactor if context.reactor is not None else services.reactor
        cache: Any
        if parsed.distributed and services.redis is not None:
            cache = RedisCache(services.redis, f"flexgw:cache:{context.api}:{context.binding}:")
        else:
            if parsed.distributed:
                _log.warn(
                    "{binding}: distributed caching needs Configuration sharedStorage.redis;"
                    " caching in this replica's memory",
                    binding=context.binding,
                )
            shared_key = f"{NAME}:{context.api}:{context.binding}"
            fingerprint = repr(attrs.astuple(parsed, recurse=False))
            kept = services.shared.get(shared_key)
            if kept is not None and kept[0] == fingerprint:
                cache = kept[1]
            else:
                cache = MemoryCache(parsed.max_entries, parsed.max_bytes)
                services.shared[shared_key] = (fingerprint, cache)
        return HttpCachingPolicy(parsed, cache, reactor, clock, context.binding)


KIND = register(HttpCachingKind())
