"""In-process measurements with no dependency: counters and latency summaries.

These feed ``statistics()`` snapshots. They are cheap enough for the request path: one
lock-protected update per request, and percentiles computed only when asked for, from a
window of the most recent observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LatencySummary", "LatencyWindow"]


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency over the most recent requests (seconds); zeros when there are none.

    ``count`` is the number of observations ever recorded; the percentiles and the
    mean cover the most recent ones only (the window).
    """

    #: Observations recorded since start.
    count: int
    #: Mean over the window.
    mean_s: float
    #: Median over the window.
    p50_s: float
    #: 90th percentile over the window.
    p90_s: float
    #: 99th percentile over the window.
    p99_s: float
    #: Largest value in the window.
    max_s: float


class LatencyWindow:
    """A ring of the last ``size`` observations. Not thread-safe: callers hold a lock."""

    __slots__ = ("_count", "_size", "_values")

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._values: list[float] = []
        self._count = 0

    def record(self, seconds: float) -> None:
        """Add one observation, replacing the oldest once the window is full."""
        if len(self._values) < self._size:
            self._values.append(seconds)
        else:
            self._values[self._count % self._size] = seconds
        self._count += 1

    def summary(self) -> LatencySummary:
        """Percentiles (nearest rank) over the window."""
        values = sorted(self._values)
        if not values:
            return LatencySummary(self._count, 0.0, 0.0, 0.0, 0.0, 0.0)

        def rank(q: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

        return LatencySummary(
            count=self._count,
            mean_s=sum(values) / len(values),
            p50_s=rank(0.50),
            p90_s=rank(0.90),
            p99_s=rank(0.99),
            max_s=values[-1],
        )
