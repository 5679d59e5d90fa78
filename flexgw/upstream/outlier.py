"""Passive health (the `upstream-outlier-detection` policy, a flexgw extension): an address
whose tries fail `consecutiveErrors` times in a row (a 5xx, a connect failure, a reset before
the response, a timeout) leaves the rotation for `baseEjectionSeconds` times the number of its
ejections, at most `maxEjectionSeconds`; at most `maxEjectionPercent` of the addresses are
ejected at once (one always may be). flexgw.upstream.cluster keeps the counts and the timers."""

from __future__ import annotations

import attrs


@attrs.frozen
class OutlierPolicy:
    """One Service's outlier detection settings."""

    consecutive_errors: int = 5
    base_ejection: float = 30.0  # seconds
    max_ejection: float = 300.0  # seconds
    max_ejection_percent: float = 10.0
