"""In-process measurements with no dependency, and their export.

servekit counts as it works (counters under the locks it already takes, histograms of
durations with fixed buckets) and exposes the counts as frozen ``statistics()``
snapshots. This module turns those snapshots into metric families at scrape time, in
one place (:func:`collect`), and every export reads that one list, so the names, help
texts and values cannot drift apart:

- :func:`register_prometheus` puts a collector into ``prometheus_client``'s registry
  (the host's own ``/metrics`` then shows servekit's series; extra ``prometheus``);
- :func:`register_opentelemetry` creates observable instruments on a
  ``MeterProvider`` (extra ``otel``);
- :func:`render_text` writes the Prometheus text format itself, for hosts with
  neither (what the transports' ``GET /metrics`` answers).

Nothing runs between scrapes, and nothing is counted twice: a scrape reads the
snapshots of the predictors, batchers and job queues it was given. Names follow the
Prometheus conventions: a ``servekit_`` prefix, base units (seconds), ``_total`` on
counters, and a ``model`` label on every per-model series. :data:`FAMILIES` lists them;
docs/metrics.md describes each.

>>> import servekit as sk
>>> from servekit.metrics import collect, render_text
>>> p = sk.Predictor(lambda xs: [x * 2 for x in xs], name="double")
>>> p.predict(2)
4
>>> "servekit_predictions_total" in render_text(collect(p))
True
>>> p.close()
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "CONTENT_TYPE",
    "DURATION_BUCKETS_S",
    "FAMILIES",
    "FamilySpec",
    "Histogram",
    "HistogramSample",
    "HistogramSnapshot",
    "LatencySummary",
    "LatencyWindow",
    "MetricFamily",
    "Sample",
    "bound_label",
    "collect",
    "register_opentelemetry",
    "register_prometheus",
    "render_text",
    "series",
]

#: Upper bounds (seconds) of the duration histograms: 100 µs to 5 minutes, finer where
#: serving latencies fall. Fixed, so every scrape has the same buckets.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

_DURATION_BOUNDS = np.asarray(DURATION_BUCKETS_S, dtype=np.float64)

#: Upper bounds of the batch size histogram (items per batch): powers of two.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(11))

#: The content type of the Prometheus text format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- in-process measurements -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """All-time observations by bucket: ``counts[i]`` observations were ``<= bounds[i]``
    (cumulative, as Prometheus buckets are); ``count`` and ``sum`` cover them all."""

    #: Upper bounds of the buckets (the ``+Inf`` bucket is ``count``).
    bounds: tuple[float, ...] = ()
    #: Cumulative counts, one per bound.
    counts: tuple[int, ...] = ()
    #: Observations recorded.
    count: int = 0
    #: Their sum.
    sum: float = 0.0


_EMPTY_HISTOGRAM = HistogramSnapshot()


def _cumulative(
    bounds: tuple[float, ...], per_bucket: list[int], total: float
) -> HistogramSnapshot:
    counts, running = [], 0
    for n in per_bucket[: len(bounds)]:
        running += n
        counts.append(running)
    return HistogramSnapshot(bounds, tuple(counts), running + per_bucket[len(bounds)], total)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency over the most recent requests (seconds); zeros when there are none.

    ``count`` is the number of observations ever recorded; the percentiles and the
    mean cover the most recent ones only (the window); ``histogram`` covers them all.
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
    #: Every observation since start, in the buckets of
    #: :data:`~servekit.metrics.DURATION_BUCKETS_S`.
    histogram: HistogramSnapshot = _EMPTY_HISTOGRAM


class LatencyWindow:
    """A ring of the last ``size`` observations, and an all-time histogram of them.

    Not thread-safe: callers hold a lock. :meth:`record` is on the request path, so it
    only writes the ring: the histogram takes the observations in bulk (numpy, a few
    nanoseconds each) when the ring is about to overwrite ones it has not counted yet,
    and when a summary is asked for.
    """

    __slots__ = ("_buckets", "_count", "_counted", "_size", "_sum", "_values")

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self._size = size
        self._values: list[float] = []
        self._count = 0
        self._counted = 0  # observations already in _buckets and _sum
        self._sum = 0.0
        self._buckets = [0] * (len(DURATION_BUCKETS_S) + 1)

    def record(self, seconds: float) -> None:
        """Add one observation, replacing the oldest once the window is full."""
        count = self._count
        if count < self._size:
            self._values.append(seconds)
        else:
            if count - self._counted == self._size:
                self._take(self._values)  # every value in the ring is uncounted
                self._counted = count
            self._values[count % self._size] = seconds
        self._count = count + 1

    def record_many(self, seconds: list[float]) -> None:
        """Add several observations at once, as :meth:`record` would one by one.

        The batcher records a whole batch's queue waits with one call: one slice
        assignment instead of a call per item.
        """
        n = len(seconds)
        if self._count < self._size or n > self._size:
            for value in seconds:
                self.record(value)
            return
        if self._count + n - self._counted > self._size:
            # The slots about to be overwritten hold values not yet counted.
            self._take(self._uncounted())
            self._counted = self._count
        start = self._count % self._size
        end = start + n
        if end <= self._size:
            self._values[start:end] = seconds
        else:
            split = self._size - start
            self._values[start:] = seconds[:split]
            self._values[: end - self._size] = seconds[split:]
        self._count += n

    def _uncounted(self) -> list[float]:
        n = self._count - self._counted
        if n == 0:
            return []
        end = self._count % self._size if self._count > self._size else self._count
        if n <= end:
            return self._values[end - n : end]
        return self._values[end - n :] + self._values[:end]

    def _take(self, values: list[float]) -> None:
        array = np.asarray(values, dtype=np.float64)
        found = np.searchsorted(_DURATION_BOUNDS, array, side="left")
        for index, n in enumerate(np.bincount(found, minlength=len(self._buckets)).tolist()):
            self._buckets[index] += n
        self._sum += float(array.sum())

    def summary(self) -> LatencySummary:
        """Percentiles (nearest rank) over the window, and the all-time histogram."""
        self._take(self._uncounted())
        self._counted = self._count
        histogram = _cumulative(DURATION_BUCKETS_S, self._buckets, self._sum)
        values = sorted(self._values)
        if not values:
            return LatencySummary(self._count, 0.0, 0.0, 0.0, 0.0, 0.0, histogram)

        def rank(q: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

        return LatencySummary(
            count=self._count,
            mean_s=sum(values) / len(values),
            p50_s=rank(0.50),
            p90_s=rank(0.90),
            p99_s=rank(0.99),
            max_s=values[-1],
            histogram=histogram,
        )


class Histogram:
    """A thread-safe all-time histogram with fixed bounds (default
    :data:`DURATION_BUCKETS_S`).

    >>> h = Histogram()
    >>> h.observe(0.003); h.observe(2.0)
    >>> snap = h.snapshot()
    >>> snap.count, snap.sum, snap.counts[snap.bounds.index(0.005)]
    (2, 2.003, 1)
    """

    __slots__ = ("_bounds", "_buckets", "_lock", "_sum")

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS_S) -> None:
        self._bounds = tuple(float(b) for b in bounds)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds!r}")
        self._buckets = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation."""
        index = bisect_left(self._bounds, value)
        with self._lock:
            self._buckets[index] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        """The counts so far."""
        with self._lock:
            return _cumulative(self._bounds, list(self._buckets), self._sum)


