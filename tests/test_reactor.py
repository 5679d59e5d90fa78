"""flexgw's reactor (flexgw/compat/epollreactor.py): the same event semantics as Twisted's epoll
reactor without the per-event log context, its plug-in and `twistd flexgw`'s default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.application.reactors import getReactorTypes
from twisted.internet.epollreactor import EPOLLHUP, EPOLLIN, EPOLLOUT, EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from flexgw.compat import writebatch
from flexgw.compat.epollreactor import NAME, FlexReactor

REPO = Path(__file__).resolve().parent.parent


class _Poller:
    """Stands in for the epoll object: poll() hands out the events given, once."""

    def __init__(self, events: list[tuple[int, int]]) -> None:
        self.events = events

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        """The scripted events."""
        events, self.events = self.events, []
        return events

    def unregister(self, fd: int) -> None:
        """Nothing registered for real."""


class _Raise:
    """A doRead/doWrite outcome: raise this exception (instead of returning it as a reason)."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


class _Selectable:
    """A selectable recording what the reactor calls on it, and the log system meanwhile."""

    def __init__(self, fd: int, read: Any = None, write: Any = None) -> None:
        self.fd = fd
        self.read = read  # what doRead returns, or (in a _Raise) the exception it raises
        self.write = write
        self.calls: list[tuple[str, Any, Any]] = []

    def fileno(self) -> int:
        """The descriptor."""
        return self.fd

    def logPrefix(self) -> str:
        """The prefix the reactor logs this selectable's failures with."""
        return f"Selectable,{self.fd}"

    def _run(self, name: str, outcome: Any) -> Any:
        self.calls.append((name, context.get(log.ILogContext).get("system"), None))
        if isinstance(outcome, _Raise):
            raise outcome.exception
        return outcome

    def doRead(self) -> Any:
        """Record the read."""
        return self._run("doRead", self.read)

    def doWrite(self) -> Any:
        """Record the write."""
        return self._run("doWrite", self.write)

    def connectionLost(self, reason: Failure) -> None:
        """Record the disconnection, its reason and the log system it ran in."""
        system = context.get(log.ILogContext).get("system")
        self.calls.append(("connectionLost", system, reason.value))


