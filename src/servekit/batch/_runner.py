"""run_batch: stream a source through a predictor into a sink, chunk by chunk.

How a run goes:

1. The sink (and the error sink) open with a manifest of the run's settings and the
   source's identity. A fresh run refuses an existing output unless ``overwrite=True``;
   ``resume=True`` gets back the chunks already written and checks the manifest.
2. The source is read in chunks of ``chunk_size`` input rows, skipping finished chunks.
   Each chunk's rows become model inputs (one column, or a dict of columns), rows with
   NaN or infinity are failed at the ``validate`` stage, and the rest go through
   ``predictor.predict_many(..., return_exceptions=True)``: the predictor's back end
   (threads, processes) and its per-item error isolation apply. Rows whose failure is
   transient (:class:`~servekit.RetryableError`, a crashed worker, an overloaded
   back end) are retried up to ``retries`` times.
3. The chunk's failed rows go to the error sink, then its outputs (with the key and
   pass-through columns) to the sink, which records the chunk as done in the same
   atomic step. The order matters: a crash between the two leaves the chunk unfinished,
   so a resumed run redoes it and rewrites its errors (same part), never losing them.
4. After the last chunk the sinks publish their outputs atomically.

Chunks are predicted ``concurrency`` at a time on a small thread pool while the main
thread reads the next chunk and writes finished ones in order, so reading, the model
and writing overlap, and memory stays bounded by ``concurrency + 1`` chunks.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._predictor import Predictor
from ..errors import (
    BatchFailed,
    InvalidInput,
    Overloaded,
    RetryableError,
    ServekitError,
    UnsafePath,
    WorkerCrashed,
)
from ._sinks import CallableSink, ListSink, open_sink
from ._sources import open_source
from ._types import Chunk, RowError, Sink, Source

__all__ = ["BatchProgress", "BatchReport", "Runner", "RunnerJob", "run_batch"]

_TRANSIENT = (RetryableError, WorkerCrashed, Overloaded)
#: How many failed rows a report keeps as examples (the error sink has them all).
_SAMPLE = 100


@dataclasses.dataclass(frozen=True)
class BatchProgress:
    """Where a run is, passed to a ``progress`` callback after every chunk."""

    #: Input rows read so far in this run (resumed chunks not included).
    rows_read: int
    #: Rows with an output.
    rows_succeeded: int
    #: Rows that failed (read, validation, model).
    rows_failed: int
    #: Chunks written in this run.
    chunks_written: int
    #: Chunks skipped because a previous run had written them (``resume=True``).
    chunks_skipped: int
    #: Rows in the whole input, when the source knows (Parquet, arrays); else None.
    total_rows: int | None
    #: Seconds since the run started.
    elapsed_s: float

    @property
    def fraction(self) -> float | None:
        """Done share of the input, 0.0 to 1.0, when the total is known."""
        if not self.total_rows:
            return None
        return min(1.0, self.rows_done / self.total_rows)

    #: Input rows of the skipped chunks (``chunk_size`` each).
    rows_skipped: int = 0

    @property
    def rows_done(self) -> int:
        """Rows read in this run plus those of the skipped chunks."""
        return self.rows_read + self.rows_skipped


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """The outcome of :func:`run_batch`."""

    #: ``"completed"``, ``"completed_with_errors"`` (some rows failed; see the error
    #: output) or ``"failed"`` (stopped by ``max_error_rate``; raised with
    #: :class:`~servekit.BatchFailed`).
    status: str
    #: Input rows read in this run (rows of chunks skipped on resume not included).
    rows_read: int
    #: Rows with an output.
    rows_succeeded: int
    #: Rows that failed; each is in the error output.
    rows_failed: int
    #: Chunks written in this run.
    chunks_written: int
    #: Chunks skipped because an earlier run had written them.
    chunks_skipped: int
    #: Wall-clock seconds of the run.
    seconds: float
    #: Up to 100 of the failed rows, for a quick look.
    errors: tuple[RowError, ...] = ()
    #: Failed rows per stage (``read``, ``validate``, ``model``).
    failed_by_stage: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        """Rows read per second."""
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.status}: {self.rows_read:,} rows read, {self.rows_succeeded:,} "
            f"succeeded, {self.rows_failed:,} failed in {self.seconds:.2f} s "
            f"({self.rows_per_s:,.0f} rows/s); {self.chunks_written} chunks written, "
            f"{self.chunks_skipped} skipped"
        )

    def _repr_html_(self) -> str:
        rows = [
            ("status", self.status),
            ("rows read", f"{self.rows_read:,}"),
            ("succeeded", f"{self.rows_succeeded:,}"),
            ("failed", f"{self.rows_failed:,}"),
            ("seconds", f"{self.seconds:.2f}"),
            ("rows/s", f"{self.rows_per_s:,.0f}"),
            ("chunks written / skipped", f"{self.chunks_written} / {self.chunks_skipped}"),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        examples = "".join(
            f"<li>row {e.row}: {html.escape(e.stage)} {html.escape(e.code)}: "
            f"{html.escape(e.message)}</li>"
            for e in self.errors[:5]
        )
        more = f"<ul>{examples}</ul>" if examples else ""
        return f"<b>servekit BatchReport</b><table>{body}</table>{more}"


def run_batch(
    predictor: Predictor[Any, Any] | Any,
    source: Any,
    sink: Any,
    *,
    key: str | Sequence[str] | None = None,
    columns: str | Sequence[str] | None = None,
    passthrough: Sequence[str] = (),
    output: str = "prediction",
    chunk_size: int = 1000,
    error_sink: Any = None,
    max_error_rate: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | Callable[[BatchProgress], Any] = True,
    concurrency: int | None = None,
    retries: int = 3,
    root: str | os.PathLike[str] | None = None,
    runner: Runner | None = None,
) -> BatchReport:
    """Run ``predictor`` over every row of ``source`` and write the outputs to ``sink``.

    ``predictor`` is a :class:`~servekit.Predictor` (used as is; the host owns it) or
    anything a Predictor accepts (a Model or a batch function; made and closed here).
    ``source`` is a path (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``), a directory or
    glob pattern of such files (read as one input), a numpy array, a pandas DataFrame,
    an iterable, or a :class:`Source` such as
    :class:`SQLSource`. ``sink`` is a path (``.jsonl``, ``.csv``, ``.parquet``), a
    list, a callable, or a :class:`Sink` such as :class:`SQLSink`.

    Each row's model input is the column ``columns`` names, a dict of the columns it
    lists, or, with ``columns=None``, a dict of every column but the key and
    pass-through ones (a source of plain values, whose one column is ``input``, gives
    the value itself). Output rows hold the ``key`` columns (or, with no key, ``row``,
    the input row number), the ``passthrough`` columns, then the output: one column
    named ``output``, or one column per key when the model returns dicts.

    Failed rows go to ``error_sink`` (any sink; with their key, row number, ``stage``,
    ``code`` and ``message``); without one they are counted and sampled in the report.
    ``max_error_rate`` (0 to 1) stops the run with :class:`~servekit.BatchFailed` once
    more than that share of the rows read has failed (checked after each chunk).

    With ``resume=True`` the chunks a previous run wrote are skipped, and the output
    ends with every input row exactly once; ``overwrite=True`` replaces an existing
    output. ``progress`` is True (a tqdm bar when tqdm is installed and the output is
    a terminal or notebook), False, or a callable given a :class:`BatchProgress` after
    each chunk. ``concurrency`` chunks are in the model at once (default: one per
    worker of the predictor's back end, so worker processes never wait for the
    parent to write a chunk). ``root`` confines file inputs and outputs to a directory
    (:class:`~servekit.UnsafePath` otherwise), for runs started from requests.
    ``runner`` runs the chunks somewhere else: :class:`~servekit.batch.DaskRunner` on a
    Dask cluster, :class:`~servekit.batch.RayRunner` on Ray (see the distributed guide);
    the default runs them here.

    Returns a :class:`BatchReport`.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ValueError(f"concurrency must be an int >= 1 or None, got {concurrency!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if max_error_rate is not None and not 0.0 <= max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate!r}")
    keys = [key] if isinstance(key, str) else list(key or [])
    inputs = [columns] if isinstance(columns, str) else None if columns is None else list(columns)
    if root is not None:
        # Relative paths are relative to the root, and no path may leave it.
        source, sink, error_sink = (_inside(v, Path(root)) for v in (source, sink, error_sink))

    src: Source = open_source(source)
    if root is not None:
        from ._files import confine

        confine(src, root)  # every file of a multi-file input must be inside the root
    out: Sink = open_sink(sink)
    err: Sink | None = None if error_sink is None else open_sink(error_sink)
    if resume and isinstance(out, CallableSink | ListSink):
        raise ValueError(
            "resume=True needs a sink that records finished chunks (a file or SQLSink); "
            "a list or a callable cannot tell what an earlier run wrote"
        )
    owned = not isinstance(predictor, Predictor)
    model: Predictor[Any, Any] = Predictor(predictor) if owned else predictor
    described = src.describe()  # the input's identity: in the manifest, and its size
    manifest = {
        "servekit_batch": 1,
        "chunk_size": chunk_size,
        "key": keys,
        "columns": inputs,
        "passthrough": list(passthrough),
        "output": output,
        "source": described,
    }
    if concurrency is None:
        # One chunk per worker of the back end: while one chunk's results come back
        # and are written, the workers already run the next (Inline: 1; Processes(n):
        # n, each chunk split across the workers by predict_many).
        concurrency = max(1, model.backend.capacity)
    run = _Run(
        model,
        keys=keys,
        inputs=inputs,
        passthrough=list(passthrough),
        output=output,
        retries=retries,
        single=isinstance(columns, str),
    )
    started = time.monotonic()
    published = False
    try:
        done = out.open(manifest, resume=resume, overwrite=overwrite)
        if err is not None:
            err.open({**manifest, "errors": True}, resume=resume, overwrite=overwrite)
            if resume:
                from ._attempts import settle

                settle(out, err)  # error parts a cluster run committed but had not settled
        start_chunk = 0
        while start_chunk in done:
            start_chunk += 1
        total = described.get("rows")
        if total is None and described.get("shape"):
            total = described["shape"][0]  # numpy arrays: rows are the first axis
        tracker = _Progress(progress, total if isinstance(total, int) else None, started)
        tracker.skipped_rows = min(len(done) * chunk_size, total or len(done) * chunk_size)
        counts = _Counts(skipped=len(done))

        def write(chunk: Chunk, result: _ChunkResult) -> None:
            read = counts.read + chunk.size
            failed = counts.failed + len(result.errors)
            if max_error_rate is not None and failed / read > max_error_rate:
                # Checked before the chunk is written: a resumed run (after the cause is
                # fixed) redoes this chunk instead of keeping its failures.
                seen = dataclasses.replace(counts, sample=list(counts.sample))
                seen.add(chunk, result)
                seen.chunks -= 1
                raise BatchFailed(
                    f"{failed} of {read} rows failed, more than max_error_rate="
                    f"{max_error_rate}; the {counts.chunks} chunks written before are kept: "
                    "fix the cause and run again with resume=True",
                    report=seen.report("failed", time.monotonic() - started),
                )
            if err is not None:
                err.write_chunk(
                    chunk.index, _error_columns(result.errors, keys), len(result.errors)
                )
            out.write_chunk(chunk.index, result.columns, result.n_rows)
            counts.add(chunk, result)
            tracker.update(counts)

        if runner is None:
            chunks = (c for c in src.chunks(chunk_size, start_chunk) if c.index not in done)
            _pipeline(chunks, run.predict_chunk, write, concurrency)
        else:
            job = RunnerJob(
                src,
                run,
                out,
                err,
                frozenset(done),
                chunk_size,
                max_error_rate,
                counts,
                tracker,
                started,
            )
            runner._execute(job, write)
        out.finish()
        if err is not None:
            err.finish()
        published = True
        tracker.close()
        status = "completed_with_errors" if counts.failed else "completed"
        return counts.report(status, time.monotonic() - started)
    finally:
        if not published:
            out.close()
            if err is not None:
                err.close()
        src.close()
        if owned:
            model.close()


