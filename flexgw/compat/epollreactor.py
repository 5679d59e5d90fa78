"""flexgw's reactor: Twisted's epoll reactor without the per-event log context.

Twisted's `EPollReactor.doPoll` runs every readiness event through
`twisted.python.log.callWithLogger`: a `logPrefix()` call, a copy of the current log context
dict and a push/pop on the context stack, about 2.6 µs per event on the development machine,
before the selectable's `doRead`/`doWrite` even starts. `FlexReactor` dispatches the event
directly (the same checks as Twisted's `_PollLikeMixin._doReadOrWrite`, inlined) and only
enters the log context where it is read:

- an exception escaping `doRead`/`doWrite` is logged with that selectable's log prefix as its
  `system` (as Twisted does) and disconnects the selectable with that exception as the reason;
- a disconnection (a hang-up event, or `doRead`/`doWrite` returning a reason) runs
  `connectionLost` inside the selectable's log context, as Twisted does.

`mainLoop` is Twisted's too, except that its failure handler (a context manager entered and
left on every turn) becomes a `try` around the loop, re-entered after a failure.

What changes: a legacy `twisted.python.log.msg` made *during a successful read or write*
carries the system of the code around the reactor (`-`) instead of the selectable's prefix.
`twisted.logger.Logger` events never read that context. Everything else (timers, threads,
signals, process support, `callFromThread`) is the inherited epoll reactor's.

Private API (Twisted 26.10): `EPollReactor._poller`, `_selectables`, `_reads`, `_POLL_IN`,
`_POLL_OUT`, `_POLL_DISCONNECTED`, `PosixReactorBase._disconnectSelectable`,
`ReactorBase._started` (mainLoop's condition) and what mainLoop reads to skip an idle
`runUntilCurrent`: `ReactorBase._pendingTimedCalls`, `_newTimedCalls`, `_justStopped`,
`_cancellations` and `threadCallQueue`;
tests/test_compat.py checks them and that Twisted's own `doPoll` still has the shape this copy
replaces (it fails naming Twisted's version if not). Installed as the reactor plug-in `flexgw`
(twisted/plugins/flexgw_plugin.py): `twistd --reactor flexgw ...`; `twistd flexgw` installs it
by default (flexgw/tap.py), `twistd --reactor epoll flexgw ...` keeps Twisted's.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionFdescWentAway
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import Logger, LogLevel
from twisted.python import log
from twisted.python.failure import Failure

from flexgw.compat import writebatch

_base_log = Logger(namespace="twisted.internet.base")  # mainLoop's events, as Twisted's

#: The reactor plug-in's short name (`twistd --reactor flexgw`).
NAME = "flexgw"

#: The longest poll timeout (seconds), as Twisted's `ReactorBase.timeout`.
_LONGEST = 2147483

#: The HTTP/2 write batch (flexgw.compat.writebatch) each turn opens and closes.
_WRITES = writebatch.BATCH

#: The reason a selectable whose fileno() is -1 is disconnected with (as posixbase's).
_NO_FILEDESC = ConnectionFdescWentAway("File descriptor lost")


class FlexReactor(EPollReactor):
    """An epoll reactor whose per-event dispatch skips `callWithLogger` on the common path."""

    def doPoll(self, timeout: float | None) -> None:
        """Poll for events and dispatch each to its selectable's doRead/doWrite."""
        if timeout is None:
            timeout = -1  # wait indefinitely
        selectables = self._selectables
        try:
            events = self._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        if not events:
            return
        poll_in = self._POLL_IN
        poll_out = self._POLL_OUT
        hangup = self._POLL_DISCONNECTED
        # HTTP/2 writes queued by this turn's reads go out once, at its end (writebatch.begin and
        # end, inlined: this runs on every turn)
        batch = _WRITES
        batch.depth += 1
        try:
            self._dispatch(events, selectables, poll_in, poll_out, hangup)
        finally:
            batch.depth -= 1
            if batch.pending and not batch.depth:
                writebatch.flush_pending()

    def _dispatch(self, events: Any, selectables: Any, poll_in: int, poll_out: int, hangup: int) -> None:
        """Each event to its selectable's doRead/doWrite (Twisted's `_doReadOrWrite`, inlined)."""
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event & hangup and not event & poll_in:
                # A hang-up with no input left: clean if we were reading, else lost.
                if fd in self._reads:
                    self._lost(selectable, CONNECTION_DONE, True)
                else:
                    self._lost(selectable, CONNECTION_LOST, False)
                continue
            why = None
            in_read = False
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & poll_in:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & poll_out:
                        why = selectable.doWrite()
                        in_read = False
            except BaseException:  # noqa: BLE001 (as Twisted: any failure disconnects it)
                log.callWithLogger(selectable, self._failed, selectable, Failure(), in_read)
                continue
            if why:
                self._lost(selectable, why, in_read)

    doIteration = doPoll

    def mainLoop(self) -> None:
        """Twisted's loop (run due timed calls, poll, dispatch) with its failure handler set
        up once, not entered and left on every turn: a turn that raises is logged at critical
        level ("Unexpected error in main loop", as Twisted's) and the loop goes on.

        A turn with nothing for `runUntilCurrent` to do (no call from a thread, no timed call
        added or due, no heap to compact, no stop) skips it and `timeout()`: the poll timeout
        is worked out here from the same heap, as `timeout()` does."""
        seconds = self.seconds
        while self._started:
            try:
                while self._started:
                    pending = self._pendingTimedCalls
                    now = seconds()
                    if (
                        self.threadCallQueue
                        or self._newTimedCalls
                        or self._justStopped
                        or self._cancellations > 50
                        or (pending and pending[0].time <= now)
                    ):
                        self.runUntilCurrent()
                        timeout = self.timeout()
                    elif pending:
                        timeout = min(pending[0].time - now, _LONGEST)
                    else:
                        timeout = None
                    self.doIteration(self.running and timeout)
            except BaseException:  # noqa: BLE001 (as Twisted's _topHandler: log, go on)
                _base_log.failure("Unexpected error in main loop", Failure(), LogLevel.critical)
        _base_log.info("Main loop terminated.")

    def _lost(self, selectable: Any, why: Any, in_read: bool) -> None:
        """Disconnect `selectable` inside its log context (connectionLost may log)."""
        log.callWithLogger(selectable, self._disconnectSelectable, selectable, why, in_read)

    def _failed(self, selectable: Any, failure: Failure, in_read: bool) -> None:
        """doRead/doWrite raised: log it (in the selectable's log context) and disconnect."""
        log.err(failure)
        self._disconnectSelectable(selectable, failure.value, in_read)


def install() -> FlexReactor:
    """Install FlexReactor as the global reactor (the `flexgw` reactor plug-in's entry)."""
    from twisted.internet.main import installReactor

    reactor = FlexReactor()
    installReactor(reactor)
    return reactor