# --- metric families: the one description every export reads --------------------------


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """What a metric family is: its name, type, unit and meaning.

    ``name`` is the Prometheus name without the ``_total`` of counters (the text format
    adds it); OpenTelemetry instruments get the same name and ``otel_unit``.
    """

    #: Prometheus family name (counters without ``_total``).
    name: str
    #: ``counter``, ``gauge`` or ``histogram``.
    kind: str
    #: The help text.
    help: str
    #: Label names of its series (``le`` of histogram buckets not included).
    labels: tuple[str, ...]
    #: The Prometheus unit suffix the name ends with (``seconds``), or "".
    unit: str = ""
    #: The UCUM unit OpenTelemetry instruments get (``s``, ``{item}``).
    otel_unit: str = "1"


def _spec(name: str, kind: str, labels: tuple[str, ...], otel_unit: str, help: str) -> FamilySpec:
    unit = next((u for u in ("seconds", "ratio") if name.endswith("_" + u)), "")
    return FamilySpec(name, kind, help, labels, unit, otel_unit)


_M = ("model",)
#: Every family servekit exports, by name. docs/metrics.md describes each one.
FAMILIES: dict[str, FamilySpec] = {
    s.name: s
    for s in (
        _spec("servekit_ready", "gauge", (), "1",
              "1 while the server accepts requests and every predictor is ready, else 0."),
        _spec("servekit_model_ready", "gauge", _M, "1",
              "1 while the predictor serves requests, else 0."),
        _spec("servekit_model_info", "gauge", ("model", "version", "backend"), "1",
              "Always 1; the labels say which model version runs on which back end."),
        _spec("servekit_predictions", "counter", ("model", "outcome"), "{item}",
              "Items predicted, by outcome (an item of predict_many counts once)."),
        _spec("servekit_predictions_in_flight", "gauge", _M, "{item}",
              "Items accepted and not answered yet."),
        _spec("servekit_request_duration_seconds", "histogram", _M, "s",
              "Time of one predict call, end to end (predict_many counts once)."),
        _spec("servekit_batcher_queue_depth", "gauge", _M, "{item}",
              "Items waiting in the batcher's queue."),
        _spec("servekit_batcher_running_batches", "gauge", _M, "{batch}",
              "Batches running now."),
        _spec("servekit_batches", "counter", _M, "{batch}",
              "Batches the batcher has run."),
        _spec("servekit_batch_items", "counter", ("model", "outcome"), "{item}",
              "Items by how they left the batcher."),
        _spec("servekit_batch_size_items", "histogram", _M, "{item}",
              "Items per batch."),
        _spec("servekit_queue_wait_seconds", "histogram", _M, "s",
              "Time items waited in the batcher's queue before their batch started."),
        _spec("servekit_batch_duration_seconds", "histogram", _M, "s",
              "Time the model took per batch."),
        _spec("servekit_batcher_utilisation_ratio", "gauge", _M, "1",
              "Share of the batcher's slot time spent running batches since start."),
        _spec("servekit_jobs_submitted", "counter", _M, "{job}",
              "Jobs this process stored (an idempotent resubmit is not counted)."),
        _spec("servekit_jobs_finished", "counter", ("model", "status"), "{job}",
              "Jobs this process moved to a final status, by status."),
        _spec("servekit_job_retries", "counter", _M, "{job}",
              "Attempts re-queued by this process for another try."),
        _spec("servekit_jobs", "gauge", ("model", "status"), "{job}",
              "Jobs in the store by status (every process sharing the store)."),
        _spec("servekit_job_duration_seconds", "histogram", _M, "s",
              "Run time of one job attempt on this process's runners."),
        _spec("servekit_webhook_deliveries", "counter", ("model", "outcome"), "{delivery}",
              "Webhook delivery attempts by outcome."),
        _spec("servekit_http_requests", "counter", ("route", "method", "status"), "{request}",
              "HTTP requests answered, by route name (unmatched: no route), method, status."),
        _spec("servekit_http_request_duration_seconds", "histogram", ("route",), "s",
              "Time from an HTTP request's arrival to its answer, by route name."),
    )
}  # fmt: skip

