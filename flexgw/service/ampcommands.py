"""AMP commands between the `--workers` supervisor and its worker processes.

Worker → supervisor: `WorkerReady` (the worker serves its configuration), and the shared
storage's `RateLimitHit` and `SpikeTake` (flexgw.storage.ampcommands, re-exported here). Supervisor → worker: `Ping` (heartbeat), `Reload`, `Stop` (drain), `StopNow` (cut the drain short),
`Readiness`, `CollectMetrics`, `WorkerStatus`. Stopping goes over AMP rather than by signal, so
a worker that also gets systemd's or a terminal's signal directly drains once, not twice.

AMP caps one value at 65 535 bytes; `BigBytes` spreads a larger value (a metrics scrape, a
status document) over as many keys as it needs.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp

from flexgw.storage.ampcommands import RateLimitHit, SpikeTake

__all__ = [
    "BigBytes",
    "CollectMetrics",
    "Ping",
    "RateLimitHit",
    "Readiness",
    "Reload",
    "SpikeTake",
    "Stop",
    "StopNow",
    "WorkerReady",
    "WorkerStatus",
]

_CHUNK = amp.MAX_VALUE_LENGTH


class BigBytes(amp.Argument):
    """Bytes of any length, carried in keys `name`, `name.1`, `name.2`, ... of one box."""

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[Any, Any], proto: Any) -> None:
        """Join the chunks back together."""
        parts = [strings[name]]
        index = 1
        while True:
            key = name + b".%d" % index
            if key not in strings:
                break
            parts.append(strings[key])
            index += 1
        objects[str(name, "ascii")] = b"".join(parts)

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[Any, Any], proto: Any) -> None:
        """Cut the value into chunks AMP can carry."""
        value: bytes = objects[str(name, "ascii")]
        strings[name] = value[:_CHUNK]
        for index, start in enumerate(range(_CHUNK, len(value), _CHUNK), 1):
            strings[name + b".%d" % index] = value[start : start + _CHUNK]


class WorkerReady(amp.Command):
    """The worker has bound its listeners and applied its configuration (or re-applied it)."""

    arguments = [  # noqa: RUF012 (AMP convention)
        (b"worker", amp.Integer()),
        (b"pid", amp.Integer()),
        (b"status", amp.Unicode()),
    ]
    response: list[Any] = []  # noqa: RUF012


class Reload(amp.Command):
    """Compile the configuration again and swap it in (SIGHUP or a file change at the supervisor)."""

    arguments: list[Any] = []  # noqa: RUF012
    response = [(b"ok", amp.Boolean()), (b"status", amp.Unicode())]  # noqa: RUF012


class Readiness(amp.Command):
    """The worker's readiness with Flex's `allow*Errors` flags (names of the flags set)."""

    arguments = [(b"allow", amp.ListOf(amp.Unicode()))]  # noqa: RUF012
    response = [(b"ready", amp.Boolean()), (b"reasons", amp.ListOf(amp.Unicode()))]  # noqa: RUF012


class CollectMetrics(amp.Command):
    """The worker's metrics in the Prometheus text format."""

    arguments: list[Any] = []  # noqa: RUF012
    response = [(b"text", BigBytes())]  # noqa: RUF012


class WorkerStatus(amp.Command):
    """The worker's `/status` document, as JSON."""

    arguments: list[Any] = []  # noqa: RUF012
    response = [(b"json", BigBytes())]  # noqa: RUF012


class Stop(amp.Command):
    """Drain and exit, as on SIGTERM."""

    arguments: list[Any] = []  # noqa: RUF012
    response: list[Any] = []  # noqa: RUF012


class StopNow(amp.Command):
    """Cut the drain under way (the supervisor got a second SIGTERM)."""

    arguments: list[Any] = []  # noqa: RUF012
    response: list[Any] = []  # noqa: RUF012


class Ping(amp.Command):
    """The supervisor's heartbeat: a worker whose reactor runs answers at once."""

    arguments: list[Any] = []  # noqa: RUF012
    response: list[Any] = []  # noqa: RUF012
