"""AMP commands of the `--workers` shared storage: a worker's counters live in the supervisor
(flexgw.storage.supervised asks, the supervisor's SupervisorCounters answers).

`RateLimitHit` is one check-and-count in the supervisor's rate-limit counters, `SpikeTake` one
unit of a spike-control sliding window. The supervisor's other commands (ready, reload, stop,
metrics) are in flexgw.service.ampcommands.
"""

from __future__ import annotations

from twisted.protocols import amp


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
