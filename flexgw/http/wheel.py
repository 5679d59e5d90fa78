"""Coarse timers for the hot path: one shared timing wheel per reactor, 100 ms granularity.

Each request used to arm and cancel Twisted `DelayedCall`s (upstream response, stream idle):
an object with a dozen attributes, a heap push on the reactor's next turn, a cancellation the
heap carries until it is compacted. Timeouts measured in seconds do not need that precision.
`TimingWheel` (Varghese and Lauck's hashed wheel, as nginx's and Envoy's coarse timers) keeps
timers in 4096 slots of `GRANULARITY` seconds each; arming, re-arming (`reset`) and cancelling
are a dict insert or delete, O(1). One `DelayedCall` on the reactor wakes the wheel up, only
while it holds timers (cancelling the last one cancels it too) and only at a tick whose slot
holds one: per-request timers are nearly always cancelled before they are due, so the wheel
sleeps through the empty ticks (found by a walk over the slots after each wake-up, at most
4096 steps) instead of waking the reactor ten times a second.

Precision (documented in the README): a timer armed for `delay` seconds runs no earlier than
`delay` after it was armed (a float slack of 1 ns aside) and at most `GRANULARITY` (100 ms)
later, plus whatever the reactor is late. Tick times are multiples of 100 ms of the clock, so
with an injected `Clock` a timer armed at a multiple of 100 ms for a multiple of 100 ms runs at
exactly its deadline: tests stay exact. The wheel is per clock (`TimingWheel.of(clock)`): every
connection of one reactor shares one, a test's `MemoryReactorClock` gets its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from twisted.logger import Logger

#: Seconds between ticks: the most a timer runs late (beyond the reactor's own lateness).
GRANULARITY = 0.1
_PER_SECOND = 10  # ticks per second (1 / GRANULARITY, as an integer: exact tick times)
_SLOTS = 4096  # a power of two: 409.6 s per round; later timers wait for their round
_MASK = _SLOTS - 1
_SLACK = 1e-9  # float error tolerated when a deadline is turned into a tick

_RUNNING = object()  # `ticking` while a tick runs its timers
_log = Logger()
_wheels: WeakKeyDictionary[Any, TimingWheel] = WeakKeyDictionary()


class WheelTimer:
    """One armed timer: `cancel()`, `active()`, `reset(delay)`, as a DelayedCall's."""

    __slots__ = ("func", "slot", "tick", "wheel")

    def __init__(self, wheel: TimingWheel, tick: int, func: Callable[[], object]) -> None:
        self.wheel = wheel
        self.tick = tick
        self.func = func
        self.slot: dict[WheelTimer, None] | None = None

    @property
    def when(self) -> float:
        """The clock time of the tick this timer runs at."""
        return self.tick / _PER_SECOND

    def active(self) -> bool:
        """Armed: neither run nor cancelled."""
        return self.slot is not None

    def cancel(self) -> None:
        """Disarm (nothing when it already ran or was cancelled)."""
        slot = self.slot
        if slot is not None:
            self.slot = None
            del slot[self]
            wheel = self.wheel
            wheel.count -= 1
            if not wheel.count:
                wheel._stop()

    def reset(self, delay: float) -> None:
        """Run `delay` seconds from now instead (re-arms a timer that ran or was cancelled)."""
        wheel = self.wheel
        tick = wheel._tick_for(delay)
        slot = self.slot
        if slot is not None:
            if tick == self.tick:
                return
            del slot[self]
            wheel.count -= 1
        self.tick = tick
        wheel._add(self)


