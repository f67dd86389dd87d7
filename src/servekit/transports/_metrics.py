"""The Prometheus text exposition of servekit's statistics (``GET /metrics``).

Built from the frozen ``statistics()`` snapshots at scrape time: nothing is counted
twice and nothing runs between scrapes. Names follow the Prometheus conventions
(``servekit_`` prefix, base units, ``_total`` for counters, ``_seconds`` for times);
latencies are summaries over a recent window (quantiles 0.5, 0.9, 0.99).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "render"]

#: The content type of the text format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, labels: Mapping[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    text = repr(float(value)) if isinstance(value, float) else str(value)
    return f"{name}{{{inner}}} {text}" if inner else f"{name} {text}"


class _Family:
    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[str] = []

    def add(self, labels: Mapping[str, str], value: float, suffix: str = "") -> None:
        self.samples.append(_line(self.name + suffix, labels, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples


def _summary(family: _Family, labels: Mapping[str, str], latency: Any) -> None:
    quantiles = (("0.5", latency.p50_s), ("0.9", latency.p90_s), ("0.99", latency.p99_s))
    for quantile, value in quantiles:
        family.add({**labels, "quantile": quantile}, float(value))
    # No _sum: the quantiles and mean cover a recent window only, so a sum derived from
    # them could go down, and rate() over it would lie. _count is all-time.
    family.add(labels, float(latency.count), "_count")


def render(predictors: Mapping[str, Any], *, ready: bool) -> str:
    """The text format for ``predictors`` (names to :class:`~servekit.Predictor`)."""
    f = {
        "up": _Family("servekit_ready", "gauge", "1 if the server accepts requests."),
        "req": _Family("servekit_requests_total", "counter", "Predict requests by outcome."),
        "inflight": _Family("servekit_requests_in_flight", "gauge", "Requests being served."),
        "lat": _Family(
            "servekit_request_duration_seconds", "summary", "Request latency, recent window."
        ),
        "depth": _Family("servekit_queue_depth", "gauge", "Items waiting in the batcher."),
        "batches": _Family("servekit_batches_total", "counter", "Batches run by the batcher."),
        "items": _Family("servekit_batch_items_total", "counter", "Items by batcher outcome."),
        "size": _Family("servekit_batch_size", "histogram", "Items per batch."),
        "wait": _Family(
            "servekit_queue_wait_seconds", "summary", "Time items waited in the queue."
        ),
        "util": _Family("servekit_batcher_utilisation", "gauge", "Share of time slots ran."),
    }
    f["up"].add({}, 1 if ready else 0)
    for name, predictor in predictors.items():
        stats = predictor.statistics()
        labels = {"model": name}
        f["req"].add({**labels, "outcome": "success"}, stats.succeeded)
        f["req"].add({**labels, "outcome": "error"}, stats.errors)
        f["inflight"].add(labels, stats.in_flight)
        _summary(f["lat"], labels, stats.latency)
        batcher = predictor.batcher
        if batcher is None:
            continue
        b = batcher.statistics()
        f["depth"].add(labels, b.queue_depth)
        f["batches"].add(labels, b.batches)
        for outcome in ("succeeded", "failed", "rejected", "expired", "cancelled", "closed"):
            f["items"].add({**labels, "outcome": outcome}, getattr(b, outcome))
        cumulative = 0
        sizes = dict(b.batch_sizes)
        for bound in sorted(sizes):
            cumulative += sizes[bound]
            f["size"].add({**labels, "le": str(bound)}, cumulative, "_bucket")
        f["size"].add({**labels, "le": "+Inf"}, cumulative, "_bucket")
        f["size"].add(labels, cumulative, "_count")
        total = sum(size * count for size, count in sizes.items())
        f["size"].add(labels, total, "_sum")
        _summary(f["wait"], labels, b.queue_wait)
        f["util"].add(labels, float(b.utilisation))
    lines = [line for family in f.values() if family.samples for line in family.lines()]
    return "\n".join(lines) + "\n"