class EventDispatchMixin:
    """Run against Twisted's EPollReactor and FlexReactor: what the flexgw reactor keeps."""

    reactor_class: type[EPollReactor]

    def dispatch(self, selectable: _Selectable, event: int, reading: bool = True) -> list[dict[str, Any]]:
        """Hand `event` for `selectable` to a fresh reactor's doPoll; the log events emitted."""
        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        reactor._poller = _Poller([(selectable.fd, event)])
        reactor._selectables[selectable.fd] = selectable
        if reading:
            reactor._reads.add(selectable.fd)
        else:
            reactor._writes.add(selectable.fd)
        logged: list[dict[str, Any]] = []
        log.addObserver(logged.append)
        try:
            reactor.doPoll(0)
        finally:
            log.removeObserver(logged.append)
        return [event for event in logged if event.get("isError")]

    def test_read_exception_logged_with_prefix_and_disconnects(self) -> None:
        """doRead raising: the failure is logged with the selectable's log prefix as system, and
        the selectable is disconnected with that exception as the reason (in that context)."""
        boom = ValueError("boom")
        selectable = _Selectable(1000, read=_Raise(boom))
        [failure] = self.dispatch(selectable, EPOLLIN)
        self.assertIs(failure["failure"].value, boom)
        self.assertEqual(failure["system"], "Selectable,1000")
        self.assertEqual(selectable.calls[-1], ("connectionLost", "Selectable,1000", boom))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # type: ignore[attr-defined]

    def test_write_exception_logged_with_prefix_and_disconnects(self) -> None:
        """doWrite raising: logged with the prefix, disconnected with the exception."""
        boom = RuntimeError("write failed")
        selectable = _Selectable(1001, write=_Raise(boom))
        [failure] = self.dispatch(selectable, EPOLLOUT, reading=False)
        self.assertIs(failure["failure"].value, boom)
        self.assertEqual(failure["system"], "Selectable,1001")
        self.assertEqual([c[0] for c in selectable.calls], ["doWrite", "connectionLost"])
        self.assertIs(selectable.calls[-1][2], boom)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # type: ignore[attr-defined]

    def test_read_returning_reason_disconnects(self) -> None:
        """doRead returning a reason disconnects with it, in the selectable's log context; the
        write half of the same event is not run."""
        selectable = _Selectable(1002, read=ConnectionLost(), write=None)
        self.assertEqual(self.dispatch(selectable, EPOLLIN | EPOLLOUT), [])
        self.assertEqual([c[0] for c in selectable.calls], ["doRead", "connectionLost"])
        self.assertEqual(selectable.calls[-1][1], "Selectable,1002")

    def test_hangup_while_reading_is_clean(self) -> None:
        """A hang-up with no input left on a reading descriptor: ConnectionDone, no read."""
        selectable = _Selectable(1003)
        self.assertEqual(self.dispatch(selectable, EPOLLHUP), [])
        [(name, system, reason)] = selectable.calls
        self.assertEqual((name, system, type(reason)), ("connectionLost", "Selectable,1003", ConnectionDone))

    def test_hangup_while_writing_is_lost(self) -> None:
        """A hang-up on a descriptor only written to: ConnectionLost."""
        selectable = _Selectable(1004)
        self.dispatch(selectable, EPOLLHUP, reading=False)
        self.assertEqual(type(selectable.calls[-1][2]), ConnectionLost)

    def test_read_then_write(self) -> None:
        """Both halves of an event run, read first, and nothing is disconnected."""
        selectable = _Selectable(1005)
        self.dispatch(selectable, EPOLLIN | EPOLLOUT)
        self.assertEqual([c[0] for c in selectable.calls], ["doRead", "doWrite"])

    def test_unknown_descriptor_ignored(self) -> None:
        """An event for a descriptor no longer registered is dropped."""
        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        reactor._poller = _Poller([(1006, EPOLLIN)])
        reactor.doPoll(0)  # no KeyError


    def test_main_loop_survives_a_failing_turn(self) -> None:
        """A turn that raises is logged at critical level as "Unexpected error in main loop"
        (namespace twisted.internet.base) and the loop runs the next turn."""
        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        turns: list[object] = []

        def iteration(timeout: object) -> None:
            turns.append(timeout)
            if len(turns) == 1:
                raise ValueError("turn")
            reactor._started = False  # type: ignore[attr-defined]

        reactor.doIteration = iteration  # type: ignore[method-assign]
        reactor._started = True  # type: ignore[attr-defined]
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        try:
            reactor.mainLoop()
        finally:
            globalLogPublisher.removeObserver(logged.append)
        self.assertEqual(len(turns), 2)
        [event] = [event for event in logged if event.get("log_failure") is not None]
        self.assertEqual(
            (event["log_format"], event["log_level"], event["log_namespace"]),
            ("Unexpected error in main loop", LogLevel.critical, "twisted.internet.base"),
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # type: ignore[attr-defined]


    def turns(self, reactor: EPollReactor, count: int) -> list[object]:
        """Run `reactor`'s mainLoop for `count` turns (polling nothing); each turn's timeout."""
        timeouts: list[object] = []

        def iteration(timeout: object) -> None:
            timeouts.append(timeout)
            if len(timeouts) == count:
                reactor._started = False  # type: ignore[attr-defined]

        reactor.doIteration = iteration  # type: ignore[method-assign]
        reactor._started = True  # type: ignore[attr-defined]
        reactor.running = True
        reactor.mainLoop()
        return timeouts

    def test_main_loop_timed_calls(self) -> None:
        """Each turn runs what is due (timed calls, calls from threads) and polls until the next
        timed call; with none, without a timeout; a cancelled call neither runs nor wakes."""
        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        now = [100.0]
        reactor.seconds = lambda: now[0]  # type: ignore[method-assign]
        ran: list[str] = []
        self.assertEqual(self.turns(reactor, 1), [None])
        reactor.callLater(0, ran.append, "now")
        later = reactor.callLater(5, ran.append, "later")
        reactor.callLater(2, ran.append, "cancelled").cancel()
        reactor.callFromThread(ran.append, "thread")
        self.assertEqual(self.turns(reactor, 2), [5.0, 5.0])
        self.assertEqual(ran, ["thread", "now"])
        now[0] = 105.0
        self.assertEqual(self.turns(reactor, 1), [None])
        self.assertEqual(ran, ["thread", "now", "later"])
        self.assertFalse(later.active())


class StockReactorTests(EventDispatchMixin, SynchronousTestCase):
    """The reference: Twisted's own EPollReactor behaves as the mixin says."""

    reactor_class = EPollReactor

    def test_read_runs_in_log_context(self) -> None:
        """Twisted's reactor pushes the selectable's log context around every read."""
        selectable = _Selectable(1010)
        self.dispatch(selectable, EPOLLIN)
        self.assertEqual(selectable.calls[0][:2], ("doRead", "Selectable,1010"))


class FlexReactorTests(EventDispatchMixin, SynchronousTestCase):
    """flexgw's reactor: the same outcomes, without the log context on the common path."""

    reactor_class = FlexReactor

    def test_read_runs_without_log_context(self) -> None:
        """A plain read is dispatched directly: no logPrefix call, no context push."""
        selectable = _Selectable(1011)
        self.dispatch(selectable, EPOLLIN)
        self.assertEqual(selectable.calls[0][0], "doRead")
        self.assertNotEqual(selectable.calls[0][1], "Selectable,1011")

    def test_idle_turn_skips_run_until_current(self) -> None:
        """A turn with nothing due, added or queued from a thread does not call
        runUntilCurrent or timeout(): the poll timeout comes from the timer heap directly."""
        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        now = [100.0]
        reactor.seconds = lambda: now[0]  # type: ignore[method-assign]
        reactor.callLater(30, lambda: None)
        self.assertEqual(self.turns(reactor, 1), [30.0])  # (the new call is inserted)
        calls: list[str] = []
        run, timeout = reactor.runUntilCurrent, reactor.timeout
        reactor.runUntilCurrent = lambda: (calls.append("run"), run())[1]  # type: ignore[method-assign]
        reactor.timeout = lambda: (calls.append("timeout"), timeout())[1]  # type: ignore[method-assign]
        now[0] = 110.0
        self.assertEqual(self.turns(reactor, 3), [20.0, 20.0, 20.0])
        self.assertEqual(calls, [])
        reactor.callLater(1, lambda: None)
        self.assertEqual(self.turns(reactor, 1), [1.0])
        self.assertEqual(calls, ["run", "timeout"])

    def test_turn_batches_writes(self) -> None:
        """What the reads of one turn ask to flush (flexgw.compat.writebatch.flush_soon) is
        flushed once per connection, after the last read: ten upstream responses for one HTTP/2
        client arriving in one poll make one send. A failing flush is logged; the others run."""
        flushed: list[str] = []

        class Connection:
            """A connection that records its flushes."""

            flush_queued = False

            def __init__(self, name: str) -> None:
                self.name = name

            def flush(self) -> None:
                flushed.append(self.name)
                if self.name == "bad":
                    raise OSError("gone")

        client, bad = Connection("client"), Connection("bad")

        class Reader(_Selectable):
            """Each read queues a flush of `client` (and of `bad`)."""

            def doRead(self) -> Any:
                writebatch.begin()  # as an HTTP/2 protocol's dataReceived
                try:
                    writebatch.flush_soon(bad)
                    writebatch.flush_soon(client)
                    flushed.append(f"read {self.fd}")
                finally:
                    writebatch.end()

        reactor = self.reactor_class()
        self.addCleanup(reactor._poller.close)  # type: ignore[attr-defined]
        reactor._poller = _Poller([(fd, EPOLLIN) for fd in range(1020, 1030)])
        for fd in range(1020, 1030):
            reactor._selectables[fd] = Reader(fd)
            reactor._reads.add(fd)
        reactor.doPoll(0)
        self.assertEqual(flushed, [f"read {fd}" for fd in range(1020, 1030)] + ["bad", "client"])
        [failure] = self.flushLoggedErrors(OSError)
        self.assertEqual(str(failure.value), "gone")
        writebatch.flush_soon(client)  # outside a turn: at once
        self.assertEqual(flushed[-1], "client")

    def test_plugin_registered(self) -> None:
        """`twistd --reactor flexgw` finds this module through the twisted/plugins dropin."""
        [plugin] = [r for r in getReactorTypes() if r.shortName == NAME]
        self.assertEqual(plugin.moduleName, "flexgw.compat.epollreactor")


def _in_child(code: str) -> str:
    """Run `code` in a fresh interpreter (nothing installed a reactor yet); its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    return out.stdout.strip()


class DefaultReactorTests(SynchronousTestCase):
    """`twistd flexgw` installs flexgw's reactor unless twistd's --reactor chose another."""

    CODE = (
        "import sys, tempfile\n"
        "from twisted.scripts._twistd_unix import ServerOptions\n"
        "from flexgw.tap import worker_command\n"
        "config = ServerOptions()\n"
        "config.parseOptions(sys.argv[1:] + ['flexgw', '--conf', tempfile.mkdtemp()])\n"
        "from twisted.internet import reactor\n"
        "argv = worker_command(config.subOptions)\n"
        "print(type(reactor).__name__, argv[argv.index('--reactor') + 1])\n"
    )

    def test_default_is_flexgw(self) -> None:
        """No --reactor: FlexReactor, and --workers' workers are started with it too."""
        self.assertEqual(_in_child(self.CODE), "FlexReactor flexgw")

    def test_stock_reactor_kept(self) -> None:
        """`twistd --reactor epoll flexgw`: Twisted's reactor, in the workers too."""
        code = self.CODE.replace("sys.argv[1:]", "['--reactor', 'epoll']")
        self.assertEqual(_in_child(code), "EPollReactor epoll")