class TimingWheel:
    """Timers at `GRANULARITY` on one clock; `call_later(delay, func)` arms one."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.slots: list[dict[WheelTimer, None]] = [{} for _ in range(_SLOTS)]
        self.count = 0  # timers armed
        self.done = self._now_tick()  # the last tick run
        self.ticking: Any = None  # the DelayedCall of the next wake-up, while timers are armed
        self.wake = 0  # the tick it is armed for

    @classmethod
    def of(cls, clock: Any) -> TimingWheel:
        """The wheel shared by everything that runs on `clock` (made on first use)."""
        wheel = _wheels.get(clock)
        if wheel is None:
            wheel = _wheels[clock] = cls(clock)
        return wheel

    def armed(self) -> list[WheelTimer]:
        """The timers armed now, soonest first (for tests and introspection, not per request)."""
        return sorted((timer for slot in self.slots for timer in slot), key=lambda t: t.tick)

    def call_later(self, delay: float, func: Callable[[], object]) -> WheelTimer:
        """Run `func()` `delay` seconds from now (within GRANULARITY after that)."""
        timer = WheelTimer(self, self._tick_for(delay), func)
        self._add(timer)
        return timer

    def call_at(self, when: float, func: Callable[[], object]) -> WheelTimer:
        """Run `func()` at clock time `when` (within GRANULARITY after it; the next tick at the
        earliest)."""
        if self.ticking is None:
            self.done = self._now_tick()
        tick = math.ceil(when * _PER_SECOND - _SLACK)
        timer = WheelTimer(self, tick if tick > self.done else self.done + 1, func)
        self._add(timer)
        return timer

    def _now_tick(self) -> int:
        return math.floor(self.clock.seconds() * _PER_SECOND + _SLACK)

    def _tick_for(self, delay: float) -> int:
        """The first tick at or after `delay` seconds from now (the next one at the earliest)."""
        if self.ticking is None:
            self.done = self._now_tick()  # idle until now (no tick armed, none running)
        tick = math.ceil((self.clock.seconds() + delay) * _PER_SECOND - _SLACK)
        return tick if tick > self.done else self.done + 1

    def _add(self, timer: WheelTimer) -> None:
        tick = timer.tick
        slot = self.slots[tick & _MASK]
        slot[timer] = None
        timer.slot = slot
        self.count += 1
        ticking = self.ticking
        if ticking is None:
            self._arm(tick)
        elif ticking is not _RUNNING and (tick < self.wake or ticking.cancelled):
            # Sooner than the wake-up armed (or that was cancelled by someone else: trial
            # cancels what a test left on the reactor). Cancel and re-arm: a DelayedCall's
            # reset() to an earlier time scans the reactor's timer heap.
            if ticking.active():
                ticking.cancel()
            self._arm(tick)

    def _stop(self) -> None:
        """No timer left: no wake-up either (an idle gateway's reactor sleeps)."""
        ticking = self.ticking
        if ticking is not None and ticking is not _RUNNING:
            self.ticking = None
            if ticking.active():
                ticking.cancel()

    def _arm(self, tick: int) -> None:
        """Wake up at `tick` (its time on the clock; now if that is past)."""
        clock = self.clock
        self.wake = tick
        self.ticking = clock.callLater(max(0.0, tick / _PER_SECOND - clock.seconds()), self._tick)

    def _tick(self) -> None:
        """Run every timer due by now, then sleep until the next slot holding a timer."""
        now = self._now_tick()
        done, self.done = self.done, max(now, self.done)  # timers armed meanwhile go later
        self.ticking = _RUNNING  # (so that they do not arm a wake-up of their own)
        if now - done >= _SLOTS:  # the clock jumped a whole round: one pass over every slot
            ticks: range = range(done + 1, done + 1 + _SLOTS)
        else:
            ticks = range(done + 1, now + 1)
        slots = self.slots
        try:
            for tick in ticks:
                slot = slots[tick & _MASK]
                if not slot:
                    continue
                due = [timer for timer in slot if timer.tick <= now]
                for timer in due:
                    del slot[timer]
                    timer.slot = None
                self.count -= len(due)
                for timer in due:
                    try:
                        timer.func()
                    except Exception:  # noqa: BLE001 (logged; the other timers still run)
                        _log.failure("while running a timer from the timing wheel")
        finally:
            self.ticking = None
            if self.count:
                self._arm(self._next_slot(self.done))

    def _next_slot(self, after: int) -> int:
        """The first tick after `after` whose slot holds a timer (maybe one of a later round:
        waking up early is harmless, it only looks again)."""
        slots = self.slots
        for tick in range(after + 1, after + 1 + _SLOTS):
            if slots[tick & _MASK]:
                return tick
        return after + _SLOTS  # (not reached while count > 0)


class Watchdog:
    """One deadline at a time on a TimingWheel, set and cleared for the cost of a few stores.

    A request's timeouts (upstream response, stream idle) are armed and disarmed on every
    request, and nearly always disarmed long before they are due. A Watchdog keeps one wheel
    timer for whoever owns the deadline now and does not move it when the deadline moves later
    or goes away: when the timer comes due it compares with the deadline of that moment, runs
    the owner's function if it has passed, re-arms for it if not, and does nothing if there is
    none. Only a deadline sooner than the armed timer moves the timer. An HTTP/1.1 connection
    keeps one (`reuse`: its exchanges come one at a time, so the timer serves all of them); an
    HTTP/2 stream's is used by one exchange and cancels its timer when stopped.

    Precision is the wheel's: a function runs no earlier than its deadline and at most
    GRANULARITY (plus the reactor's lateness) after it.
    """

    __slots__ = ("at", "due", "func", "owner", "reuse", "timer", "wheel")

    def __init__(self, wheel: TimingWheel, reuse: bool = True) -> None:
        self.wheel = wheel
        self.reuse = reuse
        self.owner: object = None  # who set the deadline (stop() by anyone else is ignored)
        self.func: Callable[[], object] | None = None
        self.due = 0.0  # the deadline (clock time) while `func` is set
        self.timer: WheelTimer | None = None
        self.at = 0.0  # the clock time the timer was armed for

    def watch(self, owner: object, due: float, func: Callable[[], object]) -> None:
        """Run `func()` at clock time `due` (replacing the deadline set before, anyone's)."""
        self.owner = owner
        self.func = func
        self.due = due
        if self.timer is None:
            self.at = due
            self.timer = self.wheel.call_at(due, self._fire)
        elif due < self.at:
            self.timer.cancel()
            self.at = due
            self.timer = self.wheel.call_at(due, self._fire)

    def stop(self, owner: object) -> None:
        """`owner`'s deadline is no more (nothing when another owner's is set)."""
        if self.owner is owner:
            self.owner = self.func = None
            if not self.reuse:
                self.close()

    def close(self) -> None:
        """No deadline and no timer (the connection is gone)."""
        self.owner = self.func = None
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    def _fire(self) -> None:
        self.timer = None
        func = self.func
        if func is None:
            return
        due = self.due
        if math.ceil(due * _PER_SECOND - _SLACK) > self.wheel._now_tick():
            # Armed for an earlier deadline that moved later: wait for this one.
            self.at = due
            self.timer = self.wheel.call_at(due, self._fire)
            return
        self.owner = self.func = None
        func()
