"""`--workers N`: a supervisor process runs N gateway worker processes on the same listeners.

Listening: each worker binds every listener itself with SO_REUSEPORT (`flexgw.service.sockets`),
and sockets passed by systemd (socket activation) are inherited by every worker at the same
descriptor numbers. Binding in each worker, rather than once in the supervisor, lets a reload add
or drop listeners inside each worker exactly as with one process, without the supervisor reading
the configuration or passing descriptors around; the cost is that connections waiting in the
backlog of a worker that dies are reset (the kernel does not move them to another worker).

Each worker gets one end of an AF_UNIX socketpair (its descriptor number in
`FLEXGW_SUPERVISOR_FD`) and speaks AMP over it (`flexgw.service.ampcommands`):

- readiness: a worker reports `WorkerReady` once its listeners are bound and its configuration
  applied; the supervisor sends systemd READY=1 once every worker has, and STATUS= lines;
- reload (SIGHUP, a file change): RELOADING=1, `Reload` to every worker, READY=1 when all
  answered;
- stop (SIGTERM): STOPPING=1, `Stop` to every worker (each drains as with one process), exit
  when all are gone; a second SIGTERM sends `StopNow`, which cuts their drains;
- SIGUSR1 is passed on to every worker (log files reopened);
- a worker that dies is started again, after a backoff that grows while workers keep dying young;
  one that stops answering the supervisor's heartbeat (`Ping`) for `--worker-timeout` seconds
  is killed, then restarted the same way;
- rate-limit and spike-control counters live here (`SupervisorCounters`), one check per request
  over AMP, so quotas are exact across workers;
- the admin listener is the supervisor's only: `/metrics` gathers every worker's metrics (each
  sample labelled `worker`), `/probes/readiness` is ready when every worker is, `/status` shows
  the workers and the first live worker's document.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from flexgw.service import ampcommands as commands
from flexgw.service.admin import ALLOW_FLAGS, _flag, _json, _QuietSite, probes_root
from flexgw.service.dashboard import DashboardResource
from flexgw.service.systemd import Notifier
from flexgw.service.worker import SUPERVISOR_FD_ENV, WORKER_ENV
from flexgw.storage.supervised import SupervisorCounters

_log = Logger(namespace="flexgw.supervisor")

#: A worker that lived this long before dying is restarted at once (its failure count resets).
HEALTHY_SECONDS = 10.0
#: Restart delays: 0 after a healthy run, then BACKOFF_BASE doubling up to BACKOFF_MAX seconds.
BACKOFF_BASE = 0.25
BACKOFF_MAX = 30.0
#: Seconds after the drain time at which workers still running are killed.
KILL_GRACE = 5.0
#: A worker that does not answer the supervisor's heartbeat for this long is killed (and then
#: restarted); `--worker-timeout`, 0 to never check.
WORKER_TIMEOUT = 30.0

# Environment a worker must not inherit: systemd talks to the supervisor only.
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def worker_count(value: str, cpu_count: Callable[[], int | None] = os.cpu_count) -> int:
    """`--workers` as a number: `auto` is the number of CPUs; raises ValueError."""
    if value.strip().lower() == "auto":
        return max(cpu_count() or 1, 1)
    count = int(value)
    if not 1 <= count <= 1024:
        raise ValueError(value)
    return count


class SupervisorProtocol(amp.AMP):
    """The supervisor's end of one worker's AMP connection."""

    def __init__(self, supervisor: SupervisorService, slot: WorkerSlot) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.slot = slot

    @commands.WorkerReady.responder
    def worker_ready(self, worker: int, pid: int, status: str) -> dict[str, Any]:
        """A worker serves."""
        self.supervisor.worker_ready(self.slot, status)
        return {}

    @commands.RateLimitHit.responder
    def rate_limit_hit(self, namespace: str, key: str, limits: list[int]) -> dict[str, Any]:
        """One rate-limit check in the shared counters."""
        return self.supervisor.counters.amp_hit(namespace, key, limits)

    @commands.SpikeTake.responder
    def spike_take(self, namespace: str, maximum: int, period_ms: int) -> dict[str, Any]:
        """One spike-control take in the shared windows."""
        return self.supervisor.counters.amp_spike(namespace, maximum, period_ms)

    def connectionLost(self, reason: Any) -> None:
        """The worker's end closed (it exited, or is exiting)."""
        super().connectionLost(reason)
        if self.slot.protocol is self:
            self.slot.protocol = None


