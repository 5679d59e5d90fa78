"""`spike-control-flex`: a sliding window for the whole binding; requests over it wait, retry, then 429.

Flex behaviour reproduced (docs `policies-included-spike-control.adoc`, reference §2.2):
- `maximumRequests` (default 1) requests are let through in any `timePeriodInMilliseconds`
  (default 1000) **sliding** window: an accepted request uses quota until it is
  `timePeriodInMilliseconds` old. No keys: one window per binding (per API for a Selector
  binding), per gateway process, as Flex's per-replica spike control.
- A request finding no quota is held `delayTimeInMillis` (default 1000) and retried, up to
  `delayAttempts` (default 1) times, while at most `queuingLimit` (default 0) requests are held
  at once; then it is refused. With the defaults (`queuingLimit: 0`) nothing waits: a request
  over the window is refused at once. The docs' timeline (2 per second, 499 ms delay, 1
  attempt) is reproduced by the tests.
- `exposeHeaders` (default false): `x-ratelimit-limit` (maximumRequests),
  `x-ratelimit-remaining` (quota left after this request) and `x-ratelimit-reset`
  (milliseconds until the oldest request in the window leaves it, **0 while quota remains**),
  on accepted requests (added to the upstream's response) and on the 429. Lower-case names, as
  Envoy-based Flex writes them.
- Refusal: **429**, `content-type: application/json`, `{"error":"Too Many Requests"}`. Flex's
  docs give only the status; the body is the one observed for rate-limiting-flex, assumed the
  same for this policy of the same family. No `Retry-After` (none documented for Flex).

A held request is a Deferred from `on_request`, with its timer on the injected clock
(`context.clock`; the global reactor is taken at the first request when none was given). The
queue is bounded by `queuingLimit`; a held request whose client disconnects is cancelled by the
chain, which frees its slot and its timer at once. Requests arriving while others are held do
not queue behind them: whoever finds quota first takes it (Flex documents no ordering).

The window is kept in the policy object, so a configuration reload starts a new one (the docs
describe the window as starting "with the first request after the policy is applied").

Under `--workers N` (N > 1) the window is the supervisor's (`flexgw.storage.supervised`), one
per API, binding and config, shared by every worker and asked over AMP for every request
(`SupervisedSpikeControlPolicy`): the quota is exact across workers. That window survives
reloads that leave the binding's config unchanged (workers reload independently, so a
reload-scoped window could not be shared). If the supervisor does not answer, the request is
refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from flexgw.policies.base import (
    BuildContext,
    IPolicy,
    IPolicyKind,
    LocalResponse,
    PolicyContext,
)
from flexgw.policies.registry import register
from flexgw.storage.supervised import SupervisedSpikeWindow

_log = Logger(namespace="flexgw.policies.spike_control")

NAME = "spike-control-flex"

LIMIT_HEADER = b"x-ratelimit-limit"
REMAINING_HEADER = b"x-ratelimit-remaining"
RESET_HEADER = b"x-ratelimit-reset"
TOO_MANY_BODY = b'{"error":"Too Many Requests"}'
JSON = (b"content-type", b"application/json")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "maximumRequests": {"type": "integer", "minimum": 1},
        "timePeriodInMilliseconds": {"type": "integer", "minimum": 1},
        "delayTimeInMillis": {"type": "integer", "minimum": 0},
        "delayAttempts": {"type": "integer", "minimum": 0},
        "queuingLimit": {"type": "integer", "minimum": 0},
        "exposeHeaders": {"type": "boolean"},
    },
    "additionalProperties": False,
}


@attrs.frozen
class SpikeControlConfig:
    """One binding's configuration, with Flex's defaults."""

    maximum_requests: int = 1
    period_ms: int = 1000
    delay_ms: int = 1000
    delay_attempts: int = 1
    queuing_limit: int = 0
    expose_headers: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SpikeControlConfig:
        """From a binding's (schema-checked) config."""
        return cls(
            maximum_requests=int(config.get("maximumRequests", 1)),
            period_ms=int(config.get("timePeriodInMilliseconds", 1000)),
            delay_ms=int(config.get("delayTimeInMillis", 1000)),
            delay_attempts=int(config.get("delayAttempts", 1)),
            queuing_limit=int(config.get("queuingLimit", 0)),
            expose_headers=bool(config.get("exposeHeaders", False)),
        )


