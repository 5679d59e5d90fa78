"""The outage breaker of a shared store: fail at once while it is known down, probe for recovery.

A store that does I/O (Redis) trips its `OutageBreaker` when a command times out or its
connection fails. From then on every call fails at once with `StoreUnavailable` (the caller
applies its unknown-quota rule, e.g. `blockOnUnknownQuota`, without waiting), and the breaker
runs a probe in the background: first `min_interval` seconds after the trip, then with the delay
doubling up to `max_interval` between the end of one probe and the start of the next. The first
probe that succeeds closes the breaker.

Logging: one `error` record when the outage starts, one `info` record when it ends (with how
long it lasted and how many calls it answered at once), and while it lasts a `warn` summary every
`summary_interval` seconds with the count. Never a record per call. A store that is up but
refuses calls (e.g. Redis out of memory) reports each refusal to `refused`, which logs at most
one `error` record per `summary_interval` with the count since the last. Each record carries
`storage_event` ("down", "still_down", "up", "refused") for filters and tests.

Time comes from the injected clock (`IReactorTime`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from flexgw.storage.interfaces import StoreUnavailable

_log = Logger(namespace="flexgw.storage")

#: Defaults: first probe 0.1 s after the trip, then at most every 0.5 s (so a store that comes
#: back is seen within about half a second), and an outage summary every minute.
MIN_PROBE_INTERVAL = 0.1
MAX_PROBE_INTERVAL = 0.5
SUMMARY_INTERVAL = 60.0


class OutageBreaker:
    """Up/down state of one store, with its background probe and its outage log records."""

    def __init__(
        self,
        clock: Any,
        name: str,
        probe: Callable[[], Deferred[Any]],
        min_interval: float = MIN_PROBE_INTERVAL,
        max_interval: float = MAX_PROBE_INTERVAL,
        summary_interval: float = SUMMARY_INTERVAL,
        log: Logger = _log,
        unavailable: type[StoreUnavailable] = StoreUnavailable,
    ) -> None:
        self.clock = clock
        self.name = name  # e.g. "Redis at 127.0.0.1:6379", for the log records
        self.probe = probe  # a Deferred that fires when the store answers, fails when it does not
        self.min_interval = min_interval
        self.max_interval = max(max_interval, min_interval)
        self.summary_interval = summary_interval
        self.log = log
        self.unavailable = unavailable  # the exception type `refuse` returns
        self.down_since: float | None = None  # None while up
        self.reason = ""  # why the store is down (the last failure seen)
        self.affected = 0  # calls failed by this outage (the tripping ones included)
        self.affected_total = 0  # the same, over every outage (for metrics)
        self.outages = 0  # outages so far (for metrics)
        self.probes = 0  # probes started during this outage
        self.refusals = 0  # calls refused while up (for metrics)
        self._refused_since_record = 0
        self._next_refusal_record: float | None = None
        self._summarised = 0  # `affected` at the last summary
        self._delay = min_interval
        self._probe_call: Any = None  # the scheduled probe (IDelayedCall) or None
        self._summary_call: Any = None
        self._probing = False
        self._waiting_up: list[Deferred[None]] = []
        self._closed = False

    @property
    def down(self) -> bool:
        """True while the store is known down."""
        return self.down_since is not None

    def refuse(self) -> StoreUnavailable:
        """Count one call refused at once while down; the exception to fail it with."""
        self.affected += 1
        self.affected_total += 1
        return self.unavailable(f"{self.name} is down ({self.reason})")

    def trip(self, reason: str) -> None:
        """A call failed for want of the store (timeout, connection failure): mark it down (logged
        once) and start probing; while already down, only count the call."""
        self.affected += 1
        self.affected_total += 1
        if self.down_since is not None or self._closed:
            return
        now = self.clock.seconds()
        self.down_since = now
        self.reason = reason
        self.outages += 1
        self.probes = 0
        self._summarised = 0
        self._delay = self.min_interval
        self.log.error(
            "{name} is down: {reason}. Rate-limit checks now fail at once (blockOnUnknownQuota"
            " decides) until a probe, every {interval}s at most, finds it back",
            name=self.name, reason=reason, interval=self.max_interval, storage_event="down",
        )
        self._schedule_probe()
        if self.summary_interval > 0:
            self._summary_call = self.clock.callLater(self.summary_interval, self._summary)

    def refused(self, reason: str) -> None:
        """The store is up but refused a call: counted, and logged at most once per
        summary_interval (with the count of refusals since the last record)."""
        self.refusals += 1
        self._refused_since_record += 1
        now = self.clock.seconds()
        if self._next_refusal_record is not None and now < self._next_refusal_record:
            return
        self._next_refusal_record = now + self.summary_interval
        self.log.error(
            "{name} refused {count} rate-limit check(s) (blockOnUnknownQuota decides): {reason};"
            " at most one such record every {interval:.0f}s",
            name=self.name, count=self._refused_since_record, reason=reason,
            interval=self.summary_interval, storage_event="refused",
        )
        self._refused_since_record = 0

    def when_up(self) -> Deferred[None]:
        """A Deferred that fires when the store is up (at once if it is)."""
        waiting: Deferred[None] = Deferred()
        if self.down_since is None:
            waiting.callback(None)
        else:
            self._waiting_up.append(waiting)
        return waiting

    def close(self) -> None:
        """Stop probing and summarising (the store is closed for good)."""
        self._closed = True
        for call in (self._probe_call, self._summary_call):
            if call is not None and call.active():
                call.cancel()
        self._probe_call = self._summary_call = None

    def _schedule_probe(self) -> None:
        if self._closed:
            return
        self._probe_call = self.clock.callLater(self._delay, self._run_probe)
        self._delay = min(max(self._delay * 2, 0.01), self.max_interval)  # never a busy loop

    def _run_probe(self) -> None:
        """One probe; on failure the next is scheduled, on success the breaker closes."""
        self._probe_call = None
        if self._probing or self.down_since is None or self._closed:
            return
        self._probing = True
        self.probes += 1
        try:
            result = self.probe()
        except Exception:  # noqa: BLE001 (a probe that raises is a failed probe)
            result = Deferred()
            result.errback(Failure())
        result.addCallbacks(self._probe_ok, self._probe_failed)

    def _probe_ok(self, _: Any) -> None:
        self._probing = False
        if self.down_since is None or self._closed:
            return
        duration = self.clock.seconds() - self.down_since
        self.log.info(
            "{name} is back after {duration:.1f}s; {affected} rate-limit checks were decided by"
            " blockOnUnknownQuota meanwhile",
            name=self.name, duration=duration, affected=self.affected, storage_event="up",
        )
        self.down_since = None
        self.affected = 0
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self._summary_call = None
        waiting, self._waiting_up = self._waiting_up, []
        for each in waiting:
            each.callback(None)

    def _probe_failed(self, failure: Failure) -> None:
        self._probing = False
        if self.down_since is None or self._closed:
            return
        self.reason = describe(failure.value)
        self._schedule_probe()

    def _summary(self) -> None:
        """The periodic record while the outage lasts."""
        self._summary_call = None
        if self.down_since is None or self._closed:
            return
        recent = self.affected - self._summarised
        self._summarised = self.affected
        self.log.warn(  # noqa: G010 - twisted.logger.Logger has warn, not warning
            "{name} is still down after {duration:.0f}s ({reason}); {affected} rate-limit checks"
            " decided by blockOnUnknownQuota so far, {recent} in the last {interval:.0f}s",
            name=self.name, duration=self.clock.seconds() - self.down_since, reason=self.reason,
            affected=self.affected, recent=recent, interval=self.summary_interval,
            storage_event="still_down",
        )
        self._summary_call = self.clock.callLater(self.summary_interval, self._summary)


def describe(error: BaseException) -> str:
    """An exception as a short message (its type when it has no text, e.g. a timeout)."""
    return str(error) or type(error).__name__
