"""GatewayService: owns the current plan, its listeners and pools; reloads by compile-and-swap."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from flexgw.config.pipeline import ConfigState, load_config
from flexgw.config.plan import GatewayPlan, Listener, Upstream
from flexgw.http.accesslog import AccessLog, MessageLog
from flexgw.ingress.front import IngressFactory
from flexgw.policies.base import PolicyRuntime
from flexgw.upstream.pool import PoolManager

_log = Logger(namespace="flexgw")


class GatewayService(Service):
    """Serves the configuration in `conf_dirs`; `reload()` swaps in a new plan without a restart.

    A reload compiles the new configuration beside the old one. Listeners whose address is
    unchanged keep their socket and get the new plan in one assignment; connections and
    requests in flight keep what they hold. New addresses are bound, removed ones closed.
    """

    def __init__(
        self,
        reactor: Any,
        conf_dirs: Sequence[str],
        environ: Mapping[str, str],
        access_log: AccessLog | None = None,
        message_log: MessageLog | None = None,
        strict: bool = False,
        rng: random.Random | None = None,
        loader: Callable[..., ConfigState] = load_config,
    ) -> None:
        self.reactor = reactor
        self.conf_dirs = list(conf_dirs)
        self.environ = environ
        self.access_log = access_log
        self.strict = strict
        self.rng = rng or random.Random()
        self.loader = loader
        self.state: ConfigState | None = None
        self.pools = PoolManager(reactor, reactor)
        self.message_log = message_log
        self.runtime = PolicyRuntime(reactor=reactor, clock=reactor, message_log=message_log)
        self.factories: dict[tuple[str, int], IngressFactory] = {}
        self.ports: dict[tuple[str, int], IListeningPort] = {}
        self.reloads = 0
        self.last_reload_ok: bool | None = None

    @property
    def plan(self) -> GatewayPlan:
        """The plan in force."""
        return self.state.plan if self.state is not None else GatewayPlan()

    def startService(self) -> None:
        """Load the configuration, bind every listener, start periodic work."""
        super().startService()
        for log in (self.access_log, self.message_log):
            if log is not None:
                log.start()
        self.pools.start()
        self.reload()

    def stopService(self) -> Any:
        """Stop listening, close idle upstream connections, flush the access log."""
        super().stopService()
        from twisted.internet.defer import gatherResults, maybeDeferred

        ports, self.ports = self.ports, {}
        self.factories = {}
        stopped = gatherResults([maybeDeferred(port.stopListening) for port in ports.values()])

        def _after(result: object) -> object:
            self.pools.stop()
            self.runtime.use_shared_storage(None)  # closes the Redis connection, if any
            for log in (self.access_log, self.message_log):
                if log is not None:
                    log.stop()
            return result

        return stopped.addBoth(_after)

    def reload(self) -> bool:
        """Compile the configuration again and swap it in. True when it had no errors.

        A listener that cannot be bound is an error too: the reload is not ok, the rest of the
        plan serves, and the next reload tries to bind it again.
        """
        state = self.loader(
            self.conf_dirs,
            self.environ,
            previous=self.state,
            strict=self.strict,
            runtime=self.runtime,
        )
        self.reloads += 1
        for problem in state.problems:
            if problem.severity == "error":
                _log.error("{problem}", problem=str(problem))
            else:
                _log.warn("{problem}", problem=str(problem))
        self.state = state
        bound = self._apply(state.plan)
        ok = state.ok and bound
        self.last_reload_ok = ok
        _log.info(
            "Configuration generation {generation} applied: {apis} API(s) on {listeners}"
            " listener(s), {errors} error(s)",
            generation=state.plan.generation,
            apis=sum(len(listener.apis) for listener in state.plan.listeners),
            listeners=len(state.plan.listeners),
            errors=sum(1 for p in state.problems if p.severity == "error"),
        )
        return ok

    def _apply(self, plan: GatewayPlan) -> bool:
        """Swap `plan` in; False when a listener could not be bound."""
        upstreams: set[Upstream] = {
            destination.upstream
            for listener in plan.listeners
            for api in listener.apis
            for route in api.routes
            for destination in route.destinations
        }
        self.pools.configure(plan.http, plan.timeouts, upstreams)
        wanted = {listener.address: listener for listener in plan.listeners}
        for address in [a for a in self.ports if a not in wanted]:
            _log.info("Closing listener {host}:{port}", host=address[0], port=address[1])
            self.ports.pop(address).stopListening()
            self.factories.pop(address, None)
        bound = True
        for address, listener in wanted.items():
            factory = self.factories.get(address)
            if factory is not None:
                factory.update(listener, plan.http, plan.timeouts)
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
            self.access_log,
            self.rng,
        )
        try:
            port = self.reactor.listenTCP(listener.port, factory, interface=listener.host)
        except Exception as exc:  # noqa: BLE001 (CannotListenError and friends: report, serve the rest)
            _log.error(
                "Cannot listen on {host}:{port}: {error}",
                host=listener.host,
                port=listener.port,
                error=exc,
            )
            return False
        self.factories[listener.address] = factory
        self.ports[listener.address] = port
        _log.info("Listening on {host}:{port}", host=listener.host, port=listener.port)
        return True

    def bound_port(self, host: str, port: int) -> int | None:
        """The actual port number of a listener (useful when the plan asked for port 0)."""
        listening = self.ports.get((host, port))
        return listening.getHost().port if listening is not None else None