class _Held:
    """One request waiting for quota: its Deferred, its timer and the retries it has left."""

    __slots__ = ("attempts_left", "ctx", "deferred", "timer")

    def __init__(self, ctx: PolicyContext, attempts_left: int) -> None:
        self.ctx = ctx
        self.attempts_left = attempts_left
        self.deferred: Deferred[Any] | None = None
        self.timer: Any = None


class _Holding:
    """What both spike-control policies share: the requests held for a retry after a delay."""

    __slots__ = ("clock", "config", "held")

    clock: Any
    config: SpikeControlConfig
    held: set[_Held]

    def _hold(self, ctx: PolicyContext) -> Deferred[Any] | None:
        """Hold the request for a retry after `delayTimeInMillis`; None when it may not wait
        (no delay attempts configured, or `queuingLimit` requests are already held)."""
        config = self.config
        if config.delay_attempts <= 0 or len(self.held) >= config.queuing_limit:
            return None
        held = _Held(ctx, config.delay_attempts)
        held.deferred = Deferred(lambda _: self._cancel(held))
        held.timer = self.clock.callLater(config.delay_ms / 1000, self._retry, held)
        self.held.add(held)
        return held.deferred

    _retry: Callable[[_Held], None]  # each policy's: a held request's delay is over

    def _cancel(self, held: _Held) -> None:
        """The client went away: free the slot and the timer."""
        self.held.discard(held)
        timer, held.timer = held.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    #: Its on_response does nothing: the chain does not call it (see IPolicy).
    response_phase = False

    def on_response(self, ctx: PolicyContext) -> None:
        """Nothing: headers were added in the request phase."""


@implementer(IPolicy)
class SpikeControlPolicy(_Holding):
    """One binding: the sliding window (times of the accepted requests) and the held requests."""

    __slots__ = ("window",)

    def __init__(self, config: SpikeControlConfig, clock: Any) -> None:
        self.config = config
        self.clock = clock  # None until the first request when no clock was given
        self.window: deque[int] = deque()  # accept times (ms), oldest first, never > maximum
        self.held: set[_Held] = set()

    def _now(self) -> int:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor

            clock = self.clock = reactor
        return round(clock.seconds() * 1000)

    def _take(self, now: int) -> bool:
        """Use one unit of quota if the sliding window has one."""
        window = self.window
        horizon = now - self.config.period_ms
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) < self.config.maximum_requests:
            window.append(now)
            return True
        return False

    def _headers(self, now: int) -> tuple[tuple[bytes, bytes], ...]:
        """The x-ratelimit-* headers for the window as it is now."""
        config = self.config
        remaining = config.maximum_requests - len(self.window)
        reset = 0 if remaining > 0 else self.window[0] + config.period_ms - now
        return (
            (LIMIT_HEADER, b"%d" % config.maximum_requests),
            (REMAINING_HEADER, b"%d" % remaining),
            (RESET_HEADER, b"%d" % reset),
        )

    def _accepted(self, ctx: PolicyContext, now: int) -> None:
        if self.config.expose_headers:
            for name, value in self._headers(now):
                ctx.add_response_header(name, value)

    def _refused(self, now: int) -> LocalResponse:
        headers: tuple[tuple[bytes, bytes], ...] = (JSON,)
        if self.config.expose_headers:
            headers += self._headers(now)
        return LocalResponse(429, headers, TOO_MANY_BODY)

    def on_request(self, ctx: PolicyContext) -> Any:
        """Accept now (None), hold the request (a Deferred), or refuse it (a 429)."""
        now = self._now()
        if self._take(now):
            self._accepted(ctx, now)
            return None
        held = self._hold(ctx)
        return self._refused(now) if held is None else held

    def _retry(self, held: _Held) -> None:
        """A held request's delay is over: take quota, wait again, or refuse."""
        held.timer = None
        now = self._now()
        deferred = held.deferred
        assert deferred is not None
        if self._take(now):
            self.held.discard(held)
            self._accepted(held.ctx, now)
            deferred.callback(None)
            return
        held.attempts_left -= 1
        if held.attempts_left > 0:
            held.timer = self.clock.callLater(self.config.delay_ms / 1000, self._retry, held)
            return
        self.held.discard(held)
        deferred.callback(self._refused(now))


