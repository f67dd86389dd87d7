"""servekit's metrics in a ``prometheus_client`` registry, read at scrape time.

Needs ``prometheus_client`` (``pip install "servekit[prometheus]"``); it is imported
only inside the functions here, so importing this module is cheap and
``import servekit`` never imports it.

The collector holds no copy of any value: each scrape calls
:func:`servekit.metrics.collect` on the live predictors and job queues and turns its
families into ``prometheus_client`` families, so the host's own ``/metrics`` (or
``generate_latest()``) shows the same series ``GET /metrics`` of the transports does.

Example::

    import prometheus_client
    from servekit.integrations.prometheus import register

    register(predictor)                       # or a JobQueue, a Service, an app, a list
    print(prometheus_client.generate_latest().decode())
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..metrics import (
    FAMILIES,
    HistogramSample,
    MetricFamily,
    _collect,
    _resolve,
    _Sources,
    bound_label,
)

__all__ = ["ServekitCollector", "register"]

_INSTALL_HINT = (
    'exporting to prometheus_client needs it installed: pip install "servekit[prometheus]"'
)


def _client() -> Any:
    try:
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return prometheus_client.core


class ServekitCollector:
    """A ``prometheus_client`` collector of servekit's families for ``source`` (what
    :func:`servekit.metrics.collect` takes). Register it with
    ``registry.register(collector)``, or use :func:`register`."""

    def __init__(self, source: Any) -> None:
        self._core = _client()
        self._sources: _Sources = _resolve(source)

    def describe(self) -> Iterator[Any]:
        """The families this collector may yield, without their series (so registering
        it reads no state)."""
        for spec in FAMILIES.values():
            yield self._family(MetricFamily(spec, ()))

    def collect(self) -> Iterator[Any]:
        """The families with their series, read from the live state now."""
        for family in _collect(self._sources):
            yield self._family(family)

    def _family(self, family: MetricFamily) -> Any:
        core, spec = self._core, family.spec
        kinds = {
            "counter": core.CounterMetricFamily,
            "gauge": core.GaugeMetricFamily,
            "histogram": core.HistogramMetricFamily,
        }
        out = kinds[spec.kind](spec.name, spec.help, labels=list(spec.labels), unit=spec.unit)
        for sample in family.samples:
            values = [v for _, v in sample.labels]
            if isinstance(sample, HistogramSample):
                h = sample.histogram
                buckets = [(bound_label(b), c) for b, c in zip(h.bounds, h.counts, strict=True)]
                buckets.append(("+Inf", h.count))
                out.add_metric(values, buckets, h.sum)
            else:
                out.add_metric(values, sample.value)
        return out


def register(source: Any, registry: Any = None) -> ServekitCollector:
    """Register a :class:`ServekitCollector` for ``source`` with ``registry`` (default
    ``prometheus_client.REGISTRY``) and return it; ``registry.unregister(collector)``
    takes it out again. One collector per registry: give it every predictor and queue
    (a list) rather than registering twice, which ``prometheus_client`` refuses as
    duplicated series."""
    collector = ServekitCollector(source)
    if registry is None:
        registry = collector._core.REGISTRY
    registry.register(collector)
    return collector
