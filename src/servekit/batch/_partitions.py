"""Partitions: how a distributed run splits its chunks, and what a worker does with one.

Shared by :class:`~servekit.batch.DaskRunner` and :class:`~servekit.batch.RayRunner`.

The unit of work is the **partition**, a range of consecutive chunks; the unit of the
checkpoint stays the **chunk** (``chunk_size`` rows, numbered as in a local run), so a
resumed run redoes only the chunks no partition wrote, and a partition that is run
twice (its worker died, the cluster retried it) commits its parts once: the first
attempt to finish wins (``_attempts``), and the output holds every row exactly once.

How an input is split (``plan``):

* **Parquet**: ranges of chunks; a worker opens the file itself and jumps to the row
  group holding its first row from the file's metadata (``ParquetSource`` does that).
* **CSV** and **JSON Lines**: byte ranges. The driver reads the file once, tokenising
  CSV records (quoted fields may hold newlines) or counting non-blank lines, and notes
  the byte offset where each partition's first row starts; a worker seeks there and
  parses only its range, with the same rules as a local read (the same row numbers,
  the same ``malformed_row`` messages, line numbers included). CSV byte ranges need an
  ASCII-compatible encoding (UTF-8, Latin-1...); other encodings are read on the driver.
* **SQL with key ranges** (an ``SQLSource`` given ``connect`` and ``partition_key``):
  the driver reads the key column once, in key order (``SELECT key FROM (query)
  ORDER BY key``: portable, one pass, no ``NTILE``), and notes the key that starts
  each chunk; a partition is a run of chunks, bounded by the keys starting its first
  chunk and the next partition's, so its rows are exactly those chunks' rows, and a
  worker numbers them from its first chunk as a local run does. A worker opens its own
  connection with ``connect()`` and runs ``SELECT * FROM (query) WHERE key >= ? AND
  key < ? ORDER BY key``, bounds bound as parameters; if the range holds a different
  number of rows than planned (the table changed), the partition fails.
* **Everything else** (arrays, DataFrames, iterables, SQL queries, custom sources):
  the driver reads the chunks and ships each partition's rows to a worker, a few
  partitions ahead of the workers, so memory stays bounded.

On a worker, a partition's chunks are predicted one by one on the worker's cached
predictor (the model is loaded once per worker, not per partition) by the same code as
a local run (``_Run.predict_chunk``: validation, NaN checks, retries of transient
errors, per-row errors). File sinks are written by the workers (parts in
``<output>.parts/``, each atomic: the path must be on storage every worker sees); other
sinks (SQL, lists, callables) get the outputs back on the driver, written in order.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .._predictor import Predictor
from ..backends import Inline
from ..errors import SourceError
from ._attempts import Attempt, settle
from ._filesinks import _PartFileSink
from ._parquetsource import ParquetSource
from ._runner import _SAMPLE, RunnerJob, _ChunkResult, _Counts, _error_columns, _Run
from ._sourcebase import _chunk_records
from ._sqlsource import SQLSource
from ._textsources import _UTF8_BOM, CSVSource, JSONLSource, _lines, _parse_object
from ._types import Chunk, RowError, Sink

__all__ = [
    "ChunkStat",
    "DriverWriter",
    "Partition",
    "PartitionResult",
    "Tally",
    "WorkSpec",
    "WorkerModel",
    "default_partitions",
    "plan",
    "run_partition",
]

#: Partitions per worker when the runner is not told a size: enough to balance uneven
#: partitions and to keep a retried partition small, few enough to keep overhead low.
PER_WORKER = 4
_ASCII_COMPATIBLE = {"utf-8", "utf-8-sig", "ascii", "latin-1", "iso8859-1", "cp1252"}


@dataclasses.dataclass(slots=True)
class Partition:
    """A range of consecutive chunks, run by one worker task."""

    #: The partition's number, from 0, in input order.
    index: int
    #: Its first chunk's number (chunks are numbered as in a local run).
    first_chunk: int
    #: How many chunks it covers (the last partition's last chunk may be short).
    n_chunks: int
    #: Chunks of the range an earlier run already wrote (``resume=True``): not redone.
    skip: frozenset[int] = frozenset()
    #: Byte range of its rows, for CSV and JSON Lines inputs.
    offset: int = 0
    stop: int = 0
    #: Lines of the file before ``offset`` (CSV: so messages give the file's line numbers).
    lines_before: int = 0
    #: The rows themselves, when the driver read them (in-memory inputs, SQL, iterables).
    chunks: list[Chunk] | None = None
    #: Key range of its rows, for SQL key ranges: ``low <= key < high`` (None: open).
    low: Any = None
    high: Any = None
    #: Rows it holds, when the plan knows (SQL key ranges: checked on the worker).
    n_rows: int = -1
    #: Byte ranges ``(file, offset, stop, lines before)`` of a multi-file text input.
    segments: list[tuple[int, int, int, int]] | None = None


@dataclasses.dataclass(slots=True)
class ChunkStat:
    """What a worker reports for one chunk it ran."""

    index: int
    #: Input rows the chunk covers.
    size: int
    #: Rows with an output.
    n_rows: int
    errors: list[RowError]
    #: Rows that failed (``len(errors)``; given alone in progress reports).
    n_failed: int = -1

    def __post_init__(self) -> None:
        if self.n_failed < 0:
            self.n_failed = len(self.errors)


@dataclasses.dataclass(slots=True)
class PartitionResult:
    """What a worker returns for a partition."""

    index: int
    stats: list[ChunkStat]
    #: The outputs, when the driver writes them (SQL, list and callable sinks).
    results: list[_ChunkResult] | None = None
    #: Set when the partition stopped for ``max_error_rate``: why.
    failure: str | None = None
    #: The chunk that went over ``max_error_rate`` (counted in the report, not written).
    unwritten: ChunkStat | None = None


@dataclasses.dataclass(slots=True)
class WorkSpec:
    """Everything a worker needs besides the model and the partition (picklable)."""

    #: Reads a partition from the input (None: partitions carry their rows).
    reader: _Reader | None
    chunk_size: int
    keys: list[str]
    inputs: list[str] | None
    passthrough: list[str]
    output: str
    retries: int
    single: bool
    #: The sinks, when workers write them (file sinks); else None.
    sink: Sink | None
    error_sink: Sink | None
    max_error_rate: float | None


# -- the model on a worker -------------------------------------------------------------


class WorkerModel:
    """The model of a run on one worker: unpickled and loaded on first use, then kept
    for every partition the worker runs; closed by its owner (a Dask worker plugin's
    teardown, a Ray actor's end)."""

    def __init__(self, payload: bytes, validate: bool) -> None:
        """``payload`` is the model as cloudpickle bytes (as the Processes back end sends)."""
        self.payload = payload
        self.validate = validate
        self.digest = model_digest(payload)
        self._lock = threading.Lock()
        self._predictor: Predictor[Any, Any] | None = None
        #: How many times the model was loaded here (1 on a healthy worker).
        self.loads = 0

    def predictor(self) -> Predictor[Any, Any]:
        """The started predictor (loading the model the first time)."""
        with self._lock:
            if self._predictor is None:
                import cloudpickle

                model = cloudpickle.loads(self.payload)
                predictor: Predictor[Any, Any] = Predictor(
                    model, backend=Inline(), validate=self.validate
                )
                predictor.start()
                self._predictor = predictor
                self.loads += 1
            return self._predictor

    def close(self) -> None:
        """Close the predictor (the model's ``close``); calling it again does nothing."""
        with self._lock:
            predictor, self._predictor = self._predictor, None
        if predictor is not None:
            predictor.close()


def model_digest(payload: bytes) -> str:
    """A short name for a pickled model (its sha256, 16 hex digits)."""
    return hashlib.sha256(payload).hexdigest()[:16]


def model_payload(job: RunnerJob) -> tuple[bytes, bool]:
    """The run's model as cloudpickle bytes, and whether workers validate inputs."""
    import cloudpickle

    predictor = job.run.predictor
    try:
        payload = cloudpickle.dumps(predictor.model)
    except Exception as exc:
        raise TypeError(
            f"the model cannot be pickled to go to the cluster's workers ({exc}); define it "
            "at module level or make its state picklable, and load heavy state in load()"
        ) from exc
    return payload, predictor.validates


# -- planning --------------------------------------------------------------------------


def default_partitions(
    n_chunks: int | None, workers: int, partition_rows: int | None, chunk_size: int
) -> int:
    """Chunks per partition: from ``partition_rows`` (rounded up to whole chunks), else
    about ``PER_WORKER`` partitions per worker (4 chunks each when the size is unknown)."""
    if partition_rows is not None:
        return max(1, math.ceil(partition_rows / chunk_size))
    if n_chunks is None:
        return 4
    return max(1, math.ceil(n_chunks / (PER_WORKER * max(1, workers))))


def make_spec(job: RunnerJob, reader: _Reader | None) -> WorkSpec:
    """The picklable settings of ``job``'s partitions; file sinks go to the workers."""
    run = job.run
    on_workers = isinstance(job.sink, _PartFileSink) and (
        job.error_sink is None or isinstance(job.error_sink, _PartFileSink)
    )
    return WorkSpec(
        reader=reader,
        chunk_size=job.chunk_size,
        keys=list(run.keys),
        inputs=None if run.inputs is None else list(run.inputs),
        passthrough=list(run.passthrough),
        output=run.output,
        retries=run.retries,
        single=run.single,
        sink=job.sink if on_workers else None,
        error_sink=job.error_sink if on_workers else None,
        # Written on the driver, the run's own check applies (exactly as a local run).
        max_error_rate=job.max_error_rate if on_workers else None,
    )


def plan(
    job: RunnerJob, workers: int, partition_rows: int | None
) -> tuple[_Reader | None, Iterator[Partition]]:
    """How ``job``'s input is split: a reader the workers use (None when partitions
    carry their rows) and the partitions, skipping those whose chunks are all done."""
    source, chunk_size = job.source, job.chunk_size
    reader: _Reader | None = None
    parts: Iterator[Partition]
    from ._files import _Many, plan_files

    if isinstance(source, _Many):
        planned_files = plan_files(source, chunk_size, workers, partition_rows)
        if planned_files is None:
            return None, _shipped(job, workers, partition_rows)
        reader, parts = planned_files
    elif isinstance(source, ParquetSource):
        n_rows = int(source.describe()["rows"])
        reader = _ParquetReader(source._path, source._columns)
        ranges = _ranges(math.ceil(n_rows / chunk_size), workers, partition_rows, chunk_size)
        parts = (Partition(i, first, n) for i, (first, n) in enumerate(ranges))
    elif isinstance(source, CSVSource) and _ascii_compatible(source._encoding):
        planned = _CSVReader.plan(source, chunk_size, workers, partition_rows)
        if planned is None:
            return None, _shipped(job, workers, partition_rows)
        reader, parts = planned
    elif isinstance(source, JSONLSource):
        reader, parts = _JSONLReader.plan(source, chunk_size, workers, partition_rows)
    elif isinstance(source, SQLSource) and source._connect is not None:
        from ._sqlranges import SQLRangeReader

        reader, parts = SQLRangeReader.plan(source, chunk_size, workers, partition_rows)
    else:
        parts = _shipped(job, workers, partition_rows)
        return None, parts
    return reader, _with_skips(parts, job.done)


def _ascii_compatible(encoding: str) -> bool:
    return codecs.lookup(encoding).name in _ASCII_COMPATIBLE


def _ranges(
    n_chunks: int, workers: int, partition_rows: int | None, chunk_size: int
) -> list[tuple[int, int]]:
    per = default_partitions(n_chunks, workers, partition_rows, chunk_size)
    return [(first, min(per, n_chunks - first)) for first in range(0, n_chunks, per)]


def _with_skips(parts: Iterator[Partition], done: frozenset[int]) -> Iterator[Partition]:
    for part in parts:
        chunks = range(part.first_chunk, part.first_chunk + part.n_chunks)
        skip = frozenset(c for c in chunks if c in done)
        if len(skip) < part.n_chunks:
            part.skip = skip
            yield part


def _shipped(job: RunnerJob, workers: int, partition_rows: int | None) -> Iterator[Partition]:
    """Partitions holding rows the driver reads (lazily: as the runner asks for more)."""
    described = job.source.describe()
    total = described.get("rows")
    if total is None and described.get("shape"):
        total = described["shape"][0]
    n_chunks = math.ceil(total / job.chunk_size) if isinstance(total, int) else None
    per = default_partitions(n_chunks, workers, partition_rows, job.chunk_size)
    start = 0
    while start in job.done:
        start += 1
    chunks = (c for c in job.source.chunks(job.chunk_size, start) if c.index not in job.done)
    index = 0
    group: list[Chunk] = []
    for chunk in chunks:
        # A partition covers the chunks ``per`` of them share (chunk // per), so the
        # partitions of a resumed run are the same as the first run's.
        if group and chunk.index // per != group[0].index // per:
            yield Partition(index, group[0].index, len(group), chunks=group)
            index += 1
            group = []
        group.append(chunk)
    if group:
        yield Partition(index, group[0].index, len(group), chunks=group)


# -- readers (run on the workers) ------------------------------------------------------


class _Reader:
    """Reads one partition's chunks from the input on a worker (picklable)."""

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        raise NotImplementedError


@dataclasses.dataclass(slots=True)
class _ParquetReader(_Reader):
    path: Path
    columns: list[str] | None

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        source = ParquetSource(self.path, columns=self.columns)
        try:
            chunks = source.chunks(chunk_size, part.first_chunk)
            yield from itertools.islice(chunks, part.n_chunks)
        finally:
            source.close()


def _open_binary(source: CSVSource | JSONLSource) -> BinaryIO:
    try:
        return open(source._path, "rb")
    except OSError as exc:
        raise source._open_error(exc) from exc


def _binary_lines(path: Path, offset: int, stop: int) -> Iterator[bytes]:
    """The lines of ``path`` from byte ``offset`` up to ``stop``."""
    with open(path, "rb") as f:
        f.seek(offset)
        position = offset
        while position < stop:
            line = f.readline()
            if not line:
                return
            position += len(line)
            yield line


@dataclasses.dataclass(slots=True)
class _CSVReader(_Reader):
    path: Path
    columns: list[str] | None
    delimiter: str
    encoding: str
    names: list[str]
    width: int
    positions: list[int]

    @classmethod
    def plan(
        cls, source: CSVSource, chunk_size: int, workers: int, partition_rows: int | None
    ) -> tuple[_CSVReader, Iterator[Partition]] | None:
        """Read the file once, noting where each partition's first record starts; None
        for a file whose lines end in a lone carriage return (read on the driver)."""
        source._stat()
        # Bytes of the lines the csv reader has taken so far: it takes one line at a
        # time and no more than a record needs, so before each record this is where
        # the record starts (and reader.line_num the lines before it).
        consumed = [0]
        try:
            with _open_binary(source) as f:
                return cls._scan(source, f, consumed, chunk_size, workers, partition_rows)
        except _LoneCR:
            return None

    @classmethod
    def _scan(
        cls,
        source: CSVSource,
        f: BinaryIO,
        consumed: list[int],
        chunk_size: int,
        workers: int,
        partition_rows: int | None,
    ) -> tuple[_CSVReader, Iterator[Partition]]:
        """The scan of :meth:`plan` over the open file ``f``."""
        path = source._path
        encoding = source._encoding.removesuffix("-sig")

        def text_lines() -> Iterator[str]:
            first = True
            for line in f:
                consumed[0] += len(line)
                if b"\r" in line.rstrip(b"\r\n"):
                    raise _LoneCR  # a text-mode read splits lines there too
                if first:
                    first = False
                    if line.startswith(_UTF8_BOM) and source._encoding == "utf-8-sig":
                        line = line[len(_UTF8_BOM) :]
                yield line.decode(encoding, "surrogateescape")

        reader = csv.reader(text_lines(), delimiter=source._delimiter)
        header = source._header(reader)
        if header is None:
            names, width = list(source._columns or []), 0
            positions: list[int] = []
            starts: list[tuple[int, int]] = []
        else:
            names, positions = source._plan(header)
            width = len(header)
            # (offset, lines before) of every record that starts a chunk, where the
            # record before it parsed cleanly (the reader's state is fresh there).
            starts, clean = [], True
            for count, (offset, lines_before, ok) in enumerate(csv_record_starts(reader, consumed)):
                if count % chunk_size == 0:
                    starts.append((offset, lines_before) if clean else (-1, 0))
                clean = ok
        end = consumed[0]
        this = cls(
            path, source._columns, source._delimiter, source._encoding, names, width, positions
        )
        return this, _byte_partitions(starts, end, workers, partition_rows, chunk_size)

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        encoding = self.encoding.removesuffix("-sig")
        lines = (
            line.decode(encoding, "surrogateescape")
            for line in _binary_lines(self.path, part.offset, part.stop)
        )
        # Empty lines before the range are read as nothing, but count in line_num: the
        # messages name the same line numbers as a local read.
        padded = itertools.chain(itertools.repeat("\n", part.lines_before), lines)
        reader = csv.reader(padded, delimiter=self.delimiter)
        source = CSVSource(
            self.path, columns=self.columns, delimiter=self.delimiter, encoding=self.encoding
        )
        records = source._records(reader, self.width, self.positions, 0)
        yield from _chunk_records(records, self.names, chunk_size, part.first_chunk)


class _LoneCR(Exception):
    """A CSV line holds a carriage return not followed by a newline."""


def csv_record_starts(reader: Any, consumed: list[int]) -> Iterator[tuple[int, int, bool]]:
    """(byte offset, lines before, parsed cleanly) of every non-empty record ``reader``
    reads, where ``consumed[0]`` counts the bytes its lines have taken so far. A record
    that fails to parse counts as a record (``csv.Error``: parsed cleanly False)."""
    while True:
        lines_before, offset = reader.line_num, consumed[0]
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield offset, lines_before, False
            continue
        if record:
            yield offset, lines_before, True


def _byte_partitions(
    starts: list[tuple[int, int]],
    end: int,
    workers: int,
    partition_rows: int | None,
    chunk_size: int,
) -> Iterator[Partition]:
    """Partitions from the start of each chunk (``(-1, 0)``: cannot start one there)."""
    per = default_partitions(len(starts), workers, partition_rows, chunk_size)
    cuts = [c for c in range(0, len(starts), per) if starts[c][0] >= 0]
    if starts and (not cuts or cuts[0] != 0):
        cuts.insert(0, 0)
    for i, first in enumerate(cuts):
        last = cuts[i + 1] if i + 1 < len(cuts) else len(starts)
        stop = starts[last][0] if last < len(starts) else end
        offset, lines_before = starts[first]
        yield Partition(i, first, last - first, offset=offset, stop=stop, lines_before=lines_before)


@dataclasses.dataclass(slots=True)
class _JSONLReader(_Reader):
    path: Path
    names: list[str]

    @classmethod
    def plan(
        cls, source: JSONLSource, chunk_size: int, workers: int, partition_rows: int | None
    ) -> tuple[_JSONLReader, Iterator[Partition]]:
        """Read the file once, noting where each partition's first line starts."""
        source._stat()
        names = source._columns
        starts: list[tuple[int, int]] = []
        with _open_binary(source) as f:
            position, count = 0, 0
            for number, line in enumerate(f):
                bom = number == 0 and line.startswith(_UTF8_BOM)
                body = line[len(_UTF8_BOM) :] if bom else line
                if body.strip():
                    if names is None:
                        obj = _parse_object(body)
                        if isinstance(obj, dict):
                            names = [str(k) for k in obj]
                    if count % chunk_size == 0:
                        starts.append((position, 0))
                    count += 1
                position += len(line)
        if names is None:
            names = []
        if starts:
            starts[0] = (0, 0)  # from the file's start: blank lines, a byte order mark
        this = cls(source._path, names)
        return this, _byte_partitions(starts, position, workers, partition_rows, chunk_size)

    def read(self, part: Partition, chunk_size: int) -> Iterator[Chunk]:
        raw = _binary_lines(self.path, part.offset, part.stop)
        # From the file's start, _lines also removes a byte order mark.
        lines = _lines(raw) if part.offset == 0 else (line for line in raw if line.strip())
        records = JSONLSource._records(lines, self.names)
        yield from _chunk_records(records, self.names, chunk_size, part.first_chunk)


# -- a partition on a worker -----------------------------------------------------------


def run_partition(
    spec: WorkSpec,
    predictor: Predictor[Any, Any],
    part: Partition,
    report: Callable[[ChunkStat], None] | None = None,
) -> PartitionResult:
    """Run ``part``'s chunks on ``predictor`` as a local run does, and write them to the
    spec's sinks (or return their outputs); ``report`` hears of each chunk done."""
    run = _Run(
        predictor,
        keys=spec.keys,
        inputs=spec.inputs,
        passthrough=spec.passthrough,
        output=spec.output,
        retries=spec.retries,
        single=spec.single,
    )
    if part.chunks is not None:
        chunks: Iterator[Chunk] = iter(part.chunks)
    elif spec.reader is not None:
        chunks = spec.reader.read(part, spec.chunk_size)
    else:  # pragma: no cover - plan() never makes such a partition
        raise SourceError("a partition without rows and an input without a reader")
    result = PartitionResult(part.index, [], None if spec.sink is not None else [])
    # File sinks: the attempt's parts are private until its one commit (see _attempts).
    attempt = None if spec.sink is None else Attempt(spec.sink, spec.error_sink)
    try:
        _run_chunks(spec, run, part, chunks, result, report, attempt)
    except BaseException:
        if attempt is not None:
            attempt.abandon()
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if attempt is not None:
        committed: PartitionResult = attempt.commit([s.index for s in result.stats], result)
        return committed
    return result


def _run_chunks(
    spec: WorkSpec,
    run: _Run,
    part: Partition,
    chunks: Iterator[Chunk],
    result: PartitionResult,
    report: Callable[[ChunkStat], None] | None,
    attempt: Attempt | None,
) -> None:
    read = failed = 0
    for chunk in chunks:
        if chunk.index in part.skip:
            continue
        out = run.predict_chunk(chunk)
        read += chunk.size
        failed += len(out.errors)
        stat = ChunkStat(chunk.index, chunk.size, out.n_rows, out.errors)
        if spec.max_error_rate is not None and failed / read > spec.max_error_rate:
            # Not written, so a resumed run redoes it (as a local run leaves it).
            result.failure = (
                f"{failed} of {read} rows of partition {part.index} (chunks "
                f"{part.first_chunk}..) failed, more than max_error_rate="
                f"{spec.max_error_rate}; the chunks written before are kept: fix the "
                "cause and run again with resume=True"
            )
            result.unwritten = stat
            break
        if attempt is not None:
            if spec.error_sink is not None:
                errors = _error_columns(out.errors, spec.keys)
                attempt.write_errors(chunk.index, errors, len(out.errors))
            attempt.write(chunk.index, out.columns, out.n_rows)
        else:
            assert result.results is not None
            result.results.append(out)
        result.stats.append(stat)
        if report is not None and spec.sink is not None:
            report(stat)  # (chunks the driver writes are counted when written)


# -- the driver's side -----------------------------------------------------------------


class Tally:
    """The run's counts and progress, from the chunks workers report: as they go
    (``progress``: counts only) and in their partitions' results (``record``: with the
    row errors). A chunk reported again (a partition redone after its worker died)
    replaces its earlier report, so every chunk counts once."""

    def __init__(self, job: RunnerJob) -> None:
        self.counts: _Counts = job.counts
        self.job = job
        self._seen: dict[int, ChunkStat] = {}
        self._final: set[int] = set()

    def progress(self, index: int, size: int, n_rows: int, n_failed: int) -> None:
        """A worker wrote chunk ``index``: count it until its partition's result comes."""
        if index in self._seen:
            return
        self._add(ChunkStat(index, size, n_rows, [], n_failed))
        self.job.tracker.update(self.counts)

    def record(self, stat: ChunkStat) -> None:
        """Count chunk ``stat.index`` from its partition's result."""
        old = self._seen.get(stat.index)
        if old is not None:
            self._add(old, -1)
        self._add(stat)
        self._final.add(stat.index)
        self.job.tracker.update(self.counts)

    def _add(self, stat: ChunkStat, sign: int = 1) -> None:
        c = self.counts
        c.read += sign * stat.size
        c.succeeded += sign * stat.n_rows
        c.failed += sign * stat.n_failed
        c.chunks += sign
        if sign > 0:
            self._seen[stat.index] = stat
        else:
            del self._seen[stat.index]

    def settle(self) -> None:
        """Failures by stage and the sample of failed rows, in input order (as a local
        run has them), from the chunks' results."""
        c = self.counts
        c.by_stage, c.sample = {}, []
        for index in sorted(self._final):
            for error in self._seen[index].errors:
                c.by_stage[error.stage] = c.by_stage.get(error.stage, 0) + 1
                if len(c.sample) < _SAMPLE:
                    c.sample.append(error)

    def failed(self, message: str, unwritten: ChunkStat | None) -> Exception:
        """The :class:`~servekit.BatchFailed` of a partition stopped by ``max_error_rate``;
        its report counts the chunk that went over (as a local run's does).

        It counts the chunks of finished partitions only: a partition still running is
        cancelled, its attempt is never committed, and a resumed run redoes its chunks,
        so chunks it reported on the way are not among those written.
        """
        from ..errors import BatchFailed

        for index in [i for i in self._seen if i not in self._final]:
            self._add(self._seen[index], -1)
        if unwritten is not None:
            self._final.add(unwritten.index)
            self._add(unwritten)
            self.counts.chunks -= 1
        self.settle()
        report = self.counts.report("failed", time.monotonic() - self.job.started)
        return BatchFailed(message, report=report)


class DriverWriter:
    """Takes finished partitions: counts those the workers wrote, and writes the chunks
    of the others through the run's own ``write`` (its checks, sinks, counts and
    progress), in partition order."""

    def __init__(
        self, job: RunnerJob, spec: WorkSpec, write: Callable[[Chunk, _ChunkResult], None]
    ) -> None:
        self.tally = Tally(job)
        self.on_workers = spec.sink is not None
        self.write = write
        self._held: dict[int, PartitionResult] = {}
        self._next = 0
        self._indices: list[int] = []
        self._finished: set[int] = set()
        self._job = job

    def expect(self, index: int) -> None:
        """Partition ``index`` was submitted (in submission order)."""
        self._indices.append(index)

    def finished(self, result: PartitionResult) -> None:
        """Partition ``result.index`` is done: count it, write what can be written in
        order, or raise BatchFailed for a partition that hit ``max_error_rate``. A
        second result for the same partition (a retried task) is ignored."""
        if result.index in self._finished:
            return
        self._finished.add(result.index)
        if result.results is None:
            for stat in result.stats:
                self.tally.record(stat)
            if result.failure is not None:
                raise self.tally.failed(result.failure, result.unwritten)
            return
        self._held[result.index] = result
        while self._next < len(self._indices) and self._indices[self._next] in self._held:
            done = self._held.pop(self._indices[self._next])
            self._next += 1
            assert done.results is not None
            for stat, out in zip(done.stats, done.results, strict=True):
                self.write(Chunk(stat.index, 0, stat.size, {}, []), out)

    def close(self) -> None:
        """Every partition is done: settle the counts of worker-written chunks, and
        publish the error parts of the committed attempts (``_attempts.settle``)."""
        if self.on_workers:
            self.tally.settle()
            settle(self._job.sink, self._job.error_sink)
