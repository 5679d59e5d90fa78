"""The shared timing wheel (flexgw/http/wheel.py) on an injected Clock: when timers run, what
cancel/reset do, and that the wheel ticks only while it holds timers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from flexgw.http.wheel import GRANULARITY, TimingWheel, Watchdog


class WheelTests(SynchronousTestCase):
    """One wheel on a Clock starting at 0."""

    def setUp(self) -> None:
        """A fresh clock and its wheel; `fired` records (label, time)."""
        self.clock = Clock()
        self.wheel = TimingWheel.of(self.clock)
        self.fired: list[tuple[str, float]] = []

    def arm(self, delay: float, label: str = "t") -> object:
        """Arm a timer recording its label and the clock time it ran at."""
        return self.wheel.call_later(delay, lambda: self.fired.append((label, self.clock.seconds())))

    def test_exact_when_aligned(self) -> None:
        """Armed at a multiple of 100 ms for a multiple of 100 ms: runs exactly at its deadline."""
        self.clock.advance(0.3)
        self.arm(15.0)
        self.clock.advance(14.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [("t", 0.3 + 14.9 + 0.1)])

    def test_unaligned_within_granularity(self) -> None:
        """Armed between ticks: not before the deadline, at the next tick after it."""
        self.clock.advance(0.05)
        self.arm(1.0)
        self.clock.advance(0.999)
        self.assertEqual(self.fired, [])
        self.clock.advance(GRANULARITY)
        [(_, when)] = self.fired
        self.assertTrue(1.05 <= when <= 1.05 + GRANULARITY, when)

    def test_cancel(self) -> None:
        """A cancelled timer never runs; cancelling twice is harmless."""
        timer = self.arm(1.0)
        timer.cancel()
        timer.cancel()
        self.assertFalse(timer.active())
        self.clock.advance(5)
        self.assertEqual(self.fired, [])

    def test_ticks_only_while_holding_timers(self) -> None:
        """No DelayedCall while empty; one tick call however many timers; none once they ran."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        timers = [self.arm(0.1 * (i % 50 + 1)) for i in range(1000)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for timer in timers[1:]:
            timer.cancel()
        self.clock.advance(0.1)
        self.assertEqual(len(self.fired), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.wheel.count, 0)

    def test_sleeps_through_empty_ticks(self) -> None:
        """The wheel wakes the clock only at ticks whose slot holds a timer: a 15 s timer
        beside many cancelled 5 s ones costs two wake-ups, not 150 ticks."""
        wakes = []
        tick = self.wheel._tick
        self.wheel._tick = lambda: (wakes.append(self.clock.seconds()), tick())  # type: ignore[method-assign]
        self.arm(15.0, "late")
        for timer in [self.arm(5.0) for _ in range(100)]:
            timer.cancel()
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 5.0)
        self.clock.advance(5.0)
        self.clock.advance(9.9)
        self.assertEqual(wakes, [5.0])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 15.0)
        self.clock.advance(0.1)
        self.assertEqual((wakes, self.fired), ([5.0, 15.0], [("late", 15.0)]))

    def test_cancel_all_stops_ticking(self) -> None:
        """Cancelling the last timer lets the wheel stop at its next tick."""
        self.arm(30.0).cancel()
        self.clock.advance(0.1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reset(self) -> None:
        """reset() moves a timer later or sooner, and re-arms one that ran."""
        timer = self.arm(1.0)
        timer.reset(3.0)
        self.clock.advance(2.9)
        self.assertEqual(self.fired, [])
        timer.reset(0.5)
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [("t", 3.4)])
        self.assertFalse(timer.active())
        timer.reset(1.0)
        self.assertTrue(timer.active())
        self.clock.advance(1.0)
        self.assertEqual(len(self.fired), 2)

    def test_beyond_one_round(self) -> None:
        """A timer further away than the wheel's 4096 slots waits for its own round."""
        self.arm(1000.0)
        self.clock.advance(409.6)
        self.clock.advance(409.6)
        self.assertEqual(self.fired, [])
        self.clock.advance(1000 - 819.2)
        self.assertEqual([label for label, _ in self.fired], ["t"])

    def test_armed_while_running(self) -> None:
        """A timer armed by a running timer, even for 0 s, runs at the next tick."""
        self.wheel.call_later(1.0, lambda: self.arm(0.0, "inner"))
        self.clock.advance(1.0)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual([label for label, _ in self.fired], ["inner"])

    def test_failure_logged_others_run(self) -> None:
        """A timer that raises is logged; the others due at that tick still run."""
        self.wheel.call_later(1.0, lambda: 1 / 0)
        self.arm(1.0)
        self.clock.advance(1.0)
        self.assertEqual(len(self.fired), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_clock_jump(self) -> None:
        """A clock that jumps past several rounds runs every due timer once, keeps the rest."""
        self.arm(5.0, "soon")
        self.arm(100000.0, "later")
        self.clock.advance(50000.0)
        self.assertEqual([label for label, _ in self.fired], ["soon"])
        self.clock.advance(50000.0)
        self.assertEqual([label for label, _ in self.fired], ["soon", "later"])

    def test_one_wheel_per_clock(self) -> None:
        """Everything on one clock shares its wheel; another clock has its own."""
        self.assertIs(TimingWheel.of(self.clock), self.wheel)
        self.assertIsNot(TimingWheel.of(MemoryReactorClock()), self.wheel)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 40000), st.booleans()), max_size=30),
        st.integers(20, 400),
    )
    def test_never_early_at_most_one_tick_late(
        self, plan: list[tuple[int, int, bool]], step: int
    ) -> None:
        """Timers armed at any time for any delay (ms) run in [deadline, deadline + 100 ms]
        (the clock advanced in steps of `step` ms), cancelled ones never."""
        clock = Clock()
        wheel = TimingWheel(clock)
        ran: dict[int, float] = {}
        deadlines: dict[int, float] = {}
        timers = {}
        for index, (at, delay, cancel) in enumerate(sorted(plan)):
            while clock.seconds() < at / 1000:
                clock.advance(min(step / 1000, at / 1000 - clock.seconds()))
            timers[index] = wheel.call_later(delay / 1000, lambda i=index: ran.setdefault(i, clock.seconds()))
            deadlines[index] = clock.seconds() + delay / 1000
            if cancel:
                timers[index].cancel()
        end = max(deadlines.values(), default=0.0) + 2 * GRANULARITY + step / 1000
        while clock.seconds() < end:
            clock.advance(step / 1000)
        for index, (_, _, cancel) in enumerate(sorted(plan)):
            if cancel:
                self.assertNotIn(index, ran)
            else:
                self.assertGreaterEqual(ran[index], deadlines[index] - 1e-6)
                # at most one tick late, plus how far one clock step overshoots it
                self.assertLessEqual(ran[index], deadlines[index] + GRANULARITY + step / 1000 + 1e-6)
        self.assertEqual(wheel.count, 0)


