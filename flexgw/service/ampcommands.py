"""AMP commands between the `--workers` supervisor and its worker processes.

Worker → supervisor: `WorkerReady` (the worker serves its configuration), `RateLimitHit` (one
check-and-count in the supervisor's rate-limit counters), `SpikeTake` (one unit of a spike-control
sliding window). Supervisor → worker: `Ping` (heartbeat), `Reload`, `Stop` (drain), `StopNow` (cut the drain short),
`Readiness`, `CollectMetrics`, `WorkerStatus`. Stopping goes over AMP rather than by signal, so
a worker that also gets systemd's or a terminal's signal directly drains once, not twice.

AMP caps one value at 65 535 bytes; `BigBytes` spreads a larger value (a metrics scrape, a
status document) over as many keys as it needs.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp

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


class RateLimitHit(amp.Command):
    """Check and count one request in the supervisor's counters of `namespace` (one binding)."""

    arguments = [  # noqa: RUF012
        (b"namespace", amp.Unicode()),
        (b"key", amp.Unicode()),
        # [maximum_requests, period_ms, maximum_requests, period_ms, ...]
        (b"limits", amp.ListOf(amp.Integer())),
    ]
    response = [  # noqa: RUF012
        (b"allowed", amp.Boolean()),
        # [remaining, reset_ms, ...] in the order of the limits
        (b"quotas", amp.ListOf(amp.Integer())),
        (b"keys", amp.Integer()),  # keys the namespace holds now (the store's len())
    ]


class SpikeTake(amp.Command):
    """Take one unit of the sliding window `namespace` if it has one (spike control)."""

    arguments = [  # noqa: RUF012
        (b"namespace", amp.Unicode()),
        (b"maximum", amp.Integer()),
        (b"period_ms", amp.Integer()),
    ]
    response = [  # noqa: RUF012
        (b"taken", amp.Boolean()),
        (b"remaining", amp.Integer()),  # quota left after this take
        (b"reset_ms", amp.Integer()),  # until the oldest request leaves the window (0 if quota left)
    ]


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