_BATCH_OUTCOMES = ("succeeded", "failed", "rejected", "expired", "cancelled", "closed")
_JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
_FINAL_STATUSES = _JOB_STATUSES[2:]
_DELIVERY_OUTCOMES = ("delivered", "retrying", "failed")


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of a counter or gauge: its labels and value."""

    #: Label names and values, in the family's label order.
    labels: tuple[tuple[str, str], ...]
    #: The value now.
    value: float


@dataclass(frozen=True, slots=True)
class HistogramSample:
    """One series of a histogram: its labels and buckets."""

    #: Label names and values (without ``le``).
    labels: tuple[tuple[str, str], ...]
    #: Its buckets, count and sum.
    histogram: HistogramSnapshot


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A family's description (:class:`FamilySpec`) and its series at one scrape."""

    #: What the family is.
    spec: FamilySpec
    #: Its series.
    samples: tuple[Sample | HistogramSample, ...]


class _Builder:
    def __init__(self) -> None:
        self.samples: dict[str, list[Sample | HistogramSample]] = {n: [] for n in FAMILIES}

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples[name].append(Sample(self._labels(name, labels), value))

    def histogram(self, name: str, histogram: HistogramSnapshot, **labels: str) -> None:
        self.samples[name].append(HistogramSample(self._labels(name, labels), histogram))

    @staticmethod
    def _labels(name: str, labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        order = FAMILIES[name].labels
        assert tuple(labels) == order, (name, tuple(labels))
        return tuple((k, str(labels[k])) for k in order)

    def families(self) -> list[MetricFamily]:
        return [
            MetricFamily(FAMILIES[name], tuple(samples))
            for name, samples in self.samples.items()
            if samples
        ]


def _sizes_histogram(sizes: Mapping[int, int]) -> HistogramSnapshot:
    per_bucket = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
    total = 0.0
    for size, n in sizes.items():
        per_bucket[bisect_left(BATCH_SIZE_BUCKETS, size)] += n
        total += size * n
    return _cumulative(BATCH_SIZE_BUCKETS, per_bucket, total)


@dataclass(slots=True)
class _Sources:
    predictors: dict[str, Any]
    queues: list[tuple[str | None, Any]]  # (model label, or None for the queue's own)
    ready: Callable[[], bool] | None = None
    http: list[Any] = field(default_factory=list)  # a Service's HTTPStatistics


def _resolve(source: Any, into: _Sources | None = None) -> _Sources:
    """What ``source`` holds: predictors, job queues, and a readiness check."""
    from ._predictor import Predictor
    from .jobs import JobQueue

    out = into if into is not None else _Sources({}, [])
    service = getattr(source, "service", None)  # an ASGI or WSGI app of the transports
    if service is not None and hasattr(service, "predictors"):
        source = service
    if isinstance(source, Predictor):
        out.predictors[source.name] = source
    elif isinstance(source, JobQueue):
        out.queues.append((None, source))
    elif hasattr(source, "predictors") and hasattr(source, "accepting"):  # a Service
        out.predictors.update(source.predictors)
        queues = getattr(source, "job_queues", None)
        if queues is None:  # a Service of one queue
            queues = {} if source.jobs is None else {None: source.jobs}
        out.queues.extend(queues.items())
        out.ready = source.ready
        http = getattr(source, "http", None)
        if http is not None and all(h is not http for h in out.http):
            out.http.append(http)
    elif isinstance(source, Mapping):
        # Names to predictors, or model names to job queues (one queue per model).
        for name, item in source.items():
            if isinstance(item, JobQueue):
                out.queues.append((None if name is None else str(name), item))
            elif isinstance(item, Predictor):
                out.predictors[str(name)] = item
            else:
                raise TypeError(f"source[{name!r}] is neither a Predictor nor a JobQueue")
    elif isinstance(source, Iterable) and not isinstance(source, str | bytes):
        for item in source:
            _resolve(item, out)
    else:
        raise TypeError(
            "metrics come from a Predictor, a mapping of names to predictors, a JobQueue, "
            f"a transports Service or app, or a list of those; got {type(source).__name__}"
        )
    return out


def collect(source: Any, *, ready: bool | None = None, jobs: Any = None) -> list[MetricFamily]:
    """The metric families of ``source`` now: a :class:`~servekit.Predictor`, a mapping
    of names to predictors, a :class:`~servekit.jobs.JobQueue`, a mapping of model
    names to job queues, a transports ``Service`` or app (its predictors, its job
    queues, its readiness and its HTTP counts), or a list of those. ``ready`` sets
    ``servekit_ready`` (a Service's own readiness otherwise); ``jobs`` adds job queues
    (a queue or a mapping).
    The ``model`` label of a job queue's series is its key in a mapping, else the name
    of its predictor. Families without series are left out."""
    sources = _resolve(source)
    if jobs is not None:
        _resolve(jobs, sources)
    return _collect(sources, ready)


def _collect(sources: _Sources, ready: bool | None = None) -> list[MetricFamily]:
    b = _Builder()
    if ready is None and sources.ready is not None:
        ready = sources.ready()
    if ready is not None:
        b.add("servekit_ready", 1 if ready else 0)
    for name, predictor in sources.predictors.items():
        stats = predictor.statistics()
        b.add("servekit_model_ready", 1 if predictor.ready else 0, model=name)
        b.add("servekit_model_info", 1, model=name, version=stats.version or "",
              backend=stats.backend)  # fmt: skip
        b.add("servekit_predictions", stats.succeeded, model=name, outcome="succeeded")
        b.add("servekit_predictions", stats.errors, model=name, outcome="failed")
        b.add("servekit_predictions_in_flight", stats.in_flight, model=name)
        b.histogram("servekit_request_duration_seconds", stats.latency.histogram, model=name)
        batcher = predictor.batcher
        if batcher is None:
            continue
        s = batcher.statistics()
        b.add("servekit_batcher_queue_depth", s.queue_depth, model=name)
        b.add("servekit_batcher_running_batches", s.running_batches, model=name)
        b.add("servekit_batches", s.batches, model=name)
        for outcome in _BATCH_OUTCOMES:
            b.add("servekit_batch_items", getattr(s, outcome), model=name, outcome=outcome)
        b.histogram("servekit_batch_size_items", _sizes_histogram(s.batch_sizes), model=name)
        b.histogram("servekit_queue_wait_seconds", s.queue_wait.histogram, model=name)
        b.histogram("servekit_batch_duration_seconds", s.run_time.histogram, model=name)
        b.add("servekit_batcher_utilisation_ratio", float(s.utilisation), model=name)
    for label, queue in sources.queues:
        q = queue.statistics()
        name = q.model if label is None else label
        b.add("servekit_jobs_submitted", q.submitted, model=name)
        for status in _FINAL_STATUSES:
            b.add("servekit_jobs_finished", q.finished.get(status, 0), model=name, status=status)
        b.add("servekit_job_retries", q.retries, model=name)
        if q.by_status is not None:
            for status in _JOB_STATUSES:
                b.add("servekit_jobs", q.by_status.get(status, 0), model=name, status=status)
        b.histogram("servekit_job_duration_seconds", q.run_time, model=name)
        if q.webhooks is not None:
            for outcome in _DELIVERY_OUTCOMES:
                b.add("servekit_webhook_deliveries", q.webhooks.get(outcome, 0), model=name,
                      outcome=outcome)  # fmt: skip
    _collect_http(b, sources.http)
    return b.families()


def _collect_http(b: _Builder, recorders: list[Any]) -> None:
    """The HTTP families, summed over the services' recorders (one, nearly always)."""
    requests: dict[tuple[str, str, str], int] = {}
    durations: dict[str, HistogramSnapshot] = {}
    for recorder in recorders:
        snapshot = recorder.snapshot()
        for key, n in snapshot.requests.items():
            requests[key] = requests.get(key, 0) + n
        for route, h in snapshot.durations.items():
            seen = durations.get(route)
            if seen is not None:
                counts = tuple(x + y for x, y in zip(seen.counts, h.counts, strict=True))
                h = HistogramSnapshot(h.bounds, counts, seen.count + h.count, seen.sum + h.sum)
            durations[route] = h
    for (route, method, status), n in sorted(requests.items()):
        b.add("servekit_http_requests", n, route=route, method=method, status=status)
    for route, h in sorted(durations.items()):
        b.histogram("servekit_http_request_duration_seconds", h, route=route)


# --- the Prometheus text format --------------------------------------------------------


def bound_label(bound: float) -> str:
    """A bucket bound as the ``le`` label value (as prometheus_client writes it)."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _histogram_series(
    name: str, labels: tuple[tuple[str, str], ...], h: HistogramSnapshot
) -> Iterable[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The ``_bucket``, ``_count`` and ``_sum`` series of one histogram."""
    for bound, count in zip(h.bounds, h.counts, strict=True):
        yield f"{name}_bucket", (*labels, ("le", bound_label(bound))), count
    yield f"{name}_bucket", (*labels, ("le", "+Inf")), h.count
    yield f"{name}_count", labels, h.count
    yield f"{name}_sum", labels, h.sum


def series(family: MetricFamily) -> Iterable[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every series of ``family`` as ``(sample name, labels, value)``: what both the text
    rendering and the prometheus_client collector write."""
    spec = family.spec
    for sample in family.samples:
        if isinstance(sample, HistogramSample):
            yield from _histogram_series(spec.name, sample.labels, sample.histogram)
        elif spec.kind == "counter":
            yield f"{spec.name}_total", sample.labels, sample.value
        else:
            yield spec.name, sample.labels, sample.value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_text(families: Iterable[MetricFamily]) -> str:
    """The Prometheus text format (version 0.0.4) of ``families``."""
    lines: list[str] = []
    for family in families:
        spec = family.spec
        exposed = f"{spec.name}_total" if spec.kind == "counter" else spec.name
        help = spec.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {exposed} {help}")
        lines.append(f"# TYPE {exposed} {spec.kind}")
        for name, labels, value in series(family):
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(
                f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


# --- exports to the host's metrics libraries ------------------------------------------


def register_prometheus(source: Any, registry: Any = None) -> Any:
    """Register servekit's series from ``source`` (as :func:`collect` takes it) with a
    ``prometheus_client`` registry (default: the global ``REGISTRY``); return the
    collector (``registry.unregister(collector)`` removes it). Needs
    ``pip install "servekit[prometheus]"``.

    Example::

        from prometheus_client import make_asgi_app
        servekit.metrics.register_prometheus(app)   # app = create_asgi_app(...)
        host.mount("/metrics", make_asgi_app())     # the host's /metrics shows servekit's
    """
    from .integrations.prometheus import register

    return register(source, registry)


def register_opentelemetry(source: Any, meter_provider: Any = None) -> Any:
    """Create observable instruments for servekit's families from ``source`` (as
    :func:`collect` takes it) on ``meter_provider`` (default: the global one); they read
    the live state when the provider's readers collect. Returns the meter. Needs
    ``pip install "servekit[otel]"`` (opentelemetry-api; the host brings the SDK)."""
    from .integrations.opentelemetry import register

    return register(source, meter_provider)
