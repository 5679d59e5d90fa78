"""GatewayService: owns the current plan, its listeners and pools; reloads by compile-and-swap."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate

from flexgw.config.ingress import IngressOptions
from flexgw.config.pipeline import ConfigState, as_source, load_config
from flexgw.config.sources import ConfigSource
from flexgw.egress.front import ForwardProxyProtocol
from flexgw.ingress.front import IngressFactory, IngressProtocol
from flexgw.ingress.h2front import H2Protocol
from flexgw.ingress.proxyprotocol import wrap_proxy_protocol
from flexgw.plan import GatewayPlan, Listener, LoggingSettings, LogOutput, Upstream
from flexgw.service.accesslog import (
    AccessLog,
    MessageLog,
    RuntimeLog,
    TeeLog,
    open_output,
    open_runtime_output,
)
from flexgw.service.activation import LISTEN_FDS_START, InheritedSockets, listen_environ
from flexgw.service.admin import ProbeServer
from flexgw.service.metrics import GatewayMetrics
from flexgw.service.policyruntime import PolicyRuntime
from flexgw.service.sockets import listen_reuse_port
from flexgw.service.systemd import Notifier
from flexgw.service.tracing import TracingService
from flexgw.tls.contexts import ListenerFactory
from flexgw.upstream.manager import PoolManager

_log = Logger(namespace="flexgw")

#: Seconds requests in flight get to finish on shutdown (Flex's default drain time).
DRAIN_SECONDS = 25.0


class GatewayService(Service):
    """Serves the configuration `source` holds (a ConfigSource, or --conf directories for the
    file source); `reload()` swaps in a new plan without a restart.

    A reload compiles the new configuration beside the old one. Listeners whose address is
    unchanged keep their socket and get the new plan in one assignment; connections and
    requests in flight keep what they hold. New addresses are bound, removed ones closed.
    """

    def __init__(
        self,
        reactor: Any,
        source: ConfigSource | Sequence[str],
        environ: Mapping[str, str],
        access_log: AccessLog | None = None,
        message_log: MessageLog | None = None,
        strict: bool = False,
        rng: random.Random | None = None,
        loader: Callable[..., ConfigState] = load_config,
        notifier: Notifier | None = None,
        drain_seconds: float = DRAIN_SECONDS,
        log_filter: LogLevelFilterPredicate | None = None,
        log_level_fixed: bool = False,
        log_publisher: Any = None,
        listen_fds_start: int = LISTEN_FDS_START,
        reuse_port: bool = False,
        supervisor: Any = None,
        ingress: IngressOptions | None = None,
        resolver: Any = None,
        service_resolver: Any = None,
    ) -> None:
        self.reactor = reactor
        # Forward-proxy name resolution (IHostnameResolver); None: the reactor's nameResolver.
        self.resolver = resolver
        self.source = as_source(source)
        self.environ = environ
        self.access_log = access_log
        # Configuration.spec.logging: the runtime level is set on `log_filter` at every reload
        # (unless `log_level_fixed`: --log-level given); access-log outputs replace `access_log`.
        self.log_filter = log_filter
        self.log_level_fixed = log_level_fixed
        self.log_outputs: dict[LogOutput, AccessLog] = {}
        # runtimeLogs file outputs: observers added to `log_publisher` (twistd's own log stays)
        self.log_publisher = log_publisher
        self.runtime_outputs: dict[LogOutput, tuple[RuntimeLog, Any]] = {}
        self.active_access_log: AccessLog | TeeLog | None = access_log
        self.strict = strict
        self.ingress = ingress  # how Kubernetes Ingress documents are served
        self.rng = rng or random.Random()
        self.loader = loader
        self.state: ConfigState | None = None
        # Service names (flexgw.upstream.manager): None, the reactor's nameResolver (no TTL)
        self.pools = PoolManager(reactor, reactor, service_resolver)
        self.message_log = message_log
        self.runtime = PolicyRuntime(reactor=reactor, clock=reactor, message_log=message_log)
        # --workers: listeners bound with SO_REUSEPORT (every worker binds the same addresses),
        # and rate-limit / spike-control counters held by the supervisor (an AMP connection)
        self.reuse_port = reuse_port
        self.runtime.supervisor = supervisor
        self.factories: dict[tuple[str, int], IngressFactory] = {}
        self.ports: dict[tuple[str, int], IListeningPort] = {}
        # What each socket serves: the ingress factory, TLS-wrapped while the plan says so
        self.listening: dict[tuple[str, int], ListenerFactory] = {}
        self.reloads = 0
        self.last_reload_ok: bool | None = None
        # The last reloads, newest last (time, ok, generation, errors): /status and /ui show them.
        self.recent_reloads: deque[dict[str, Any]] = deque(maxlen=10)
        # called after every reload (e.g. the Ingress status writer: what is served changed)
        self.after_reload: list[Callable[[], Any]] = []
        self.unbound: set[tuple[str, int]] = set()  # listener addresses the last reload could not bind
        self.metrics = GatewayMetrics(reactor)
        # Configuration.spec.tracing: the exporter, and the tracer observing exchanges (or None)
        self.tracing = TracingService(reactor, reactor)
        self.observers: tuple[Any, ...] = ()
        self.probe = ProbeServer(reactor, self)
        self.notifier = notifier if notifier is not None else Notifier(reactor, environ)
        self.drain_seconds = drain_seconds
        self.draining: set[IngressProtocol | H2Protocol] = set()
        self._drained: Deferred[None] | None = None
        self._drain_timer: Any = None
        self.stopping = False
        self._stop_waiters: list[Deferred[None]] | None = None
        self.listen_fds_start = listen_fds_start
        self.inherited: InheritedSockets | None = None  # systemd's sockets, read on first start

    @property
    def plan(self) -> GatewayPlan:
        """The plan in force."""
        return self.state.plan if self.state is not None else GatewayPlan()

    def startService(self) -> None:
        """Load the configuration, bind every listener, start periodic work."""
        super().startService()
        self.stopping = False
        for log in (self.access_log, self.message_log):
            if log is not None:
                log.start()
        self.pools.start()
        if self.inherited is None:
            self.inherited = InheritedSockets(
                listen_environ(self.environ), start=self.listen_fds_start
            )
        self.reload()
        # Every listener is bound (or reported) and the first configuration applied.
        self.notifier.ready(self.status_line())
        self.notifier.start_watchdog()

    def stopService(self) -> Deferred[Any]:
        """Drain: stop listening, close idle connections, give requests in flight up to
        `drain_seconds` (then abort them), close idle upstream connections, flush the logs.

        Fires when every downstream connection is gone. `drain_now()` cuts the wait short.
        """
        if self.stopping:
            return self._stop_waiter()  # a second call: the same drain
        super().stopService()
        self.stopping = True
        self.notifier.stopping(f"Draining (up to {self.drain_seconds:g}s)")
        ports, self.ports = self.ports, {}
        self.listening = {}
        factories, self.factories = self.factories, {}
        for address in ports:
            self._release(address)
        # The probe listener stays: readiness answers 503 while draining (closed in _after).
        stopped = gatherResults([maybeDeferred(port.stopListening) for port in ports.values()])
        drained: Deferred[None] = Deferred()
        self._drained = drained
        for factory in factories.values():
            factory.on_connection_lost = self._connection_gone
            for connection in list(factory.connections):
                self.draining.add(connection)
                connection.drain()  # idle: closed now; else after what is in flight (h2: GOAWAY)
        # Connections already gone, or lost while being closed above, were not counted in.
        self.draining = {c for c in self.draining if c in c.factory.connections}
        if self.draining:
            self._drain_timer = self.reactor.callLater(self.drain_seconds, self.drain_now)
        else:
            self._drain_done()

        def _close_probe(result: object) -> Deferred[object]:
            return self.probe.stop().addBoth(lambda _: result)

        def _after(result: object) -> object:
            self.notifier.stop_watchdog()
            self.pools.stop()
            self.runtime.use_shared_storage(None)  # closes the Redis connection, if any
            closed = gatherResults(
                [self.runtime.close_shared(),  # e.g. LDAP connections
                 maybeDeferred(self.tracing.stop)],  # the span export's connections
                consumeErrors=True,
            )
            for log in (self.access_log, self.message_log):
                if log is not None:
                    log.stop()
            for output in self.log_outputs.values():
                output.close()
            self._apply_runtime_outputs(())
            return closed.addBoth(lambda _: result)

        self._stop_waiters = []
        done = gatherResults([stopped, drained]).addBoth(_close_probe).addBoth(_after)

        def _release(result: object) -> object:
            waiters, self._stop_waiters = self._stop_waiters or [], None
            for waiter in waiters:
                waiter.callback(None)
            return result

        return done.addBoth(_release)

    def wait_stopped(self) -> Deferred[None]:
        """A Deferred firing when the service is stopped (at once if no drain is under way)."""
        return self._stop_waiter()

    def _stop_waiter(self) -> Deferred[None]:
        """A Deferred firing when the drain under way ends (now, if it has ended)."""
        waiter: Deferred[None] = Deferred()
        if self._stop_waiters is None:
            waiter.callback(None)
        else:
            self._stop_waiters.append(waiter)
        return waiter

    def drain_now(self) -> None:
        """Abort every connection still draining (the drain deadline, or a second SIGTERM)."""
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        remaining = list(self.draining)
        if remaining:
            _log.warn("Drain: aborting {count} connection(s) still busy", count=len(remaining))
        for connection in remaining:
            connection.transport.abortConnection()

    def _connection_gone(self, connection: IngressProtocol | H2Protocol) -> None:
        """A downstream connection closed while draining."""
        self.draining.discard(connection)
        if not self.draining and self._drained is not None:
            self._drain_done()

    def _drain_done(self) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def status_line(self) -> str:
        """One line for `systemctl status`: what is served and how the last reload went."""
        plan = self.plan
        apis = sum(len(listener.apis) for listener in plan.listeners)
        errors = sum(1 for p in self.state.problems if p.severity == "error") if self.state else 0
        result = "ok" if self.last_reload_ok else f"failed ({errors} error(s))"
        return (
            f"Serving {apis} API(s) on {len(plan.listeners)} listener(s);"
            f" configuration generation {plan.generation}: {result}"
        )

    def reload(self) -> bool:
        """Compile the configuration again and swap it in. True when it had no errors.

        A listener that cannot be bound is an error too: the reload is not ok, the rest of the
        plan serves, and the next reload tries to bind it again.
        """
        if self.stopping:
            return False  # draining: no listener may be bound again
        reloading = self.reloads > 0 and self.running
        if reloading:
            self.notifier.reloading("Reloading configuration")
        state = self.loader(
            self.source,
            self.environ,
            previous=self.state,
            strict=self.strict,
            runtime=self.runtime,
            ingress=self.ingress,
        )
        self.reloads += 1
        self._apply_logging(state.plan.logging)
        for problem in state.problems:
            if problem.severity == "error":
                _log.error("{problem}", problem=str(problem))
            elif problem.severity == "info":
                _log.info("{problem}", problem=str(problem))
            else:
                _log.warn("{problem}", problem=str(problem))
        self.state = state
        self._apply_tracing(state.plan)
        bound = self._apply(state.plan)
        ok = state.ok and bound
        self.last_reload_ok = ok
        self.recent_reloads.append({
            "time": self.reactor.seconds(),
            "ok": ok,
            "generation": state.plan.generation,
            "errors": sum(1 for p in state.problems if p.severity == "error"),
        })
        self.metrics.reload(ok)
        self.probe.configure(state.plan.probe)
        _log.info(
            "Configuration generation {generation} applied: {apis} API(s) on {listeners}"
            " listener(s), {errors} error(s)",
            generation=state.plan.generation,
            apis=sum(len(listener.apis) for listener in state.plan.listeners),
            listeners=len(state.plan.listeners),
            errors=sum(1 for p in state.problems if p.severity == "error"),
        )
        if reloading:
            self.notifier.ready(self.status_line())
        for hook in self.after_reload:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a failing observer must not fail the reload
                _log.failure("after-reload hook failed")
        return ok

    def _apply(self, plan: GatewayPlan) -> bool:
        """Swap `plan` in; False when a listener could not be bound."""
        upstreams: set[Upstream] = {
            destination.upstream
            for listener in plan.listeners
            for api in listener.apis
            for route in api.routes
            for destination in route.destinations
        } | {
            destination.upstream
            for listener in plan.listeners
            for api in listener.apis
            for destination in api.proxy_services
        }
        self.pools.configure(plan.http, plan.timeouts, upstreams)
        wanted = {listener.address: listener for listener in plan.listeners}
        for address in [a for a in self.ports if a not in wanted]:
            _log.info("Closing listener {host}:{port}", host=address[0], port=address[1])
            self.ports.pop(address).stopListening()
            self.factories.pop(address, None)
            self.listening.pop(address, None)
            self._release(address)
        bound = True
        self.unbound = set()
        for address, listener in wanted.items():
            factory = self.factories.get(address)
            if factory is not None:
                factory.update(listener, plan.http, plan.timeouts)
                # New connections: new certificates, or TLS switched on/off (same socket).
                self.listening[address].set_tls(listener.tls)
                continue
            bound = self._bind(listener, plan) and bound
        return bound

    def _bind(self, listener: Listener, plan: GatewayPlan) -> bool:
        factory = IngressFactory(
            self.reactor,
            self.reactor,
            listener,
            plan.http,
            plan.timeouts,
            self.pools,
            self.active_access_log,
            self.rng,
            metrics=self.metrics,
            resolver=self.resolver,
            observers=self.observers,
            forward_proxy=ForwardProxyProtocol,
        )
        served = ListenerFactory(factory, listener.tls)
        # Outermost: the PROXY header comes before anything else (a TLS handshake included).
        # The setting is read per connection, so a reload switches it without a rebind.
        accepting: Any = wrap_proxy_protocol(
            served,
            lambda: self.plan.proxy_protocol,
            self.reactor,
            lambda: self.plan.http.header_timeout,
        )
        inherited = self.inherited.take(*listener.address) if self.inherited else None
        try:
            if inherited is not None:  # systemd socket activation: no bind of our own
                port = self.reactor.adoptStreamPort(inherited.fd, inherited.family, accepting)
            elif self.reuse_port:  # --workers: every worker binds the address
                port = listen_reuse_port(self.reactor, listener.port, accepting, listener.host)
            else:
                port = self.reactor.listenTCP(listener.port, accepting, interface=listener.host)
        except Exception as exc:  # noqa: BLE001 (CannotListenError and friends: report, serve the rest)
            _log.error(
                "Cannot listen on {host}:{port} ({apis}): {error}; the other listeners keep"
                " serving, readiness reports it, and the next reload tries again",
                host=listener.host,
                port=listener.port,
                apis=", ".join(f"ApiInstance {api.key}" for api in listener.apis) or "no API",
                error=getattr(exc, "socketError", None) or exc,
            )
            self.unbound.add(listener.address)
            self._release(listener.address)
            return False
        self.factories[listener.address] = factory
        self.ports[listener.address] = port
        self.listening[listener.address] = served
        _log.info(
            "Listening on {host}:{port}{tls}{how}",
            host=listener.host,
            port=listener.port,
            tls=" (TLS)" if listener.tls is not None else "",
            how=f" (inherited from systemd: {inherited.describe()})" if inherited else "",
        )
        return True

    def _apply_tracing(self, plan: GatewayPlan) -> None:
        """Start, change or stop the trace exporter as the plan says; every listener's exchanges
        are observed by its tracer."""
        tracer = self.tracing.configure(plan.tracing)
        observers = (tracer,) if tracer is not None else ()
        if observers != self.observers:
            self.observers = observers
            for factory in self.factories.values():
                factory.set_observers(observers)

    def _release(self, address: tuple[str, int]) -> None:
        """A listener closed: its inherited socket, if any, stays open for a later reload."""
        if self.inherited is not None:
            self.inherited.release(address)

    def _apply_logging(self, settings: LoggingSettings) -> None:
        """Set the runtime log level and swap the access-log outputs in (files kept open
        across reloads while an output is unchanged)."""
        if self.log_filter is not None and not self.log_level_fixed:
            self.log_filter.setLogLevelForNamespace(
                "", LogLevel.levelWithName(settings.runtime_level or "info")
            )
        logs: list[AccessLog] = []
        for output in settings.access_outputs:
            log = self.log_outputs.get(output)
            if log is None:
                try:
                    log = open_output(self.reactor, output)
                except OSError as exc:
                    _log.error(
                        "Access log output {name}: cannot open {path}: {error}",
                        name=output.name,
                        path=output.path,
                        error=exc,
                    )
                    continue
                if self.running:
                    log.start()
                self.log_outputs[output] = log
            logs.append(log)
        for output in [o for o in self.log_outputs if o not in settings.access_outputs]:
            self.log_outputs.pop(output).close()
        active: AccessLog | TeeLog | None = self.access_log
        if logs:  # none could be opened: the default keeps logging
            active = logs[0] if len(logs) == 1 else TeeLog(logs)
        self.active_access_log = active
        for factory in self.factories.values():
            factory.access_log = active  # type: ignore[assignment]
        self._apply_runtime_outputs(settings.runtime_outputs)

    def _apply_runtime_outputs(self, outputs: Sequence[LogOutput]) -> None:
        """Observe runtime log events into the configured file outputs (stdout: twistd's log)."""
        if self.log_publisher is None:
            return
        wanted = [o for o in outputs if o.type == "file"]
        for output in [o for o in self.runtime_outputs if o not in wanted]:
            log, observer = self.runtime_outputs.pop(output)
            self.log_publisher.removeObserver(observer)
            log.close()
        for output in wanted:
            if output in self.runtime_outputs:
                continue
            try:
                log = open_runtime_output(self.reactor, output)
            except OSError as exc:
                _log.error(
                    "Runtime log output {name}: cannot open {path}: {error}",
                    name=output.name,
                    path=output.path,
                    error=exc,
                )
                continue
            observer: Any = log
            if self.log_filter is not None:
                observer = FilteringLogObserver(log, [self.log_filter])
            if self.running:
                log.start()
            self.runtime_outputs[output] = (log, observer)
            self.log_publisher.addObserver(observer)

    def reopen_logs(self) -> None:
        """Reopen every log file by its path (SIGUSR1, after logrotate moved them)."""
        runtime = [log for log, _ in self.runtime_outputs.values()]
        for log in (self.access_log, self.message_log, *self.log_outputs.values(), *runtime):
            if log is None:
                continue
            try:
                log.reopen()
            except OSError as exc:
                _log.error("Cannot reopen {path}: {error}", path=log.path, error=exc)
        _log.info("Log files reopened")

    def bound_port(self, host: str, port: int) -> int | None:
        """The actual port number of a listener (useful when the plan asked for port 0)."""
        listening = self.ports.get((host, port))
        return listening.getHost().port if listening is not None else None