class Runner(Protocol):
    """Where :func:`run_batch` runs the chunks (:class:`~servekit.batch.DaskRunner`,
    :class:`~servekit.batch.RayRunner`)."""

    def _execute(self, job: RunnerJob, write: Callable[[Chunk, _ChunkResult], None]) -> None:
        """Run every chunk of ``job`` not in ``job.done`` and write it, through ``write``
        (as a local run does) or from the workers; return when all are written."""
        ...


@dataclasses.dataclass(frozen=True)
class RunnerJob:
    """What a :class:`Runner` is given: the opened source and sinks, the settings, and
    the counts and progress of the run (updated for chunks written by workers)."""

    source: Source
    run: _Run
    sink: Sink
    error_sink: Sink | None
    #: Chunks an earlier run wrote (``resume=True``): not to be run again.
    done: frozenset[int]
    chunk_size: int
    max_error_rate: float | None
    counts: _Counts
    tracker: _Progress
    started: float


def _pipeline(
    chunks: Iterator[Chunk],
    predict: Callable[[Chunk], _ChunkResult],
    write: Callable[[Chunk, _ChunkResult], None],
    concurrency: int,
) -> None:
    """Predict up to ``concurrency`` chunks at once, one read ahead; write in order."""
    pending: list[tuple[Chunk, Future[_ChunkResult]]] = []
    with ThreadPoolExecutor(concurrency, thread_name_prefix="servekit-batch") as pool:
        try:
            for chunk in chunks:
                pending.append((chunk, pool.submit(predict, chunk)))
                while len(pending) > concurrency:
                    first, future = pending.pop(0)
                    write(first, future.result())
            for first, future in pending:
                write(first, future.result())
            pending.clear()
        finally:
            for _, future in pending:
                future.cancel()


