"""servekit's metrics as OpenTelemetry observable instruments.

Needs ``opentelemetry-api`` (``pip install "servekit[otel]"``); the host brings the SDK
and its exporters (OTLP, Prometheus...). It is imported only inside the functions
here, so ``import servekit`` never imports it.

Each family of :data:`servekit.metrics.FAMILIES` becomes an instrument of the same name
(the Prometheus name without ``_total``) with its UCUM unit and help text: counters
become observable counters, gauges observable gauges. The OpenTelemetry API has no
asynchronous histogram, so a histogram family becomes two observable counters,
``NAME_count`` (observations) and ``NAME_sum`` (their sum, in the family's unit); the
buckets are in the Prometheus exports. Values are read from the live state when a
reader collects: one :func:`servekit.metrics.collect` per collection, shared by every
instrument's callback.

Example::

    from opentelemetry import metrics
    from servekit.integrations.opentelemetry import register

    register(predictor)   # or a JobQueue, a Service, an app, a list; global provider
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..metrics import FAMILIES, HistogramSample, MetricFamily, _collect, _resolve, _Sources

__all__ = ["register"]

_INSTALL_HINT = 'exporting to OpenTelemetry needs opentelemetry-api: pip install "servekit[otel]"'


class _Snapshots:
    """One collection shared by the callbacks of one reader's pass.

    A reader calls every instrument's callback once per collection; a callback that
    finds its instrument already served from the current snapshot starts a new one.
    So each collection reads the state once, however many instruments there are.
    """

    def __init__(self, sources: _Sources) -> None:
        self._sources = sources
        self._lock = threading.Lock()
        self._families: dict[str, MetricFamily] = {}
        self._served: set[str] = set()

    def get(self, instrument: str) -> dict[str, MetricFamily]:
        with self._lock:
            if not self._served or instrument in self._served:
                self._families = {f.spec.name: f for f in _collect(self._sources)}
                self._served = set()
            self._served.add(instrument)
            return self._families


def register(source: Any, meter_provider: Any = None) -> Any:
    """Create servekit's observable instruments for ``source`` (what
    :func:`servekit.metrics.collect` takes) on a meter of ``meter_provider`` (default:
    the global provider) and return the meter. Call it once per provider."""
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    from .. import __version__

    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    meter = provider.get_meter("servekit", __version__)
    snapshots = _Snapshots(_resolve(source))

    def observe(instrument: str, family: str, part: str | None) -> Callable[[Any], Any]:
        def callback(options: Any) -> Iterable[Any]:
            found = snapshots.get(instrument).get(family)
            if found is None:
                return []
            out = []
            for sample in found.samples:
                attributes = dict(sample.labels)
                if isinstance(sample, HistogramSample):
                    h = sample.histogram
                    value: float = h.count if part == "count" else h.sum
                else:
                    value = sample.value
                out.append(metrics.Observation(value, attributes))
            return out

        return callback

    for spec in FAMILIES.values():
        if spec.kind == "histogram":
            meter.create_observable_counter(
                f"{spec.name}_count",
                [observe(f"{spec.name}_count", spec.name, "count")],
                unit="1",
                description=f"{spec.help} Observations counted.",
            )
            meter.create_observable_counter(
                f"{spec.name}_sum",
                [observe(f"{spec.name}_sum", spec.name, "sum")],
                unit=spec.otel_unit,
                description=f"{spec.help} Sum of the observations.",
            )
        else:
            create = (
                meter.create_observable_counter
                if spec.kind == "counter"
                else meter.create_observable_gauge
            )
            create(
                spec.name,
                [observe(spec.name, spec.name, None)],
                unit=spec.otel_unit,
                description=spec.help,
            )
    return meter