@implementer(IPolicy)
class SupervisedSpikeControlPolicy(_Holding):
    """One binding under `--workers`: the window is the supervisor's; the held requests are this
    worker's (its `queuingLimit` bounds what this worker holds)."""

    __slots__ = ("window",)

    def __init__(self, config: SpikeControlConfig, window: SupervisedSpikeWindow, clock: Any) -> None:
        self.config = config
        self.window = window
        self.clock = clock
        self.held: set[_Held] = set()

    def _take(self) -> Deferred[tuple[bool, int, int]]:
        config = self.config
        return self.window.take(config.maximum_requests, config.period_ms)

    def _headers(self, remaining: int, reset: int) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (LIMIT_HEADER, b"%d" % self.config.maximum_requests),
            (REMAINING_HEADER, b"%d" % remaining),
            (RESET_HEADER, b"%d" % reset),
        )

    def _refused(self, remaining: int, reset: int) -> LocalResponse:
        headers: tuple[tuple[bytes, bytes], ...] = (JSON,)
        if self.config.expose_headers:
            headers += self._headers(remaining, reset)
        return LocalResponse(429, headers, TOO_MANY_BODY)

    def _unanswered(self, failure: Failure) -> LocalResponse:
        if not failure.check(CancelledError):
            _log.failure("Spike control: the supervisor did not answer; request refused", failure)
        return LocalResponse(429, (JSON,), TOO_MANY_BODY)

    def on_request(self, ctx: PolicyContext) -> Any:
        """Ask the supervisor's window: accept (None), hold (a Deferred), or refuse (a 429)."""
        d = self._take()
        d.addCallback(self._first, ctx)
        return d.addErrback(self._unanswered)

    def _first(self, answer: tuple[bool, int, int], ctx: PolicyContext) -> Any:
        taken, remaining, reset = answer
        config = self.config
        if taken:
            if config.expose_headers:
                for name, value in self._headers(remaining, reset):
                    ctx.add_response_header(name, value)
            return None
        held = self._hold(ctx)
        return self._refused(remaining, reset) if held is None else held

    def _retry(self, held: _Held) -> None:
        held.timer = None
        d = self._take()
        d.addCallbacks(self._retried, self._retry_failed, callbackArgs=(held,), errbackArgs=(held,))

    def _retried(self, answer: tuple[bool, int, int], held: _Held) -> None:
        deferred = held.deferred
        if held not in self.held or deferred is None:
            return  # cancelled while the supervisor was asked
        taken, remaining, reset = answer
        if taken:
            self.held.discard(held)
            if self.config.expose_headers:
                for name, value in self._headers(remaining, reset):
                    held.ctx.add_response_header(name, value)
            deferred.callback(None)
            return
        held.attempts_left -= 1
        if held.attempts_left > 0:
            held.timer = self.clock.callLater(self.config.delay_ms / 1000, self._retry, held)
            return
        self.held.discard(held)
        deferred.callback(self._refused(remaining, reset))

    def _retry_failed(self, failure: Failure, held: _Held) -> None:
        if held in self.held and held.deferred is not None:
            self.held.discard(held)
            held.deferred.callback(self._unanswered(failure))


@implementer(IPolicyKind)
class SpikeControlKind:
    """The `spike-control-flex` policy kind."""

    name = NAME
    schema = SCHEMA
    phase = "inbound"

    def build(self, config: dict[str, Any], context: BuildContext) -> Any:
        """Apply Flex's defaults; the clock is the context's (or the reactor at first use).
        Under --workers, the window is the supervisor's."""
        clock = context.clock if context.clock is not None else context.services.clock
        parsed = SpikeControlConfig.from_config(config)
        supervisor = context.services.supervisor
        if supervisor is not None and clock is not None:
            namespace = f"{NAME}:{context.api}:{context.binding}:{parsed!r}"
            return SupervisedSpikeControlPolicy(
                parsed, SupervisedSpikeWindow(supervisor, namespace), clock
            )
        return SpikeControlPolicy(parsed, clock)


KIND = register(SpikeControlKind())