@dataclasses.dataclass
class _ChunkResult:
    columns: dict[str, Any]
    n_rows: int
    errors: list[RowError]


@dataclasses.dataclass
class _Counts:
    skipped: int = 0
    read: int = 0
    succeeded: int = 0
    failed: int = 0
    chunks: int = 0
    by_stage: dict[str, int] = dataclasses.field(default_factory=dict)
    sample: list[RowError] = dataclasses.field(default_factory=list)

    def add(self, chunk: Chunk, result: _ChunkResult) -> None:
        self.read += chunk.size
        self.succeeded += result.n_rows
        self.failed += len(result.errors)
        self.chunks += 1
        for error in result.errors:
            self.by_stage[error.stage] = self.by_stage.get(error.stage, 0) + 1
            if len(self.sample) < _SAMPLE:
                self.sample.append(error)

    def report(self, status: str, seconds: float) -> BatchReport:
        return BatchReport(
            status=status,
            rows_read=self.read,
            rows_succeeded=self.succeeded,
            rows_failed=self.failed,
            chunks_written=self.chunks,
            chunks_skipped=self.skipped,
            seconds=seconds,
            errors=tuple(self.sample),
            failed_by_stage=dict(self.by_stage),
        )


class _Run:
    """Turns a chunk into model inputs, runs them, and builds the output columns."""

    def __init__(
        self,
        predictor: Predictor[Any, Any],
        *,
        keys: list[str],
        inputs: list[str] | None,
        passthrough: list[str],
        output: str,
        retries: int,
        single: bool,
    ) -> None:
        self.predictor = predictor
        self.single = single  # columns named one column (a str): its value is the input
        self.keys = keys
        self.inputs = inputs
        self.passthrough = passthrough
        self.output = output
        self.retries = retries

    def _items(self, chunk: Chunk) -> list[Any]:
        cols = chunk.columns
        names = self.inputs
        if names is None:
            excluded = set(self.keys) | set(self.passthrough)
            names = [c for c in cols if c not in excluded]
            if names == ["input"]:
                return list(cols["input"])
        missing = [c for c in [*names, *self.keys, *self.passthrough] if c not in cols]
        if missing:
            from ..errors import SourceError

            raise SourceError(
                f"the input has no column {missing[0]!r}; its columns are {list(cols)}"
            )
        if self.single:
            return list(cols[names[0]])
        return [{c: cols[c][i] for c in names} for i in range(len(chunk))]

    def _numeric_column(self, chunk: Chunk) -> np.ndarray[Any, Any] | None:
        """The chunk's input column when each row's input is a row of one numeric
        numpy array (so NaN can be found for all rows at once); else None."""
        if self.single and self.inputs is not None:
            name = self.inputs[0]
        elif self.inputs is None and list(chunk.columns) == ["input"]:
            name = "input"
        else:
            return None
        column = chunk.columns.get(name)
        if isinstance(column, np.ndarray) and column.dtype.kind in "fc" and column.ndim >= 1:
            return column
        return None

    def predict_chunk(self, chunk: Chunk) -> _ChunkResult:
        errors = list(chunk.errors)
        items = self._items(chunk)
        outcomes: list[Any] = [None] * len(items)
        todo: list[int] = []
        validate = self.predictor.validates
        signature = self.predictor.signature
        nan = "the row holds NaN or infinity, which the model is not given"
        column = self._numeric_column(chunk)
        if column is not None and not validate:
            # The fast path of numeric columns (a Parquet vector column): one vectorised
            # check for the whole chunk instead of one per row.
            finite = np.isfinite(column.reshape(len(column), -1)).all(axis=1)
            for bad in np.flatnonzero(~finite).tolist():
                outcomes[bad] = InvalidInput(nan)
            todo = np.flatnonzero(finite).tolist()
        for i, item in enumerate(items if column is None or validate else ()):
            if validate:
                # Validated here (the predictor checks again, cheaply) so that values
                # parsed from text ("nan", "inf") are seen as the numbers they become.
                try:
                    item = items[i] = signature.validate(item)
                except InvalidInput as exc:
                    outcomes[i] = exc
                    continue
            if _non_finite(item):
                outcomes[i] = InvalidInput(nan)
            else:
                todo.append(i)
        attempt = 0
        while todo:
            results = self.predictor.predict_many([items[i] for i in todo], return_exceptions=True)
            retry = []
            for i, result in zip(todo, results, strict=True):
                outcomes[i] = result
                if isinstance(result, _TRANSIENT):
                    retry.append(i)
            if not retry or attempt >= self.retries:
                break
            attempt += 1
            time.sleep(min(2.0, 0.05 * 2**attempt))
            todo = retry
        good = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException)]
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                errors.append(self._row_error(chunk, i, outcome))
        errors.sort(key=lambda e: e.row)
        columns: dict[str, Any] = {}
        if not self.keys:
            columns["row"] = [chunk.rows[i] for i in good]
        for name in [*self.keys, *self.passthrough]:
            columns[name] = _take(chunk.columns[name], good)
        columns.update(self._outputs([outcomes[i] for i in good]))
        return _ChunkResult(columns, len(good), errors)

    def _row_error(self, chunk: Chunk, i: int, error: BaseException) -> RowError:
        stage = "validate" if isinstance(error, InvalidInput) else "model"
        code = error.code if isinstance(error, ServekitError) else "model_error"
        key = {name: _plain(chunk.columns[name][i]) for name in self.keys}
        return RowError(chunk.rows[i], stage, code, str(error) or type(error).__name__, key)

    def _outputs(self, values: list[Any]) -> dict[str, Any]:
        if values and all(hasattr(v, "model_dump") for v in values):
            values = [v.model_dump() for v in values]
        if values and all(isinstance(v, dict) for v in values):
            names: dict[str, None] = {}
            for v in values:
                names.update(dict.fromkeys(v))
            return {name: [v.get(name) for v in values] for name in names}
        if values and all(isinstance(v, np.ndarray) for v in values):
            shape = values[0].shape
            if all(v.shape == shape for v in values):
                return {self.output: np.stack(values)}
        return {self.output: values}


