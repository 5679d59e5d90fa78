"""A JSON Web Key Set fetched with treq and cached: TTL, backoff after failures, stale keys kept, rate-limited refetch for an unknown `kid`.

Flex's documented behaviour (`policies-included-jwt-validation.adoc`, "Retry Mechanism"): when
the cached JWKS is expired or absent and a request arrives, the JWKS service is called; when that
fails, it is retried with an exponential backoff until a new set is cached; meanwhile the expired
set keeps serving, and a request gets a 503 only when no set was ever obtained.

flexgw's backoff is lazy: after a failure the next attempt is allowed `backoff` seconds later and
is made by the first request that arrives after that moment (the stale set serves requests
meanwhile). No timer is left behind, so a policy object dropped by a reload costs nothing. Flex
retries in the background; the difference is only when, in an idle period, the retry happens.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import attrs
from jwt import PyJWK
from jwt.exceptions import PyJWKError
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.http.tracecontext import side_call
from flexgw.sidecalls.bounded import read_bounded

_log = Logger(namespace="flexgw.policies.jwks")

#: First wait after a failed fetch, doubled after each further failure up to BACKOFF_MAX.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 300.0
#: At most one refetch per this many seconds because a token named a `kid` the set lacks.
UNKNOWN_KID_INTERVAL = 30.0
#: A JWKS document larger than this is refused (a key set is a few KiB).
MAX_JWKS_BYTES = 1 << 20

#: `fetch(url, timeout)`, or `fetch(url, timeout, traceparent=...)` for a traced request.
Fetcher = Callable[..., "Deferred[bytes]"]


class JwksError(Exception):
    """The JWKS service answered something that is not a usable key set."""


@attrs.frozen
class Key:
    """One usable key of a set: its `kid` (or None), `kty`, optional `alg`, and the key object."""

    kid: str | None
    kty: str
    alg: str | None
    key: Any  # a cryptography public key, or bytes for `oct`


def parse_jwks(body: bytes) -> tuple[Key, ...]:
    """The usable signature keys of a JWKS document (`use: enc` keys and unknown types skipped)."""
    try:
        document = json.loads(body)
    except ValueError as e:
        raise JwksError(f"the JWKS is not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("the JWKS has no 'keys' array")
    keys = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = PyJWK(entry)
        except (PyJWKError, ValueError, TypeError, KeyError):
            continue  # unsupported kty/crv or a malformed key: ignored, as JWKS clients do
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys.append(
            Key(
                kid=kid if isinstance(kid, str) else None,
                kty=str(entry.get("kty")),
                alg=alg if isinstance(alg, str) else None,
                key=jwk.key,
            )
        )
    if not keys:
        raise JwksError("the JWKS holds no usable signature key")
    return tuple(keys)


def treq_fetcher(reactor: Any, agent: Any = None) -> Fetcher:
    """A fetcher doing `GET url` with treq (through `agent` when given), bounded in time and size;
    with a `traceparent` when the fetch is made for a traced request."""

    def fetch(url: str, timeout: float, traceparent: bytes | None = None) -> Deferred[bytes]:
        import treq

        kwargs: dict[str, Any] = {"reactor": reactor, "persistent": False}
        if agent is not None:
            kwargs["agent"] = agent
        headers: dict[bytes | str, list[bytes | str]] = {b"Accept": [b"application/json"]}
        if traceparent is not None:  # made for a traced request: the fetch is its child span
            headers[b"traceparent"] = [traceparent]
        d: Deferred[Any] = treq.get(url, headers=headers, **kwargs)

        def got(response: Any) -> Any:
            if response.code != 200:
                response.deliverBody(_Discard())
                raise JwksError(f"the JWKS service answered {response.code}")
            return read_bounded(
                response, MAX_JWKS_BYTES, lambda: JwksError("the JWKS is too large")
            )

        d.addCallback(got)
        d.addTimeout(timeout, reactor)
        return d

    return fetch


class _Discard:
    """A body protocol that drops what it gets (for refused responses)."""

    def makeConnection(self, transport: Any) -> None:
        """Stop the body as soon as it starts."""
        with contextlib.suppress(Exception):
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """Ignore data."""

    def connectionLost(self, reason: Failure) -> None:
        """Nothing to clean."""


class JwksCache:
    """The key set of one JWKS URL: cached for `ttl` seconds, refreshed on demand.

    `keys` is the last set obtained (None until one was). Requests call `current()` (the set to use
    now, possibly stale, starting a refresh when it is due), `when_available()` (for when there is
    no set yet) and `refetch_for_unknown_kid()` (key rotation).
    """

    def __init__(
        self,
        url: str,
        ttl: float,
        timeout: float,
        clock: Any,
        fetch: Fetcher,
        unknown_kid_interval: float = UNKNOWN_KID_INTERVAL,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self._fetch = fetch
        self.unknown_kid_interval = unknown_kid_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.keys: tuple[Key, ...] | None = None
        self.expires_at = 0.0
        self.failures = 0
        self.next_attempt_at = 0.0  # no attempt before this (backoff after failures)
        self.last_started = float("-inf")
        self.fetches = 0  # attempts started (for tests and /status)
        self._inflight: list[Deferred[None]] | None = None

    # -- the request side ------------------------------------------------------------------------

    # Each request-side method takes the request's trace (flexgw.http.tracecontext.Trace, or
    # None): a fetch it starts is a child span of that request, with a `traceparent`.

    def current(self, trace: Any = None) -> tuple[Key, ...] | None:
        """The set to use now (stale or not); starts a refresh when it is expired and one may start."""
        if self.clock.seconds() >= self.expires_at:
            self._maybe_start(trace)
        return self.keys

    def when_available(self, trace: Any = None) -> Deferred[None] | None:
        """With no set yet: a Deferred firing when the attempt in flight (or one started now) ends;
        None when the backoff forbids an attempt now (the caller answers 503)."""
        if self._inflight is None and not self._maybe_start(trace):
            return None
        return self._wait()

    def refetch_for_unknown_kid(self, trace: Any = None) -> Deferred[None] | None:
        """A refetch because a token named an unknown `kid`: a Deferred for its end, or None when
        one ran less than `unknown_kid_interval` ago (or the backoff forbids it)."""
        if self._inflight is not None:
            return self._wait()
        now = self.clock.seconds()
        if now - self.last_started < self.unknown_kid_interval:
            return None
        if not self._maybe_start(trace):
            return None
        return self._wait()

    def settled(self) -> Deferred[None]:
        """A Deferred firing when no fetch is in flight any more (at once when none is)."""
        return self._wait()

    # -- fetching --------------------------------------------------------------------------------

    def _wait(self) -> Deferred[None]:
        """A new Deferred fired (with None) when the fetch in flight ends, whatever its outcome."""
        if self._inflight is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._inflight.append(d)
        return d

    def _maybe_start(self, trace: Any = None) -> bool:
        """Start a fetch unless one is in flight or the backoff says not yet; True if one was in
        flight or has been started (it may already have ended, for a synchronous fetcher). A
        fetch started for a traced request (`trace`) is its child span."""
        if self._inflight is not None:
            return True
        now = self.clock.seconds()
        if now < self.next_attempt_at:
            return False
        self._inflight = []
        self.last_started = now
        self.fetches += 1
        try:
            d = side_call(trace, "jwks", self._start_fetch, "jwks_unreachable", (("url.full", self.url),))
        except Exception:  # noqa: BLE001 (a fetcher that raises is a failed fetch)
            d = Deferred()
            d.errback(Failure())
        d.addCallback(parse_jwks)
        d.addCallbacks(self._fetched, self._failed)
        return True

    def _start_fetch(self, traceparent: bytes | None) -> Deferred[bytes]:
        """The fetcher's call (with the traceparent of a traced request's fetch)."""
        if traceparent is None:
            return self._fetch(self.url, self.timeout)
        return self._fetch(self.url, self.timeout, traceparent=traceparent)

    def _fetched(self, keys: tuple[Key, ...]) -> None:
        self.keys = keys
        self.failures = 0
        now = self.clock.seconds()
        self.expires_at = now + self.ttl
        self.next_attempt_at = 0.0
        self._done()

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        delay = min(self.backoff_initial * (2 ** (self.failures - 1)), self.backoff_max)
        self.next_attempt_at = self.clock.seconds() + delay
        _log.warn(
            "JWKS fetch from {url} failed ({failures} in a row, next attempt in {delay}s"
            "{stale}): {error}",
            url=self.url,
            failures=self.failures,
            delay=delay,
            stale="; the previous key set stays in use" if self.keys is not None else "",
            error=failure.getErrorMessage(),
        )
        self._done()

    def _done(self) -> None:
        waiters, self._inflight = self._inflight or [], None
        for d in waiters:
            d.callback(None)
