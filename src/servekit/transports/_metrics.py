"""``GET /metrics``: the Prometheus text format of a service's metrics, and the HTTP
counts the adapters keep (:class:`HTTPStatistics`).

The families, their names and help texts, and their values come from
:func:`servekit.metrics.collect`, the one description every export reads (the
``prometheus_client`` collector and the OpenTelemetry instruments too), so this text
and theirs cannot drift apart. Built at scrape time from the ``statistics()``
snapshots: nothing runs between scrapes.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from ..metrics import (
    CONTENT_TYPE,
    DURATION_BUCKETS_S,
    HistogramSnapshot,
    _cumulative,
    collect,
    render_text,
)

__all__ = ["CONTENT_TYPE", "HTTPSnapshot", "HTTPStatistics", "render"]

#: Methods counted under their own name; any other is counted as ``other`` (the method
#: is the client's string: a fuzzer must not grow the label set).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_SUM = len(DURATION_BUCKETS_S) + 1  # the index of the sum, after the +Inf bucket


@dataclass(frozen=True, slots=True)
class HTTPSnapshot:
    """The HTTP counts of one service so far."""

    #: Requests answered, by ``(route, method, status)``.
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: Their durations by route, in the buckets of
    #: :data:`~servekit.metrics.DURATION_BUCKETS_S`.
    durations: dict[str, HistogramSnapshot] = field(default_factory=dict)


class HTTPStatistics:
    """Requests answered by one service's adapters, by route name, method and status,
    and their durations by route name.

    The adapters count each request once, when its answer is ready: a dictionary
    increment and a bucket increment. The ASGI app and the FastAPI router call
    :meth:`record` on their event loop's thread, the one writer, so it takes no lock (an
    uncontended lock would cost more than the counting); the WSGI app's request threads
    call :meth:`record_locked`. :meth:`snapshot` copies with operations the GIL makes
    atomic, from any thread.
    """

    __slots__ = ("_lock", "_series")

    def __init__(self) -> None:
        # Per (route, method, status): the count of each duration bucket (the last one
        # +Inf), then the sum of the durations. One lookup per request; the request
        # counts and the per-route histograms are added up at scrape time.
        self._series: dict[tuple[str, str, int], list[float]] = {}
        self._lock = threading.Lock()

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request of ``route`` that took ``seconds``; from one
        thread at a time (an event loop's)."""
        key = (route, method if method in _METHODS else "other", status)
        buckets = self._series.get(key)
        if buckets is None:
            buckets = self._series[key] = [0.0] * (_SUM + 1)
        buckets[bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        buckets[_SUM] += seconds

    def record_locked(self, route: str, method: str, status: int, seconds: float) -> None:
        """:meth:`record` under a lock, for request threads."""
        with self._lock:
            self.record(route, method, status, seconds)

    def snapshot(self) -> HTTPSnapshot:
        """The counts so far, sorted by their labels."""
        with self._lock:
            series = sorted((key, list(b)) for key, b in list(self._series.items()))
        requests: dict[tuple[str, str, str], int] = {}
        per_route: dict[str, list[float]] = {}
        for (route, method, status), buckets in series:
            requests[(route, method, str(status))] = int(sum(buckets[:_SUM]))
            total = per_route.setdefault(route, [0.0] * (_SUM + 1))
            for i, n in enumerate(buckets):
                total[i] += n
        durations = {
            route: _cumulative(DURATION_BUCKETS_S, [int(n) for n in b[:_SUM]], b[_SUM])
            for route, b in sorted(per_route.items())
        }
        return HTTPSnapshot(requests, durations)


def render(source: Any, *, ready: bool, jobs: Any = None) -> str:
    """The text format for ``source`` (a transports ``Service``, or names to
    :class:`~servekit.Predictor`) and, when given, a :class:`~servekit.jobs.JobQueue`
    or a mapping of model names to queues."""
    return render_text(collect(source, ready=ready, jobs=jobs))