class WorkerSlot:
    """One worker position: its current process, AMP connection and restart bookkeeping."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.transport: Any = None  # the IProcessTransport while a process runs
        self.protocol: SupervisorProtocol | None = None
        self.pid: int | None = None
        self.ready = False
        self.status = ""
        self.started_at = 0.0
        self.failures = 0  # deaths in a row, each before HEALTHY_SECONDS
        self.restarts = 0
        self.restart_timer: Any = None
        self.pinging = False  # a heartbeat Ping is awaiting its answer
        self.ended: Deferred[None] | None = None  # fires when the current process exits


class _WorkerProcess(ProcessProtocol):
    """Watches one worker process for its exit."""

    def __init__(self, supervisor: SupervisorService, slot: WorkerSlot) -> None:
        self.supervisor = supervisor
        self.slot = slot

    def processEnded(self, reason: Failure) -> None:
        """The worker exited."""
        self.supervisor.worker_ended(self.slot, reason)


class SupervisorService(Service):
    """Starts and supervises `count` workers (see the module docstring).

    `command(index)` is the argv of worker `index`; `environ` its environment base.
    `inherited_fds` descriptors from 3 on (systemd's sockets) are passed to every worker.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: Callable[[int], Sequence[str]],
        environ: Mapping[str, str],
        notifier: Notifier | None = None,
        drain_seconds: float = 25.0,
        inherited_fds: int = 0,
        inherited_names: str | None = None,
        executable: str | None = None,
        worker_timeout: float = WORKER_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.worker_timeout = worker_timeout
        self._heartbeat: LoopingCall | None = None
        self.count = count
        self.command = command
        self.environ = environ
        self.notifier = notifier if notifier is not None else Notifier(reactor, environ)
        self.drain_seconds = drain_seconds
        self.inherited_fds = inherited_fds
        self.inherited_names = inherited_names
        self.executable = executable
        self.counters = SupervisorCounters(reactor)
        self.slots = [WorkerSlot(index) for index in range(count)]
        self.stopping = False
        self.announced = False  # READY=1 sent for the start
        self.reloads = 0
        self._kill_timer: Any = None

    # lifecycle

    def startService(self) -> None:
        """Start every worker; READY=1 follows when all report ready."""
        super().startService()
        self.stopping = False
        for slot in self.slots:
            self._spawn(slot)
        self.notifier.status(self.status_line())
        self.notifier.start_watchdog()
        if self.worker_timeout > 0:
            self._heartbeat = LoopingCall(self.heartbeat)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(self.worker_timeout / 3, now=False)

    def heartbeat(self) -> None:
        """Ask every ready worker for a `Ping`; one that does not answer within `worker_timeout`
        (hung: an endless loop, stopped, deadlocked) is killed, and restarted as a dead one."""
        for slot in self.slots:
            if slot.protocol is None or not slot.ready or slot.pinging or self.stopping:
                continue
            slot.pinging = True
            d = slot.protocol.callRemote(commands.Ping)
            d.addTimeout(self.worker_timeout, self.reactor)
            d.addCallbacks(self._pong, self._no_pong, callbackArgs=(slot, slot.pid), errbackArgs=(slot, slot.pid))

    def _pong(self, answer: object, slot: WorkerSlot, pid: int | None) -> None:
        slot.pinging = False

    def _no_pong(self, failure: Failure, slot: WorkerSlot, pid: int | None) -> None:
        slot.pinging = False
        if slot.pid != pid or slot.transport is None or self.stopping:
            return  # that process is already gone
        _log.error(
            "Worker {index} (pid {pid}) did not answer for {timeout:g}s ({why}): killed",
            index=slot.index,
            pid=pid,
            timeout=self.worker_timeout,
            why=failure.getErrorMessage(),
        )
        self._signal(slot, "KILL")

    def _worker_environ(self, slot: WorkerSlot, fd: int) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in _SUPERVISOR_ONLY}
        env[WORKER_ENV] = str(slot.index)
        env[SUPERVISOR_FD_ENV] = str(fd)
        if self.inherited_fds:
            # LISTEN_PID is the worker's own pid, which is not known before the fork: the worker
            # sets it (FLEXGW_WORKER tells it these descriptors were passed on to it).
            env["LISTEN_FDS"] = str(self.inherited_fds)
            if self.inherited_names is not None:
                env["LISTEN_FDNAMES"] = self.inherited_names
        return env

    def _spawn(self, slot: WorkerSlot) -> None:
        """Start the process of `slot`."""
        slot.restart_timer = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = 3 + self.inherited_fds  # after systemd's descriptors
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, fd: theirs.fileno()}
        for inherited in range(3, 3 + self.inherited_fds):
            child_fds[inherited] = inherited
        argv = list(self.command(slot.index))
        slot.ready = False
        slot.status = ""
        slot.ended = Deferred()
        try:
            slot.transport = self.reactor.spawnProcess(
                _WorkerProcess(self, slot),
                self.executable or argv[0],
                argv,
                env=self._worker_environ(slot, fd),
                path=os.getcwd(),
                childFDs=child_fds,
            )
        except Exception:  # noqa: BLE001 (OSError and friends: try again later)
            _log.failure("Cannot start worker {index}", index=slot.index)
            ours.close()
            theirs.close()
            ended, slot.ended = slot.ended, None
            ended.callback(None)
            slot.failures += 1  # back off: a spawn that fails now (EMFILE...) may fail again
            self._schedule_restart(slot)
            return
        finally:
            theirs.close()
        slot.pid = slot.transport.pid
        slot.started_at = self.reactor.seconds()
        protocol = SupervisorProtocol(self, slot)
        slot.protocol = protocol
        factory = Factory()
        factory.buildProtocol = lambda addr: protocol  # type: ignore[method-assign]
        try:
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        finally:
            ours.close()
        _log.info("Worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def worker_ready(self, slot: WorkerSlot, status: str) -> None:
        """A worker reported ready: READY=1 once all are (the first time)."""
        slot.ready = True
        slot.status = status
        if self.stopping:
            return
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            self.notifier.ready(self.status_line())
            _log.info("All {count} workers ready", count=self.count)
            return
        self.notifier.status(self.status_line())

    def worker_ended(self, slot: WorkerSlot, reason: Failure) -> None:
        """A worker exited: restart it, unless stopping."""
        slot.transport = None
        slot.ready = False
        pid = slot.pid
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if self.stopping:
            _log.info("Worker {index} (pid {pid}) exited", index=slot.index, pid=pid)
            return
        lived = self.reactor.seconds() - slot.started_at
        slot.failures = 0 if lived >= HEALTHY_SECONDS else slot.failures + 1
        _log.error(
            "Worker {index} (pid {pid}) died after {lived:.1f}s: {why}",
            index=slot.index,
            pid=pid,
            lived=lived,
            why=reason.getErrorMessage(),
        )
        self._schedule_restart(slot)
        self.notifier.status(self.status_line())

    def restart_delay(self, slot: WorkerSlot) -> float:
        """Seconds before restarting `slot`: none after a healthy run, then doubling."""
        if slot.failures == 0:
            return 0.0
        return float(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (slot.failures - 1)))

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        delay = self.restart_delay(slot)
        slot.restarts += 1
        _log.info("Restarting worker {index} in {delay:g}s", index=slot.index, delay=delay)
        slot.restart_timer = self.reactor.callLater(delay, self._spawn, slot)

    def stopService(self) -> Deferred[Any]:
        """STOPPING=1, every worker drains (`Stop`); fires when all have exited."""
        if self.stopping:
            return self._all_ended()
        super().stopService()
        self.stopping = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        self.notifier.stopping(f"Draining {self.count} worker(s) (up to {self.drain_seconds:g}s)")
        for slot in self.slots:
            if slot.restart_timer is not None and slot.restart_timer.active():
                slot.restart_timer.cancel()
            slot.restart_timer = None
            self._tell(slot, commands.Stop, "TERM")
        self._kill_timer = self.reactor.callLater(
            self.drain_seconds + KILL_GRACE, self._kill_remaining
        )

        def _done(result: object) -> object:
            if self._kill_timer is not None and self._kill_timer.active():
                self._kill_timer.cancel()
            self._kill_timer = None
            self.notifier.stop_watchdog()
            return result

        return self._all_ended().addBoth(_done)

    def wait_stopped(self) -> Deferred[Any]:
        """Fires when every worker process has exited (at once when none runs)."""
        return self._all_ended()

    def _all_ended(self) -> Deferred[Any]:
        waits = [slot.ended for slot in self.slots if slot.ended is not None]
        return gatherResults(waits) if waits else succeed(None)

    def _tell(self, slot: WorkerSlot, command: type[amp.Command], signal_name: str) -> None:
        """Send `command` to the worker, or the signal when it has no AMP connection (yet)."""
        if slot.transport is None:
            return
        if slot.protocol is not None:
            d = slot.protocol.callRemote(command)
            d.addErrback(lambda _: self._signal(slot, signal_name))
        else:
            self._signal(slot, signal_name)

    def _signal(self, slot: WorkerSlot, signal_id: str | int) -> None:
        if slot.transport is None:
            return
        try:
            slot.transport.signalProcess(signal_id)
        except ProcessExitedAlready:
            pass

    def drain_now(self) -> None:
        """A second SIGTERM: every worker cuts its drain."""
        for slot in self.slots:
            self._tell(slot, commands.StopNow, "TERM")

    def _kill_remaining(self) -> None:
        self._kill_timer = None
        for slot in self.slots:
            if slot.transport is not None:
                _log.warn("Worker {index} (pid {pid}) still running: killed", index=slot.index, pid=slot.pid)
                self._signal(slot, "KILL")

    # reload, logs

    def reload(self) -> Deferred[bool]:
        """RELOADING=1, `Reload` to every worker, READY=1 when all answered; fires with True when
        every worker applied the configuration without errors."""
        if self.stopping:
            return succeed(False)
        self.reloads += 1
        # Before the first READY=1 systemd is still waiting for the start: no RELOADING/READY now
        # (the READY=1 of the start follows once every worker serves).
        announce = self.announced
        if announce:
            self.notifier.reloading("Reloading configuration in every worker")
        calls = []
        for slot in self.slots:
            if slot.protocol is not None and slot.ready:
                calls.append(slot.protocol.callRemote(commands.Reload))
        # a worker still starting reads the new configuration anyway

        def _done(results: list[tuple[bool, Any]]) -> bool:
            ok = True
            for success, answer in results:
                if not success:
                    ok = False
                    _log.warn("A worker did not answer the reload: {why}", why=answer.getErrorMessage())
                else:
                    ok = ok and answer["ok"]
            if announce and not self.stopping:
                self.notifier.ready(self.status_line())
            return ok

        return DeferredList(calls, consumeErrors=True).addCallback(_done)

    def reopen_logs(self) -> None:
        """SIGUSR1 to every worker."""
        for slot in self.slots:
            self._signal(slot, signal.SIGUSR1)  # signalProcess knows few names: the number

    def status_line(self) -> str:
        """`N/M workers ready` and the first ready worker's own status line."""
        ready = [s for s in self.slots if s.ready]
        line = f"{len(ready)}/{self.count} workers ready"
        if ready and ready[0].status:
            line += f"; {ready[0].status}"
        return line

    # admin

    def _ask(self, command: type[amp.Command], **kwargs: Any) -> Deferred[list[tuple[WorkerSlot, Any]]]:
        """Ask every connected worker; (slot, answer or Failure) for each."""
        slots = [s for s in self.slots if s.protocol is not None]
        calls = [s.protocol.callRemote(command, **kwargs) for s in slots if s.protocol is not None]
        d = DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: [(s, r[1]) for s, r in zip(slots, results, strict=True)])

    def readiness(self, allow: Sequence[str] = ()) -> Deferred[tuple[bool, list[str]]]:
        """Ready when not draining and every worker is ready (with the `allow` flags)."""
        if self.stopping:
            return succeed((False, ["the gateway is draining"]))

        def _combine(answers: list[tuple[WorkerSlot, Any]]) -> tuple[bool, list[str]]:
            reasons: list[str] = []
            answered = dict(answers)
            for slot in self.slots:
                answer = answered.get(slot)
                if answer is None:
                    reasons.append(f"worker {slot.index}: not running")
                elif isinstance(answer, Failure):
                    reasons.append(f"worker {slot.index}: no answer")
                else:
                    reasons += [f"worker {slot.index}: {r}" for r in answer["reasons"]]
                    if not slot.ready and not answer["reasons"]:
                        reasons.append(f"worker {slot.index}: starting")
            return not reasons, reasons

        return self._ask(commands.Readiness, allow=list(allow)).addCallback(_combine)

    def metrics(self) -> Deferred[bytes]:
        """Every worker's metrics and the supervisor's, in one exposition (label `worker`)."""

        def _merge(answers: list[tuple[WorkerSlot, Any]]) -> bytes:
            families: dict[str, Metric] = {}

            def add(family: Metric, worker: str) -> None:
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={"worker": worker, **sample.labels}))

            for family in self._own_metrics():
                add(family, "supervisor")
            for slot, answer in answers:
                if isinstance(answer, Failure):
                    _log.warn("Worker {index}: no metrics: {why}", index=slot.index, why=answer.getErrorMessage())
                    continue
                for family in text_string_to_metric_families(answer["text"].decode("utf-8")):
                    add(family, str(slot.index))
            return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]

        return self._ask(commands.CollectMetrics).addCallback(_merge)

    def _own_metrics(self) -> list[Metric]:
        workers = GaugeMetricFamily(
            "flexgw_workers", "Worker processes by state (--workers).", labels=["state"]
        )
        ready = sum(1 for s in self.slots if s.ready)
        running = sum(1 for s in self.slots if s.transport is not None)
        workers.add_metric(["ready"], ready)
        workers.add_metric(["running"], running)
        workers.add_metric(["configured"], self.count)
        info = GaugeMetricFamily(
            "flexgw_worker_info", "One per running worker: its index and pid.", labels=["index", "pid"]
        )
        restarts = CounterMetricFamily(
            "flexgw_worker_restarts", "Workers started again after dying, by index.", labels=["index"]
        )
        for slot in self.slots:
            if slot.transport is not None:
                info.add_metric([str(slot.index), str(slot.pid)], 1)
            restarts.add_metric([str(slot.index)], slot.restarts)
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        return [workers, info, restarts, *registry.collect()]

    def status(self) -> Deferred[dict[str, Any]]:
        """The first live worker's /status document, with `workers` (index, pid, ready)."""

        def _combine(answers: list[tuple[WorkerSlot, Any]]) -> dict[str, Any]:
            document: dict[str, Any] = {}
            for _slot, answer in answers:
                if not isinstance(answer, Failure):
                    document = json.loads(answer["json"])
                    break
            document["ready"] = bool(document.get("ready")) and all(s.ready for s in self.slots)
            document["draining"] = self.stopping
            document["workers"] = [
                {"index": s.index, "pid": s.pid if s.transport else None, "ready": s.ready,
                 "restarts": s.restarts, "status": s.status}
                for s in self.slots
            ]
            return document

        return self._ask(commands.WorkerStatus).addCallback(_combine)