def _take(values: Any, index: list[int]) -> Any:
    if isinstance(values, np.ndarray):
        return values[index]
    return [values[i] for i in index]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _non_finite(item: Any) -> bool:
    """True if a row holds NaN or infinity (in a float, a float array, or a dict/list
    of them); such rows fail validation instead of reaching the model."""
    if isinstance(item, float):
        return not math.isfinite(item)
    if isinstance(item, np.ndarray):
        return item.dtype.kind in "fc" and not bool(np.isfinite(item).all())
    if isinstance(item, np.floating):
        return not bool(np.isfinite(item))
    if isinstance(item, dict):
        return any(_non_finite(v) for v in item.values())
    if isinstance(item, list | tuple):
        return any(_non_finite(v) for v in item)
    if hasattr(item, "model_dump"):  # a pydantic model from validation
        return any(_non_finite(v) for v in vars(item).values())
    return False


def _error_columns(errors: list[RowError], keys: list[str]) -> dict[str, Any]:
    columns: dict[str, Any] = {"row": [e.row for e in errors]}
    for name in keys:
        columns[name] = [e.key.get(name) for e in errors]
    columns["stage"] = [e.stage for e in errors]
    columns["code"] = [e.code for e in errors]
    columns["message"] = [e.message for e in errors]
    return columns


