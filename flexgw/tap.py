"""twistd entry point: command-line options and the service tree (the only global-reactor user)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.python import usage

from flexgw import __version__

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
            "message-log",
            None,
            "-",
            "message-logging-flex output: a file path, '-' for stdout, 'twisted' for the runtime log.",
        ],
    ]
    optFlags = [["strict", None, "Unknown configuration keys are errors, not warnings."]]  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        self["conf"] = []
        self["policy-modules"] = []

    def opt_conf(self, path: str) -> None:
        """Configuration directory (repeatable; default /etc/flexgw)."""
        self["conf"].append(path)

    def opt_policy_module(self, name: str) -> None:
        """Import a third-party policy module (repeatable); it registers its policy kinds."""
        self["policy-modules"].append(name)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"flexgw {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        """Check values and apply defaults."""
        if not self["conf"]:
            self["conf"] = ["/etc/flexgw"]
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
        if self["log-level"] is not None and self["log-level"] not in _LEVELS:
            raise usage.UsageError("--log-level must be one of " + ", ".join(_LEVELS))


def _install_log_level(
    level: str | None, publisher: Any = globalLogPublisher, predicate: Any = None
) -> Any:
    """Drop runtime log events below `level` (info when None), or below what `predicate`
    says, on every observer of `publisher`; returns the predicate, whose level reloads set
    (unless --log-level was given)."""
    if predicate is None:
        predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level or "info"])
    for observer in list(publisher._observers):
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(observer, [predicate]))
    return predicate


def makeService(options: Options) -> MultiService:
    """Build the gateway service tree from the options."""
    from twisted.internet import reactor

    from flexgw.config.watch import ConfigWatcher, debounce_from_env
    from flexgw.http.accesslog import AccessLog, MessageLog
    from flexgw.service.gateway import GatewayService

    log_filter = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[options["log-level"] or "info"])
    access_log = None
    if options["access-log"] != "off":
        access_log = AccessLog.open(reactor, options["access-log"])
    message_log = None
    if options["message-log"] != "twisted":
        message_log = MessageLog.open(reactor, options["message-log"])
    top = MultiService()
    _LogLevelService(log_filter).setServiceParent(top)  # first: before the gateway logs
    gateway = GatewayService(
        reactor,
        options["conf"],
        os.environ,
        access_log=access_log,
        message_log=message_log,
        strict=options["strict"],
        drain_seconds=options["drain-seconds"],
        log_filter=log_filter,
        log_level_fixed=options["log-level"] is not None,
        log_publisher=globalLogPublisher,
    )
    gateway.setServiceParent(top)
    if options["admin"] != "off":
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet.endpoints import serverFromString

        from flexgw.service.admin import admin_site

        admin = StreamServerEndpointService(
            serverFromString(reactor, options["admin"]), admin_site(gateway)
        )
        admin.setServiceParent(top)
    watcher = ConfigWatcher(
        reactor,
        options["conf"],
        gateway.reload,
        debounce_from_env(os.environ),
        extra_files=lambda: gateway.plan.tls_files,  # certificates, keys, CAs read by the plan
    )
    _WatcherService(watcher).setServiceParent(top)

    def _on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(gateway.reload)

    signal.signal(signal.SIGHUP, _on_hup)

    def _on_usr1(signum: int, frame: Any) -> None:
        reactor.callFromThread(gateway.reopen_logs)

    signal.signal(signal.SIGUSR1, _on_usr1)  # logrotate: reopen log files

    def _on_second_stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(gateway.drain_now)

    def _arm_second_stop() -> None:
        # The reactor is stopping (first SIGTERM/SIGINT) and the gateway drains; a second
        # signal cuts what is left, and shutdown then completes as usual (logs flushed).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_second_stop)

    reactor.addSystemEventTrigger("before", "shutdown", _arm_second_stop)
    return top


class _LogLevelService(Service):
    """Puts the level filter on twistd's log observers, which twistd only sets up after
    makeService (so it cannot be done there)."""

    def __init__(self, predicate: LogLevelFilterPredicate) -> None:
        self.predicate = predicate

    def startService(self) -> None:
        """Wrap the observers in the filter."""
        super().startService()
        _install_log_level(None, globalLogPublisher, self.predicate)


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
