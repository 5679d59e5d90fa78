"""The worker side of `--workers`: the AMP connection to the supervisor, and a notifier that
reports to the supervisor instead of systemd.

A worker is a whole gateway (`GatewayService`) started by the supervisor with the AMP socket
in `FLEXGW_SUPERVISOR_FD` and its index in `FLEXGW_WORKER`. It binds its listeners with
SO_REUSEPORT, keeps its rate-limit and spike-control counters in the supervisor, answers the
supervisor's reload, stop, readiness, metrics and status requests, and drains and exits when the
supervisor goes away.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from flexgw.service import ampcommands as commands
from flexgw.service.admin import ALLOW_FLAGS, readiness, status_json
from flexgw.service.metrics import make_registry, render

if TYPE_CHECKING:
    from flexgw.service.gateway import GatewayService

_log = Logger(namespace="flexgw.worker")

SUPERVISOR_FD_ENV = "FLEXGW_SUPERVISOR_FD"
WORKER_ENV = "FLEXGW_WORKER"


class WorkerProtocol(amp.AMP):
    """The worker's end of the AMP connection to the supervisor."""

    def __init__(self, index: int, on_lost: Callable[[], None], on_stop: Callable[[], None]) -> None:
        super().__init__()
        self.index = index
        self.gateway: GatewayService | None = None  # set once the gateway is built
        self.on_lost = on_lost  # the supervisor is gone
        self.on_stop = on_stop  # the supervisor asks for a drain
        self._registry: Any = None

    def _gateway(self) -> GatewayService:
        if self.gateway is None:
            raise RuntimeError("the worker's gateway is not built yet")
        return self.gateway

    @commands.Ping.responder
    def ping(self) -> dict[str, Any]:
        """The heartbeat: answering proves the reactor turns."""
        return {}

    @commands.Reload.responder
    def reload(self) -> dict[str, Any]:
        """Reload the configuration now."""
        gateway = self._gateway()
        ok = gateway.reload()
        return {"ok": ok, "status": gateway.status_line()}

    @commands.Stop.responder
    def stop(self) -> dict[str, Any]:
        """Drain and exit (answered first, the drain follows)."""
        self._gateway().reactor.callLater(0, self.on_stop)
        return {}

    @commands.StopNow.responder
    def stop_now(self) -> dict[str, Any]:
        """Cut the drain short (or, when it has not begun yet, make it end at once)."""
        gateway = self._gateway()
        if not gateway.stopping:  # `Stop` was answered, the reactor's shutdown is still to come
            gateway.drain_seconds = 0.0
        gateway.drain_now()
        return {}

    @commands.Readiness.responder
    def readiness(self, allow: list[str]) -> dict[str, Any]:
        """This worker's readiness."""
        ready, reasons = readiness(self._gateway(), {flag: flag in allow for flag in ALLOW_FLAGS})
        return {"ready": ready, "reasons": reasons}

    @commands.CollectMetrics.responder
    def collect_metrics(self) -> dict[str, Any]:
        """This worker's metrics (Prometheus text)."""
        if self._registry is None:
            self._registry = make_registry(self._gateway())
        return {"text": render(self._registry)}

    @commands.WorkerStatus.responder
    def worker_status(self) -> dict[str, Any]:
        """This worker's /status document."""
        return {"json": json.dumps(status_json(self._gateway())).encode("utf-8")}

    def connectionLost(self, reason: Any) -> None:
        """The supervisor is gone: drain and exit."""
        super().connectionLost(reason)
        self.on_lost()


class SupervisedNotifier:
    """The worker's `Notifier`: readiness goes to the supervisor, which speaks to systemd once
    every worker is ready; the other messages are the supervisor's to send."""

    enabled = True
    watchdog_interval = None

    def __init__(self, supervisor: WorkerProtocol, index: int, pid: int | None = None) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid = os.getpid() if pid is None else pid

    def ready(self, status: str | None = None) -> bool:
        """Tell the supervisor this worker serves."""
        d = self.supervisor.callRemote(
            commands.WorkerReady, worker=self.index, pid=self.pid, status=status or ""
        )
        d.addErrback(lambda failure: _log.warn("Cannot report to the supervisor: {f}", f=failure.value))
        return True

    def reloading(self, status: str | None = None) -> bool:
        """The supervisor reports reloads."""
        return False

    def stopping(self, status: str | None = None) -> bool:
        """The supervisor reports the stop."""
        return False

    def status(self, status: str) -> bool:
        """The supervisor sends STATUS lines."""
        return False

    def ping(self) -> bool:
        """The supervisor pings the watchdog."""
        return False

    def start_watchdog(self) -> None:
        """The supervisor pings the watchdog."""

    def stop_watchdog(self) -> None:
        """The supervisor pings the watchdog."""


def connect_to_supervisor(reactor: Any, fd: int, protocol: WorkerProtocol) -> None:
    """Run `protocol` on the inherited AF_UNIX socket `fd` (closed here; the reactor keeps a copy)."""
    import socket

    factory = Factory()
    factory.buildProtocol = lambda addr: protocol  # type: ignore[method-assign]
    try:
        reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
    finally:
        os.close(fd)