def _inside(value: Any, root: Path) -> Any:
    """``value`` as a path under ``root`` if it is a path (else as it is); raises
    UnsafePath if it leaves the root, through ``..`` or a symbolic link."""
    if not isinstance(value, str | os.PathLike):
        return value
    base = Path(os.path.abspath(root))
    resolved = Path(os.path.abspath(base / value))
    real_base = Path(os.path.realpath(base))
    if not (
        resolved.is_relative_to(base) and Path(os.path.realpath(resolved)).is_relative_to(real_base)
    ):
        raise UnsafePath(
            f"{str(value)!r} is outside the batch root {str(root)!r}; give a path inside it"
        )
    return resolved


class _Progress:
    """Reports progress to a callback or a tqdm bar."""

    def __init__(
        self, progress: bool | Callable[[BatchProgress], Any], total: int | None, started: float
    ) -> None:
        self.callback = progress if callable(progress) else None
        self.total = total
        self.started = started
        self.skipped_rows = 0
        self.bar: Any = None
        if progress is True and _interactive():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="rows", desc="servekit batch")

    def update(self, counts: _Counts) -> None:
        state = BatchProgress(
            rows_read=counts.read,
            rows_succeeded=counts.succeeded,
            rows_failed=counts.failed,
            chunks_written=counts.chunks,
            chunks_skipped=counts.skipped,
            total_rows=self.total,
            elapsed_s=time.monotonic() - self.started,
            rows_skipped=self.skipped_rows,
        )
        if self.callback is not None:
            self.callback(state)
        if self.bar is not None:
            self.bar.n = state.rows_done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())
