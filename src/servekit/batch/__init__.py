"""servekit.batch: offline batch inference over files, tables and iterables.

:func:`run_batch` streams a source through a predictor into a sink in chunks, with
bounded memory, per-row errors, key columns that join outputs back to inputs, and
checkpoints that let an interrupted run resume where it stopped. The same run goes to
a Dask or Ray cluster with ``runner=DaskRunner(client)`` or ``runner=RayRunner()``.

>>> from servekit.batch import run_batch
>>> out = []
>>> report = run_batch(lambda xs: [x * 2 for x in xs], [1, 2, 3], out, progress=False)
>>> report.status, [row["prediction"] for row in out]
('completed', [2, 4, 6])
"""

from __future__ import annotations

from ._dask import DaskRunner
from ._filesinks import CSVSink, JSONLSink, ParquetSink
from ._jobs import BatchJob, BatchRunSpec
from ._parquetsource import ParquetSource
from ._ray import RayRunner
from ._runner import BatchProgress, BatchReport, Runner, run_batch
from ._sinks import CallableSink, ListSink, columns_to_rows, open_sink
from ._sources import ArraySource, DataFrameSource, IterableSource, open_source
from ._sqlsink import SQLSink
from ._sqlsource import SQLSource
from ._textsources import CSVSource, JSONLSource
from ._types import Chunk, RowError, Sink, Source

__all__ = [
    "ArraySource",
    "BatchJob",
    "BatchProgress",
    "BatchReport",
    "BatchRunSpec",
    "CSVSink",
    "CSVSource",
    "CallableSink",
    "Chunk",
    "DaskRunner",
    "DataFrameSource",
    "IterableSource",
    "JSONLSink",
    "JSONLSource",
    "ListSink",
    "ParquetSink",
    "ParquetSource",
    "RayRunner",
    "RowError",
    "Runner",
    "SQLSink",
    "SQLSource",
    "Sink",
    "Source",
    "columns_to_rows",
    "open_sink",
    "open_source",
    "run_batch",
]
