"""sd_notify without dependencies: readiness, reload, stopping, status and watchdog for systemd.

The protocol is one datagram per message, `KEY=value` lines, sent to the Unix socket named by
`NOTIFY_SOCKET` (a leading `@` means the abstract namespace). Without `NOTIFY_SOCKET` every call
is a no-op, so the gateway behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger(namespace="flexgw.systemd")


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds (what systemd compares MONOTONIC_USEC against)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address named by a NOTIFY_SOCKET value; None when unset or unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock and other families: not supported


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when NOTIFY_SOCKET is unset.

    `reactor` schedules the watchdog pings (every half of WATCHDOG_USEC, when systemd set it for
    this process).
    """

    def __init__(
        self,
        reactor: Any,
        environ: Mapping[str, str],
        monotonic_usec: Callable[[], int] = _monotonic_usec,
        pid: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.address = notify_address(environ.get("NOTIFY_SOCKET"))
        self.monotonic_usec = monotonic_usec
        self.watchdog_interval: float | None = None
        self._watchdog: LoopingCall | None = None
        self._warned = False
        if self.address is None:
            return
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
            owner = int(environ.get("WATCHDOG_PID", "0"))
        except ValueError:
            usec, owner = 0, 0
        if usec > 0 and (owner == 0 or owner == (os.getpid() if pid is None else pid)):
            self.watchdog_interval = usec / 2 / 1_000_000

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message made of `lines`; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:  # once: a gone socket must not flood the log every ping
                self._warned = True
                _log.warn("sd_notify to {address!r} failed: {error}", address=self.address, error=exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up (or back up after a reload)."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts (systemd waits for the next READY=1)."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self.monotonic_usec()}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """The service is shutting down."""
        return self.notify("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        """A one-line status shown by `systemctl status`."""
        return self.notify(*_status(status))

    def ping(self) -> bool:
        """One watchdog keep-alive."""
        return self.notify("WATCHDOG=1")

    def start_watchdog(self) -> None:
        """Ping every half of WATCHDOG_USEC (no-op when systemd asked for no watchdog)."""
        if self.watchdog_interval is None or self._watchdog is not None:
            return
        self._watchdog = LoopingCall(self.ping)
        self._watchdog.clock = self.reactor
        self._watchdog.start(self.watchdog_interval, now=True)

    def stop_watchdog(self) -> None:
        """Stop pinging."""
        if self._watchdog is not None:
            if self._watchdog.running:
                self._watchdog.stop()
            self._watchdog = None


def _status(status: str | None) -> tuple[str, ...]:
    """The STATUS= line for `status` (one line: newlines would start new keys)."""
    if status is None:
        return ()
    return ("STATUS=" + " ".join(status.splitlines()),)