class WatchdogTests(SynchronousTestCase):
    """Watchdog: one deadline at a time on the wheel; moving it later or stopping it leaves the
    timer where it is, and a timer that comes due runs only a deadline that has passed."""

    def setUp(self) -> None:
        """A fresh clock, its wheel and a reusable watchdog; `fired` records (label, time)."""
        self.clock = Clock()
        self.wheel = TimingWheel.of(self.clock)
        self.watchdog = Watchdog(self.wheel)
        self.fired: list[tuple[str, float]] = []

    def watch(self, owner: object, delay: float, label: str = "t") -> None:
        """Set `owner`'s deadline `delay` seconds from now."""
        self.watchdog.watch(
            owner, self.clock.seconds() + delay,
            lambda: self.fired.append((label, self.clock.seconds())),
        )

    def test_runs_at_its_deadline(self) -> None:
        """A deadline set once runs at its time, exactly when aligned, and then not again."""
        self.watch("a", 15.0)
        self.clock.advance(14.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [("t", 15.0)])
        self.assertIsNone(self.watchdog.owner)
        self.clock.advance(100)
        self.assertEqual(len(self.fired), 1)

    def test_later_deadline_keeps_the_timer(self) -> None:
        """Moving the deadline later does not touch the wheel; the timer armed for the earlier
        one re-arms for the later one when it comes due."""
        self.watch("a", 15.0)
        [timer] = self.wheel.armed()
        self.clock.advance(5)
        self.watch("b", 15.0, "b")
        self.assertEqual(self.wheel.armed(), [timer])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [("b", 20.0)])

    def test_sooner_deadline_moves_the_timer(self) -> None:
        """A deadline sooner than the armed timer re-arms it sooner."""
        self.watch("a", 300.0)
        self.watch("a", 15.0)
        self.clock.advance(15)
        self.assertEqual(self.fired, [("t", 15.0)])
        self.assertEqual(self.wheel.armed(), [])

    def test_stop_by_owner_only(self) -> None:
        """stop() by another owner leaves the deadline; by its owner it runs nothing, and the
        timer kept for reuse runs nothing when it comes due."""
        self.watch("a", 15.0)
        self.watchdog.stop("b")
        self.watchdog.stop("a")
        self.assertEqual(len(self.wheel.armed()), 1)  # kept: the next exchange reuses it
        self.clock.advance(30)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.wheel.armed(), [])

    def test_not_reused_cancels_on_stop(self) -> None:
        """An HTTP/2 stream's watchdog (reuse=False) cancels its timer when its owner stops."""
        watchdog = Watchdog(self.wheel, reuse=False)
        watchdog.watch("a", 15.0, lambda: self.fired.append(("t", 0.0)))
        watchdog.stop("a")
        self.assertEqual(self.wheel.armed(), [])

    def test_close(self) -> None:
        """close() drops the deadline and the timer (the connection is gone)."""
        self.watch("a", 15.0)
        self.watchdog.close()
        self.assertEqual(self.wheel.armed(), [])
        self.clock.advance(30)
        self.assertEqual(self.fired, [])

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 20000), st.booleans()), max_size=30),
        st.integers(20, 400),
    )
    def test_never_early_at_most_one_tick_late(
        self, plan: list[tuple[int, int, bool]], step: int
    ) -> None:
        """Owners one after another set a deadline at any time for any delay (ms), each
        replacing the one before, some stopping theirs at once: one runs only if not stopped
        and not replaced before it ran, in [deadline, deadline + 100 ms] (the clock advanced in
        steps of `step` ms); the last one set runs unless stopped."""
        clock = Clock()
        watchdog = Watchdog(TimingWheel(clock))
        ran: list[tuple[int, float]] = []
        deadlines: list[float] = []
        set_at: list[float] = []
        plan = sorted(plan)
        for index, (at, delay, stop) in enumerate(plan):
            while clock.seconds() < at / 1000:
                clock.advance(min(step / 1000, at / 1000 - clock.seconds()))
            set_at.append(clock.seconds())
            deadlines.append(clock.seconds() + delay / 1000)
            watchdog.watch(index, deadlines[-1], lambda i=index: ran.append((i, clock.seconds())))
            if stop:
                watchdog.stop(index)
        end = max(deadlines, default=0.0) + 2 * GRANULARITY + step / 1000
        while clock.seconds() < end:
            clock.advance(step / 1000)
        for index, when in ran:
            self.assertFalse(plan[index][2])  # a stopped deadline never runs
            self.assertTrue(all(t >= when for t in set_at[index + 1 :]))  # nor a replaced one
            self.assertGreaterEqual(when, deadlines[index] - 1e-6)
            self.assertLessEqual(when, deadlines[index] + GRANULARITY + step / 1000 + 1e-6)
        if plan and not plan[-1][2]:
            self.assertIn(len(plan) - 1, [i for i, _ in ran])
        self.assertEqual(len(ran), len({i for i, _ in ran}))  # each at most once
