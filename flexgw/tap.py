"""twistd entry point: command-line options and the service tree (the only global-reactor user)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python import usage

from flexgw import __version__
from flexgw.compat.logobservers import observers

_log = Logger()
_LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}


class Options(usage.Options):
    """`twistd flexgw` options."""

    synopsis = "[options]"
    longdesc = "Serve Flex Gateway Local Mode resource files (ApiInstance, Service, ...)."
    optParameters = [  # noqa: RUF012 (twisted.python.usage convention)
        ["access-log", None, "-", "Access log destination: a file path, '-' for stdout, 'off'."],
        [
            "admin",
            None,
            "tcp:9901:interface=127.0.0.1",
            "Admin listener (/metrics, /status, /probes/*): a server endpoint, or 'off'.",
        ],
        [
            "log-level",
            None,
            None,
            (
                "Runtime log level: debug, info, warn, error (default: the configuration's"
                " logging.runtimeLogs.logLevel, else FLEX_LOG_LEVEL, else info)."
            ),
        ],
        [
            "drain-seconds",
            None,
            "25",
            "Seconds requests in flight get on SIGTERM (a second SIGTERM cuts them).",
        ],
        [
            "workers",
            None,
            "1",
            (
                "Worker processes serving the same listeners ('auto': one per CPU). Above 1, a"
                " supervisor process starts and watches them and holds the admin listener."
            ),
        ],
        [
            "worker-timeout",
            None,
            "30",
            (
                "With --workers: a worker not answering the supervisor for this many seconds is"
                " killed and restarted (0: never)."
            ),
        ],
        [
            "message-log",
            None,
            "-",
            "message-logging-flex output: a file path, '-' for stdout, 'twisted' for the runtime log.",
        ],
        [
            "etcd",
            None,
            None,
            "Follow the resources in etcd: client URLs, comma-separated (http://10.0.0.5:2379,...).",
        ],
        ["etcd-prefix", None, "/flexgw", "The etcd key prefix of this fleet."],
        [
            "gateway-id",
            None,
            None,
            "This gateway's name in the fleet status (<prefix>/gateways/<id>; default: host name).",
        ],
        ["etcd-cacert", None, None, "CA certificate (PEM) that etcd's https certificate chains to."],
        ["etcd-cert", None, None, "Client certificate (PEM) presented to etcd."],
        ["etcd-key", None, None, "Private key (PEM) of --etcd-cert."],
        ["etcd-user", None, None, "etcd user (password authentication)."],
        ["etcd-password-file", None, None, "File holding the --etcd-user password."],
        [
            "state-dir",
            None,
            None,
            (
                "Directory for the snapshot of the last applied remote configuration (a restart"
                " while etcd or the Kubernetes API is unreachable serves it); default with"
                " --kubernetes: /var/lib/flexgw; 'off': no snapshot."
            ),
        ],
        ["ingress-class", None, "flexgw", "The Kubernetes ingress class flexgw serves."],
        [
            "ingress-listener",
            None,
            "http://0.0.0.0:8080",
            "Listener for Ingresses without the api-instance annotation (an ApiInstance address).",
        ],
        [
            "ingress-tls-listener",
            None,
            "https://0.0.0.0:8443",
            "TLS listener serving those Ingresses too, with their spec.tls certificates (when any).",
        ],
        [
            "kubeconfig",
            None,
            None,
            "With --kubernetes: the kubeconfig to use (its current context; default: in-cluster).",
        ],
        ["kube-context", None, None, "With --kubeconfig: the context to use (default: current)."],
        [
            "publish-service",
            None,
            None,
            (
                "With --kubernetes: write this Service's (NAMESPACE/NAME) load-balancer or cluster"
                " addresses into the status of every Ingress served (leader only)."
            ),
        ],
        [
            "publish-address",
            None,
            None,
            "With --kubernetes: write these addresses (IP or host name, comma-separated) instead.",
        ],
        [
            "election-id",
            None,
            "flexgw-leader",
            (
                "The Lease replicas elect the status writer with, in $POD_NAMESPACE (else the"
                " service account's or kubeconfig context's namespace, else default)."
            ),
        ],
    ]
    optFlags = [  # noqa: RUF012
        [
            "kubernetes",
            None,
            (
                "Read Ingresses, IngressClasses, Services, EndpointSlices, referenced TLS Secrets"
                " and the Flex CRDs from the Kubernetes API (in-cluster, or --kubeconfig);"
                " combinable with --conf."
            ),
        ],
        ["strict", None, "Unknown configuration keys are errors, not warnings."],
        ["ingress-default-class", None, "Serve Kubernetes Ingresses that name no ingress class."],
        [
            "reuse-port",
            None,
            (
                "Bind listeners with SO_REUSEPORT: several gateways of one user on one host share"
                " their addresses (a fleet on one machine, a new gateway started before the old"
                " one stops)."
            ),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.raw_args: list[str] = []  # as given, for the --workers worker command line
        self.reactor_name: str | None = None  # the reactor plug-in twistd runs (default_reactor)
        self["conf"] = []
        self["policy-modules"] = []
        self["kube-namespaces"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, keeping the arguments as given (see `worker_command`); install flexgw's
        reactor first unless twistd's --reactor installed another (`default_reactor`)."""
        self.raw_args = list(sys.argv[1:] if options is None else options)
        self.reactor_name = default_reactor(getattr(self, "parent", None))
        super().parseOptions(options)

    def opt_conf(self, path: str) -> None:
        """Configuration directory (repeatable; default /etc/flexgw)."""
        self["conf"].append(path)

    def opt_kube_namespace(self, namespace: str) -> None:
        """With --kubernetes: watch this namespace only (repeatable; default: all namespaces)."""
        self["kube-namespaces"].append(namespace)

    def opt_policy_module(self, name: str) -> None:
        """Import a third-party policy module (repeatable); it registers its policy kinds."""
        self["policy-modules"].append(name)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"flexgw {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        """Check values and apply defaults."""
        if self["kubeconfig"] is not None or self["kube-namespaces"]:
            self["kubernetes"] = True
        if self["kubernetes"] and self["etcd"]:
            raise usage.UsageError("--kubernetes and --etcd: choose one remote source")
        if not self["conf"] and not self["etcd"] and not self["kubernetes"]:
            self["conf"] = ["/etc/flexgw"]
        if self["state-dir"] is None and self["kubernetes"]:
            from flexgw.config.sources.state import DEFAULT_STATE_DIR

            self["state-dir"] = DEFAULT_STATE_DIR
        if self["state-dir"] in ("off", ""):
            self["state-dir"] = None
        publishing = self["publish-service"] is not None or self["publish-address"] is not None
        if publishing and not self["kubernetes"]:
            raise usage.UsageError("--publish-service/--publish-address need --kubernetes")
        if self["publish-service"] is not None and self["publish-address"] is not None:
            raise usage.UsageError("give --publish-service or --publish-address, not both")
        namespace, slash, name = (self["publish-service"] or "x/x").partition("/")
        if not (namespace and slash and name) or "/" in name:
            raise usage.UsageError("--publish-service must be NAMESPACE/NAME")
        if self["kubernetes"]:
            from flexgw.config.sources.kubeconnect import KubeConnectionError

            try:  # checked now (a usage error), built again with the reactor in makeService
                kube_connection(None, self, os.environ)
            except KubeConnectionError as exc:
                raise usage.UsageError(f"--kubernetes: {exc}") from None
        for path in self["conf"]:
            if not os.path.isdir(path):
                raise usage.UsageError(f"--conf {path}: not a directory")
        if self["admin"] != "off":
            from twisted.internet.endpoints import serverFromString

            try:  # only parsed here (nothing is bound): a typo is a usage error, not a log line
                serverFromString(None, self["admin"])
            except Exception as exc:  # endpoint parsers raise various errors
                raise usage.UsageError(f"--admin {self['admin']}: {exc}") from exc
        from flexgw.policies.registry import load_modules

        try:
            load_modules(self["policy-modules"])
        except ImportError as exc:
            raise usage.UsageError(f"--policy-module: {exc}") from exc
        try:
            self["drain-seconds"] = float(self["drain-seconds"])
        except ValueError:
            raise usage.UsageError("--drain-seconds must be a number of seconds") from None
        if not 0 <= self["drain-seconds"] < float("inf"):
            raise usage.UsageError("--drain-seconds must be 0 or more")
        from flexgw.service.workers import worker_count

        try:
            self["workers"] = worker_count(str(self["workers"]))
        except ValueError:
            raise usage.UsageError("--workers must be a number from 1 to 1024, or 'auto'") from None
        try:
            self["worker-timeout"] = float(self["worker-timeout"])
        except ValueError:
            raise usage.UsageError("--worker-timeout must be a number of seconds") from None
        if not 0 <= self["worker-timeout"] < float("inf"):
            raise usage.UsageError("--worker-timeout must be 0 or more")
        self._check_etcd()
        if self["log-level"] is not None and self["log-level"] not in _LEVELS:
            raise usage.UsageError("--log-level must be one of " + ", ".join(_LEVELS))
        from flexgw.config.ingress import ingress_options

        try:
            self["ingress"] = ingress_options(
                self["ingress-class"],
                self["ingress-default-class"],
                self["ingress-listener"],
                self["ingress-tls-listener"],
            )
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from None


    def _check_etcd(self) -> None:
        """--etcd and its companions: URLs, readable files, the password read now."""
        self["etcd-password"] = None
        if not self["etcd"]:
            for name in ("etcd-cacert", "etcd-cert", "etcd-key", "etcd-user", "etcd-password-file"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} needs --etcd")
            return
        urls = [url.strip() for url in self["etcd"].split(",") if url.strip()]
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise usage.UsageError(f"--etcd {url}: an etcd client URL is http:// or https://")
        if not urls:
            raise usage.UsageError("--etcd needs at least one URL")
        self["etcd"] = urls
        for name in ("etcd-cacert", "etcd-cert", "etcd-key", "etcd-password-file"):
            path = self[name]
            if path is not None and not os.access(path, os.R_OK):
                raise usage.UsageError(f"--{name} {path}: cannot read it")
        if (self["etcd-key"] is None) != (self["etcd-cert"] is None):
            raise usage.UsageError("--etcd-cert and --etcd-key go together")
        if (self["etcd-user"] is None) != (self["etcd-password-file"] is None):
            raise usage.UsageError("--etcd-user and --etcd-password-file go together")
        if self["etcd-password-file"] is not None:
            with open(self["etcd-password-file"], encoding="utf-8") as handle:
                self["etcd-password"] = handle.read().rstrip("\r\n")


def default_reactor(parent: Any) -> str | None:
    """`twistd flexgw` runs on flexgw's reactor (flexgw/compat/epollreactor.py) unless twistd's
    `--reactor NAME` installed one already (`twistd --reactor epoll flexgw` is Twisted's own):
    install it if no reactor is installed yet. Returns the reactor's plug-in name when known
    (the workers of --workers get the same), else None."""
    if parent is not None and parent.get("reactor"):
        return str(parent["reactor"])
    if "twisted.internet.reactor" in sys.modules:
        return None  # installed by whoever runs us (trial, an embedding program): theirs
    from flexgw.compat.epollreactor import NAME, install

    install()
    if parent is not None:
        parent["reactor"] = NAME
    return NAME


def kube_connection(reactor: Any, options: Options, environ: Any) -> Any:
    """The Kubernetes API connection the options name (kubeconfig, else in-cluster)."""
    from flexgw.config.sources.kubeconnect import from_kubeconfig, in_cluster

    if options["kubeconfig"] is not None:
        return from_kubeconfig(reactor, options["kubeconfig"], options["kube-context"])
    return in_cluster(reactor, environ)


def config_source(reactor: Any, options: Options, environ: Any = None) -> tuple[Any, Any]:
    """What the gateway serves: the --conf directories, the --etcd prefix or the Kubernetes API
    (--kubernetes), or files first and one of those (a resource defined by both is an error
    reported at the remote object or key; the file's version serves); and the remote source
    (etcd or Kubernetes), if any."""
    from flexgw.config.sources import CombinedSource
    from flexgw.config.sources.files import FileSource

    files = FileSource(options["conf"])
    remote: Any
    if options["etcd"]:
        from flexgw.config.sources.etcd import EtcdSource, make_client

        client = make_client(
            reactor,
            options["etcd"],
            cacert=options["etcd-cacert"],
            cert=options["etcd-cert"],
            key=options["etcd-key"],
            user=options["etcd-user"],
            password=options["etcd-password"],
        )
        name, remote = "etcd", EtcdSource(client, options["etcd-prefix"], state_dir=options["state-dir"])
    elif options["kubernetes"]:
        from flexgw.config.sources.kubernetes import KubernetesSource

        connection = kube_connection(reactor, options, os.environ if environ is None else environ)
        remote = KubernetesSource(
            reactor, connection, options["kube-namespaces"], state_dir=options["state-dir"]
        )
        name = "kubernetes"
    else:
        return files, None
    return (CombinedSource([("files", files), (name, remote)]) if options["conf"] else remote), remote


def _install_log_level(
    level: str | None, publisher: Any = globalLogPublisher, predicate: Any = None
) -> Any:
    """Drop runtime log events below `level` (info when None), or below what `predicate`
    says, on every observer of `publisher`; returns the predicate, whose level reloads set
    (unless --log-level was given)."""
    if predicate is None:
        predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level or "info"])
    for observer in observers(publisher):
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(observer, [predicate]))
    return predicate


def worker_command(options: Options) -> list[str]:
    """The argv of a `--workers` worker: twistd flexgw with the options the supervisor was given
    (every one, so an option added later reaches the workers too), then `--workers 1 --admin
    off` (the later occurrence wins: one process, no admin listener, which the supervisor has)."""
    reactor = ["--reactor", options.reactor_name] if options.reactor_name else []
    return [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "--nodaemon", "--pidfile=", "--logfile=-", *reactor, "flexgw",
        *options.raw_args,
        "--workers", "1", "--admin", "off",
    ]


def makeService(options: Options) -> MultiService:
    """Build the gateway service tree from the options."""
    from flexgw.service.worker import WORKER_ENV

    if options["workers"] > 1 and WORKER_ENV not in os.environ:
        return _make_supervisor(options)
    return _make_gateway(options)


def _make_supervisor(options: Options) -> MultiService:
    """`--workers N`: the supervisor, its admin listener and config watcher; no gateway here."""
    from twisted.internet import reactor

    from flexgw.config.pipeline import ConfiguredFiles
    from flexgw.config.sources.files import FileSource, debounce_from_env
    from flexgw.service.activation import listen_environ
    from flexgw.service.workers import SupervisorService, supervisor_admin_site

    top = MultiService()
    log_filter = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[options["log-level"] or "info"])
    _LogLevelService(log_filter).setServiceParent(top)
    inherited = 0
    names = None
    listen = listen_environ(os.environ)  # systemd's sockets, passed on to every worker
    if listen.get("LISTEN_PID") == str(os.getpid()):
        try:
            inherited = max(int(listen.get("LISTEN_FDS", "0")), 0)
        except ValueError:
            inherited = 0
        names = listen.get("LISTEN_FDNAMES")
    supervisor = SupervisorService(
        reactor,
        options["workers"],
        lambda index: worker_command(options),
        os.environ,
        drain_seconds=options["drain-seconds"],
        inherited_fds=inherited,
        inherited_names=names,
        worker_timeout=options["worker-timeout"],
    )
    if options["admin"] != "off":  # before the supervisor: stopped after it (see _AdminService)
        _AdminService(
            reactor, options["admin"], supervisor_admin_site(supervisor), supervisor.wait_stopped
        ).setServiceParent(top)
    supervisor.setServiceParent(top)
    # The workers hold the plans; the supervisor lists the certificate files itself, so a
    # changed certificate reloads every worker as a changed YAML file does.
    tls_files = ConfiguredFiles(options["conf"], os.environ, ingress=options["ingress"])
    tls_files.refresh()

    def reload() -> Any:
        result = supervisor.reload()
        tls_files.refresh()
        return result

    watcher = FileSource(options["conf"]).watcher(
        reactor, reload, debounce_from_env(os.environ), extra_files=tls_files
    )
    _WatcherService(watcher).setServiceParent(top)
    _install_signals(reactor, reload, supervisor.reopen_logs, supervisor.drain_now)
    return top


def _install_signals(
    reactor: Any, reload: Any, reopen_logs: Any, drain_now: Any
) -> None:
    """SIGHUP reloads, SIGUSR1 reopens the logs, a second SIGTERM/SIGINT cuts the drain."""

    def _on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, _on_hup)

    def _on_usr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(reopen_logs)

    signal.signal(signal.SIGUSR1, _on_usr1)  # logrotate: reopen log files

    def _on_second_stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(drain_now)

    def _arm_second_stop() -> None:
        # The reactor is stopping (first SIGTERM/SIGINT) and the gateway drains; a second
        # signal cuts what is left, and shutdown then completes as usual (logs flushed).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_second_stop)

    reactor.addSystemEventTrigger("before", "shutdown", _arm_second_stop)


def _make_gateway(options: Options) -> MultiService:
    """One gateway process: alone (--workers 1), or a worker of a supervisor."""
    from twisted.internet import reactor

    from flexgw.config.sources.files import debounce_from_env
    from flexgw.service.accesslog import AccessLog, MessageLog
    from flexgw.service.gateway import GatewayService
    from flexgw.service.worker import (
        SUPERVISOR_FD_ENV,
        WORKER_ENV,
        SupervisedNotifier,
        WorkerProtocol,
        connect_to_supervisor,
    )
    from flexgw.upstream.dns import RecordResolver

    log_filter = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[options["log-level"] or "info"])
    access_log = None
    if options["access-log"] != "off":
        access_log = AccessLog.open(reactor, options["access-log"])
    message_log = None
    if options["message-log"] != "twisted":
        message_log = MessageLog.open(reactor, options["message-log"])
    top = MultiService()
    _LogLevelService(log_filter).setServiceParent(top)  # first: before the gateway logs
    environ: Any = os.environ
    worker: Any = None
    if WORKER_ENV in os.environ:  # started by a --workers supervisor
        environ = dict(os.environ)
        if "LISTEN_FDS" in environ:  # systemd's sockets, passed on by the supervisor
            environ["LISTEN_PID"] = str(os.getpid())
        worker = WorkerProtocol(
            int(environ[WORKER_ENV]), on_lost=_stop_reactor(reactor), on_stop=_stop_reactor(reactor)
        )
        connect_to_supervisor(reactor, int(environ[SUPERVISOR_FD_ENV]), worker)
    source, remote = config_source(reactor, options, environ)
    etcd = remote if options["etcd"] else None
    kube = remote if options["kubernetes"] else None
    gateway = GatewayService(
        reactor,
        source,
        environ,
        access_log=access_log,
        message_log=message_log,
        strict=options["strict"],
        drain_seconds=options["drain-seconds"],
        log_filter=log_filter,
        log_level_fixed=options["log-level"] is not None,
        log_publisher=globalLogPublisher,
        ingress=options["ingress"],
        notifier=SupervisedNotifier(worker, worker.index) if worker is not None else None,
        reuse_port=worker is not None or bool(options["reuse-port"]),
        supervisor=worker,
        service_resolver=RecordResolver(reactor),
    )
    if options["admin"] != "off":  # before the gateway: stopped after it (see _AdminService)
        from flexgw.service.admin import admin_site

        _AdminService(
            reactor, options["admin"], admin_site(gateway), gateway.wait_stopped
        ).setServiceParent(top)
    gateway.setServiceParent(top)
    if etcd is not None:  # after the gateway: stopped first, its lease revoked
        import socket

        from flexgw.service.fleet import FleetReporter

        gateway_id = options["gateway-id"] or socket.gethostname()
        if worker is not None:  # each worker follows etcd and reports itself
            gateway_id = f"{gateway_id}-w{worker.index}"
        FleetReporter(
            reactor, etcd.client, options["etcd-prefix"], gateway_id, gateway, etcd
        ).setServiceParent(top)
    if worker is not None:
        worker.gateway = gateway
    if worker is None:  # a worker's file reloads come from the supervisor, which watches
        watcher = source.watcher(
            reactor,
            gateway.reload,
            debounce_from_env(os.environ),
            extra_files=lambda: gateway.plan.tls_files,  # certificates, keys, CAs read by the plan
        )
        _WatcherService(watcher).setServiceParent(top)
    elif remote is not None:  # the supervisor watches the files; each worker follows etcd or the API
        _WatcherService(remote.watcher(reactor, gateway.reload, debounce_from_env(os.environ))).setServiceParent(top)
    publishing = options["publish-service"] is not None or options["publish-address"] is not None
    if kube is not None and publishing and (worker is None or worker.index == 0):
        _IngressStatusService(reactor, options, kube, gateway, environ).setServiceParent(top)
    _install_signals(reactor, gateway.reload, gateway.reopen_logs, gateway.drain_now)
    return top


def _stop_reactor(reactor: Any) -> Any:
    """A callable stopping `reactor` (a drain) unless it is already stopping."""

    def stop() -> None:
        if reactor.running:
            with contextlib.suppress(ReactorNotRunning):  # already stopping
                reactor.stop()

    return stop


class _LogLevelService(Service):
    """Puts the level filter on twistd's log observers, which twistd only sets up after
    makeService (so it cannot be done there)."""

    def __init__(self, predicate: LogLevelFilterPredicate) -> None:
        self.predicate = predicate

    def startService(self) -> None:
        """Wrap the observers in the filter."""
        super().startService()
        _install_log_level(None, globalLogPublisher, self.predicate)


class _AdminService(Service):
    """The admin listener; on stop it stays open until `wait_stopped()` fires (the drain is
    over), so /probes/readiness answers 503 while draining instead of refusing connections.
    MultiService stops its children in reverse order: added before the gateway, this one is
    asked to stop after it, when the drain has begun.

    An endpoint that cannot be listened on (another gateway holds the port) is one error line
    saying what to do; the gateway serves its listeners without the admin listener."""

    def __init__(self, reactor: Any, description: str, site: Any, wait_stopped: Any) -> None:
        from twisted.internet.endpoints import serverFromString

        self.description = description
        self.endpoint = serverFromString(reactor, description)
        self.site = site
        self.wait_stopped = wait_stopped
        self.listening: Any = None  # the Deferred of endpoint.listen, once asked
        self.port: Any = None

    def privilegedStartService(self) -> None:
        """Bind (before twistd drops privileges, as StreamServerEndpointService does)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Listen, unless privilegedStartService did."""
        super().startService()
        if self.listening is None:
            self._listen()

    def _listen(self) -> None:
        def listened(port: Any) -> None:
            self.port = port

        def failed(failure: Any) -> None:
            from twisted.internet.defer import CancelledError

            if failure.check(CancelledError):
                return
            _log.error(
                "Admin listener {endpoint} not started: {error}. The gateway serves its"
                " listeners without it; use --admin off, or another port:"
                " --admin tcp:PORT:interface=127.0.0.1",
                endpoint=self.description,
                error=failure.getErrorMessage().rstrip("."),
            )

        self.listening = self.endpoint.listen(self.site).addCallbacks(listened, failed)

    def stopService(self) -> Any:
        """Close the listener once the drain is over."""
        super().stopService()

        def close(_: object) -> Any:
            listening, self.listening = self.listening, None
            if listening is not None and not listening.called:
                listening.cancel()
            port, self.port = self.port, None
            return port.stopListening() if port is not None else None

        return self.wait_stopped().addBoth(close)


class _IngressStatusService(Service):
    """--publish-service/--publish-address: leader election, and the Ingress status writer
    syncing after every reload and when this replica becomes the leader."""

    def __init__(self, reactor: Any, options: Options, kube: Any, gateway: Any, environ: Any) -> None:
        from flexgw.config.sources.kubestatus import IngressStatus, LeaderElector, served_ingresses

        connection = kube.connection
        namespace = environ.get("POD_NAMESPACE") or connection.namespace or "default"
        self.status: Any = None
        self.elector = LeaderElector(
            reactor, connection, namespace, options["election-id"], on_started=lambda: self.status.sync()
        )
        addresses = (options["publish-address"] or "").split(",") if options["publish-address"] else ()
        self.status = IngressStatus(
            connection,
            self.elector,
            kube.ingresses,
            lambda: served_ingresses(gateway.plan),
            publish_addresses=addresses,
            publish_service=options["publish-service"],
        )
        gateway.after_reload.append(self.status.sync)

    def startService(self) -> None:
        """Start competing for the Lease."""
        super().startService()
        self.elector.start()

    def stopService(self) -> Any:
        """Give the Lease up (another replica takes over at its next try)."""
        super().stopService()
        return self.elector.stop()


class _WatcherService(MultiService):
    """Runs the config watcher while the service runs."""

    def __init__(self, watcher: Any) -> None:
        super().__init__()
        self.watcher = watcher

    def startService(self) -> None:
        """Start watching."""
        super().startService()
        self.watcher.start()

    def stopService(self) -> Any:
        """Stop watching."""
        self.watcher.stop()
        return super().stopService()
