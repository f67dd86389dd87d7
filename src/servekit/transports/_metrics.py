"""``GET /metrics``: the Prometheus text format of a service's metrics.

The families, their names and help texts, and their values come from
:func:`servekit.metrics.collect`, the one description every export reads (the
``prometheus_client`` collector and the OpenTelemetry instruments too), so this text
and theirs cannot drift apart. Built at scrape time from the ``statistics()``
snapshots: nothing runs between scrapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..metrics import CONTENT_TYPE, collect, render_text

__all__ = ["CONTENT_TYPE", "render"]


def render(predictors: Mapping[str, Any], *, ready: bool, jobs: Any = None) -> str:
    """The text format for ``predictors`` (names to :class:`~servekit.Predictor`) and,
    when given, a :class:`~servekit.jobs.JobQueue` or a mapping of model names to
    queues."""
    return render_text(collect(predictors, ready=ready, jobs=jobs))