class _Families:
    """A collector-like holder of ready families (what generate_latest asks for)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        """The families."""
        return self.families


class _DeferredResource(Resource):
    """A leaf answering from a Deferred (the supervisor asks its workers first)."""

    isLeaf = True

    def __init__(self, supervisor: SupervisorService) -> None:
        super().__init__()
        self.supervisor = supervisor

    def answer(self, request: Request) -> Deferred[bytes]:
        """The body (status and headers set on `request`)."""
        raise NotImplementedError

    def render_GET(self, request: Request) -> Any:
        """Answer when the workers have."""
        d = self.answer(request)
        gone: list[bool] = []  # the client left (or the request finished): nothing to write
        request.notifyFinish().addBoth(gone.append)

        def _write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def _fail(failure: Failure) -> None:
            _log.failure("Admin request failed", failure)
            if not gone:
                request.write(_json(request, 500, {"error": "internal error"}))
                request.finish()

        d.addCallbacks(_write, _fail)
        return NOT_DONE_YET


class _Readiness(_DeferredResource):
    """`/probes/readiness` for the whole gateway: 200 when every worker is ready."""

    def answer(self, request: Request) -> Deferred[bytes]:
        """Ask every worker."""
        allow = [flag for flag in ALLOW_FLAGS if _flag(request, flag)]

        def _body(result: tuple[bool, list[str]]) -> bytes:
            ready, reasons = result
            body: dict[str, Any] = {"status": "ready" if ready else "not ready"}
            if reasons:
                body["reasons"] = reasons
            return _json(request, 200 if ready else 503, body)

        return self.supervisor.readiness(allow).addCallback(_body)


class _Metrics(_DeferredResource):
    """`/metrics` from every worker."""

    def answer(self, request: Request) -> Deferred[bytes]:
        """Collect from every worker."""
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.supervisor.metrics()


class _Status(_DeferredResource):
    """`/status` with the workers."""

    def answer(self, request: Request) -> Deferred[bytes]:
        """Ask the workers."""
        return self.supervisor.status().addCallback(lambda doc: _json(request, 200, doc))


def supervisor_admin_site(supervisor: SupervisorService) -> Site:
    """The supervisor's admin listener: /metrics, /status, /ui, /probes/readiness, /probes/liveness."""
    root = probes_root(_Readiness(supervisor))
    root.putChild(b"metrics", _Metrics(supervisor))
    root.putChild(b"status", _Status(supervisor))
    root.putChild(b"ui", DashboardResource())
    return _QuietSite(root)
